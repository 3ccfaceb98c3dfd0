"""Graph files without a daemon: loading with file/line/field errors, the injection-safe
templates, the pure planner (run through the real barrier, in any completion order), every
lint finding on its own fixture, and the Mermaid text."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from agentd.errors import FailedPrecondition
from agentd.graph import (
    TimelineRow,
    graph_mermaid,
    lint,
    load_graph,
    plan,
    render,
    timeline_mermaid,
)
from agentd.graph.model import Graph
from agentd.graph.pregel import check_writes
from agentd.policy import PolicyFileError, effective_policy, load_policy, load_stage_ceilings
from agentd.scheduler import barrier, channels

REPO = Path(__file__).resolve().parent.parent
CASES = REPO / "tests" / "graph_cases"

HEAD = """apiVersion: agentd/v1
kind: Graph
name: g
agent: integration
inputs: [start]
channels:
  start: {}
  out: {}
nodes:
"""


def load_text(tmp_path: Path, text: str) -> Graph:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    return load_graph(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(PolicyFileError) as caught:
        load_text(tmp_path, text)
    return [str(issue) for issue in caught.value.issues]


class TestLoad:
    def test_the_fixtures_and_the_shipped_example_load(self) -> None:
        """Every graph file in the repository is valid."""
        for path in [*CASES.glob("*.yaml"), *(REPO / "graphs").glob("*.yaml")]:
            assert load_graph(path).nodes, path

    def test_unknown_field_names_file_line_and_field(self, tmp_path: Path) -> None:
        """A misspelt key is an error at its own line, never ignored."""
        found = problems(tmp_path, HEAD + "  n:\n    argv: [/bin/true]\n    trigers: [start]\n")
        assert any(p.startswith(f"{tmp_path}/g.yaml:12: nodes.n.trigers:") for p in found), found

    def test_bad_reducer_is_refused_with_its_line(self, tmp_path: Path) -> None:
        """A reducer that does not exist is named at its line."""
        text = HEAD.replace("  out: {}", "  out: {reducer: sum}") + "  n:\n    argv: [/bin/true]\n"
        found = problems(tmp_path, text)
        assert any(":8: channels.out.reducer:" in p for p in found), found

    def test_undeclared_channel_is_refused(self, tmp_path: Path) -> None:
        """A trigger must be a declared channel."""
        found = problems(tmp_path, HEAD + "  n:\n    argv: [/bin/true]\n    triggers: [nope]\n")
        assert any(":12: nodes.n.triggers[0]:" in p and "'nope'" in p for p in found), found

    def test_barrier_must_wait_for_nodes_that_write_it(self, tmp_path: Path) -> None:
        """A barrier waiting for a node that never writes it could never open."""
        text = HEAD.replace("  out: {}", "  out: {reducer: barrier, tasks: [n]}") + \
            "  n:\n    argv: [/bin/true]\n    triggers: [start]\n"
        found = problems(tmp_path, text)
        assert any("channels.out.tasks[0]" in p and "does not write" in p for p in found), found

    def test_an_input_cannot_be_a_barrier(self, tmp_path: Path) -> None:
        """Only the nodes a barrier waits for write it; an input is written by graph run."""
        text = HEAD.replace("  start: {}", "  start: {reducer: barrier, tasks: [n]}") + \
            "  n:\n    argv: [/bin/true]\n    writes: [start]\n"
        assert any("inputs[0]" in p for p in problems(tmp_path, text))

    def test_yaml_anchors_are_refused(self, tmp_path: Path) -> None:
        """The policy loader's YAML subset holds for graphs too."""
        text = HEAD + "  n:\n    argv: &x [/bin/true]\n"
        assert any("anchors" in p for p in problems(tmp_path, text))


class TestTemplates:
    def test_a_channel_inside_a_script_is_refused(self, tmp_path: Path) -> None:
        """{start} spliced into shell text would run a value as code: refused, with the fix."""
        text = HEAD + "  n:\n    argv: [/bin/sh, -c, 'echo {start}']\n    triggers: [start]\n"
        found = problems(tmp_path, text)
        assert any("nodes.n.argv[2]" in p and "$1" in p for p in found), found

    @pytest.mark.parametrize("argv", [
        "[/bin/sh, -c, '{start}']", "[/bin/sh, -uc, 'true', sh, '{start}']",
        "[/bin/sh, -cu, '{start}']", "[/usr/bin/python3, -uc, '{start}']",
        "[/usr/bin/perl, -ne, '{start}']", "[/usr/bin/sed, '{start}', f]",
        "[/usr/bin/awk, '{start}']", "[/usr/bin/awk, --, '{start}']",
        "[/bin/tar, -cf, o.tar, '{start}']", "[/usr/bin/env, --, '{start}']",
        "[/usr/bin/xargs, --, '{start}']", "[/bin/sh, -c, 'true', '{start}']",
        "[/bin/sh, '{start}']", "[/bin/sh, -c, '{out}', sh, '{start}']",
        "[/usr/bin/python3.11, --, '{start}']", "[/usr/bin/sqlite3, --, '{start}']"])
    def test_a_channel_where_it_could_be_code_or_an_option_is_refused(
            self, tmp_path: Path, argv: str) -> None:
        """Option clusters, script-first programs, runners of commands and anything before
        `--`: refused at load time (the review found each of these accepted by a list of
        dangerous options)."""
        text = HEAD + f"  n:\n    argv: {argv}\n    triggers: [start]\n"
        assert problems(tmp_path, text), argv

    @pytest.mark.parametrize("argv", [
        "[/bin/sh, -c, 'ls -- \"$1\"', sh, '{start}']",
        "[/bin/bash, -c, 'echo \"$1\" \"$2\"', x, '{start}', '{out}']",
        "[/bin/ls, -l, --, '{start}']", "[/usr/bin/curl, -s, --, '{start}']"])
    def test_a_positional_parameter_or_an_operand_after_the_options_is_data(
            self, tmp_path: Path, argv: str) -> None:
        load_text(tmp_path, HEAD + f"  n:\n    argv: {argv}\n    triggers: [start]\n")

    def test_the_program_cannot_come_from_a_channel(self, tmp_path: Path) -> None:
        """argv[0] is what the policy reviews; it is written in the file."""
        text = HEAD + "  n:\n    argv: ['{start}']\n    triggers: [start]\n"
        assert any("argv[0]" in p for p in problems(tmp_path, text))

    def test_values_are_whole_arguments_whatever_they_hold(self) -> None:
        """Quotes, spaces and $(...) arrive as one argument; non-strings as canonical JSON."""
        argv, env = render("n", ["/bin/sh", "-c", 'echo "$1"', "sh", "{t}", "{{t}}", "{n}"],
                           {"V": "{n}"}, {"t": "a b; $(rm -rf .)'\"", "n": {"b": 1, "a": [2]}})
        assert argv == ["/bin/sh", "-c", 'echo "$1"', "sh", "a b; $(rm -rf .)'\"", "{t}",
                        '{"a":[2],"b":1}']
        assert env == {"V": '{"a":[2],"b":1}'}

    def test_an_unavailable_channel_stops_rather_than_runs_empty(self) -> None:
        """A barrier not yet open is not in the snapshot: no empty argument is made up."""
        with pytest.raises(FailedPrecondition, match="not available"):
            render("n", ["/bin/echo", "{ready}"], {}, {})


# ---- the planner, driven through the real barrier ---------------------------------------------


def simulate(graph: Graph, inputs: dict[str, Any], *, shuffle: random.Random | None = None,
             limit: int = 20) -> tuple[list[tuple[str, ...]], dict[str, channels.ChannelValue]]:
    """The daemon's loop without workers: each node writes what it declares (its name as the
    value); results reach the barrier in a shuffled completion order if asked."""
    specs = {name: channels.ChannelSpec(name, c.reducer, tuple(c.tasks))
             for name, c in graph.channels.items()}
    state = channels.initial_state(specs)
    history = [state]
    state, _ = barrier.apply_writes(specs, state, [barrier.TaskResult(
        0, "graph.input", True, None, sorted(inputs.items()))], 1)
    history.append(state)
    timeline: list[tuple[str, ...]] = [("graph.input",)]
    for step in range(2, limit + 2):
        before, after = history[-2], history[-1]
        available = {n for n, s in specs.items() if channels.is_available(s, after[n])
                     and not (s.reducer == "topic" and not after[n].value)}
        nodes = plan(graph, {k: v.version for k, v in before.items()},
                     {k: v.version for k, v in after.items()}, available)
        if not nodes:
            break
        results = [barrier.TaskResult(i, name, True, None,
                                      [(c, name) for c in graph.nodes[name].writes])
                   for i, name in enumerate(nodes)]
        if shuffle is not None:
            shuffle.shuffle(results)
        state, _ = barrier.apply_writes(specs, after, results, step)
        history.append(state)
        timeline.append(nodes)
    return timeline, history[-1]


class TestPregel:
    def test_without_a_barrier_the_join_runs_twice(self) -> None:
        """The double-scheduling example: join in supersteps 3 and 4."""
        timeline, _ = simulate(load_graph(CASES / "fan_in.yaml"), {"start": "go"})
        assert timeline == [("graph.input",), ("a1", "b1"), ("b2", "join"), ("join",)]

    def test_with_a_barrier_the_join_runs_once(self) -> None:
        """The barrier opens when the longer branch has written: join once, in superstep 4."""
        timeline, state = simulate(load_graph(CASES / "fan_in_barrier.yaml"), {"start": "go"})
        assert timeline == [("graph.input",), ("a1", "b1"), ("b2",), ("join",)]
        assert state["log"].value == ["join"]

    def test_completion_order_changes_nothing(self) -> None:
        """Shuffled completion orders give the same timeline and channel state."""
        graph = load_graph(CASES / "fan_in.yaml")
        expected = simulate(graph, {"start": "go"})
        for seed in range(20):
            assert simulate(graph, {"start": "go"}, shuffle=random.Random(seed)) == expected

    def test_a_cycle_without_exit_runs_until_the_limit(self) -> None:
        """ping and pong trigger each other forever; only the loop's limit stops them."""
        timeline, _ = simulate(load_graph(CASES / "endless.yaml"), {"start": 1}, limit=6)
        assert len(timeline) == 7
        assert timeline[-1] in (("ping",), ("pong",))

    def test_a_cleared_topic_and_a_consumed_barrier_trigger_nothing(self) -> None:
        """Their versions move when they empty, but an empty channel is not a new value."""
        graph = load_graph(CASES / "fan_in_barrier.yaml")
        assert plan(graph, {"ready": 1}, {"ready": 2}, available=set()) == ()
        assert plan(graph, {"ready": 1}, {"ready": 2}, available={"ready"}) == ("join",)

    def test_declared_writes_are_held(self) -> None:
        """A node that writes an undeclared channel, or skips a declared one, is named."""
        graph = load_graph(CASES / "fan_in.yaml")
        broken = check_writes(graph, {"a1": ["b"], "b1": ["b1"]})
        assert [(b.node, b.undeclared, b.missing) for b in broken] == [("a1", ("b",), ("a",))]


# ---- lint ------------------------------------------------------------------------------------


def shell_helper_policy() -> Any:
    policies = REPO / "policies"
    return effective_policy(load_policy(policies / "shell-helper.yaml"), "prototype",
                            load_stage_ceilings(policies / "stages.yaml"))


class TestLint:
    @pytest.mark.parametrize(("fixture", "rule", "line"), [
        ("fan_in.yaml", "double-scheduling", 28),
        ("unwritten.yaml", "unwritten-channel", 13),
        ("untriggered.yaml", "untriggered-node", 30),
        ("endless.yaml", "cycle-without-exit", 14),
    ])
    def test_each_fixture_triggers_exactly_its_finding(self, fixture: str, rule: str,
                                                        line: int) -> None:
        """One finding, its rule, its line, and a fix."""
        findings = lint(load_graph(CASES / fixture))
        assert [(f.rule, f.line) for f in findings] == [(rule, line)]
        assert findings[0].fix

    def test_refused_tool_uses_the_policys_decision(self) -> None:
        """curl is not in shell-helper's exec.allow: the finding names the rule's line."""
        findings = lint(load_graph(CASES / "refused.yaml"), shell_helper_policy())
        assert [(f.rule, f.line) for f in findings] == [("refused-tool", 13)]
        assert "shell-helper.yaml" in findings[0].message

    @pytest.mark.parametrize("fixture", ["fan_in_barrier.yaml", "loop.yaml", "allowed.yaml"])
    def test_the_clean_versions_lint_clean(self, fixture: str) -> None:
        """The barrier, the may_write exit and an allowed program each remove the finding."""
        assert lint(load_graph(CASES / fixture), shell_helper_policy()
                    if fixture == "allowed.yaml" else None) == []

    def test_the_double_scheduling_fix_names_the_branches(self) -> None:
        """The suggested barrier waits for the two nodes whose writes reach the join."""
        finding = lint(load_graph(CASES / "fan_in.yaml"))[0]
        assert "tasks: [a1, b2]" in finding.fix
        assert "input start -> b1 -> b2 -> join" in finding.message

    def test_the_shipped_example_lints_clean_against_its_policy(self) -> None:
        """graphs/ holds a reviewed example: no finding, tools checked."""
        for path in (REPO / "graphs").glob("*.yaml"):
            assert lint(load_graph(path), shell_helper_policy()) == [], path


class TestMermaid:
    def test_graph(self) -> None:
        """Inputs, nodes, channel edges and the barrier as a circle, quoted labels."""
        text = graph_mermaid(load_graph(CASES / "fan_in_barrier.yaml"))
        assert text.splitlines()[0] == "flowchart TD"
        assert 'in0(["input: start"])' in text
        assert 'n1 -->|"b1"| n2' in text
        assert 'b0(("ready"))' in text
        assert "b0 ==> n3" in text

    def test_conditional_edges_are_dotted(self) -> None:
        """An edge whose writer only may write it is drawn dotted."""
        assert 'n1 -.->|"pong"| n0' in graph_mermaid(load_graph(CASES / "loop.yaml"))

    def test_timeline_shows_a_node_once_per_superstep_it_ran_in(self) -> None:
        """join ran in two supersteps: two boxes."""
        text = timeline_mermaid([TimelineRow(1, ("graph.input",), "committed"),
                                 TimelineRow(3, ("b2", "join"), "committed"),
                                 TimelineRow(4, ("join",), "committed"),
                                 TimelineRow(4, ("x",), "committed", read_only=True)])
        assert text.count('"join"') == 2
        assert 'subgraph s3["superstep 4 · committed read-only"]' in text
        assert "s0 --> s1" in text
        assert 'quot' not in text


def test_names_with_quotes_cannot_break_mermaid() -> None:
    """Labels escape quotes."""
    assert "#quot;" in timeline_mermaid([TimelineRow(1, ('a"b',), "committed")])



class TestCli:
    @pytest.mark.parametrize(("args", "status"), [
        (["fan_in_barrier.yaml"], 0),
        (["fan_in.yaml"], 1),
        (["refused.yaml", "--policy-dir", str(REPO / "policies")], 1),
        (["allowed.yaml", "--policy-dir", str(REPO / "policies")], 0),
    ])
    def test_lint_exit_status(self, args: list[str], status: int,
                              capsys: pytest.CaptureFixture[str]) -> None:
        """0 clean, 1 findings, as `policy lint`; each finding printed with its fix."""
        from agentd.cli.main import main

        assert main(["graph", "lint", str(CASES / args[0]), *args[1:]]) == status
        out = capsys.readouterr().out
        assert ("fix: " in out) == bool(status)

    def test_lint_of_an_invalid_file_exits_2_with_the_line(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An invalid file is exit 2, each problem with file and line, no traceback."""
        from agentd.cli.main import main

        path = tmp_path / "g.yaml"
        path.write_text(HEAD + "  n:\n    argv: [/bin/true]\n    trigers: [start]\n")
        assert main(["graph", "lint", str(path)]) == 2
        assert f"{path}:12: nodes.n.trigers:" in capsys.readouterr().err

    def test_show_prints_mermaid(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A fenced mermaid block, without the daemon."""
        from agentd.cli.main import main

        assert main(["graph", "show", str(CASES / "fan_in.yaml")]) == 0
        assert capsys.readouterr().out.startswith("```mermaid\nflowchart TD\n")

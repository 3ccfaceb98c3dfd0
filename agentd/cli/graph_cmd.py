"""`agentctl graph run|show|lint`: graph files (docs/graphs.md).

`lint` and `show` read the file locally (agentd/graph, pure, like a policy file: agentctl's one
use of it); `run` sends the file's text to the daemon, which validates it again and runs it;
`show --run` reads the run's steps through the client.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agentd.cli import output
from agentd.errors import AgentdError

EXIT_FINDINGS = 1
EXIT_INVALID = 2
EXIT_STOPPED = 1
EXIT_PENDING = 3  # as `agentctl step`: the graph waits for an approver


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds `graph` and its subcommands."""
    graph = subparsers.add_parser("graph", help="run, show and lint graph files")
    sub = graph.add_subparsers(dest="graph_command", metavar="ACTION", required=True)

    run = sub.add_parser(
        "run", help="run a graph on a new run of its agent (or --run RUN): inputs, then "
        "supersteps until nothing triggers; exit 0 when it ends, 1 when it stops")
    run.add_argument("file", metavar="FILE", help="graph file (YAML)")
    run.add_argument("--run", dest="run_id", default="", metavar="RUN",
                     help="a run made for this graph: continue it (after a rollback, on a fork)")
    run.add_argument("--input", action="append", default=[], metavar="NAME=VALUE",
                     help="set an input channel (repeatable); the value is a string")
    run.add_argument("--approval-timeout", type=float, default=0.0, metavar="SECONDS",
                     help="how long a superstep may wait for an approver (default: an hour)")
    run.set_defaults(func=cmd_run)

    show = sub.add_parser(
        "show", help="print the graph as Mermaid; with --run, the run's executed timeline too "
        "(which node ran in which superstep)")
    show.add_argument("file", metavar="FILE", help="graph file (YAML)")
    show.add_argument("--run", dest="run_id", default="", metavar="RUN")
    show.set_defaults(func=cmd_show)

    lint = sub.add_parser(
        "lint", help="find double scheduling, channels nobody writes, nodes nothing triggers, "
        "cycles without an exit and tools the agent's policy refuses; exit 0 if none, 1 if "
        "any, 2 if the file is invalid")
    lint.add_argument("file", metavar="FILE", help="graph file (YAML)")
    lint.add_argument("--policy-dir", type=Path, metavar="DIR",
                      help="where the agent's policy (name: AGENT) and stages.yaml are; "
                      "without it, tools are not checked")
    lint.add_argument("--stage", default="prototype",
                      help="the agent's stage to decide its tools at (default: prototype)")
    lint.set_defaults(func=cmd_lint)


def _load(path: str) -> Any:
    """The validated graph, or None after printing each problem with file and line."""
    from agentd.graph import load_graph

    try:
        return load_graph(path)
    except AgentdError as exc:
        sys.stderr.write("".join(line + "\n" for line in str(exc).splitlines()))
    return None


def cmd_lint(args: argparse.Namespace) -> int:
    """`graph lint FILE`: findings with line and fix; 1 if any, 2 if invalid."""
    from agentd.graph import lint

    graph = _load(args.file)
    if graph is None:
        return EXIT_INVALID
    policy = None
    if args.policy_dir is not None:
        try:
            policy = _policy(args.policy_dir, graph.agent, args.stage)
        except (AgentdError, LookupError) as exc:
            print(f"agentctl: {exc}", file=sys.stderr)
            return EXIT_INVALID
    findings = lint(graph, policy)
    for finding in findings:
        print(finding)
    note = "" if policy is not None else " (tools not checked: give --policy-dir)"
    print(f"{args.file}: {len(findings)} finding(s){note}" if findings
          else f"{args.file}: ok{note}")
    return EXIT_FINDINGS if findings else 0


def _policy(directory: Path, agent: str, stage: str) -> Any:
    """The agent's effective policy at `stage`: the file in `directory` whose name: is the
    agent (AGENT.yaml first), clamped by the directory's stages.yaml."""
    from agentd.policy import effective_policy, load_policy, load_stage_ceilings
    from agentd.policy.model import STAGES

    if stage not in STAGES:
        raise LookupError(f"--stage {stage!r} is not a stage ({', '.join(STAGES)})")
    candidates = [directory / f"{agent}.yaml", *sorted(directory.glob("*.yaml"))]
    for path in dict.fromkeys(candidates):
        if not path.is_file() or path.name == "stages.yaml":
            continue
        try:
            policy = load_policy(path)
        except AgentdError:
            if path.name == f"{agent}.yaml":
                raise
            continue
        if policy.name == agent:
            if policy.resolve(stage) is None:
                raise LookupError(f"{path} declares no stage at or below {stage}")
            return effective_policy(policy, stage, load_stage_ceilings(directory / "stages.yaml"))
    raise LookupError(f"no policy named {agent!r} in {directory}")


def cmd_show(args: argparse.Namespace) -> int:
    """`graph show FILE [--run RUN]`: Mermaid text, the graph then the timeline."""
    from agentd.graph import TimelineRow, graph_mermaid, timeline_mermaid

    graph = _load(args.file)
    if graph is None:
        return EXIT_INVALID
    print("```mermaid")
    print(graph_mermaid(graph), end="")
    print("```")
    if args.run_id:
        rows = [TimelineRow(step.step, tuple(t.name for t in step.tasks), str(step.state),
                            step.read_only)
                for step in args.client().list_steps(args.run_id)]
        print()
        print("```mermaid")
        print(timeline_mermaid(rows), end="")
        print("```")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`graph run FILE`: events as they happen, one line each; 0 ended, 1 stopped."""
    inputs: dict[str, str] = {}
    for item in args.input:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise output.UsageError(f"--input {item!r}: write NAME=VALUE")
        if name in inputs:
            raise output.UsageError(f"--input {name} is given twice")
        inputs[name] = value
    try:
        text = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"agentctl: {args.file}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    status = 0
    for event in args.client().run_graph(text, args.file, run_id=args.run_id, inputs=inputs,
                                         approval_timeout=args.approval_timeout):
        print(_describe(event), flush=True)
        if event.kind == "finished":
            status = EXIT_STOPPED if event.stopped else 0
    return status


def _describe(event: Any) -> str:
    nodes = ", ".join(event.nodes)
    if event.kind == "started":
        return f"run {event.run_id} at step {event.step}"
    if event.kind == "input":
        return f"step {event.step}: inputs written"
    if event.kind == "superstep":
        return f"step {event.step}: {nodes}"
    if event.kind == "pending_approval":
        return (f"step {event.step}: waits for approval ({event.reason}); `agentctl approve "
                f"{event.run_id} {event.step}`")
    if event.kind == "step":
        state = "committed read-only" if event.read_only else event.state
        return f"step {event.step}: {state}" + (f": {event.reason}" if event.reason else "")
    verdict = "stopped" if event.stopped else "ended"
    return (f"graph {verdict} after {event.supersteps} superstep(s) at step {event.step}: "
            f"{event.reason}")

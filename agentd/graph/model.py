"""A graph file: an agent, its channels, its nodes (tool-call templates) and a recursion limit.

    apiVersion: agentd/v1
    kind: Graph
    name: fan-in
    agent: shell-helper
    recursion_limit: 10          # supersteps one `graph run` may take (the input not counted)
    inputs: [topic]              # what `agentctl graph run FILE --input topic=...` writes
    channels:
      topic: {}                  # reducer last_value unless said
      notes: {reducer: append}
      ready: {reducer: barrier, tasks: [left, right]}
    nodes:
      left:
        argv: [/bin/sh, -c, 'echo "{\\"channel\\":\\"ready\\",\\"value\\":1}" >&3']
        triggers: [topic]        # runs in the superstep after `topic` got a new version
        writes: [ready]          # always writes these; `may_write:` for sometimes

It is reviewed like a policy and loaded by the policy loader (`agentd/policy/loader.py`): the
same YAML subset (no anchors, no tags, duplicate keys refused with both lines) and every
problem reported with its file, line and field, all at once. Checks that span fields (a
trigger names a declared channel, a barrier waits for nodes that write it, where a channel
value may be substituted) run after the field checks and report the same way.

`writes` and `may_write` are what lint reasons with (an edge that may stay silent is how a cycle
ends); the daemon holds a node to them after each superstep.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from agentd.graph.template import RUNNERS, SHELLS, Piece, parse
from agentd.policy.issues import Issue, PolicyFileError
from agentd.policy.loader import load_document
from agentd.policy.model import Document
from agentd.policy.sizes import parse_duration
from agentd.store.values import NAME_PATTERN

# A superstep is one step, and a step has at most 64 tasks (agentd/scheduler/plan.py).
MAX_NODES: Final = 64
MAX_RECURSION_LIMIT: Final = 10_000
NODE_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"

ChannelName = Annotated[str, Field(pattern=NAME_PATTERN)]
NodeName = Annotated[str, Field(pattern=NODE_PATTERN)]
Seconds = Annotated[float, BeforeValidator(parse_duration)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Channel(_Part):
    """One channel of the run the graph runs on (declared at the run's creation)."""

    reducer: Literal["last_value", "append", "topic", "barrier"] = "last_value"
    """How a superstep's writes merge: see README "Channels"."""
    tasks: list[NodeName] = Field(default_factory=list, max_length=MAX_NODES)
    """For a barrier: the nodes it waits for; it triggers once all of them wrote."""
    description: str = ""


class Node(_Part):
    """A tool-call template: what runs, on which channel changes, and what it writes."""

    argv: list[str] = Field(min_length=1, max_length=4096)
    """The command, one argument per item (never split, never given to a shell by agentd).
    An item that is exactly `{channel}` is replaced by that channel's value."""
    env: dict[str, str] = Field(default_factory=dict)
    """Variables for the call (the policy's env.allow decides); a value may be `{channel}`."""
    triggers: list[ChannelName] = Field(default_factory=list)
    """The node runs in the superstep after one of these got a new version."""
    writes: list[ChannelName] = Field(default_factory=list)
    """Channels the node writes every time it runs."""
    may_write: list[ChannelName] = Field(default_factory=list)
    """Channels the node writes only sometimes: its way to end a cycle or skip a branch."""
    timeout: Seconds | None = None
    """Wall time of one run (default: the policy's limits.wall_time)."""
    allow_failure: bool = False
    """A non-zero exit does not fail the superstep."""
    description: str = ""


class Graph(Document):
    """A graph file, validated."""

    api_version: Literal["agentd/v1"] = Field(alias="apiVersion")
    kind: Literal["Graph"]
    name: NodeName
    description: str = ""
    agent: str = Field(min_length=1, max_length=128)
    """The registered agent whose run (and policy) the nodes run under."""
    recursion_limit: int = Field(default=25, ge=1, le=MAX_RECURSION_LIMIT)
    """Supersteps one `graph run` may take; reaching it stops the graph with an error."""
    inputs: list[ChannelName] = Field(min_length=1)
    """Channels `graph run --input NAME=VALUE` writes (as one checkpoint) to start the graph."""
    channels: dict[ChannelName, Channel] = Field(min_length=1, max_length=256)
    nodes: dict[NodeName, Node] = Field(min_length=1, max_length=MAX_NODES)

    def writers(self, channel: str) -> list[str]:
        """The nodes that write `channel` (always or sometimes), in file order."""
        return [name for name, node in self.nodes.items()
                if channel in node.writes or channel in node.may_write]

    def field_line(self, field: str) -> int | None:
        """The line of `field`, or of the nearest written field above it."""
        while field:
            line = self.line(field)
            if line is not None:
                return line
            field = field.rpartition(".")[0]
        return self.line("")


def load_graph(path: str | Path, raw: bytes | None = None) -> Graph:
    """A graph file read and validated; PolicyFileError listing every problem (file, line,
    field) otherwise. With `raw`, those bytes are the file (the daemon gets the text, not the
    path); problems still name `path`."""
    graph = load_document(path, Graph, raw)
    issues = _cross_check(graph)
    if issues:
        raise PolicyFileError(issues)
    return graph


def _cross_check(graph: Graph) -> list[Issue]:
    """What no single field can say: names that must agree across the file."""
    issues: list[Issue] = []

    def issue(field: str, message: str) -> None:
        issues.append(Issue(graph.source, graph.field_line(field), field, message))

    declared = ", ".join(graph.channels)
    for index, name in enumerate(graph.inputs):
        channel = graph.channels.get(name)
        if channel is None:
            issue(f"inputs[{index}]", f"channel {name!r} is not declared under channels: "
                  f"(declared: {declared}); declare it or remove it")
        elif channel.reducer == "barrier":
            issue(f"inputs[{index}]", f"channel {name!r} is a barrier, which only the nodes it "
                  "waits for write; an input is written by `graph run --input`: use another "
                  "reducer")
    for name, channel in graph.channels.items():
        issues += _check_barrier(graph, name, channel)
    for name, node in graph.nodes.items():
        for key in ("triggers", "writes", "may_write"):
            for index, channel_name in enumerate(getattr(node, key)):
                if channel_name not in graph.channels:
                    issue(f"nodes.{name}.{key}[{index}]",
                          f"channel {channel_name!r} is not declared under channels: "
                          f"(declared: {declared}); declare it or fix the name")
        for channel_name in sorted(set(node.writes) & set(node.may_write)):
            issue(f"nodes.{name}.may_write", f"channel {channel_name!r} is under both writes "
                  "and may_write; keep it under one (may_write if the node sometimes skips it)")
        issues += _check_templates(graph, name, node)
    return issues


def _check_barrier(graph: Graph, name: str, channel: Channel) -> list[Issue]:
    field = f"channels.{name}"
    line = graph.field_line(field)
    if channel.reducer != "barrier":
        if channel.tasks:
            return [Issue(graph.source, graph.field_line(f"{field}.tasks"), f"{field}.tasks",
                          "tasks is only for the barrier reducer; remove it or make the channel "
                          "a barrier")]
        return []
    if not channel.tasks:
        return [Issue(graph.source, line, f"{field}.tasks",
                      "a barrier needs the nodes it waits for: tasks: [node, ...]")]
    issues = []
    for index, task in enumerate(channel.tasks):
        where = f"{field}.tasks[{index}]"
        if task not in graph.nodes:
            issues.append(Issue(graph.source, graph.field_line(where), where,
                                f"{task!r} is not a node of this graph; a barrier waits for "
                                "nodes (nodes: " + ", ".join(graph.nodes) + ")"))
        elif task not in graph.writers(name):
            issues.append(Issue(graph.source, graph.field_line(where), where,
                                f"node {task!r} does not write {name!r}, so the barrier would "
                                f"never open; add {name!r} to its writes"))
    if len(set(channel.tasks)) != len(channel.tasks):
        issues.append(Issue(graph.source, graph.field_line(f"{field}.tasks"), f"{field}.tasks",
                            "a node is listed twice; list each node once"))
    for writer in graph.writers(name):
        if writer not in channel.tasks:
            issues.append(Issue(graph.source, graph.field_line(f"nodes.{writer}"),
                                f"nodes.{writer}",
                                f"node {writer!r} writes barrier {name!r}, which does not wait "
                                "for it (the step would fail); add it to the barrier's tasks "
                                "or stop writing it"))
    return issues


def _check_templates(graph: Graph, name: str, node: Node) -> list[Issue]:
    """Channel values enter a call only as whole arguments in a position that is data, or as
    variables, never as code (agentd/graph/template.py)."""
    issues: list[Issue] = []
    items: list[tuple[str, str, int | None]] = [
        (f"nodes.{name}.argv[{i}]", arg, i) for i, arg in enumerate(node.argv)]
    items += [(f"nodes.{name}.env.{key}", value, None) for key, value in node.env.items()]
    for field, text, index in items:
        problem = _template_problem(graph, field, text)
        if not problem and index is not None and parse(text).channel is not None:
            problem = _position_problem(node.argv, index)
        if problem:
            issues.append(Issue(graph.source, graph.field_line(field), field, problem))
    return issues


def _position_problem(argv: Sequence[str], index: int) -> str:
    """Why a placeholder at argv[index] could be read as code or an option ("" if it cannot):
    only a shell's positional parameter, or an operand after `--` of a program that runs no
    code, is data whatever the value holds."""
    if index == 0:
        return "the program cannot come from a channel; name it here, where it is reviewed"
    program = PurePosixPath(argv[0]).name
    # python3.11 is python; perl5.36 is perl: a version suffix names the same runner.
    runner = program in RUNNERS or re.sub(r"[\d.]+$", "", program) in RUNNERS
    literal = [parse(a).channel is None for a in argv[:index]]
    if (program in SHELLS and len(argv) > 3 and argv[1] == "-c" and index >= 4
            and all(literal[1:4])):
        return ""
    fix = ("pass it as a shell's positional parameter, [/bin/sh, -c, 'tool -- \"$1\"', sh, "
           "'{value}'], or in env")
    if runner:
        return (f"{program} runs its operands as code or as a command: a channel value there "
                f"could become a program; {fix}")
    if "--" not in [a for a, is_literal in zip(argv[:index], literal, strict=True)
                    if is_literal]:
        return (f"a channel value before `--` could be read as an option (--exec=..., "
                f"--checkpoint-action=...); put a literal `--` before it, or {fix}")
    return ""


_EMBEDDED = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


def _template_problem(graph: Graph, field: str, text: str) -> str:
    piece: Piece = parse(text)
    if piece.channel is None:
        if piece.literal != text:  # {{name}}: the literal text, asked for
            return ""
        embedded = [m for m in _EMBEDDED.findall(text) if m in graph.channels]
        if embedded:
            return (f"{{{embedded[0]}}} inside a longer argument: a channel value is "
                    "substituted only as a whole argument, never spliced into text (which a "
                    f"shell would run as code); pass it as its own item, e.g. [/bin/sh, -c, "
                    f"'echo \"$1\"', sh, '{{{embedded[0]}}}']")
        return ""
    if piece.channel not in graph.channels:
        return (f"{{{piece.channel}}} names no declared channel; write {{{{{piece.channel}}}}} "
                "for the literal text")
    return ""

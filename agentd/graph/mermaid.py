"""Mermaid text for a graph file and for a run's executed timeline (`agentctl graph show`).

Mermaid because it renders where reviewers already read (GitHub, GitLab, most wikis) from
plain text that diffs well. Node names become ids `n0, n1, ...` and labels, so no name can
break the syntax; labels are quoted, with `"` written as Mermaid's `#quot;`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agentd.graph.lint import edges
from agentd.graph.model import Graph


def _label(text: str) -> str:
    return '"' + text.replace('"', "#quot;").replace("\n", " ") + '"'


def graph_mermaid(graph: Graph) -> str:
    """The graph: inputs as stadiums, nodes as boxes (name and program), an edge per channel
    that links them (dotted when the writer only may write it), barriers as circles."""
    ids = {name: f"n{i}" for i, name in enumerate(graph.nodes)}
    barriers = {name: f"b{i}" for i, name in enumerate(
        n for n, c in graph.channels.items() if c.reducer == "barrier")}
    lines = ["flowchart TD"]
    for i, channel in enumerate(graph.inputs):
        lines.append(f"  in{i}([{_label('input: ' + channel)}])")
    for name, node in graph.nodes.items():
        lines.append(f"  {ids[name]}[{_label(name + ': ' + node.argv[0])}]")
    for channel, bid in barriers.items():
        lines.append(f"  {bid}(({_label(channel)}))")
    for i, channel in enumerate(graph.inputs):
        lines += [f"  in{i} -->|{_label(channel)}| {ids[name]}"
                  for name, node in graph.nodes.items() if channel in node.triggers]
    for edge in edges(graph):
        if edge.channel in barriers:
            continue
        arrow = "-.->" if edge.conditional else "-->"
        lines.append(f"  {ids[edge.source]} {arrow}|{_label(edge.channel)}| {ids[edge.target]}")
    for channel, bid in barriers.items():
        for writer in graph.writers(channel):
            arrow = "-.->" if channel in graph.nodes[writer].may_write else "-->"
            lines.append(f"  {ids[writer]} {arrow} {bid}")
        lines += [f"  {bid} ==> {ids[name]}"
                  for name, node in graph.nodes.items() if channel in node.triggers]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TimelineRow:
    """One attempt at a step of the run: its number, its tasks (node names) and how it ended."""

    step: int
    nodes: tuple[str, ...]
    state: str
    read_only: bool = False


def timeline_mermaid(rows: Sequence[TimelineRow]) -> str:
    """The run's supersteps left to right, each a box holding the nodes that ran in it: a node
    that ran twice shows up in two boxes."""
    lines = ["flowchart LR"]
    for i, row in enumerate(rows):
        state = "committed read-only" if row.read_only else row.state.replace("_", " ")
        lines.append(f"  subgraph s{i}[{_label(f'superstep {row.step} · {state}')}]")
        lines += [f"    s{i}_{j}[{_label(node)}]" for j, node in enumerate(row.nodes)]
        if not row.nodes:
            lines.append(f"    s{i}_none[{_label('no task')}]")
        lines.append("  end")
    lines += [f"  s{i} --> s{i + 1}" for i in range(len(rows) - 1)]
    return "\n".join(lines) + "\n"

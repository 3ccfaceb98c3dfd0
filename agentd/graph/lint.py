"""`agentctl graph lint`: what a valid graph file would do wrong, each with its line and fix.

Validation (`load_graph`) says whether the file means something; lint says whether what it
means is what its author wants. Findings, by rule:

    double-scheduling   a node reachable from the inputs by paths of different lengths: it
                        runs once per length, in different supersteps (LangGraph's classic
                        bug); fix: a barrier channel the branches write, triggering it
    unwritten-channel   a channel no node writes and no input sets: it never changes
    untriggered-node    a node that never runs: nothing it is triggered by is ever written
    cycle-without-exit  a cycle in which every node always writes the next one's trigger:
                        only the recursion limit ends it; fix: a may_write edge
    refused-tool        a node whose program the agent's policy refuses at its stage (decided
                        by `judge`, as `policy test` and the scheduler decide it)

The graph lint reasons over the node graph: an edge X -> Y for each channel X writes (or may
write) that triggers Y. A barrier channel joins: it opens one superstep after the last of its
nodes wrote, so every path through it has one length. Path lengths are counted on the acyclic
part only; a node downstream of a cycle runs once per turn of the loop by design, and the
cycle itself is judged by `cycle-without-exit`. What lint cannot see: programs a node starts
itself (`sh -c 'curl ...'`: the policy refuses those in the worker) and whether a node keeps to
its declared writes (the daemon checks that after every superstep).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agentd.graph.model import Graph
from agentd.policy import EffectivePolicy
from agentd.policy.decide import judge


@dataclass(frozen=True)
class Finding:
    source: str
    line: int | None
    rule: str
    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        at = f"{self.source}:{self.line}" if self.line else self.source
        return f"{at}: {self.field}: {self.message} [{self.rule}]\n  fix: {self.fix}"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    channel: str
    conditional: bool  # the source only may write the channel


def edges(graph: Graph) -> list[Edge]:
    """Every node -> node edge, in file order of the writer, then its channels, then readers."""
    found = []
    for name, node in graph.nodes.items():
        for channel in [*node.writes, *node.may_write]:
            conditional = channel in node.may_write
            found += [Edge(name, target, channel, conditional)
                      for target, reader in graph.nodes.items() if channel in reader.triggers]
    return found


def lint(graph: Graph, policy: EffectivePolicy | None = None) -> list[Finding]:
    """Every finding of `graph`, in line order; `policy` (the agent's effective policy at its
    stage) turns on refused-tool."""
    all_edges = edges(graph)
    cyclic = _cyclic_components(graph, all_edges)
    findings = [*_unwritten(graph), *_untriggered(graph), *_double(graph, all_edges, cyclic),
                *_endless(graph, all_edges, cyclic)]
    if policy is not None:
        findings += _refused(graph, policy)
    return sorted(findings, key=lambda f: (f.line or 0, f.rule, f.field))


def _finding(graph: Graph, field: str, rule: str, message: str, fix: str) -> Finding:
    return Finding(graph.source, graph.field_line(field), rule, field, message, fix)


def _unwritten(graph: Graph) -> Iterable[Finding]:
    for name in graph.channels:
        if name not in graph.inputs and not graph.writers(name):
            yield _finding(
                graph, f"channels.{name}", "unwritten-channel",
                f"no node writes channel {name!r} and it is not an input: it never changes",
                f"add {name!r} to the writes (or may_write) of the node that produces it, list "
                "it under inputs, or remove it")


def _reachable(graph: Graph) -> set[str]:
    """Nodes that can run: triggered by an input, or by what a node that can run writes (a
    barrier once all of its nodes can run)."""
    written = set(graph.inputs)
    running: set[str] = set()
    grew = True
    while grew:
        grew = False
        for name, node in graph.nodes.items():
            if name not in running and written & set(node.triggers):
                running.add(name)
                written.update(node.writes, node.may_write)
                grew = True
        for name, channel in graph.channels.items():
            if (channel.reducer == "barrier" and name in written
                    and not set(channel.tasks) <= running):
                written.discard(name)  # opens only once every node it waits for runs
    return running


def _untriggered(graph: Graph) -> Iterable[Finding]:
    running = _reachable(graph)
    for name, node in graph.nodes.items():
        if name in running:
            continue
        if not node.triggers:
            message = f"nothing triggers node {name!r} (its triggers: list is empty): it never runs"
        else:
            message = (f"node {name!r} never runs: none of its triggers ("
                       + ", ".join(node.triggers) + ") is an input or written by a node that "
                       "runs")
        yield _finding(graph, f"nodes.{name}", "untriggered-node", message,
                       "trigger it on a channel an input or a running node writes, or remove it")


def _cyclic_components(graph: Graph, all_edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components that hold a cycle, each in file order (Tarjan's
    algorithm, iterative: no recursion over a file's structure)."""
    successors: dict[str, list[str]] = {name: [] for name in graph.nodes}
    for edge in all_edges:
        successors[edge.source].append(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in graph.nodes:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            nexts = successors[node]
            if position < len(nexts):
                work.append((node, position + 1))
                target = nexts[position]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in successors[node]:
                    order = list(graph.nodes)
                    components.append(sorted(component, key=order.index))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def _downstream(graph: Graph, all_edges: list[Edge], start: set[str]) -> set[str]:
    seen = set(start)
    frontier = list(start)
    while frontier:
        node = frontier.pop()
        for edge in all_edges:
            if edge.source == node and edge.target not in seen:
                seen.add(edge.target)
                frontier.append(edge.target)
    return seen


def _double(graph: Graph, all_edges: list[Edge], cyclic: list[list[str]]) -> Iterable[Finding]:
    """Path lengths from the inputs over the acyclic part, in topological order; a node with
    more than one, whose own sources each have one, is where the double scheduling starts."""
    skipped = _downstream(graph, all_edges, {n for c in cyclic for n in c})
    acyclic = [e for e in all_edges if e.source not in skipped and e.target not in skipped]
    order = _topological([n for n in graph.nodes if n not in skipped], acyclic)
    # node -> length -> how it is reached: (previous node or None for an input, channel)
    lengths: dict[str, dict[int, tuple[str | None, str]]] = {}
    for name in order:
        reached: dict[int, tuple[str | None, str]] = {}
        for channel in graph.nodes[name].triggers:
            if channel in graph.inputs:
                reached.setdefault(1, (None, channel))
            spec = graph.channels[channel]
            if spec.reducer == "barrier":
                waited = [lengths.get(task) for task in spec.tasks]
                if all(waited) and not any(task in skipped for task in spec.tasks):
                    last = max(spec.tasks, key=lambda t: max(lengths[t]))
                    reached.setdefault(max(lengths[last]) + 1, (last, channel))
                continue
            for edge in acyclic:
                if edge.target == name and edge.channel == channel:
                    for length in lengths.get(edge.source, {}):
                        reached.setdefault(length + 1, (edge.source, channel))
        if reached:
            lengths[name] = reached
    for name in order:
        reached = lengths.get(name, {})
        if len(reached) < 2:
            continue
        sources = {via for via, _ in reached.values() if via is not None}
        if any(len(lengths.get(s, {})) > 1 for s in sources):
            continue  # inherited: reported where it starts
        shortest, longest = min(reached), max(reached)
        writers = sorted({via for via, _ in reached.values() if via is not None},
                         key=list(graph.nodes).index)
        steps = ", ".join(str(n) for n in sorted(reached))
        yield _finding(
            graph, f"nodes.{name}", "double-scheduling",
            f"node {name!r} is reached by paths of different lengths ("
            f"{_path(lengths, name, shortest)}; {_path(lengths, name, longest)}), so it runs "
            f"in supersteps {steps} after the input, once per path length",
            f"join the branches with a barrier: declare `{name}_ready: {{reducer: barrier, "
            f"tasks: [{', '.join(writers)}]}}` under channels, add it to the writes of "
            f"{', '.join(writers)}, and trigger {name!r} on it alone")


def _path(lengths: dict[str, dict[int, tuple[str | None, str]]], name: str,
          length: int) -> str:
    """`input topic -> a -> b -> name`, walked back from (name, length)."""
    parts = [name]
    node, at = name, length
    while True:
        via, channel = lengths[node][at]
        if via is None:
            parts.append(f"input {channel}")
            break
        parts.append(via)
        node, at = via, at - 1
        if at not in lengths.get(node, {}):  # reached through a barrier: its last writer
            at = max(lengths[node])
    return " -> ".join(reversed(parts))


def _topological(nodes: list[str], acyclic: list[Edge]) -> list[str]:
    """Kahn's algorithm, ties broken by file order."""
    incoming = dict.fromkeys(nodes, 0)
    for edge in acyclic:
        incoming[edge.target] += 1
    ready = [n for n in nodes if incoming[n] == 0]
    order: list[str] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for edge in acyclic:
            if edge.source == node:
                incoming[edge.target] -= 1
                if incoming[edge.target] == 0:
                    ready.append(edge.target)
        ready.sort(key=nodes.index)
    return order


def _endless(graph: Graph, all_edges: list[Edge],
             cyclic: list[list[str]]) -> Iterable[Finding]:
    """A cycle made only of edges whose writer always writes: nothing but the limit ends it."""
    for component in cyclic:
        members = set(component)
        always = [e for e in all_edges if e.source in members and e.target in members
                  and not e.conditional]
        loop = _find_cycle(component, always)
        if loop is None:
            continue
        shown = " -> ".join([*loop, loop[0]])
        yield _finding(
            graph, f"nodes.{loop[0]}", "cycle-without-exit",
            f"cycle {shown}: every node on it always writes the next one's trigger, so only "
            f"the recursion limit ({graph.recursion_limit}) ends it, as an error",
            "let one node end the loop: move the channel it writes to the next node from "
            "writes to may_write, and write it only while the loop should go on")


def _find_cycle(component: list[str], always: list[Edge]) -> list[str] | None:
    """A cycle over `always` edges, from the first node of the component that is on one."""
    successors: dict[str, list[str]] = {n: [] for n in component}
    for edge in always:
        successors[edge.source].append(edge.target)
    for start in component:
        # paths from start, breadth first; the first one back to start is a shortest cycle
        frontier: list[list[str]] = [[start]]
        visited = {start}
        while frontier:
            path = frontier.pop(0)
            for target in successors[path[-1]]:
                if target == start:
                    return path
                if target not in visited:
                    visited.add(target)
                    frontier.append([*path, target])
    return None


def _refused(graph: Graph, policy: EffectivePolicy) -> Iterable[Finding]:
    for name, node in graph.nodes.items():
        env = dict.fromkeys(node.env, "")  # the names decide; values come later
        verdict = judge(policy, node.argv[0], env, "", node.timeout or 0.0)
        if verdict.verdict not in ("refuse", "invalid"):
            continue
        rule = f" (rule: {verdict.rule})" if verdict.rule and verdict.rule not in verdict.detail \
            else ""
        yield _finding(
            graph, f"nodes.{name}.argv", "refused-tool",
            f"agent {graph.agent}'s policy at stage {policy.stage} refuses node {name!r}: "
            f"{verdict.detail}{rule}",
            "use a program the policy allows, or have the policy grant it (a reviewed policy "
            "change)")

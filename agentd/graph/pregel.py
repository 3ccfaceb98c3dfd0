"""Planning a superstep: pure, from channel versions and the graph alone.

The rule (Pregel's, as LangGraph's `prepare_next_tasks` applies it): a node runs in superstep
S+1 if one of its trigger channels got a new version in superstep S and is available (a
barrier whose nodes have all written; a topic that holds values, not one just cleared). Every
triggered node runs, in the file's order, as one step; nothing else does.

Where the progress lives. LangGraph keeps, per node, the versions it has seen, in the
checkpoint. Here every superstep is one committed step, so "changed in superstep S" is
"newer at checkpoint S than at checkpoint S-1", and the versions a node has seen never need a
record of their own: they are the versions of the checkpoint before the one it last ran on.
(Proof sketch: a channel available at S with the same version at S-1 last changed at some
T < S, was available then, so every node it triggers ran at T+1 <= S and saw that version.)
So the graph's progress is the run's checkpoints themselves: a rollback to checkpoint k, or a
fork of it, plans exactly the superstep that followed k the first time. Alternatives weighed:

- a reserved channel holding versions seen per node, written at each barrier: the same
  information twice, and it needs a write that no task makes inside the step's commit;
- the list of nodes that ran, from the step records: those are not part of a checkpoint (a
  fork copies checkpoints, not attempts), and a rollback would have to filter them.

What the choice means for a step that is not a superstep of the graph (an Exec or a WriteFile
on the same run between two `graph run`s): it counts as one. Its channel writes trigger nodes,
as a node's would; a file write, which changes no channel, triggers nothing, and it also
un-triggers nodes that were triggered before it (the plan compares the last two checkpoints).

The plan never depends on task timing or completion order: its inputs are versions, which the
barrier computes in task order (agentd/scheduler/barrier.py).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from agentd.graph.model import Graph


def changed(before: Mapping[str, int], after: Mapping[str, int],
            available: Collection[str]) -> set[str]:
    """Channels newer in `after` than in `before`, and available to trigger."""
    return {name for name, version in after.items()
            if version > before.get(name, 0) and name in available}


def plan(graph: Graph, before: Mapping[str, int], after: Mapping[str, int],
         available: Collection[str]) -> tuple[str, ...]:
    """The nodes of the next superstep, in file order: those with a trigger that changed
    between the checkpoints `before` and `after` (channel -> version) and is available."""
    fresh = changed(before, after, available)
    return tuple(name for name, node in graph.nodes.items() if fresh & set(node.triggers))


@dataclass(frozen=True)
class Broken:
    """A node did not keep to its declared writes (the lint reasoned with them)."""

    node: str
    undeclared: tuple[str, ...]
    missing: tuple[str, ...]

    def __str__(self) -> str:
        parts = []
        if self.undeclared:
            parts.append(f"wrote {', '.join(self.undeclared)}, which it does not declare "
                         "(add to writes or may_write)")
        if self.missing:
            parts.append(f"did not write {', '.join(self.missing)}, which it declares under "
                         "writes (move to may_write if it writes it only sometimes)")
        return f"node {self.node} " + "; ".join(parts)


def check_writes(graph: Graph, written: Mapping[str, Iterable[str]]) -> list[Broken]:
    """Each node of a committed superstep against its declaration: node -> channels written.
    A node's failure (allowed by allow_failure) excuses what it did not write."""
    broken = []
    for name, channels in written.items():
        node = graph.nodes[name]
        wrote = set(channels)
        undeclared = tuple(sorted(wrote - set(node.writes) - set(node.may_write)))
        missing = tuple(c for c in node.writes if c not in wrote)
        if undeclared or missing:
            broken.append(Broken(name, undeclared, missing))
    return broken

"""The barrier of a step: merge every task's channel writes into the next state, or fail it.

Pure, like LangGraph's `pregel/_algo.py` `apply_writes`: no I/O, inputs never mutated, and the
results are sorted by task index (the order of the step request) before anything is looked
at, so the outcome never depends on which task finished first. Either the whole step applies
or `StepFailed` is raised and the caller keeps the run at step S-1.

Decisions, with the alternatives weighed:

- Failure before conflicts. A task that failed (or was killed) fails the step on its own; the
  first such task in task order is named. Conflicts are reported only when every task is ok,
  since a failed task's writes may be partial and its conflicts noise.
- `last_value`: a conflict only between tasks. One task writing the channel twice keeps its
  last write: a task is one sequential program, so its own order is well defined, while two
  tasks have no order but the arbitrary one of the request. Rejecting a task's own rewrite
  would fail steps for no ambiguity (say, a progress value updated as the task goes).
- `append`: each write is one element (a list written stays one element, never flattened),
  appended in task order and, within a task, in write order. A task appends several values
  with several lines. Flattening lists (LangGraph's Topic) would make a list value
  impossible to append; requiring list writes would make the common one-item case awkward.
- `topic`: the value after a step is the list of the values written in it; a step that writes
  none clears it (a change: the version moves). LangGraph's Topic(accumulate=False).
- `barrier`: LangGraph's NamedBarrierValue, carrying values. Writes of the named tasks
  accumulate across steps as {task: value} (keys in the spec's order, the only order stable
  across steps; a task's later write replaces its earlier one); once every named task wrote,
  the channel is available to the next step and is consumed when that step commits, whether
  or not its tasks wrote. Consuming happens before that step's writes are applied, so they
  start the next round. A failed step consumes nothing: its retry sees the barrier again.
  A task not named in the spec writing the channel fails the step (LangGraph raises
  InvalidUpdateError), since it would otherwise be silently dropped.
- Versions: per channel, +1 at each commit that changed it. "Changed" means written (even with
  an equal value, as in LangGraph), a topic cleared, or a barrier consumed; never compared by
  value, which would make versions depend on deep equality of arbitrary JSON.

File changes are merged, and their conflicts found, by the storage layer (one engine:
agentd/store/layers.py `conflicts`); both kinds are the one `agentd.conflicts.Conflict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentd.conflicts import Conflict
from agentd.scheduler.channels import ChannelSpec, ChannelValue, is_available

# How many conflicts the one-line reason spells out; `StepFailure.conflicts` has all.
_REASON_CONFLICTS = 3


@dataclass(frozen=True)
class TaskResult:
    """A finished task: `ok` is False when it failed or was killed and may not fail."""

    index: int
    name: str
    ok: bool
    reason: str | None
    writes: list[tuple[str, Any]]


@dataclass(frozen=True)
class StepFailure:
    """Why a step applies nothing: the failing task (None for conflicts) and the reason."""

    task: str | None
    reason: str
    conflicts: tuple[Conflict, ...] = ()


class StepFailed(Exception):
    """The step fails as a whole; `failure` says which task and why.

    Not an AgentdError: a failed step is an outcome. The caller applies nothing (no channel,
    no file), keeps the run at step S-1 and reports `failure` in a successful reply.
    """

    def __init__(self, failure: StepFailure, *, step: int | None = None) -> None:
        who = f"task {failure.task}: " if failure.task is not None else ""
        where = f"step {step} failed: " if step is not None else ""
        super().__init__(f"{where}{who}{failure.reason}")
        self.failure = failure
        self.step = step


def apply_writes(specs: Mapping[str, ChannelSpec], state: Mapping[str, ChannelValue],
                 results: Sequence[TaskResult],
                 step: int) -> tuple[dict[str, ChannelValue], set[str]]:
    """The state after step `step` and the names of the channels it changed.

    Raises StepFailed (nothing applied) for a failed task, a write to an undeclared channel or
    to a barrier that does not wait for the writer, or conflicting `last_value` writes.
    Raises ValueError for a caller's bug: a state not matching `specs`, repeated task indexes
    or names, a step below 1.
    """
    if step < 1:
        raise ValueError(f"steps are numbered from 1, not {step}")
    if state.keys() != specs.keys():
        raise ValueError(f"state has channels {sorted(state)}, the run declares {sorted(specs)}")
    ordered = sorted(results, key=lambda result: result.index)
    _check_unique(ordered)

    for result in ordered:
        if not result.ok:
            raise StepFailed(StepFailure(result.name, result.reason or "failed"), step=step)
    written = _group_writes(specs, ordered, step)
    conflicts = _channel_conflicts(specs, written)
    if conflicts:
        raise StepFailed(StepFailure(None, _conflict_reason(conflicts), conflicts), step=step)

    new_state = dict(state)
    changed: set[str] = set()
    for name, spec in specs.items():
        current = state[name]
        reduced = _reduce(spec, current, written.get(name, []))
        if reduced is not None:
            new_value, seen = reduced
            new_state[name] = ChannelValue(new_value, current.version + 1, seen)
            changed.add(name)
    return new_state, changed


# ---- helpers --------------------------------------------------------------------------------


def _check_unique(ordered: Sequence[TaskResult]) -> None:
    indexes = [result.index for result in ordered]
    names = [result.name for result in ordered]
    if len(set(indexes)) != len(indexes) or len(set(names)) != len(names):
        raise ValueError(f"task indexes and names must be unique in a step: {indexes}, {names}")


def _group_writes(specs: Mapping[str, ChannelSpec], ordered: Sequence[TaskResult],
                  step: int) -> dict[str, list[tuple[str, Any]]]:
    """channel -> [(task, value)] in task order, then write order; checks who may write."""
    written: dict[str, list[tuple[str, Any]]] = {}
    for result in ordered:
        for channel, value in result.writes:
            spec = specs.get(channel)
            if spec is None:
                raise StepFailed(StepFailure(
                    result.name, f"wrote channel {channel!r}, which this run does not declare"),
                    step=step)
            if spec.reducer == "barrier" and result.name not in spec.barrier_tasks:
                raise StepFailed(StepFailure(
                    result.name, f"wrote barrier channel {channel!r}, which waits only for"
                    f" tasks {', '.join(spec.barrier_tasks)}"), step=step)
            written.setdefault(channel, []).append((result.name, value))
    return written


def _channel_conflicts(specs: Mapping[str, ChannelSpec],
                       written: Mapping[str, list[tuple[str, Any]]]) -> tuple[Conflict, ...]:
    """Every pair of tasks that wrote the same last_value channel; channels in spec order."""
    conflicts: list[Conflict] = []
    for name, spec in specs.items():
        if spec.reducer != "last_value" or name not in written:
            continue
        writers = list(dict.fromkeys(task for task, _ in written[name]))
        conflicts.extend(Conflict("channel", name, (first, second))
                         for i, first in enumerate(writers) for second in writers[i + 1:])
    return tuple(conflicts)


def _conflict_reason(conflicts: Sequence[Conflict]) -> str:
    shown = "; ".join(str(conflict) for conflict in conflicts[:_REASON_CONFLICTS])
    more = len(conflicts) - _REASON_CONFLICTS
    return f"conflict: {shown}" + (f"; and {more} more" if more > 0 else "")


def _reduce(spec: ChannelSpec, current: ChannelValue,
            writes: Sequence[tuple[str, Any]]) -> tuple[Any, tuple[str, ...]] | None:
    """The channel's new (value, seen) after this step's writes, or None if unchanged."""
    if spec.reducer == "last_value":
        return (writes[-1][1], ()) if writes else None
    if spec.reducer == "append":
        return ([*current.value, *(value for _, value in writes)], ()) if writes else None
    if spec.reducer == "topic":
        if writes:
            return [value for _, value in writes], ()
        return ([], ()) if current.value else None
    # barrier: consume what the step just run could see, then take its writes.
    consumed = is_available(spec, current)
    if not consumed and not writes:
        return None
    values: dict[str, Any] = {} if consumed or current.value is None else dict(current.value)
    for task, value in writes:
        values[task] = value
    seen = tuple(task for task in spec.barrier_tasks if task in values)
    return ({task: values[task] for task in seen} if seen else None), seen

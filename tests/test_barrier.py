"""The barrier: merging a step's channel writes in task order, conflicts, and failed steps."""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from agentd.conflicts import Conflict
from agentd.scheduler.barrier import (
    StepFailed,
    StepFailure,
    TaskResult,
    apply_writes,
)
from agentd.scheduler.channels import (
    ChannelSpec,
    ChannelValue,
    declare,
    initial_state,
    visible,
)

SPECS = declare([
    ChannelSpec("plan", "last_value"),
    ChannelSpec("log", "append"),
    ChannelSpec("news", "topic"),
    ChannelSpec("done", "barrier", ("a", "b", "c")),
])
State = dict[str, ChannelValue]


def ok(index: int, name: str, *writes: tuple[str, Any]) -> TaskResult:
    return TaskResult(index, name, ok=True, reason=None, writes=list(writes))


def failed(index: int, name: str, reason: str | None, *writes: tuple[str, Any]) -> TaskResult:
    return TaskResult(index, name, ok=False, reason=reason, writes=list(writes))


def run_steps(*steps: Sequence[TaskResult], state: State | None = None) -> State:
    """Applies each step in turn from `state` (default: the initial state); returns the last."""
    current = initial_state(SPECS) if state is None else state
    for number, results in enumerate(steps, start=1):
        current, _ = apply_writes(SPECS, current, results, number)
    return current


def failure_of(state: Mapping[str, ChannelValue], results: Sequence[TaskResult],
               step: int = 1) -> StepFailed:
    with pytest.raises(StepFailed) as caught:
        apply_writes(SPECS, state, results, step)
    return caught.value


class TestLastValue:
    def test_one_write(self) -> None:
        """The value written by the one task that wrote it becomes the channel's value."""
        state = run_steps([ok(0, "a", ("plan", "p")), ok(1, "b")])
        assert state["plan"] == ChannelValue("p", 1)

    def test_task_rewrites_keep_its_last(self) -> None:
        """One task writing the channel twice keeps its last write; that is no conflict."""
        state = run_steps([ok(0, "a", ("plan", 1), ("plan", 2))])
        assert state["plan"] == ChannelValue(2, 1)

    def test_two_tasks_conflict(self) -> None:
        """Two tasks writing it in one step fail the step with the conflict named."""
        error = failure_of(initial_state(SPECS), [ok(0, "a", ("plan", 1)), ok(1, "b", ("plan", 1))])
        conflict = Conflict("channel", "plan", ("a", "b"))
        assert error.failure == StepFailure(None, f"conflict: {conflict}", (conflict,))
        assert str(conflict) == "tasks a and b both wrote channel 'plan' (last_value)"
        assert str(error) == "step 1 failed: conflict: tasks a and b both wrote channel 'plan'" \
            " (last_value)"

    def test_every_pair_reported(self) -> None:
        """Three writers give every pair in task order; the reason lists at most three."""
        results = [ok(i, name, ("plan", i)) for i, name in enumerate("abcd")]
        failure = failure_of(initial_state(SPECS), results).failure
        assert [c.tasks for c in failure.conflicts] == [
            ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
        assert failure.reason.endswith("; and 3 more")
        assert failure.reason.count("both wrote") == 3

    def test_kept_across_steps(self) -> None:
        """A later step that does not write it keeps the value and the version."""
        state = run_steps([ok(0, "a", ("plan", "p"))], [ok(0, "a", ("log", 1))])
        assert state["plan"] == ChannelValue("p", 1)


class TestAppend:
    def test_concatenates_in_task_order(self) -> None:
        """Writes are appended in task order, then in each task's write order, one per write."""
        state = run_steps([ok(1, "b", ("log", "b1"), ("log", "b2")), ok(0, "a", ("log", "a1"))])
        assert state["log"] == ChannelValue(["a1", "b1", "b2"], 1)

    def test_accumulates_across_steps(self) -> None:
        """Each step appends to what the previous steps committed."""
        state = run_steps([ok(0, "a", ("log", 1))], [ok(0, "a")], [ok(0, "b", ("log", 2))])
        assert state["log"] == ChannelValue([1, 2], 2)

    def test_list_is_one_element(self) -> None:
        """A list written is appended as one element, never flattened."""
        state = run_steps([ok(0, "a", ("log", [1, 2]))])
        assert state["log"].value == [[1, 2]]

    def test_no_conflict(self) -> None:
        """Several tasks appending in one step is no conflict."""
        state = run_steps([ok(0, "a", ("log", 1)), ok(1, "b", ("log", 2))])
        assert state["log"].value == [1, 2]


class TestTopic:
    def test_values_of_the_step(self) -> None:
        """The value after a step is the list of what its tasks wrote, in task order."""
        state = run_steps([ok(1, "b", ("news", "y")), ok(0, "a", ("news", "x"))])
        assert state["news"] == ChannelValue(["x", "y"], 1)
        assert visible(SPECS, state)["news"] == ["x", "y"]

    def test_replaced_not_accumulated(self) -> None:
        """A step that writes replaces the previous step's values."""
        state = run_steps([ok(0, "a", ("news", 1))], [ok(0, "a", ("news", 2))])
        assert state["news"] == ChannelValue([2], 2)

    def test_cleared_after_one_step(self) -> None:
        """A step that writes nothing clears it, and the clearing moves the version."""
        state, changed = apply_writes(SPECS, run_steps([ok(0, "a", ("news", 1))]), [ok(0, "a")], 2)
        assert state["news"] == ChannelValue([], 2)
        assert changed == {"news"}
        assert visible(SPECS, state)["news"] == []

    def test_empty_stays_unchanged(self) -> None:
        """An empty topic that nothing writes keeps its version."""
        state = run_steps([ok(0, "a", ("news", 1))], [ok(0, "a")], [ok(0, "a")])
        assert state["news"] == ChannelValue([], 2)


class TestBarrier:
    def test_available_once_all_wrote(self) -> None:
        """The barrier is hidden until every named task wrote, across steps, then shown."""
        state = run_steps([ok(0, "a", ("done", 1))])
        assert state["done"] == ChannelValue({"a": 1}, 1, ("a",))
        assert "done" not in visible(SPECS, state)
        state, _ = apply_writes(SPECS, state, [ok(0, "c", ("done", 3)), ok(1, "b", ("done", 2))], 2)
        assert state["done"] == ChannelValue({"a": 1, "b": 2, "c": 3}, 2, ("a", "b", "c"))
        assert visible(SPECS, state)["done"] == {"a": 1, "b": 2, "c": 3}

    def test_keys_in_spec_order(self) -> None:
        """Values and `seen` follow the spec's task order, whatever order the tasks wrote in."""
        state = run_steps([ok(0, "c", ("done", 3))], [ok(0, "b", ("done", 2))],
                          [ok(0, "a", ("done", 1))])
        assert list(state["done"].value) == ["a", "b", "c"]
        assert state["done"].seen == ("a", "b", "c")

    def test_consumed_by_the_next_step(self) -> None:
        """The step after it became available consumes it, writes or not, moving the version."""
        all_wrote = [ok(i, name, ("done", i)) for i, name in enumerate("abc")]
        state = run_steps(all_wrote)
        state, changed = apply_writes(SPECS, state, [ok(0, "x", ("log", 1))], 2)
        assert state["done"] == ChannelValue(None, 2)
        assert "done" in changed
        assert "done" not in visible(SPECS, state)

    def test_writes_in_consuming_step_start_next_round(self) -> None:
        """Writes made in the step that consumes it count towards the next round."""
        all_wrote = [ok(i, name, ("done", i)) for i, name in enumerate("abc")]
        state = run_steps(all_wrote, [ok(0, "b", ("done", "again"))])
        assert state["done"] == ChannelValue({"b": "again"}, 2, ("b",))
        assert "done" not in visible(SPECS, state)

    def test_complete_in_consuming_step(self) -> None:
        """All named tasks writing in the consuming step make it available again."""
        all_wrote = [ok(i, name, ("done", i)) for i, name in enumerate("abc")]
        state = run_steps(all_wrote, all_wrote)
        assert state["done"] == ChannelValue({"a": 0, "b": 1, "c": 2}, 2, ("a", "b", "c"))

    def test_rewrite_replaces(self) -> None:
        """A task that writes again, in the same or a later step, replaces its own value."""
        state = run_steps([ok(0, "a", ("done", 1), ("done", 2))], [ok(0, "a", ("done", 3))])
        assert state["done"] == ChannelValue({"a": 3}, 2, ("a",))

    def test_unnamed_writer_fails_step(self) -> None:
        """A task the barrier does not wait for writing it fails the step, naming the task."""
        failure = failure_of(initial_state(SPECS), [ok(0, "a"), ok(1, "z", ("done", 1))]).failure
        assert failure == StepFailure(
            "z", "wrote barrier channel 'done', which waits only for tasks a, b, c")

    def test_failed_step_does_not_consume(self) -> None:
        """A failed step leaves an available barrier available for its retry."""
        state = run_steps([ok(i, name, ("done", i)) for i, name in enumerate("abc")])
        failure_of(state, [failed(0, "x", "exited 1")], step=2)
        assert visible(SPECS, state)["done"] == {"a": 0, "b": 1, "c": 2}


class TestFailedStep:
    def test_first_failed_task_in_task_order(self) -> None:
        """The failure names the first failed task in task order, not in the given order."""
        results = [failed(2, "c", "killed: memory limit 64 MiB"), ok(0, "a", ("log", 1)),
                   failed(1, "b", "exited 3")]
        error = failure_of(initial_state(SPECS), results, step=4)
        assert error.failure == StepFailure("b", "exited 3")
        assert error.step == 4
        assert str(error) == "step 4 failed: task b: exited 3"

    def test_failure_without_reason(self) -> None:
        """A failed task without a reason is reported as 'failed'."""
        assert failure_of(initial_state(SPECS), [failed(0, "a", None)]).failure.reason == "failed"

    def test_failure_before_conflicts(self) -> None:
        """A failed task is reported rather than the conflicts of the other tasks."""
        results = [ok(0, "a", ("plan", 1)), ok(1, "b", ("plan", 2)), failed(2, "c", "exited 1")]
        assert failure_of(initial_state(SPECS), results).failure == StepFailure("c", "exited 1")

    def test_nothing_applied(self) -> None:
        """A failed step leaves the given state and results exactly as they were."""
        state = run_steps([ok(0, "a", ("plan", "p"), ("log", 1), ("news", 1), ("done", 1))])
        results = [ok(0, "a", ("plan", 2), ("log", 2)), failed(1, "b", "exited 1", ("log", 3))]
        before_state, before_results = copy.deepcopy(state), copy.deepcopy(results)
        failure_of(state, results, step=2)
        assert state == before_state
        assert results == before_results

    def test_undeclared_channel(self) -> None:
        """A write to a channel the run does not declare fails the step, naming the task."""
        failure = failure_of(initial_state(SPECS), [ok(0, "a", ("nope", 1))]).failure
        assert failure == StepFailure("a", "wrote channel 'nope', which this run does not declare")

    def test_str_without_step(self) -> None:
        """StepFailed made from a failure alone says the task and the reason."""
        assert str(StepFailed(StepFailure("a", "exited 1"))) == "task a: exited 1"


class TestVersions:
    def test_only_changed_channels_bump(self) -> None:
        """Only the channels a commit changed move, each by one; the rest keep their object."""
        state = run_steps([ok(0, "a", ("plan", 1), ("log", 1))])
        new, changed = apply_writes(SPECS, state, [ok(0, "a", ("log", 2))], 2)
        assert changed == {"log"}
        assert {name: value.version for name, value in new.items()} == {
            "plan": 1, "log": 2, "news": 0, "done": 0}
        assert new["plan"] is state["plan"]

    def test_equal_value_still_bumps(self) -> None:
        """Writing the value a channel already has is a change: versions count writes."""
        state = run_steps([ok(0, "a", ("plan", 1))], [ok(0, "a", ("plan", 1))])
        assert state["plan"] == ChannelValue(1, 2)

    def test_no_writes_no_change(self) -> None:
        """A step without writes on an empty state changes nothing."""
        state = initial_state(SPECS)
        new, changed = apply_writes(SPECS, state, [ok(0, "a"), ok(1, "b")], 1)
        assert changed == set()
        assert new == state

    def test_per_channel_counters(self) -> None:
        """Each channel's version is its previous version plus one, independent of others."""
        state = initial_state(SPECS) | {"plan": ChannelValue("p", 7)}
        new, _ = apply_writes(SPECS, state, [ok(0, "a", ("plan", "q"), ("log", 1))], 9)
        assert (new["plan"].version, new["log"].version) == (8, 1)


class TestDeterminism:
    STEPS = (
        [ok(0, "a", ("log", "a"), ("news", 1), ("done", "A")), ok(1, "b", ("plan", "b")),
         ok(2, "c", ("log", "c"), ("news", 3), ("done", "C")), ok(3, "d", ("log", "d"))],
        [ok(0, "b", ("done", "B"), ("log", 1)), ok(1, "x", ("news", "x")),
         ok(2, "y", ("log", 2), ("plan", "y"))],
        [ok(0, "p"), ok(1, "q", ("log", "q"), ("news", 0))],
    )

    def test_any_order_same_result(self) -> None:
        """Every permutation of the results of each step gives the same states and versions."""
        rng = random.Random(20240501)
        expected = [initial_state(SPECS)]
        for number, results in enumerate(self.STEPS, start=1):
            expected.append(apply_writes(SPECS, expected[-1], results, number)[0])
        for _ in range(200):
            state = initial_state(SPECS)
            for number, results in enumerate(self.STEPS, start=1):
                shuffled = rng.sample(results, len(results))
                state, _ = apply_writes(SPECS, state, shuffled, number)
                assert state == expected[number]

    def test_any_order_same_failure(self) -> None:
        """Every permutation of a failing step's results gives the same failure."""
        rng = random.Random(7)
        results = [ok(0, "a", ("plan", 1)), ok(1, "b", ("plan", 2)), ok(2, "c", ("log", 1)),
                   ok(3, "d", ("plan", 3))]
        expected = failure_of(initial_state(SPECS), results).failure
        for _ in range(100):
            shuffled = rng.sample(results, len(results))
            assert failure_of(initial_state(SPECS), shuffled).failure == expected

    def test_inputs_not_mutated(self) -> None:
        """A successful apply mutates neither the state nor the results it was given."""
        state = run_steps([ok(0, "a", ("log", [1]), ("done", {"k": 1}))])
        results = [ok(1, "b", ("log", 2), ("done", 2)), ok(0, "a", ("news", 1))]
        before_state, before_results = copy.deepcopy(state), copy.deepcopy(results)
        apply_writes(SPECS, state, results, 2)
        assert state == before_state
        assert results == before_results


class TestContract:
    def test_step_from_one(self) -> None:
        """Step numbers start at 1."""
        with pytest.raises(ValueError, match="from 1"):
            apply_writes(SPECS, initial_state(SPECS), [], 0)

    def test_state_matches_specs(self) -> None:
        """A state whose channels are not the declared ones is a caller's bug."""
        state = initial_state(SPECS)
        del state["news"]
        with pytest.raises(ValueError, match="the run declares"):
            apply_writes(SPECS, state, [], 1)

    @pytest.mark.parametrize("results", [
        [ok(0, "a"), ok(0, "b")],
        [ok(0, "a"), ok(1, "a")],
    ])
    def test_unique_tasks(self, results: list[TaskResult]) -> None:
        """Repeated task indexes or names are a caller's bug."""
        with pytest.raises(ValueError, match="unique"):
            apply_writes(SPECS, initial_state(SPECS), results, 1)

    def test_no_tasks(self) -> None:
        """A step without tasks still consumes an available barrier and clears topics."""
        state = run_steps([ok(0, "a", ("news", 1), ("done", 1)), ok(1, "b", ("done", 2)),
                           ok(2, "c", ("done", 3))])
        new, changed = apply_writes(SPECS, state, [], 2)
        assert changed == {"news", "done"}
        assert (new["news"], new["done"]) == (ChannelValue([], 2), ChannelValue(None, 2))

"""Graph mode against the real daemon: supersteps as steps, the double-scheduling example with
and without its barrier, determinism under shuffled task delays, approvals pausing the graph,
rollback and fork then continuing, the recursion limit, and a bad file's error.

Timelines are read back as any client would (ListSteps: which tasks, i.e. nodes, ran in which
step) and channel values through a read-only step's reply; nothing of the daemon is mocked.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from agentd.audit.evidence import read_records
from tests.conftest import CONFIG, REPO, DaemonHandle, daemon_base, start_daemon, stop_daemon

pytestmark = pytest.mark.privileged

Stub = agentd_pb2_grpc.AgentdStub
CASES = REPO / "tests" / "graph_cases"
APPROVALS_CONFIG = CONFIG + '\n[agents.approvals]\npolicy = "approvals.yaml"\nstage = "prototype"\n'
FINISHED = pb.GRAPH_EVENT_KIND_FINISHED
PENDING = pb.GRAPH_EVENT_KIND_PENDING_APPROVAL
TIMEOUT = 120  # every call is bounded; a hang fails the test instead of stalling the suite


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonHandle]:
    """A daemon of this module's own, with the approvals agent (rm needs an approver)."""
    base = daemon_base()
    (base / "policies").mkdir()
    shutil.copy(REPO / "tests" / "policy_cases" / "approvals.yaml", base / "policies")
    handle = start_daemon(base, APPROVALS_CONFIG)
    yield handle
    stop_daemon(handle)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def stub(daemon: DaemonHandle) -> Stub:
    return daemon.stub()


def run_graph(stub: Stub, text: str, *, run_id: str = "", source: str = "g.yaml",
              **inputs: str) -> list[pb.GraphEvent]:
    return list(stub.RunGraph(pb.RunGraphRequest(run_id=run_id, graph=text.encode(),
                                                 source=source, inputs=inputs),
                              timeout=TIMEOUT))


def timeline(stub: Stub, run_id: str) -> list[tuple[int, tuple[str, ...]]]:
    """Committed supersteps: (step, nodes), from the run's step records."""
    steps = stub.ListSteps(pb.ListStepsRequest(run_id=run_id), timeout=TIMEOUT).steps
    return [(s.step, tuple(t.name for t in s.tasks)) for s in steps
            if s.state == pb.STEP_STATE_COMMITTED]


def channels_of(stub: Stub, run_id: str) -> dict[str, object]:
    """The run's channel values at its head, as a task sees them (a read-only step)."""
    reply = stub.Step(pb.StepRequest(run_id=run_id, tasks=[pb.TaskSpec(
        name="look", argv=["/bin/true"])]), timeout=TIMEOUT)
    assert reply.read_only
    return {name: json.loads(value) for name, value in reply.channels.items()}


def finished(events: list[pb.GraphEvent]) -> pb.GraphEvent:
    assert events[-1].kind == FINISHED, events
    return events[-1]


class TestDoubleScheduling:
    def test_without_the_barrier_the_join_runs_twice(self, stub: Stub) -> None:
        """fan_in.yaml: join runs in supersteps 3 and 4, the timeline shows it twice."""
        events = run_graph(stub, (CASES / "fan_in.yaml").read_text(), start="go")
        end = finished(events)
        assert not end.stopped, end.reason
        run_id = end.run_id
        assert timeline(stub, run_id) == [(1, ("graph.input",)), (2, ("a1", "b1")),
                                          (3, ("b2", "join")), (4, ("join",))]
        assert channels_of(stub, run_id)["log"] == ["join", "join"]

    def test_with_the_barrier_the_join_runs_once(self, stub: Stub) -> None:
        """fan_in_barrier.yaml: join runs once, in superstep 4, after both branches."""
        end = finished(run_graph(stub, (CASES / "fan_in_barrier.yaml").read_text(),
                                 start="go"))
        assert not end.stopped, end.reason
        assert end.supersteps == 3
        assert timeline(stub, end.run_id) == [(1, ("graph.input",)), (2, ("a1", "b1")),
                                              (3, ("b2",)), (4, ("join",))]
        assert channels_of(stub, end.run_id)["log"] == ["join"]


def with_delays(text: str, rng: random.Random) -> str:
    """Each node's script sleeps a random short time first (0-300 ms, in a random order)."""
    return "\n".join(
        line.replace("-c, 'echo", f"-c, 'sleep 0.{rng.randrange(0, 300):03d}; echo")
        for line in text.splitlines()) + "\n"


class TestDeterminism:
    def test_shuffled_task_delays_give_the_same_state_and_timeline(self, stub: Stub) -> None:
        """Whichever task ends first, the plan and the merged channels are the same."""
        text = (CASES / "fan_in.yaml").read_text()
        seen = []
        for seed in range(3):
            end = finished(run_graph(stub, with_delays(text, random.Random(seed)), start="go"))
            seen.append((timeline(stub, end.run_id), channels_of(stub, end.run_id)))
        assert seen[0] == seen[1] == seen[2]


APPROVAL_GRAPH = """apiVersion: agentd/v1
kind: Graph
name: needs-approval
agent: approvals
inputs: [start]
channels:
  start: {}
  cleaned: {}
  after: {}
nodes:
  clean:
    argv: [/usr/bin/rm, -f, nothing-here.txt]
    triggers: [start]
  mark:
    argv: [/bin/sh, -c, 'echo "{\\"channel\\":\\"cleaned\\",\\"value\\":1}" >&3']
    triggers: [start]
    writes: [cleaned]
  after:
    argv: [/bin/sh, -c, 'echo "{\\"channel\\":\\"after\\",\\"value\\":1}" >&3']
    triggers: [cleaned]
    writes: [after]
"""


class TestApprovals:
    def test_a_caller_that_goes_away_leaves_the_stop_on_record(self, daemon: DaemonHandle,
                                                                stub: Stub) -> None:
        """The client cancels while the graph waits for an approver: the graph's end is
        recorded (graph.stopped) all the same, and the pending step stays for a later run."""
        call = stub.RunGraph(pb.RunGraphRequest(graph=APPROVAL_GRAPH.encode(), source="a.yaml",
                                                inputs={"start": "1"}), timeout=TIMEOUT)
        run_id = ""
        for event in call:
            run_id = event.run_id
            if event.kind == PENDING:
                break
        call.cancel()
        assert run_id

        def stopped() -> list[dict[str, object]]:
            return [r for r in read_records(daemon.base / "state" / "audit",
                                            containing=b"graph.stopped")
                    if r["event"] == "graph.stopped" and r["run_id"] == run_id]

        deadline = time.monotonic() + 30
        while not stopped() and time.monotonic() < deadline:
            time.sleep(0.05)
        [record] = stopped()
        assert "the caller went away" in record["details"]["reason"]  # type: ignore[index]
        steps = stub.ListSteps(pb.ListStepsRequest(run_id=run_id), timeout=TIMEOUT).steps
        assert steps[-1].state == pb.STEP_STATE_PENDING_APPROVAL

    def test_a_superstep_pending_approval_pauses_the_graph(self, daemon: DaemonHandle,
                                                           stub: Stub) -> None:
        """The graph waits at the pending step; once approved (and run) it goes on."""
        events: list[pb.GraphEvent] = []
        pending = threading.Event()

        def consume() -> None:
            for event in stub.RunGraph(pb.RunGraphRequest(
                    graph=APPROVAL_GRAPH.encode(), source="a.yaml", inputs={"start": "1"}),
                    timeout=TIMEOUT):
                events.append(event)
                if event.kind == PENDING:
                    pending.set()

        thread = threading.Thread(target=consume)
        thread.start()
        try:
            assert pending.wait(TIMEOUT), events
            paused = next(e for e in events if e.kind == PENDING)
            assert paused.step == 2
            assert list(paused.nodes) == ["clean", "mark"]
            assert not any(e.kind == FINISHED for e in events)
            reply = daemon.stub("approver").Approve(pb.ApproveRequest(
                run_id=paused.run_id, step=2, approve=True), timeout=TIMEOUT)
            assert reply.state == pb.STEP_STATE_COMMITTED
        finally:
            thread.join(TIMEOUT)
        end = finished(events)
        assert not end.stopped, end.reason
        assert timeline(stub, end.run_id) == [(1, ("graph.input",)), (2, ("clean", "mark")),
                                              (3, ("after",))]

    def test_a_rejected_superstep_stops_the_graph(self, daemon: DaemonHandle,
                                                  stub: Stub) -> None:
        """Rejection is an outcome: the graph stops, saying which step and why."""
        events: list[pb.GraphEvent] = []
        pending = threading.Event()

        def consume() -> None:
            for event in stub.RunGraph(pb.RunGraphRequest(
                    graph=APPROVAL_GRAPH.encode(), source="a.yaml", inputs={"start": "1"}),
                    timeout=TIMEOUT):
                events.append(event)
                if event.kind == PENDING:
                    pending.set()

        thread = threading.Thread(target=consume)
        thread.start()
        try:
            assert pending.wait(TIMEOUT), events
            daemon.stub("approver").Approve(pb.ApproveRequest(
                run_id=events[-1].run_id, step=2, approve=False, reason="no"), timeout=TIMEOUT)
        finally:
            thread.join(TIMEOUT)
        end = finished(events)
        assert end.stopped
        assert "discarded" in end.reason


class TestRollbackAndFork:
    def test_rollback_then_continue_replans_the_superstep_after_it(self, stub: Stub) -> None:
        """Progress is the checkpoints: after a rollback to 2, the graph runs b2 then join."""
        text = (CASES / "fan_in_barrier.yaml").read_text()
        run_id = finished(run_graph(stub, text, start="go")).run_id
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=2), timeout=TIMEOUT)
        end = finished(run_graph(stub, text, run_id=run_id))
        assert not end.stopped, end.reason
        assert end.supersteps == 2
        assert timeline(stub, run_id)[-2:] == [(3, ("b2",)), (4, ("join",))]
        assert channels_of(stub, run_id)["log"] == ["join"]

    def test_a_fork_continues_from_its_checkpoint(self, stub: Stub) -> None:
        """A fork of checkpoint 3 (b2 done) runs the join, and only it."""
        text = (CASES / "fan_in_barrier.yaml").read_text()
        source = finished(run_graph(stub, text, start="go")).run_id
        fork = stub.Fork(pb.ForkRequest(run_id=source, step=3), timeout=TIMEOUT).run_id
        end = finished(run_graph(stub, text, run_id=fork))
        assert end.supersteps == 1
        assert timeline(stub, fork) == [(4, ("join",))]

    def test_a_finished_graph_continues_to_nothing(self, stub: Stub) -> None:
        """Running it again on its run plans nothing: its last superstep triggers no node."""
        text = (CASES / "fan_in_barrier.yaml").read_text()
        run_id = finished(run_graph(stub, text, start="go")).run_id
        end = finished(run_graph(stub, text, run_id=run_id))
        assert (end.supersteps, end.stopped) == (0, False)


class TestStops:
    def test_the_recursion_limit_stops_with_a_clear_reason(self, stub: Stub) -> None:
        """endless.yaml: 6 supersteps, then a stop naming the limit; the run keeps them."""
        end = finished(run_graph(stub, (CASES / "endless.yaml").read_text(), start="go"))
        assert end.stopped
        assert "recursion limit: 6 supersteps" in end.reason
        assert end.supersteps == 6
        assert end.step == 7

    def test_an_invalid_file_is_invalid_argument_with_its_line(self, stub: Stub) -> None:
        """The daemon validates the text like agentctl does: file, line, field."""
        text = (CASES / "fan_in.yaml").read_text().replace("triggers: [b1]", "trigger: [b1]")
        with pytest.raises(grpc.RpcError) as caught:
            run_graph(stub, text, source="mine.yaml", start="go")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "mine.yaml:26: nodes.b2.trigger" in (caught.value.details() or "")

    def test_an_unknown_input_is_refused(self, stub: Stub) -> None:
        """Only declared inputs can be set."""
        with pytest.raises(grpc.RpcError) as caught:
            run_graph(stub, (CASES / "fan_in.yaml").read_text(), nope="x")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class TestCli:
    def test_graph_run_then_show_with_its_timeline(self, daemon: DaemonHandle) -> None:
        """`agentctl graph run` against the daemon (0: ended), then `graph show --run`: the
        graph and the run's timeline as Mermaid, the join shown in the superstep it ran in."""
        path = CASES / "fan_in_barrier.yaml"
        socket = ["--socket", str(daemon.socket())]
        ran = subprocess.run([sys.executable, "-m", "agentd.cli.main", *socket, "graph", "run",
                              str(path), "--input", "start=go"], capture_output=True,
                             text=True, timeout=TIMEOUT, check=False)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        run_id = next(word for word in ran.stdout.split() if word.startswith("r-"))
        run_id = run_id.strip(":,()")
        shown = subprocess.run([sys.executable, "-m", "agentd.cli.main", *socket, "graph",
                                "show", str(path), "--run", run_id], capture_output=True,
                               text=True, timeout=TIMEOUT, check=False)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("```mermaid") == 2
        timeline = shown.stdout.split("```mermaid")[2]
        assert "join" in timeline
        assert timeline.count("join") == 1  # with its barrier, the join ran once

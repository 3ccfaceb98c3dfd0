"""The gRPC API of the real daemon (the session's `daemon` fixture), as a client sees it.

Nothing of the kernel is mocked: every Exec runs a real confined worker. Checks that need
the host's view (processes left behind, the workspace on disk, the audit log) read /proc, the
daemon's directory and its audit segments directly.

The workspace is a stack of immutable layers (agentd/store/layers.py) and an Exec is a step of
one task: what it changes in /workspace becomes a new layer only if it exits 0. On the host,
`Run.workspace` is the top layer of the run's current checkpoint: a step that changed nothing
adds no layer, so a file may live in a lower one.

A note on signals, found while writing TestExitAndSignals: the tool is pid 1 of its own pid
namespace, and the kernel delivers to a namespace's init only the signals it has a handler
for (never SIGKILL or SIGSTOP) when they come from inside the namespace. So `kill -TERM $$`
in `sh -c` does nothing, and neither does `os.kill(os.getpid(), SIGTERM)` from an exec'd
python. What does work: a *child* of the tool killed by a signal (the shell reports it as
128 + signo, an exit), a signal the kernel forces on a fault (SIGSEGV from a real page fault
kills even an init: the outcome has `signal` 11 and `exited` false), and the daemon's own
kill from outside the namespace (timeout, limits: `signal` 9).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from tests.conftest import (
    DaemonHandle,
    Result,
    execute,
    marked_processes,
    sh,
    wait_until_gone,
)

pytestmark = pytest.mark.privileged

Stub = agentd_pb2_grpc.AgentdStub
MiB = 1 << 20
# The integration policy's limits (tests/policy_cases/integration.yaml, prototype).
MEMORY_LIMIT = 128 * MiB
OUTPUT_LIMIT = 1 * MiB
WALL_LIMIT = 30.0
WORKER_UID = 65534
LAYER_ID = re.compile(r"l-[0-9a-f]{24}")


# --- helpers ---------------------------------------------------------------------------------


def audit_records(daemon: DaemonHandle, run_id: str | None = None) -> list[dict[str, Any]]:
    """Every record of the daemon's audit log (optionally only those of one run), in order."""
    records: list[dict[str, Any]] = []
    for segment in sorted((daemon.base / "state" / "audit").glob("audit-*.jsonl")):
        for line in segment.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    if run_id is not None:
        records = [r for r in records if r.get("run_id") == run_id]
    return records


def events_of(daemon: DaemonHandle, run_id: str) -> list[str]:
    return [r["event"] for r in audit_records(daemon, run_id)]


def run_layers(daemon: DaemonHandle, run_id: str) -> set[Path]:
    """Every layer the run ever made, as its audit records name them: the base layer of
    run.created and the new layer of each step.committing (a step that changed no file makes
    none). Fork shares its source's layers and makes none of its own."""
    ids = set()
    for rec in audit_records(daemon, run_id):
        if rec["event"] == "run.created":
            ids.add(rec["details"]["base_layer"])
        elif rec["event"] == "step.committing" and rec["details"]["layer"]:
            ids.add(rec["details"]["layer"])
    return {layers_dir(daemon) / layer for layer in ids}


def layers_dir(daemon: DaemonHandle) -> Path:
    """Where the daemon keeps published workspace layers (agentd/store/layers.py)."""
    return daemon.base / "state" / "workspaces" / "layers"


def layers_on_disk(daemon: DaemonHandle) -> set[str]:
    """The ids of every published layer of the daemon."""
    return {p.name for p in layers_dir(daemon).iterdir() if LAYER_ID.fullmatch(p.name)}


def upper_of(daemon: DaemonHandle, task_id: str) -> Path:
    """Where a task's writable upper (and overlay work dir) lives while its step runs."""
    return daemon.base / "state" / "workspaces" / "uppers" / task_id


def checkpoint_layers(stub: Stub, run_id: str) -> list[tuple[int, int]]:
    """(step, number of layers) of each of the run's checkpoints, oldest first."""
    reply = stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run_id))
    return [(c.step, c.layers) for c in reply.checkpoints]


def ready_event(daemon: DaemonHandle) -> dict[str, Any]:
    for line in daemon.log().splitlines():
        if '"agentd.ready"' in line:
            event: dict[str, Any] = json.loads(line)
            return event
    raise AssertionError("the daemon log has no agentd.ready event")


def stream_kinds(result: Result) -> list[tuple[str, bytes]]:
    """The stream as (kind, data) pairs, the outcome as ("outcome", b"")."""
    out = []
    for event in result.events:
        if event.HasField("output"):
            kind = "stdout" if event.output.stream == pb.STREAM_KIND_STDOUT else "stderr"
            out.append((kind, event.output.data))
        else:
            out.append(("outcome", b""))
    return out


@pytest.fixture
def marker() -> str:
    """A string no other process on the host carries."""
    return "agentd-test-" + uuid.uuid4().hex


@pytest.fixture
def admin_stub(daemon: DaemonHandle) -> Iterator[Stub]:
    with daemon.channel("admin") as channel:
        yield agentd_pb2_grpc.AgentdStub(channel)


@pytest.fixture
def approver_stub(daemon: DaemonHandle) -> Iterator[Stub]:
    with daemon.channel("approver") as channel:
        yield agentd_pb2_grpc.AgentdStub(channel)


def code_of(call: Any) -> grpc.StatusCode:
    """Runs `call()` and returns the status code it failed with."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()  # type: ignore[no-any-return]


# --- runs ------------------------------------------------------------------------------------


class TestRuns:
    def test_create_run_describes_the_run(self, stub: Stub, daemon: DaemonHandle) -> None:
        """CreateRun returns an open run of the agent at its stage, with a hashed policy."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration", label="tests"))
        try:
            assert run.run_id
            assert run.agent == "integration"
            assert run.stage == "prototype"
            assert run.state == pb.RUN_STATE_OPEN
            assert run.policy_hash.startswith("sha256:")
            assert len(run.policy_hash) == len("sha256:") + 64
            assert run.policy_file.endswith("integration.yaml")
            assert abs(run.created_at.ToSeconds() - time.time()) < 60
            assert not run.HasField("closed_at")
            assert run.tasks_run == 0
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))

    def test_workspace_layers_are_owned_by_the_worker_uid(self, stub: Stub, run_id: str,
                                                          daemon: DaemonHandle) -> None:
        """A new run's workspace is its empty base layer, a directory owned by the worker uid,
        mode 0755 (/workspace as the worker sees it), under root-owned 0711 directories that
        other host users can cross but not list; a committed layer's root keeps that owner and
        mode."""
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        base = Path(run.workspace)
        assert LAYER_ID.fullmatch(base.name), base
        assert base.parent == layers_dir(daemon)
        info = os.lstat(base)
        assert stat.S_ISDIR(info.st_mode)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (
            0o755, WORKER_UID, WORKER_UID)
        assert os.listdir(base) == []
        for directory in (base.parent, base.parent.parent, base.parent.parent / "uppers"):
            st = os.lstat(directory)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 0, 0), directory
        result = sh(stub, run_id, "echo x > file")
        assert result.outcome is not None
        assert result.outcome.committed
        top = Path(stub.GetRun(pb.GetRunRequest(run_id=run_id)).workspace)
        assert top != base
        info = os.lstat(top)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (
            0o755, WORKER_UID, WORKER_UID)
        st = os.lstat(top / "file")
        assert (st.st_uid, st.st_gid) == (WORKER_UID, WORKER_UID)

    def test_created_by_carries_the_role_of_the_socket(self, stub: Stub, daemon: DaemonHandle,
                                                      run_id: str) -> None:
        """created_by is the role and socket the daemon established, not a caller's claim."""
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        assert run.created_by == f"client@{daemon.socket('client')}"

    def test_created_by_ignores_a_claimed_name(self, daemon: DaemonHandle, stub: Stub) -> None:
        """A name the caller sends in metadata is not what created_by says."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"),
                             metadata=[("agentd-caller-name", "admin")])
        try:
            assert run.created_by.startswith("client@")
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))

    def test_get_run_returns_what_create_returned(self, stub: Stub) -> None:
        """GetRun of a fresh run equals the Run that CreateRun returned."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        try:
            assert stub.GetRun(pb.GetRunRequest(run_id=run.run_id)) == run
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))

    def test_list_runs_filters_by_agent_and_state(self, stub: Stub) -> None:
        """ListRuns shows open runs, of one agent when asked, and closed ones on request."""
        mine = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        other = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper"))
        closed = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        stub.CloseRun(pb.CloseRunRequest(run_id=closed.run_id))
        try:
            ids = {r.run_id for r in stub.ListRuns(pb.ListRunsRequest()).runs}
            assert {mine.run_id, other.run_id} <= ids
            assert closed.run_id not in ids
            ids = {r.run_id for r in stub.ListRuns(pb.ListRunsRequest(agent="integration")).runs}
            assert mine.run_id in ids
            assert other.run_id not in ids
            runs = stub.ListRuns(pb.ListRunsRequest(include_closed=True)).runs
            assert closed.run_id in {r.run_id for r in runs}
            assert all(r.state == pb.RUN_STATE_OPEN for r in
                       stub.ListRuns(pb.ListRunsRequest()).runs)
        finally:
            for run in (mine, other):
                stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))

    def test_close_removes_the_workspace(self, stub: Stub, daemon: DaemonHandle) -> None:
        """CloseRun marks the run closed, clears its workspace field and deletes every layer of
        the run (the base and each committed step's) and its tasks' uppers."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        result = sh(stub, run.run_id, "echo data > file")
        assert result.outcome is not None
        assert result.outcome.committed
        top = Path(stub.GetRun(pb.GetRunRequest(run_id=run.run_id)).workspace)
        layers = run_layers(daemon, run.run_id)
        assert layers == {Path(run.workspace), top}
        assert all(layer.is_dir() for layer in layers)
        closed = stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
        assert closed.state == pb.RUN_STATE_CLOSED
        assert closed.HasField("closed_at")
        assert closed.workspace == ""
        assert [str(layer) for layer in layers if layer.exists()] == []
        assert not upper_of(daemon, result.outcome.task_id).exists()
        assert stub.GetRun(pb.GetRunRequest(run_id=run.run_id)).state == pb.RUN_STATE_CLOSED
        assert "run.closed" in events_of(daemon, run.run_id)

    def test_close_keeps_the_layers_a_fork_shares(self, stub: Stub,
                                                  daemon: DaemonHandle) -> None:
        """Closing a run leaves the layers a fork of it still uses (the fork reads its file);
        closing the fork too deletes them."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        sh(stub, run.run_id, "echo shared > file")
        layers = run_layers(daemon, run.run_id)
        fork = stub.Fork(pb.ForkRequest(run_id=run.run_id, step=1))
        try:
            assert run_layers(daemon, fork.run_id) == set()  # the fork made no layer
            stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
            assert all(layer.is_dir() for layer in layers)
            assert Path(fork.workspace) in layers
            assert (Path(fork.workspace) / "file").read_text() == "shared\n"
            assert sh(stub, fork.run_id, "cat file").stdout == b"shared\n"
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=fork.run_id))
        assert [str(layer) for layer in layers if layer.exists()] == []

    def test_close_with_keep_workspace_leaves_it(self, stub: Stub,
                                                 daemon: DaemonHandle) -> None:
        """keep_workspace leaves the run's layers, and the closed run's workspace still names
        its top layer, holding what the tools wrote."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        sh(stub, run.run_id, "echo kept > file")
        top = stub.GetRun(pb.GetRunRequest(run_id=run.run_id)).workspace
        closed = stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id, keep_workspace=True))
        assert closed.state == pb.RUN_STATE_CLOSED
        assert closed.workspace == top
        assert (Path(top) / "file").read_text() == "kept\n"
        assert all(layer.is_dir() for layer in run_layers(daemon, run.run_id))

    def test_workspace_persists_between_execs(self, stub: Stub, run_id: str) -> None:
        """What one Exec writes in /workspace the next one reads, and the host sees it in the
        run's top layer."""
        sh(stub, run_id, "echo hello > note")
        assert sh(stub, run_id, "cat note").stdout == b"hello\n"
        workspace = stub.GetRun(pb.GetRunRequest(run_id=run_id)).workspace
        assert (Path(workspace) / "note").read_text() == "hello\n"

    def test_tasks_are_counted(self, stub: Stub, run_id: str) -> None:
        """Every Exec that reached a worker increments the run's tasks_run."""
        for _ in range(3):
            sh(stub, run_id, "true")
        assert stub.GetRun(pb.GetRunRequest(run_id=run_id)).tasks_run == 3

    def test_closed_run_refuses_exec(self, stub: Stub) -> None:
        """Exec in a closed run is FAILED_PRECONDITION."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
        assert code_of(lambda: execute(stub, run.run_id, ["/bin/true"])) == \
            grpc.StatusCode.FAILED_PRECONDITION

    def test_closing_twice_is_failed_precondition(self, stub: Stub) -> None:
        """A second CloseRun of the same run is FAILED_PRECONDITION."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
        assert code_of(lambda: stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))) == \
            grpc.StatusCode.FAILED_PRECONDITION

    def test_unknown_agent_is_not_found(self, stub: Stub) -> None:
        """CreateRun of an agent the config does not register is NOT_FOUND, naming it."""
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateRun(pb.CreateRunRequest(agent="no-such-agent"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-agent" in caught.value.details()

    def test_overlong_label_is_invalid_argument(self, stub: Stub) -> None:
        """A caller-supplied label longer than 200 characters is INVALID_ARGUMENT."""
        assert code_of(lambda: stub.CreateRun(pb.CreateRunRequest(
            agent="integration", label="x" * 201))) == grpc.StatusCode.INVALID_ARGUMENT

    def test_missing_agent_is_invalid_argument(self, stub: Stub) -> None:
        """CreateRun without an agent is INVALID_ARGUMENT."""
        assert code_of(lambda: stub.CreateRun(pb.CreateRunRequest())) == \
            grpc.StatusCode.INVALID_ARGUMENT

    @pytest.mark.parametrize("method", ["GetRun", "CloseRun", "Exec"])
    def test_unknown_run_is_not_found(self, stub: Stub, method: str) -> None:
        """Every call naming a run that does not exist is NOT_FOUND."""
        calls = {
            "GetRun": lambda: stub.GetRun(pb.GetRunRequest(run_id="r-doesnotexist")),
            "CloseRun": lambda: stub.CloseRun(pb.CloseRunRequest(run_id="r-doesnotexist")),
            "Exec": lambda: execute(stub, "r-doesnotexist", ["/bin/true"]),
        }
        assert code_of(calls[method]) == grpc.StatusCode.NOT_FOUND

    def test_exec_racing_a_close_is_refused(self, stub: Stub, daemon: DaemonHandle) -> None:
        """Once CloseRun is under way no Exec of the run starts, and every layer of the closed
        run is gone when the dust settles, those of Execs that ran before the close included
        (nothing commits a step behind the close)."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        # Enough files that deleting the run's layers takes a while (about 0.5 s here); made
        # from the host, where no cgroup limit slows their creation down, in the run's only
        # layer (the base: the top of its current checkpoint).
        many = Path(run.workspace) / "many"
        many.mkdir()
        for i in range(40000):
            os.close(os.open(many / str(i), os.O_CREAT | os.O_WRONLY, 0o600))
        closing = stub.CloseRun.future(pb.CloseRunRequest(run_id=run.run_id))
        close_sent = time.monotonic()
        attempts: list[tuple[float, str]] = []  # (seconds after the close was sent, result)
        while not closing.done():
            began = time.monotonic() - close_sent
            try:
                sh(stub, run.run_id, "echo late > late-file")
                attempts.append((round(began, 3), "ran"))
            except grpc.RpcError as exc:
                attempts.append((round(began, 3), exc.code().name))
        assert closing.result().state == pb.RUN_STATE_CLOSED
        late = [(t, what) for t, what in attempts if t > 0.1]
        assert late, f"the close took under 0.1 s, so nothing raced it: {attempts}"
        events = events_of(daemon, run.run_id)
        problems = {
            "Execs that ran though started after the close (s)":
                [t for t, what in late if what == "ran"],
            "other refusals than FAILED_PRECONDITION":
                [what for _, what in late if what not in ("ran", "FAILED_PRECONDITION")],
            "closed run's layers still on disk":
                sorted(str(p) for p in run_layers(daemon, run.run_id) if p.exists()),
            "exec.allowed audited after run.closed":
                "exec.allowed" in events[events.index("run.closed"):],
            "step committed after run.closed":
                "step.committing" in events[events.index("run.closed"):],
        }
        assert not any(problems.values()), problems

    def test_close_during_a_commit_leaves_nothing_of_the_run(self, stub: Stub,
                                                             daemon: DaemonHandle) -> None:
        """A CloseRun sent while an Exec's changes are being committed (its new layer is being
        built) leaves no layer and no checkpoint of the closed run, and no step is committed
        after run.closed."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        # Thousands of new files: the commit fsyncs each, which takes a while (about 0.5 s).
        program = ("import os\nos.mkdir('many')\nfor i in range(5000):\n"
                   "    open('many/%d' % i, 'w').close()\n")
        results: list[Result] = []
        exec_thread = threading.Thread(target=lambda: results.append(
            execute(stub, run.run_id, ["/usr/bin/python3", "-c", program])))
        exec_thread.start()
        building = False
        while exec_thread.is_alive() and not building:
            # A layer being built: agentd/store/layers.py names it .tmp-<hex> until published.
            building = any(p.name.startswith(".tmp-") for p in layers_dir(daemon).iterdir())
            time.sleep(0.002)
        try:
            assert building, "the Exec ended before its commit was seen: nothing raced it"
            closed = stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
        finally:
            exec_thread.join(timeout=60)
        assert closed.state == pb.RUN_STATE_CLOSED
        assert results
        assert results[0].outcome is not None
        events = events_of(daemon, run.run_id)
        problems = {
            "closed run's layers still on disk":
                sorted(str(p) for p in run_layers(daemon, run.run_id) if p.exists()),
            "checkpoints of the closed run":
                checkpoint_layers(stub, run.run_id),
            "step committed after run.closed":
                "step.committing" in events[events.index("run.closed"):],
        }
        assert not any(problems.values()), (problems, results[0].outcome)

    def test_close_kills_a_running_exec(self, stub: Stub, marker: str) -> None:
        """CloseRun of a run with a running tool ends its Exec with stop_reason CANCELLED."""
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        call = stub.Exec(pb.ExecRequest(run_id=run.run_id, argv=[
            "/bin/sh", "-c", "echo up; sleep 60"], env={"FOO": marker}), timeout=30)
        events = iter(call)
        assert next(events).output.data == b"up\n"
        stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
        rest = list(events)
        assert rest[-1].outcome.stop_reason == pb.STOP_REASON_CANCELLED
        assert rest[-1].outcome.signal == 9
        assert wait_until_gone(marker, timeout=1.0) == []


# --- exec: a step of one task ----------------------------------------------------------------


def workspace_of(stub: Stub, run_id: str) -> str:
    return stub.GetRun(pb.GetRunRequest(run_id=run_id)).workspace


class TestExecIsAStep:
    def test_successful_exec_commits_a_step(self, stub: Stub, daemon: DaemonHandle,
                                            run_id: str) -> None:
        """An Exec that exits 0 commits its file changes as the run's next step, in a new
        layer, and the next Exec sees them."""
        assert stub.GetRun(pb.GetRunRequest(run_id=run_id)).step == 0
        base = workspace_of(stub, run_id)
        result = sh(stub, run_id, "echo one > made")
        outcome = result.outcome
        assert outcome is not None
        assert (outcome.exit_code, outcome.committed, outcome.step, outcome.step_failure) == (
            0, True, 1, "")
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        assert run.step == 1
        assert run.workspace != base
        assert (Path(run.workspace) / "made").read_text() == "one\n"
        assert checkpoint_layers(stub, run_id) == [(0, 1), (1, 2)]
        assert not upper_of(daemon, outcome.task_id).exists()
        again = sh(stub, run_id, "cat made > copy")
        assert again.stdout == b""
        assert again.outcome is not None
        assert (again.outcome.committed, again.outcome.step, again.outcome.base_step) == (
            True, 2, 1)
        assert stub.GetRun(pb.GetRunRequest(run_id=run_id)).step == 2

    @pytest.mark.parametrize(("ending", "timeout", "why"), [
        ("exit 1", 0.0, "exited 1"),
        ("sleep 30", 0.5, "stopped for timeout"),
    ], ids=["exit-1", "timeout"])
    def test_failing_exec_commits_nothing(self, stub: Stub, daemon: DaemonHandle, run_id: str,
                                          ending: str, timeout: float, why: str) -> None:
        """An Exec that fails (exit 1, or stopped at its timeout) after writing, changing and
        deleting files applies none of it: no new step, checkpoint or layer, and step_failure
        says why."""
        sh(stub, run_id, "echo kept > kept; echo old > changed")
        before = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        assert before.step == 1
        checkpoints = checkpoint_layers(stub, run_id)
        on_disk = layers_on_disk(daemon)
        result = sh(stub, run_id, f"echo new > made; echo new > changed; rm kept; {ending}",
                    timeout=timeout)
        outcome = result.outcome
        assert outcome is not None
        assert not outcome.committed
        assert why in outcome.step_failure
        if ending == "exit 1":
            assert (outcome.exited, outcome.exit_code) == (True, 1)
        else:
            assert outcome.stop_reason == pb.STOP_REASON_TIMEOUT
        after = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        assert (after.step, after.workspace, after.tasks_run) == (
            before.step, before.workspace, before.tasks_run + 1)
        assert checkpoint_layers(stub, run_id) == checkpoints
        assert layers_on_disk(daemon) == on_disk
        assert not upper_of(daemon, outcome.task_id).exists()
        look = sh(stub, run_id, "cat kept changed; test -e made || echo absent")
        assert look.stdout == b"kept\nold\nabsent\n"

    def test_exec_that_changes_nothing_makes_no_checkpoint(self, stub: Stub,
                                                           run_id: str) -> None:
        """An Exec that exits 0 without changing a file or writing a channel is committed
        read-only: no checkpoint, the run stays at its head, and the outcome names that head
        as both its step and its base; the timeline shows it."""
        sh(stub, run_id, "echo x > file")
        before = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        result = sh(stub, run_id, "cat file")
        assert result.stdout == b"x\n"
        assert result.outcome is not None
        assert (result.outcome.committed, result.outcome.read_only, result.outcome.step,
                result.outcome.base_step) == (True, True, before.step, before.step)
        after = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        assert (after.step, after.workspace) == (before.step, before.workspace)
        assert checkpoint_layers(stub, run_id) == [(0, 1), (1, 2)]
        timeline = stub.ListSteps(pb.ListStepsRequest(run_id=run_id)).steps
        assert [(s.step, s.read_only, s.state) for s in timeline] == [
            (1, False, pb.STEP_STATE_COMMITTED), (1, True, pb.STEP_STATE_COMMITTED)]
        # The next change is the next checkpoint: numbers move only with state.
        assert sh(stub, run_id, "echo y > other").outcome.step == before.step + 1  # type: ignore[union-attr]


# --- exec: streaming -------------------------------------------------------------------------


class TestExecStreaming:
    def test_chunks_arrive_in_order_while_the_tool_runs(self, stub: Stub, run_id: str) -> None:
        """Lines printed between sleeps arrive as separate chunks, in order, as they are made."""
        script = "for i in 1 2 3 4; do echo line$i; sleep 0.2; done"
        started = time.monotonic()
        arrivals = []
        data = []
        for event in stub.Exec(pb.ExecRequest(run_id=run_id, argv=["/bin/sh", "-c", script]),
                               timeout=30):
            if event.HasField("output"):
                arrivals.append(time.monotonic() - started)
                data.append(event.output.data)
        assert data == [b"line1\n", b"line2\n", b"line3\n", b"line4\n"]
        # Streamed, not gathered: the first line came long before the tool's end (≥ 0.8 s).
        assert arrivals[0] < arrivals[-1] - 0.4

    def test_stdout_and_stderr_are_separate_and_interleaved_in_order(
            self, stub: Stub, run_id: str) -> None:
        """Each stream's chunks are tagged with their stream, in the order they were written."""
        result = sh(stub, run_id, "echo o1; sleep 0.1; echo e1 >&2; sleep 0.1; echo o2; "
                                  "sleep 0.1; echo e2 >&2")
        assert stream_kinds(result) == [("stdout", b"o1\n"), ("stderr", b"e1\n"),
                                        ("stdout", b"o2\n"), ("stderr", b"e2\n"),
                                        ("outcome", b"")]
        assert result.outcome is not None
        assert result.outcome.stdout_bytes == 6
        assert result.outcome.stderr_bytes == 6

    def test_outcome_is_the_one_last_message(self, stub: Stub, run_id: str) -> None:
        """Exactly one message carries the outcome, and it is the last one."""
        result = sh(stub, run_id, "echo a; echo b >&2; echo c")
        outcomes = [i for i, e in enumerate(result.events) if e.HasField("outcome")]
        assert outcomes == [len(result.events) - 1]

    def test_stdin_is_delivered(self, stub: Stub, run_id: str) -> None:
        """The request's stdin is what the tool reads on fd 0, then EOF."""
        result = execute(stub, run_id, ["/bin/cat"], stdin=b"hello\nstdin\n")
        assert result.stdout == b"hello\nstdin\n"
        assert result.outcome is not None
        assert result.outcome.exited
        assert result.outcome.exit_code == 0

    def test_stdin_larger_than_a_pipe_buffer(self, stub: Stub, run_id: str) -> None:
        """A stdin of 256 KiB (four pipe buffers) arrives whole."""
        data = os.urandom(256 << 10)
        result = execute(stub, run_id, ["/usr/bin/sha256sum"], stdin=data)
        assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()

    def test_stdin_of_five_mib_is_accepted(self, stub: Stub, run_id: str) -> None:
        """A 5 MiB stdin, within the daemon's documented 16 MiB, reaches the tool whole."""
        result = execute(stub, run_id, ["/usr/bin/wc", "-c"], stdin=b"x" * (5 * MiB))
        assert result.stdout.strip() == str(5 * MiB).encode()

    def test_large_output_is_complete_and_in_order(self, stub: Stub, run_id: str) -> None:
        """512 KiB of numbered lines arrive complete and in order, over many chunks."""
        lines = 512 * 1024 // 16
        program = f"import sys\nfor i in range({lines}): sys.stdout.write('%015d\\n' % i)"
        result = execute(stub, run_id, ["/usr/bin/python3", "-c", program])
        assert result.stdout == b"".join(b"%015d\n" % i for i in range(lines))
        assert result.outcome is not None
        assert result.outcome.stdout_bytes == 512 * 1024
        assert result.outcome.stop_reason == pb.STOP_REASON_NONE
        assert len(result.events) > 2

    def test_env_from_the_request_is_visible(self, stub: Stub, run_id: str) -> None:
        """An allowed variable from the request reaches the tool beside the policy's env.set."""
        result = sh(stub, run_id, 'echo "$GREETING|$LANG|$HOME"', env={"GREETING": "hola"})
        assert result.stdout == b"hola|C.UTF-8|/workspace\n"

    def test_default_cwd_is_the_workspace(self, stub: Stub, run_id: str) -> None:
        """Without cwd the tool starts in /workspace."""
        assert sh(stub, run_id, "pwd").stdout == b"/workspace\n"

    @pytest.mark.parametrize("cwd", ["/tmp", "/workspace/sub"])
    def test_cwd_is_honoured(self, stub: Stub, run_id: str, cwd: str) -> None:
        """cwd under /workspace or /tmp is where the tool starts."""
        sh(stub, run_id, "mkdir -p sub")
        assert sh(stub, run_id, "pwd", cwd=cwd).stdout == f"{cwd}\n".encode()

    def test_bare_name_is_found_on_path(self, stub: Stub, run_id: str) -> None:
        """argv[0] as a bare name is resolved on the worker's PATH."""
        result = execute(stub, run_id, ["echo", "found"])
        assert result.stdout == b"found\n"


# --- exec: exit codes and signals ------------------------------------------------------------


class TestExitAndSignals:
    def test_exit_zero(self, stub: Stub, run_id: str) -> None:
        """A tool that exits 0 reports exited, code 0, no signal, no stop reason."""
        outcome = sh(stub, run_id, "exit 0").outcome
        assert outcome is not None
        assert (outcome.exited, outcome.exit_code, outcome.signal) == (True, 0, 0)
        assert outcome.stop_reason == pb.STOP_REASON_NONE
        assert outcome.summary == "exited 0"
        assert outcome.task_id.startswith("t-")

    def test_exit_three_is_an_outcome_not_an_error(self, stub: Stub, run_id: str) -> None:
        """A failing tool is a successful RPC whose outcome says exit code 3."""
        outcome = sh(stub, run_id, "exit 3").outcome
        assert outcome is not None
        assert (outcome.exited, outcome.exit_code, outcome.signal) == (True, 3, 0)
        assert outcome.summary == "exited 3"

    @pytest.mark.parametrize(("signame", "signo"), [("TERM", 15), ("KILL", 9)])
    def test_child_killed_by_a_signal_is_reported_by_the_shell(
            self, stub: Stub, run_id: str, signame: str, signo: int) -> None:
        """A child that kills itself with SIGTERM/SIGKILL dies; sh reports 128 + signo."""
        result = sh(stub, run_id, f'sh -c "kill -{signame} \\$\\$"; echo "rc=$?"')
        assert result.stdout == f"rc={128 + signo}\n".encode()

    def test_tool_dying_of_a_fault_reports_the_signal(self, stub: Stub, run_id: str) -> None:
        """A tool killed by SIGSEGV reports signal 11 and not exited."""
        result = execute(stub, run_id, ["/usr/bin/python3", "-c",
                                        "import ctypes; ctypes.string_at(0)"])
        outcome = result.outcome
        assert outcome is not None
        assert not outcome.exited
        assert outcome.signal == 11
        assert outcome.stop_reason == pb.STOP_REASON_NONE
        assert "SIGSEGV" in outcome.summary

    @pytest.mark.parametrize("signame", ["TERM", "KILL"])
    def test_tool_is_pid_one_and_survives_its_own_signals(
            self, stub: Stub, run_id: str, signame: str) -> None:
        """The tool is its pid namespace's init, so a handler-less signal it sends itself is
        dropped by the kernel and it runs on (see the module docstring)."""
        result = sh(stub, run_id, f'echo "pid=$$"; kill -{signame} $$; echo after')
        assert result.stdout == b"pid=1\nafter\n"
        assert result.outcome is not None
        assert result.outcome.exited
        assert result.outcome.exit_code == 0

    def test_outcome_measures_wall_cpu_and_memory(self, stub: Stub, run_id: str) -> None:
        """wall, cpu and peak memory are plausible for 0.3 s of busy work holding 48 MiB."""
        program = ("import time\nb = bytearray(48 << 20)\nt = time.process_time()\n"
                   "while time.process_time() - t < 0.3: pass\n")
        outcome = execute(stub, run_id, ["/usr/bin/python3", "-c", program]).outcome
        assert outcome is not None
        assert outcome.exited
        assert outcome.exit_code == 0
        assert 0.3 <= outcome.wall_seconds < 10
        assert 0.3 <= outcome.cpu_seconds <= outcome.wall_seconds + 0.5
        assert 48 * MiB <= outcome.peak_memory_bytes <= MEMORY_LIMIT


# --- exec: limits ----------------------------------------------------------------------------


class TestLimits:
    def test_timeout(self, stub: Stub, run_id: str, marker: str) -> None:
        """A tool past its timeout is killed whole: TIMEOUT, signal 9, wall ≈ the timeout."""
        result = sh(stub, run_id, "sleep 30 & sleep 30", timeout=1.0, env={"FOO": marker})
        outcome = result.outcome
        assert outcome is not None
        assert outcome.stop_reason == pb.STOP_REASON_TIMEOUT
        assert not outcome.exited
        assert outcome.signal == 9
        assert 1.0 <= outcome.wall_seconds < 2.5
        assert "timeout" in outcome.summary
        assert wait_until_gone(marker, timeout=1.0) == []

    def test_memory(self, stub: Stub, run_id: str) -> None:
        """Allocating 512 MiB under a 128 MiB limit ends with MEMORY, peak at the limit."""
        result = execute(stub, run_id, ["/usr/bin/python3", "-c",
                                        "b = bytearray(512 << 20); print('survived')"])
        outcome = result.outcome
        assert outcome is not None
        assert outcome.stop_reason == pb.STOP_REASON_MEMORY
        assert b"survived" not in result.stdout
        assert not outcome.exited
        assert outcome.signal == 9
        assert MEMORY_LIMIT * 0.75 <= outcome.peak_memory_bytes <= MEMORY_LIMIT + MiB

    def test_pids(self, stub: Stub, run_id: str, marker: str) -> None:
        """A fork loop hits the pids limit: PIDS, pids_limit_hit, and nothing of it survives."""
        result = sh(stub, run_id, "while :; do sleep 30 & done", env={"FOO": marker})
        outcome = result.outcome
        assert outcome is not None
        assert outcome.stop_reason == pb.STOP_REASON_PIDS
        assert outcome.pids_limit_hit
        assert outcome.wall_seconds < 10
        assert wait_until_gone(marker, timeout=1.0) == []

    def test_output(self, stub: Stub, run_id: str) -> None:
        """Printing 2 MiB under a 1 MiB limit: OUTPUT, and exactly the first 1 MiB arrives."""
        program = ("import sys\nfor i in range(2 << 16): sys.stdout.write('%015d\\n' % i)\n"
                   "sys.stdout.flush()")
        result = execute(stub, run_id, ["/usr/bin/python3", "-c", program])
        outcome = result.outcome
        assert outcome is not None
        assert outcome.stop_reason == pb.STOP_REASON_OUTPUT
        assert len(result.stdout) == OUTPUT_LIMIT
        assert outcome.stdout_bytes == OUTPUT_LIMIT
        assert result.stdout == b"".join(b"%015d\n" % i for i in range(OUTPUT_LIMIT // 16))
        assert not outcome.exited
        assert outcome.signal == 9

    def test_output_limit_counts_both_streams(self, stub: Stub, run_id: str) -> None:
        """stdout and stderr share the output limit: 768 KiB of each delivers 1 MiB in all."""
        program = ("import sys\nb = b'y' * (768 << 10)\nsys.stdout.buffer.write(b)\n"
                   "sys.stdout.flush()\nsys.stderr.buffer.write(b)\n")
        result = execute(stub, run_id, ["/usr/bin/python3", "-c", program])
        assert result.outcome is not None
        assert result.outcome.stop_reason == pb.STOP_REASON_OUTPUT
        assert len(result.stdout) + len(result.stderr) == OUTPUT_LIMIT
        assert result.outcome.stdout_bytes + result.outcome.stderr_bytes == OUTPUT_LIMIT


# --- exec: refusals and bad requests ---------------------------------------------------------


class TestRefusals:
    def assert_no_worker(self, stub: Stub, daemon: DaemonHandle, run_id: str) -> list[str]:
        """The call started nothing: no exec.allowed or step.started in the audit log, execs
        still 0, no step committed."""
        events = events_of(daemon, run_id)
        assert "exec.allowed" not in events
        assert "step.started" not in events
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        assert (run.tasks_run, run.step) == (0, 0)
        return events

    @pytest.mark.parametrize(("argv", "env", "timeout", "rule"), [
        (["/opt/tool"], {}, 0.0, "exec.allow"),
        (["/etc/passwd"], {}, 0.0, "exec.allow"),
        (["/bin/true"], {"SECRET_TOKEN": "x"}, 0.0, "env.allow"),
        (["/bin/true"], {"LANG": "C"}, 0.0, "env.allow"),
        (["/bin/true"], {}, WALL_LIMIT + 1, "limits.wall_time"),
    ], ids=["exec-outside", "exec-not-a-tool", "env-not-allowed", "env-set-by-policy",
            "timeout-above-wall-time"])
    def test_policy_refusal_names_the_rule(self, stub: Stub, daemon: DaemonHandle, run_id: str,
                                           argv: list[str], env: dict[str, str],
                                           timeout: float, rule: str) -> None:
        """A request the policy refuses is PERMISSION_DENIED naming file:line and rule, is
        audited as exec.refused, and starts no worker."""
        with pytest.raises(grpc.RpcError) as caught:
            execute(stub, run_id, argv, env=env, timeout=timeout)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "integration.yaml:" in caught.value.details()
        assert f"stages.prototype.{rule}" in caught.value.details()
        events = self.assert_no_worker(stub, daemon, run_id)
        assert events.count("exec.refused") == 1
        refused = next(r for r in audit_records(daemon, run_id) if r["event"] == "exec.refused")
        assert refused["details"]["error"] == "PERMISSION_DENIED"
        assert rule in refused["details"]["rule"]

    @pytest.mark.parametrize(("argv", "cwd", "timeout"), [
        ([], "", 0.0),
        ([""], "", 0.0),
        (["/bin/echo", "a\0b"], "", 0.0),
        (["/bin/true"], "tmp", 0.0),
        (["/bin/true"], "/etc", 0.0),
        (["/bin/true"], "/workspace/../etc", 0.0),
        (["/bin/true"], "", -1.0),
        (["/bin/true"], "", math.nan),
        (["/bin/true"], "", math.inf),
        (["no-such-tool-agentd"], "", 0.0),
        (["bin/true"], "", 0.0),
    ], ids=["empty-argv", "empty-argv0", "nul-in-argv", "relative-cwd", "cwd-outside",
            "cwd-escapes", "negative-timeout", "nan-timeout", "inf-timeout",
            "bare-name-not-on-path", "relative-argv0"])
    def test_malformed_request_is_invalid_argument(self, stub: Stub, daemon: DaemonHandle,
                                                   run_id: str, argv: list[str], cwd: str,
                                                   timeout: float) -> None:
        """A malformed request is INVALID_ARGUMENT and starts no worker."""
        with pytest.raises(grpc.RpcError) as caught:
            execute(stub, run_id, argv, cwd=cwd, timeout=timeout)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details()
        self.assert_no_worker(stub, daemon, run_id)

    def test_nul_in_env_value_is_invalid_argument(self, stub: Stub, daemon: DaemonHandle,
                                                  run_id: str) -> None:
        """An allowed variable whose value holds a NUL is INVALID_ARGUMENT, not passed on."""
        with pytest.raises(grpc.RpcError) as caught:
            execute(stub, run_id, ["/bin/true"], env={"GREETING": "a\0b"})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        self.assert_no_worker(stub, daemon, run_id)

    @pytest.mark.parametrize("name", ["A=B", "", "1X"])
    def test_bad_env_name_is_invalid_argument(self, stub: Stub, daemon: DaemonHandle,
                                              run_id: str, name: str) -> None:
        """An environment variable name that is not a shell identifier is INVALID_ARGUMENT."""
        with pytest.raises(grpc.RpcError) as caught:
            execute(stub, run_id, ["/bin/true"], env={name: "x"})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        self.assert_no_worker(stub, daemon, run_id)

    def test_stdin_above_sixteen_mib_is_invalid_argument(self, stub: Stub, daemon: DaemonHandle,
                                                        run_id: str) -> None:
        """A stdin above 16 MiB is the daemon's INVALID_ARGUMENT saying to use the workspace."""
        with pytest.raises(grpc.RpcError) as caught:
            execute(stub, run_id, ["/usr/bin/wc", "-c"], stdin=b"x" * (17 * MiB))
        assert (caught.value.code(), caught.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "stdin is larger than 16 MiB; put large inputs in the workspace")
        self.assert_no_worker(stub, daemon, run_id)

    def test_missing_cwd_is_a_setup_failure(self, stub: Stub, run_id: str) -> None:
        """A well-formed cwd that does not exist fails the call, naming the setup step, and
        commits no step."""
        with pytest.raises(grpc.RpcError) as caught:
            execute(stub, run_id, ["/bin/true"], cwd="/workspace/absent")
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "chdir" in caught.value.details()
        assert stub.GetRun(pb.GetRunRequest(run_id=run_id)).step == 0


# --- roles -----------------------------------------------------------------------------------


class TestRoles:
    def test_approver_may_read_runs(self, stub: Stub, approver_stub: Stub, run_id: str) -> None:
        """The approver socket serves ListRuns and GetRun."""
        runs = approver_stub.ListRuns(pb.ListRunsRequest()).runs
        assert run_id in {r.run_id for r in runs}
        assert approver_stub.GetRun(pb.GetRunRequest(run_id=run_id)).run_id == run_id

    def test_approver_may_not_create_exec_or_close(self, approver_stub: Stub, stub: Stub,
                                                   run_id: str) -> None:
        """CreateRun, Exec and CloseRun on the approver socket are PERMISSION_DENIED."""
        calls = [
            lambda: approver_stub.CreateRun(pb.CreateRunRequest(agent="integration")),
            lambda: execute(approver_stub, run_id, ["/bin/true"]),
            lambda: approver_stub.CloseRun(pb.CloseRunRequest(run_id=run_id)),
        ]
        assert [code_of(c) for c in calls] == [grpc.StatusCode.PERMISSION_DENIED] * 3
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        assert run.state == pb.RUN_STATE_OPEN
        assert run.tasks_run == 0

    def test_approver_refusal_names_role_and_method(self, approver_stub: Stub) -> None:
        """The refusal says which role may not call which method."""
        with pytest.raises(grpc.RpcError) as caught:
            approver_stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        assert "approver" in caught.value.details()
        assert "CreateRun" in caught.value.details()

    def test_role_refusal_is_audited(self, approver_stub: Stub, daemon: DaemonHandle,
                                     run_id: str) -> None:
        """An approver's refused Exec leaves an audit record with the approver as actor."""
        before = len(audit_records(daemon))
        code_of(lambda: execute(approver_stub, run_id, ["/bin/true"]))
        new = audit_records(daemon)[before:]
        assert any(r["actor"].get("role") == "approver" for r in new), \
            f"no audit record of the refusal; new records: {[r['event'] for r in new]}"

    def test_admin_may_do_everything(self, admin_stub: Stub) -> None:
        """The admin socket creates, runs in, lists and closes runs; created_by says admin."""
        run = admin_stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        assert run.created_by.startswith("admin@")
        assert sh(admin_stub, run.run_id, "echo admin").stdout == b"admin\n"
        assert run.run_id in {r.run_id for r in admin_stub.ListRuns(pb.ListRunsRequest()).runs}
        closed = admin_stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
        assert closed.state == pb.RUN_STATE_CLOSED

    def test_sockets_are_guarded_by_mode(self, daemon: DaemonHandle) -> None:
        """Client and approver sockets are 0660, admin is 0600 (root only)."""
        modes = {role: stat.S_IMODE(os.stat(daemon.socket(role)).st_mode)
                 for role in ("client", "approver", "admin")}
        assert modes == {"client": 0o660, "approver": 0o660, "admin": 0o600}


# --- health and reflection -------------------------------------------------------------------


class TestHealthAndReflection:
    @pytest.mark.parametrize("role", ["client", "approver", "admin"])
    @pytest.mark.parametrize("service", ["", "agentd.v1.Agentd"])
    def test_health_is_serving(self, daemon: DaemonHandle, role: str, service: str) -> None:
        """grpc.health.v1.Health/Check says SERVING for the server and for agentd.v1.Agentd."""
        with daemon.channel(role) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    def test_health_of_unknown_service_is_not_found(self, daemon: DaemonHandle) -> None:
        """Health/Check of a service the daemon does not serve is NOT_FOUND."""
        with daemon.channel() as channel, pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    def test_reflection_lists_and_describes_the_services(self, daemon: DaemonHandle) -> None:
        """Server reflection lists agentd, health and reflection and describes Agentd's methods,
        the step API and Exec's step outcome included."""
        with daemon.channel() as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            pool = DescriptorPool(database)
            agentd = pool.FindServiceByName("agentd.v1.Agentd")
            methods = {m.name for m in agentd.methods}
            outcome = pool.FindMessageTypeByName("agentd.v1.Outcome")
        assert {"agentd.v1.Agentd", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= services
        assert methods == {"CreateRun", "GetRun", "ListRuns", "CloseRun", "Exec", "Step",
                           "StreamStep", "Approve", "ListSteps", "ListCheckpoints", "Rollback",
                           "Fork", "ExportCheckpoint", "GetStatus", "ReloadPolicies",
                           "GetStage", "StageHistory", "PromoteStage", "ApproveStage",
                           "AcceptPolicy", "WaitStep", "ReadFile", "WriteFile", "RunGraph",
                           "ResolveStep"}
        assert agentd.methods_by_name["Exec"].output_type.full_name == "agentd.v1.ExecEvent"
        assert agentd.methods_by_name["Exec"].server_streaming
        assert agentd.methods_by_name["Step"].output_type.full_name == "agentd.v1.StepReply"
        assert {"committed", "step", "step_failure"} <= set(outcome.fields_by_name)


# --- cancel ----------------------------------------------------------------------------------


class TestCancel:
    def test_cancelled_stream_leaves_no_process(self, stub: Stub, daemon: DaemonHandle,
                                                run_id: str, marker: str) -> None:
        """A client that cancels Exec mid-way leaves no process of the tool within 2 s."""
        script = "echo started; (setsid sleep 60 &); sleep 60"
        call = stub.Exec(pb.ExecRequest(run_id=run_id, argv=["/bin/sh", "-c", script, marker],
                                        env={"FOO": marker}), timeout=30)
        events = iter(call)
        assert next(events).output.data == b"started\n"
        deadline = time.monotonic() + 3
        while len(marked_processes(marker)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(marked_processes(marker)) >= 3  # sh, its sleep, the setsid'd sleep
        call.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            list(events)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        assert wait_until_gone(marker, timeout=2.0) == []

    def test_cancel_is_audited_and_cgroup_removed(self, stub: Stub, daemon: DaemonHandle,
                                                  run_id: str) -> None:
        """The cancelled call is audited as exec.cancelled and its task cgroup is removed."""
        call = stub.Exec(pb.ExecRequest(run_id=run_id, argv=["/bin/sh", "-c",
                                                             "echo started; sleep 60"]),
                         timeout=30)
        events = iter(call)
        next(events)
        call.cancel()
        with pytest.raises(grpc.RpcError):
            list(events)
        deadline = time.monotonic() + 3
        while "exec.cancelled" not in events_of(daemon, run_id) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        records = audit_records(daemon, run_id)
        assert "exec.cancelled" in [r["event"] for r in records]
        task_id = next(r["task_id"] for r in records if r["event"] == "exec.allowed")
        parents = [v for k, v in ready_event(daemon)["cgroups"].items()
                   if k.startswith("parent.")]
        assert parents
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(
                (Path(p) / task_id).exists() or (Path(p) / "workers" / task_id).exists()
                for p in parents):
            time.sleep(0.05)
        left = [p for p in parents
                if (Path(p) / task_id).exists() or (Path(p) / "workers" / task_id).exists()]
        assert left == []
        # The run is still usable after a cancelled call.
        assert sh(stub, run_id, "echo again").stdout == b"again\n"

"""AMBIGUOUS steps: a step with network egress cut short by a crash, and its resolution.

The daemon runs against tests/test_egress.py's fake internet, plus one server of this module
(198.18.0.10:8090) that holds every connection open while `Hold.on` (the step is mid-request
when the daemon dies) and answers "done" at once afterwards (a retry ends). Four steps are
started at once, three with egress and one without, the daemon is killed with SIGKILL and
started again on the same state: what recovery made of each, the refusals while a step is
ambiguous, and each resolution by another uid (a process that dropped to uid 1234 before it
connected to the approver socket), are checked against ListSteps, the clients, `agentctl`
and the audit log. The migration of an old state.db is a unit test on the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socketserver
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.store.runs import RunStore
from agentd.store.steps import StepState, StepStore
from tests.conftest import (
    CONFIG,
    REPO,
    DaemonHandle,
    daemon_base,
    marked_processes,
    start_daemon,
    stop_daemon,
)
from tests.test_audit_daemon import read_records, wait_for
from tests.test_egress import ALLOWED, POLICY, Internet, write_egress_dir

HOLD_PORT = 8090
MARKER = "ambiguous-probe"
# Connects to the holding server and reports the first line; "hold": stays connected (the
# daemon is killed meanwhile); otherwise writes what it got, so a retry commits a change.
FETCH = textwrap.dedent(f"""\
    import socket, time  # {MARKER}
    s = socket.create_connection(("allowed.test", {HOLD_PORT}))
    line = s.makefile().readline().strip()
    print(line, flush=True)
    if line == "hold":
        time.sleep(120)
    open("/workspace/fetched", "w").write(line)
    """)
SLEEP = f"echo up; sleep 120 # {MARKER}"
RESOLVER_UID = 1234


class Hold:
    """Whether the holding server keeps new connections open ("hold") or answers "done"."""

    on = True
    connections = 0


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        Hold.connections += 1
        self.request.sendall(b"hold\n" if Hold.on else b"done\n")
        with contextlib.suppress(OSError):
            while self.request.recv(4096):  # until the other side closes
                pass


@pytest.fixture(scope="module")
def internet() -> Iterator[Internet]:
    world = Internet(f"agentd-amb-{os.getpid()}")
    server = world.ns.call(lambda: _Server((ALLOWED, HOLD_PORT), _Handler))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield world
    server.shutdown()
    server.server_close()
    world.close()


def _write(base: Path, internet: Internet) -> None:
    """The daemon directory: egress on through the fake internet, self-approval off."""
    policy = POLICY.replace("        - allowed.test:8080\n",
                            f"        - allowed.test:8080\n        - allowed.test:{HOLD_PORT}\n")
    policy = policy.replace("filesystem: {read_only: [/usr, /bin, /lib, /lib64]}",
                            "filesystem: {read_only: [/usr, /bin, /lib, /lib64],"
                            " workspace: read_write}")
    write_egress_dir(base, internet,
                     CONFIG.replace("allow_self_approval = true", "allow_self_approval = false"),
                     policy)


def _started(stub: Any, run_id: str, argv: list[str]) -> Any:
    """An Exec whose tool has printed its first line (connected, or up); the open stream."""
    events = stub.Exec(pb.ExecRequest(run_id=run_id, argv=argv), timeout=120)
    for event in events:
        if event.HasField("output"):
            return events
        if event.HasField("outcome"):
            raise AssertionError(f"the tool ended before the crash: {event.outcome}")
    raise AssertionError("the Exec stream ended without output")


def _as_user(handle: DaemonHandle, body: str, uid: int = RESOLVER_UID) -> str:
    """Runs `body` in a process that dropped to `uid` before connecting; `sock` is the
    approver socket. Prints what body prints, or the error's class and message."""
    program = textwrap.dedent(f"""
        import asyncio, grpc, os
        from agentd.api.gen.v1 import agentd_pb2 as pb, agentd_pb2_grpc
        from agentd_client import AsyncClient, Client
        from agentd_client.errors import AgentdError
        os.setgroups([]); os.setgid({uid}); os.setuid({uid})
        sock = "{handle.socket('approver')}"
        stub = agentd_pb2_grpc.AgentdStub(grpc.insecure_channel("unix:" + sock))
        try:
        """) + textwrap.indent(textwrap.dedent(body).strip(), "    ") + textwrap.dedent("""
        except grpc.RpcError as exc:
            print(exc.code().name, exc.details())
        except AgentdError as exc:
            print(exc.code, exc)
        """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _state(stub: Any, run_id: str) -> pb.StepReply:
    return list(stub.ListSteps(pb.ListStepsRequest(run_id=run_id), timeout=30).steps)[-1]


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


@pytest.fixture(scope="module")
def crashed(internet: Internet) -> Iterator[tuple[DaemonHandle, dict[str, str]]]:
    """A daemon killed with SIGKILL while three egress steps (runs retry, accept, abandon)
    and one without egress (run plain) ran, then started again on the same state."""
    base = daemon_base()
    _write(base, internet)
    first = start_daemon(base, keep_files=True)
    second: DaemonHandle | None = None
    streams = []
    try:
        stub = first.stub()
        runs = {name: stub.CreateRun(pb.CreateRunRequest(agent="fetcher")).run_id
                for name in ("retry", "accept", "abandon")}
        runs["plain"] = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
        for name in ("retry", "accept", "abandon"):
            streams.append(_started(stub, runs[name], ["/usr/bin/python3", "-c", FETCH]))
        streams.append(_started(stub, runs["plain"], ["/bin/sh", "-c", SLEEP]))
        assert Hold.connections == 3
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
        for stream in streams:
            stream.cancel()
        Hold.on = False
        second = start_daemon(base, keep_files=True)
        os.chmod(second.socket("approver"), 0o666)  # what approver_group grants uid 1234
        assert wait_for(lambda: not marked_processes(MARKER), 30)  # the workers died too
        yield second, runs
    finally:
        for stream in streams:
            stream.cancel()
        if second is not None:
            stop_daemon(second)
        stop_daemon(first, signal.SIGKILL)


def _records(handle: DaemonHandle, run_id: str | None = None) -> list[dict[str, Any]]:
    return [r for r in read_records(handle.base / "state" / "audit")
            if run_id is None or r.get("run_id") == run_id]


class TestRecovery:
    def test_egress_steps_are_ambiguous_and_the_other_interrupted(
            self, crashed: tuple[DaemonHandle, dict[str, str]]) -> None:
        """After kill -9, the steps that had egress are AMBIGUOUS in ListSteps, each with a
        `step.ambiguous` record and listed in `daemon.started`; the step without egress is
        interrupted (FAILED, "submit it again") and its run takes new steps at once."""
        handle, runs = crashed
        stub = handle.stub()
        for name in ("retry", "accept", "abandon"):
            step = _state(stub, runs[name])
            assert (step.state, step.step) == (pb.STEP_STATE_AMBIGUOUS, 1), name
            assert "external effects may have happened" in step.reason
        plain = _state(stub, runs["plain"])
        assert plain.state == pb.STEP_STATE_FAILED
        assert "submit it again" in plain.reason
        started = [r for r in _records(handle) if r["event"] == "daemon.started"][-1]
        recovered = started["details"]["recovered"]
        assert sorted(s["run_id"] for s in recovered["ambiguous_steps"]) == sorted(
            runs[n] for n in ("retry", "accept", "abandon"))
        assert recovered["interrupted_steps"] == [{"run_id": runs["plain"], "step": 1}]
        for name in ("retry", "accept", "abandon"):
            events = [r["event"] for r in _records(handle, runs[name])]
            assert events.count("step.ambiguous") == 1
        assert "step.ambiguous" not in [r["event"] for r in _records(handle, runs["plain"])]
        again = stub.Step(pb.StepRequest(run_id=runs["plain"], tasks=[
            pb.TaskSpec(name="t", argv=["/bin/true"])]), timeout=60)
        assert again.state == pb.STEP_STATE_COMMITTED

    def test_timeline_shows_ambiguous(self, crashed: tuple[DaemonHandle, dict[str, str]]
                                      ) -> None:
        """`agentctl timeline RUN` shows the step as AMBIGUOUS with its reason."""
        handle, runs = crashed
        shown = subprocess.run(
            [sys.executable, "-m", "agentd.cli.main", "--socket", str(handle.socket()),
             "timeline", runs["abandon"]], capture_output=True, text=True, timeout=60,
            check=True)
        heading = shown.stdout.splitlines()[0].split()
        assert heading[:3] == ["step", "1", "AMBIGUOUS"], shown.stdout
        assert "agentctl resolve" in shown.stdout

    def test_nothing_more_runs_on_the_run(self, crashed: tuple[DaemonHandle, dict[str, str]]
                                          ) -> None:
        """A step (the light client too), a file write and a rollback on a run with an
        ambiguous step are FAILED_PRECONDITION naming the step and `agentctl resolve`."""
        handle, runs = crashed
        run_id = runs["abandon"]
        stub = handle.stub()
        calls = [
            lambda: stub.Step(pb.StepRequest(run_id=run_id, tasks=[
                pb.TaskSpec(name="t", argv=["/bin/true"])]), timeout=60),
            lambda: stub.WriteFile(pb.WriteFileRequest(run_id=run_id, path="a", data=b"x"),
                                   timeout=60),
            lambda: stub.Rollback(pb.RollbackRequest(run_id=run_id, step=0), timeout=60),
        ]
        for call in calls:
            code, details = _code(call)
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"step 1 of run {run_id} is AMBIGUOUS" in details
            assert f"agentctl resolve {run_id} 1 retry|accept|abandon" in details
        from agentd_client import Client, Task
        from agentd_client.errors import FailedPrecondition
        with Client(str(handle.socket())) as client, pytest.raises(FailedPrecondition) as err:
            client.step(run_id, [Task(["/bin/true"])])
        assert "AMBIGUOUS" in str(err.value)

    def test_who_may_resolve(self, crashed: tuple[DaemonHandle, dict[str, str]]) -> None:
        """The requester's uid (root) may not resolve its own step, the client role may not
        at all, and a resolution must say which one; none of these changed anything."""
        handle, runs = crashed
        run_id = runs["abandon"]
        request = pb.ResolveStepRequest(run_id=run_id, step=1, resolution=pb.RESOLUTION_ACCEPT,
                                        reason="mine")
        code, details = _code(lambda: handle.stub("approver").ResolveStep(request, timeout=60))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "cannot resolve it" in details
        code, _ = _code(lambda: handle.stub().ResolveStep(request, timeout=60))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        shown = subprocess.run(
            [sys.executable, "-m", "agentd.cli.main", "--socket", str(handle.socket("approver")),
             "resolve", run_id, "1", "accept", "--reason", "mine"], capture_output=True,
            text=True, timeout=60, check=False)
        assert shown.returncode == 1
        assert "cannot resolve it" in shown.stderr
        out = _as_user(handle, f"""
            stub.ResolveStep(pb.ResolveStepRequest(run_id="{run_id}", step=1), timeout=60)""")
        assert out.startswith("INVALID_ARGUMENT resolution is required")
        out = _as_user(handle, f"""
            stub.ResolveStep(pb.ResolveStepRequest(run_id="{run_id}", step=2,
                             resolution=pb.RESOLUTION_ACCEPT), timeout=60)""")
        assert out.startswith("NOT_FOUND")
        assert _state(handle.stub(), run_id).state == pb.STEP_STATE_AMBIGUOUS


class TestResolution:
    def test_retry_runs_the_tasks_again(self, crashed: tuple[DaemonHandle, dict[str, str]]
                                        ) -> None:
        """RETRY by another uid runs the stored tasks again as the same attempt (the fake
        internet sees a new connection) and commits; `step.resolved` precedes its start."""
        handle, runs = crashed
        run_id = runs["retry"]
        attempt = _state(handle.stub(), run_id).attempt
        before = Hold.connections
        out = _as_user(handle, f"""
            reply = stub.ResolveStep(pb.ResolveStepRequest(
                run_id="{run_id}", step=1, resolution=pb.RESOLUTION_RETRY,
                reason="the fetch is idempotent"), timeout=120)
            print(pb.StepState.Name(reply.state), reply.step, reply.attempt, reply.decided_by)""")
        state, step, replied, decided_by = out.split(" ", 3)
        assert (state, step, int(replied)) == ("STEP_STATE_COMMITTED", "1", attempt)
        assert decided_by.startswith("approver@")
        assert Hold.connections == before + 1
        assert handle.stub().GetRun(pb.GetRunRequest(run_id=run_id)).step == 1
        data = handle.stub().ReadFile(pb.ReadFileRequest(run_id=run_id, path="fetched"))
        assert data.data == b"done"
        events = _records(handle, run_id)
        names = [r["event"] for r in events]
        resolved = events[names.index("step.resolved")]
        assert resolved["actor"]["uid"] == RESOLVER_UID
        assert (resolved["details"]["resolution"], resolved["details"]["reason"]) == (
            "retry", "the fetch is idempotent")
        assert names.index("step.resolved") < len(names) - 1 - names[::-1].index("step.started")
        assert "step.committing" in names[names.index("step.resolved"):]

    def test_accept_takes_it_as_done(self, crashed: tuple[DaemonHandle, dict[str, str]]
                                     ) -> None:
        """ACCEPT through the light client: a waiter (wait_step) returns once it is resolved,
        the attempt is accepted, the run stays at its head and takes new steps; a second
        resolution is FAILED_PRECONDITION naming the first."""
        handle, runs = crashed
        run_id = runs["accept"]
        from agentd_client import Client
        waited: list[Any] = []
        with Client(str(handle.socket())) as client:
            waiter = threading.Thread(target=lambda: waited.append(
                client.wait_step(run_id, 1, deadline=120)))
            waiter.start()
            out = _as_user(handle, f"""
                reply = Client(sock).resolve_step("{run_id}", 1, "accept",
                                                  reason="the mail was sent")
                print(reply.state, reply.reason)""")
            waiter.join(timeout=120)
        assert out == "accepted accepted as done: the mail was sent"
        assert [w.state for w in waited] == ["accepted"]
        stub = handle.stub()
        assert _state(stub, run_id).state == pb.STEP_STATE_ACCEPTED
        assert stub.GetRun(pb.GetRunRequest(run_id=run_id)).step == 0
        resolved = [r["details"] for r in _records(handle, run_id)
                    if r["event"] == "step.resolved"]
        assert [(d["resolution"], d["reason"]) for d in resolved] == [
            ("accept", "the mail was sent")]
        out = _as_user(handle, f"""
            Client(sock).resolve_step("{run_id}", 1, "abandon", reason="late")""")
        assert out.startswith("FAILED_PRECONDITION")
        assert "already decided" in out
        after = stub.Step(pb.StepRequest(run_id=run_id, tasks=[
            pb.TaskSpec(name="t", argv=["/bin/true"])]), timeout=60)
        assert after.state == pb.STEP_STATE_COMMITTED

    def test_abandon_discards_it(self, crashed: tuple[DaemonHandle, dict[str, str]]) -> None:
        """ABANDON through the asyncio client (and `agentctl timeline` after it): the attempt
        is discarded as abandoned, on record, the run at its head and open for steps."""
        handle, runs = crashed
        run_id = runs["abandon"]
        out = _as_user(handle, f"""
            async def main():
                async with AsyncClient(sock) as client:
                    return await client.resolve_step("{run_id}", 1, "abandon",
                                                     reason="will redo by hand")
            reply = asyncio.run(main())
            print(reply.state, reply.reason)""")
        assert out == "discarded abandoned: will redo by hand"
        stub = handle.stub()
        assert _state(stub, run_id).state == pb.STEP_STATE_DISCARDED
        assert stub.GetRun(pb.GetRunRequest(run_id=run_id)).step == 0
        resolved = [r["details"] for r in _records(handle, run_id)
                    if r["event"] == "step.resolved"]
        assert [d["resolution"] for d in resolved] == ["abandon"]
        stub.WriteFile(pb.WriteFileRequest(run_id=run_id, path="a", data=b"x"), timeout=60)


# The steps table as agentd made it before AMBIGUOUS existed (its CHECK lists six states).
OLD_STEPS = """
CREATE TABLE steps (
    attempt      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT NOT NULL,
    step         INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending_approval', 'running', 'committed',
                                                 'failed', 'discarded', 'interrupted')),
    request      TEXT NOT NULL,
    reply        TEXT NOT NULL DEFAULT '{}',
    reason       TEXT NOT NULL DEFAULT '',
    requested_by TEXT NOT NULL,
    decided_by   TEXT NOT NULL DEFAULT '',
    created_at   REAL NOT NULL,
    finished_at  REAL
);
CREATE INDEX steps_run ON steps(run_id, step);
CREATE INDEX steps_state ON steps(state, run_id);
"""


class TestMigration:
    def test_an_old_database_opens_with_every_row(self, tmp_path: Path) -> None:
        """A state.db whose steps table predates AMBIGUOUS is rebuilt at open: every row
        and attempt number kept, the counter not reused, the indexes back, the new states
        accepted, and opening it again changes nothing."""
        path = tmp_path / "state.db"
        old = sqlite3.connect(path)
        old.executescript(OLD_STEPS)
        states = ["pending_approval", "running", "committed", "failed", "discarded",
                  "interrupted"]
        for index, state in enumerate(states):
            old.execute("INSERT INTO steps (run_id, step, state, request, requested_by,"
                        " created_at) VALUES ('r', ?, ?, ?, 'uid:0', 1.0)",
                        (index, state, json.dumps({"tasks": [], "n": index})))
        old.execute("DELETE FROM steps WHERE attempt = 6")  # the counter stays at 6
        old.commit()
        with pytest.raises(sqlite3.IntegrityError):
            old.execute("UPDATE steps SET state = 'ambiguous' WHERE attempt = 1")
        old.close()

        store = RunStore(path)
        steps = StepStore(store.connection)
        kept = steps.attempts("r")
        assert [(s.attempt, s.state, s.request["n"]) for s in kept] == [
            (i + 1, state, i) for i, state in enumerate(states[:5])]
        indexes = {r[0] for r in store.connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'steps'")}
        assert {"steps_run", "steps_state"} <= indexes
        fresh = steps.begin("r", 9, StepState.RUNNING, {"tasks": []}, "uid:0")
        assert fresh == 7
        steps.finish(fresh, StepState.AMBIGUOUS, reply={})
        steps.resolve(fresh, StepState.ACCEPTED, resolution={"resolution": "accept"},
                      decided_by="uid:1234", reason="accepted as done")
        assert steps.attempt(fresh).state == StepState.ACCEPTED
        store.close()

        again = RunStore(path)
        StepStore(again.connection)
        assert len(again.connection.execute("SELECT * FROM steps").fetchall()) == 6
        assert again.connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        again.close()

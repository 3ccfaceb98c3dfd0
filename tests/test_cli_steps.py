"""Tests of steps, approvals and checkpoints in the client library and agentctl, against a fake
agentd.

As in test_client_cli: a real grpc.aio server in a background thread, canned in-memory
behaviour, agentctl run for real as a subprocess. Here the fake listens on two sockets in one
short temporary directory, `agentd.sock` (client role) and `agentd-approver.sock` (approver
role), sharing one state, and refuses calls for the wrong role as the daemon does.

A task's command (`/bin/sh -c CMD`) is a tiny script for the fake, one word per action:
`out:TEXT` / `err:TEXT` write a line, `part:TEXT` writes without a newline, `exit:N` ends the
task, `kill` has it stopped for its wall time, `change:PATH` changes a file, `write` makes a
channel write, `approval` makes the step wait for an approver, `abort` breaks the stream,
`wait` blocks until the test opens the gate, `request` writes the task's spec as JSON. The
tasks' words are played round robin (first word of every task, then the second, ...), so that
their output interleaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc as pb_grpc
from agentd.cli import output
from agentd.cli.steps_cmd import LinePrefixer, atomic_file
from agentd.client import (
    AgentdClient,
    ChannelDecl,
    ClientError,
    Outcome,
    StepReply,
    StepState,
    Stream,
    TaskOutput,
    TaskReport,
    TaskSpec,
)
from tests.fake_servers import ServeInThread, read_until

REPO = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000  # 2023-11-14 22:13:20Z
APPROVAL_REASON = "needs approval (exec; rule: approval_required_for)"
# Every byte value, newlines and NULs included: a tarball is binary.
EXPORT_CHUNKS = [b"tar:" + bytes(range(256)) * 40, b"\r\n\x00" * 1000, b"end"]


# --- the fake daemon -------------------------------------------------------------------------


class FakeState:
    """What both sockets of the fake share: runs, attempts, checkpoints, pending steps."""

    def __init__(self) -> None:
        self.runs: dict[str, pb.Run] = {}
        self.attempts: dict[str, list[pb.StepReply]] = {}
        self.checkpoints: dict[str, list[pb.Checkpoint]] = {}
        self.pending: dict[tuple[str, int], pb.StepRequest] = {}
        self.calls: list[tuple[str, Any]] = []
        self.gate = threading.Event()
        self.cancelled = threading.Event()
        self.export_fails = False
        self.next_run = 1

    def call_names(self) -> list[str]:
        """The RPCs made so far, in order."""
        return [name for name, _ in self.calls]


class RoleFake(pb_grpc.AgentdServicer):
    """The fake Agentd as seen on the socket of one role."""

    # Who may call what, as agentd.api.interceptor has it (admin is not served here).
    ROLES: ClassVar[dict[str, set[str]]] = {
        "CreateRun": {"client"},
        "Step": {"client"},
        "StreamStep": {"client"},
        "Rollback": {"client"},
        "Fork": {"client"},
        "ExportCheckpoint": {"client"},
        "Approve": {"approver"},
    }
    CALLERS: ClassVar[dict[str, str]] = {"client": "uid:1000", "approver": "uid:2000"}

    def __init__(self, state: FakeState, role: str) -> None:
        self.state = state
        self.role = role

    async def _enter(self, method: str, request: Any, context: Any) -> None:
        self.state.calls.append((method, request))
        if self.role not in self.ROLES.get(method, {self.role}):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the {self.role} role may not call {method}; use the socket of a role that may",
            )

    async def _run(self, run_id: str, context: Any) -> pb.Run:
        if run_id not in self.state.runs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"run {run_id} not found")
        return self.state.runs[run_id]

    async def _checkpoint(self, run_id: str, step: int, context: Any) -> None:
        await self._run(run_id, context)
        if step not in [c.step for c in self.state.checkpoints[run_id]]:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"run {run_id} has no checkpoint {step}")

    def _new_run(self, agent: str, channels: Any = ()) -> pb.Run:
        run_id = f"r-{self.state.next_run}"
        self.state.next_run += 1
        run = pb.Run(
            run_id=run_id,
            agent=agent,
            stage="prototype",
            state=pb.RUN_STATE_OPEN,
            workspace=f"/var/lib/agentd/runs/{run_id}/workspace",
            created_by=self.CALLERS[self.role],
            channels=list(channels),
        )
        run.created_at.FromSeconds(T0)
        self.state.runs[run_id] = run
        self.state.attempts[run_id] = []
        base = pb.Checkpoint(step=0, layers=1)
        base.committed_at.FromSeconds(T0)
        self.state.checkpoints[run_id] = [base]
        return run

    # -- runs

    async def CreateRun(self, request: pb.CreateRunRequest, context: Any) -> pb.Run:
        await self._enter("CreateRun", request, context)
        if request.agent != "web":
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"agent {request.agent} is not registered"
            )
        return self._new_run(request.agent, request.channels)

    async def GetRun(self, request: pb.GetRunRequest, context: Any) -> pb.Run:
        await self._enter("GetRun", request, context)
        return await self._run(request.run_id, context)

    async def ListRuns(self, request: pb.ListRunsRequest, context: Any) -> pb.ListRunsResponse:
        await self._enter("ListRuns", request, context)
        return pb.ListRunsResponse(runs=list(self.state.runs.values()))

    async def CloseRun(self, request: pb.CloseRunRequest, context: Any) -> pb.Run:
        await self._enter("CloseRun", request, context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError("unreachable")

    async def Exec(self, request: pb.ExecRequest, context: Any) -> AsyncIterator[pb.ExecEvent]:
        await self._enter("Exec", request, context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        yield pb.ExecEvent()

    # -- steps

    async def Step(self, request: pb.StepRequest, context: Any) -> pb.StepReply:
        await self._enter("Step", request, context)
        events = [e async for e in self._play(request, context)]
        return events[-1].done

    async def StreamStep(
        self, request: pb.StepRequest, context: Any
    ) -> AsyncIterator[pb.StepEvent]:
        await self._enter("StreamStep", request, context)
        try:
            async for event in self._play(request, context):
                yield event
        except ConnectionAbortedError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "agentd is shutting down")
        except asyncio.CancelledError:
            self.state.cancelled.set()
            raise

    async def Approve(self, request: pb.ApproveRequest, context: Any) -> pb.StepReply:
        await self._enter("Approve", request, context)
        await self._run(request.run_id, context)
        step = self.state.pending.pop((request.run_id, request.step), None)
        if step is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"step {request.step} of {request.run_id} is not waiting for approval",
            )
        assert step is not None
        if request.approve:
            events = [e async for e in self._play(step, context, approved=True)]
            return events[-1].done
        reply = self._attempt(
            step, pb.STEP_STATE_DISCARDED, reason=request.reason or "rejected", decided=True
        )
        reply.tasks.extend(pb.TaskReport(name=t.name) for t in step.tasks)
        return reply

    def _attempt(
        self, request: pb.StepRequest, state: int, reason: str = "", decided: bool = False
    ) -> pb.StepReply:
        run = self.state.runs[request.run_id]
        attempts = self.state.attempts[request.run_id]
        reply = pb.StepReply(
            run_id=run.run_id,
            step=run.step + 1,
            state=state,  # type: ignore[arg-type]
            reason=reason,
            requested_by=self.CALLERS["client"],
            decided_by=self.CALLERS["approver"] if decided else "",
        )
        reply.created_at.FromSeconds(T0 + 100 + 10 * len(attempts))
        attempts.append(reply)
        return reply

    async def _play(
        self, request: pb.StepRequest, context: Any, approved: bool = False
    ) -> AsyncIterator[pb.StepEvent]:
        run = await self._run(request.run_id, context)
        for task in request.tasks:
            if list(task.argv[:2]) != ["/bin/sh", "-c"] or len(task.argv) != 3:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"argv {task.argv}")
        scripts = [task.argv[2].split() for task in request.tasks]
        if not approved and (request.request_approval
                             or any("approval" in words for words in scripts)):
            reply = self._attempt(request, pb.STEP_STATE_PENDING_APPROVAL, APPROVAL_REASON)
            reply.tasks.extend(pb.TaskReport(name=t.name) for t in request.tasks)
            self.state.pending[(run.run_id, reply.step)] = request
            yield pb.StepEvent(done=reply)
            return
        reports = [
            pb.TaskReport(
                name=t.name,
                outcome=pb.Outcome(exited=True, wall_seconds=0.1 * (i + 1), summary="exited 0"),
            )
            for i, t in enumerate(request.tasks)
        ]
        for turn in range(max(len(words) for words in scripts)):
            for task, words, report in zip(request.tasks, scripts, reports, strict=True):
                if turn < len(words):
                    for event in await self._act(task, words[turn], report):
                        yield event
        for task, report in zip(request.tasks, reports, strict=True):
            outcome = report.outcome
            if not outcome.exited:
                report.failure = f"stopped for timeout ({outcome.summary})"
            elif outcome.exit_code and not task.allow_failure:
                report.failure = outcome.summary
            yield pb.StepEvent(task_done=report)
        yield pb.StepEvent(done=self._finish(request, reports, approved))

    async def _act(self, task: pb.TaskSpec, word: str, report: pb.TaskReport) -> list[pb.StepEvent]:
        kind, _, value = word.partition(":")
        outcome = report.outcome
        data = {"out": value + "\n", "err": value + "\n", "part": value}.get(kind)
        if data is not None:
            stream = pb.STREAM_KIND_STDERR if kind == "err" else pb.STREAM_KIND_STDOUT
            chunk = pb.OutputChunk(stream=stream, data=data.encode())
            return [pb.StepEvent(output=pb.TaskOutput(task=task.name, chunk=chunk))]
        if kind == "exit":
            outcome.exit_code, outcome.summary = int(value), f"exited {value}"
        elif kind == "kill":
            outcome.exited, outcome.signal = False, 9
            outcome.stop_reason = pb.STOP_REASON_TIMEOUT
            outcome.summary = "killed: wall time limit 1 s"
        elif kind == "change":
            report.changed_paths.append(value)
        elif kind == "write":
            report.writes += 1
        elif kind == "abort":
            raise ConnectionAbortedError
        elif kind == "wait":
            deadline = time.monotonic() + 10
            while not self.state.gate.is_set():
                if time.monotonic() > deadline:
                    raise TimeoutError("the test never opened the gate")
                await asyncio.sleep(0.01)
        elif kind == "request":
            seen = {
                "name": task.name,
                "argv": list(task.argv),
                "timeout": task.timeout_seconds,
                "allow_failure": task.allow_failure,
            }
            chunk = pb.OutputChunk(
                stream=pb.STREAM_KIND_STDOUT, data=json.dumps(seen).encode() + b"\n"
            )
            return [pb.StepEvent(output=pb.TaskOutput(task=task.name, chunk=chunk))]
        return []

    def _finish(
        self, request: pb.StepRequest, reports: list[pb.TaskReport], approved: bool
    ) -> pb.StepReply:
        run = self.state.runs[request.run_id]
        by_path: dict[str, list[str]] = {}
        for report in reports:
            for path in report.changed_paths:
                by_path.setdefault(path, []).append(report.name)
        conflicts = [
            f"{path}: changed by {' and '.join(names)}"
            for path, names in by_path.items()
            if len(names) > 1
        ]
        failed = next((r for r in reports if r.failure), None)
        if failed is not None:
            reply = self._attempt(
                request, pb.STEP_STATE_FAILED, f"task {failed.name}: {failed.failure}", approved
            )
        elif conflicts:
            reply = self._attempt(request, pb.STEP_STATE_FAILED, "conflicting changes", approved)
            reply.conflicts.extend(conflicts)
        else:
            reply = self._attempt(request, pb.STEP_STATE_COMMITTED, decided=approved)
            run.step += 1
            previous = self.state.checkpoints[run.run_id][-1]
            checkpoint = pb.Checkpoint(step=run.step, layers=previous.layers + 1)
            checkpoint.versions.update(previous.versions)
            for channel in run.channels:
                writes = sum(r.writes for r in reports)
                checkpoint.versions[channel.name] = previous.versions.get(channel.name, 0) + writes
                reply.channels[channel.name] = json.dumps(checkpoint.versions[channel.name])
            reply.versions.update(checkpoint.versions)
            checkpoint.committed_at.CopyFrom(reply.created_at)
            self.state.checkpoints[run.run_id].append(checkpoint)
        reply.tasks.extend(reports)
        reply.wall_seconds = 0.2134
        return reply

    async def ListSteps(self, request: pb.ListStepsRequest, context: Any) -> pb.ListStepsResponse:
        await self._enter("ListSteps", request, context)
        await self._run(request.run_id, context)
        return pb.ListStepsResponse(steps=self.state.attempts[request.run_id])

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: Any
    ) -> pb.ListCheckpointsResponse:
        await self._enter("ListCheckpoints", request, context)
        await self._run(request.run_id, context)
        return pb.ListCheckpointsResponse(checkpoints=self.state.checkpoints[request.run_id])

    # -- checkpoints

    async def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.Run:
        await self._enter("Rollback", request, context)
        await self._checkpoint(request.run_id, request.step, context)
        run = self.state.runs[request.run_id]
        run.step = request.step
        kept = [c for c in self.state.checkpoints[run.run_id] if c.step <= request.step]
        self.state.checkpoints[run.run_id] = kept
        return run

    async def Fork(self, request: pb.ForkRequest, context: Any) -> pb.Run:
        await self._enter("Fork", request, context)
        await self._checkpoint(request.run_id, request.step, context)
        parent = self.state.runs[request.run_id]
        run = self._new_run(parent.agent, parent.channels)
        run.step, run.forked_from, run.forked_at_step = request.step, parent.run_id, request.step
        self.state.checkpoints[run.run_id] = [
            c for c in self.state.checkpoints[parent.run_id] if c.step <= request.step
        ]
        return run

    async def ExportCheckpoint(
        self, request: pb.ExportCheckpointRequest, context: Any
    ) -> AsyncIterator[pb.ExportChunk]:
        await self._enter("ExportCheckpoint", request, context)
        await self._checkpoint(request.run_id, request.step, context)
        for i, data in enumerate(EXPORT_CHUNKS):
            if i == 1 and self.state.export_fails:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "agentd is shutting down")
            yield pb.ExportChunk(data=data)


@pytest.fixture(scope="module")
def servers(short_tmp: Path) -> Iterator[ServeInThread]:
    state = FakeState()
    servicers = {
        str(short_tmp / "agentd.sock"): RoleFake(state, "client"),
        str(short_tmp / "agentd-approver.sock"): RoleFake(state, "approver"),
    }
    with ServeInThread(servicers) as running:
        yield running


@pytest.fixture
def fake(servers: ServeInThread) -> FakeState:
    state = FakeState()
    for servicer in servers.servicers.values():
        servicer.state = state
    return state


@pytest.fixture
def sock(short_tmp: Path, fake: FakeState) -> str:
    return str(short_tmp / "agentd.sock")


@pytest.fixture
def approver_sock(short_tmp: Path, fake: FakeState) -> str:
    return str(short_tmp / "agentd-approver.sock")


@pytest.fixture
def client(sock: str) -> Iterator[AgentdClient]:
    with AgentdClient(sock) as c:
        yield c


@pytest.fixture
def run_id(client: AgentdClient) -> str:
    return client.create_run("web", channels=[ChannelDecl("notes", "append")]).run_id


# --- running agentctl ------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AGENTD_SOCKET", "AGENTCTL_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _argv(args: tuple[str, ...], socket: str | None) -> list[str]:
    argv = [sys.executable, "-m", "agentd.cli.main"]
    if socket is not None:
        argv += ["--socket", socket]
    return [*argv, *args]


def agentctl(
    *args: str, socket: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs agentctl as a subprocess and returns what it did, as text."""
    return subprocess.run(
        _argv(args, socket),
        input="",
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=60,
        check=False,
    )


def agentctl_bytes(*args: str, socket: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """Runs agentctl as a subprocess and returns what it did, as bytes."""
    return subprocess.run(
        _argv(args, socket), input=b"", capture_output=True, env=_env(), timeout=60, check=False
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    """agentctl failed with `status` and exactly one plain line on stderr."""
    assert result.returncode == status, result.stderr
    assert result.stderr.splitlines()[-1] == f"agentctl: {message}"
    assert "Traceback" not in result.stderr


def step_of(fake: FakeState) -> pb.StepRequest:
    """The last step request the fake received."""
    request: pb.StepRequest = next(
        r for name, r in reversed(fake.calls) if name in ("Step", "StreamStep")
    )
    return request


# --- the client library ----------------------------------------------------------------------


class TestClientSteps:
    def test_create_run_with_channels(self, fake: FakeState, client: AgentdClient) -> None:
        """create_run sends the channel declarations and Run reports them back, frozen."""
        run = client.create_run(
            "web", channels=[ChannelDecl("plan", "last_value"), ChannelDecl("v", "barrier", ("a",))]
        )
        assert run.channels == (
            ChannelDecl("plan", "last_value", ()),
            ChannelDecl("v", "barrier", ("a",)),
        )
        assert (run.step, run.forked_from, run.forked_at_step) == (0, "", 0)
        assert list(fake.calls[0][1].channels[1].barrier_tasks) == ["a"]

    def test_step_reply(self, run_id: str, client: AgentdClient) -> None:
        """step returns a StepReply with TaskReports, decoded channels and versions."""
        tasks = [
            TaskSpec("a", ("/bin/sh", "-c", "change:x write")),
            TaskSpec("b", ("/bin/sh", "-c", "exit:0")),
        ]
        reply = client.step(run_id, tasks)
        assert (reply.step, reply.state, reply.reason) == (1, StepState.COMMITTED, "")
        assert [t.name for t in reply.tasks] == ["a", "b"]
        assert reply.tasks[0].changed_paths == ("x",)
        assert reply.tasks[0].writes == 1
        assert isinstance(reply.tasks[0].outcome, Outcome)
        assert reply.channels == {"notes": 1}
        assert reply.versions == {"notes": 1}
        assert reply.requested_by == "uid:1000"

    def test_stream_step_events(self, run_id: str, client: AgentdClient) -> None:
        """stream_step yields output chunks, then a report per task, then the reply."""
        tasks = [TaskSpec("a", ("/bin/sh", "-c", "out:1 err:2"), timeout=5, allow_failure=True)]
        events = list(client.stream_step(run_id, tasks))
        assert events[:2] == [
            TaskOutput("a", Stream.STDOUT, b"1\n"),
            TaskOutput("a", Stream.STDERR, b"2\n"),
        ]
        assert isinstance(events[2], TaskReport)
        assert isinstance(events[3], StepReply)
        assert len(events) == 4

    def test_stream_step_cancels(self, fake: FakeState, run_id: str, client: AgentdClient) -> None:
        """Abandoning a stream_step iterator cancels the call, so the daemon stops the step."""
        events = client.stream_step(run_id, [TaskSpec("a", ("/bin/sh", "-c", "out:go wait"))])
        assert next(events) == TaskOutput("a", Stream.STDOUT, b"go\n")
        events.close()  # type: ignore[attr-defined]
        assert fake.cancelled.wait(10)

    def test_pending_then_approved(
        self, run_id: str, client: AgentdClient, approver_sock: str
    ) -> None:
        """A step waiting for approval runs when an approver approves it on their socket."""
        reply = client.step(run_id, [TaskSpec("a", ("/bin/sh", "-c", "approval"))])
        assert reply.state is StepState.PENDING_APPROVAL
        assert reply.tasks[0].outcome is None
        with AgentdClient(approver_sock) as approver:
            decided = approver.approve(run_id, reply.step, True)
        assert (decided.state, decided.decided_by) == (StepState.COMMITTED, "uid:2000")

    def test_approve_needs_the_approver_role(self, run_id: str, client: AgentdClient) -> None:
        """approve on the client socket is PERMISSION_DENIED."""
        with pytest.raises(ClientError) as info:
            client.approve(run_id, 1, True)
        assert info.value.code == "PERMISSION_DENIED"

    def test_checkpoints_rollback_fork(self, run_id: str, client: AgentdClient) -> None:
        """list_checkpoints, rollback and fork return Checkpoint and Run dataclasses."""
        for _ in range(2):
            client.step(run_id, [TaskSpec("a", ("/bin/sh", "-c", "write"))])
        checkpoints = client.list_checkpoints(run_id)
        assert [(c.step, c.layers, dict(c.versions)) for c in checkpoints] == [
            (0, 1, {}),
            (1, 2, {"notes": 1}),
            (2, 3, {"notes": 2}),
        ]
        forked = client.fork(run_id, 1, label="try")
        assert (forked.forked_from, forked.forked_at_step, forked.step) == (run_id, 1, 1)
        assert client.rollback(run_id, 1).step == 1
        assert [s.step for s in client.list_steps(run_id)] == [1, 2]

    def test_export_chunks(self, run_id: str, client: AgentdClient) -> None:
        """export_checkpoint yields the tarball's bytes in order."""
        assert list(client.export_checkpoint(run_id, 0)) == EXPORT_CHUNKS

    def test_outcome_step_fields(self) -> None:
        """Outcome carries committed, step and step_failure from the API message."""
        msg = pb.Outcome(exited=True, committed=False, step=4, step_failure="task t1: exited 1")
        outcome = Outcome.from_proto(msg)
        assert (outcome.committed, outcome.step, outcome.step_failure) == (
            False,
            4,
            "task t1: exited 1",
        )


# --- agentctl --------------------------------------------------------------------------------


class TestRunCreateChannels:
    def test_channels_reach_the_daemon(self, fake: FakeState, sock: str) -> None:
        """Each --channel becomes a declaration; a barrier carries its task list."""
        result = agentctl(
            "run",
            "create",
            "--agent",
            "web",
            "--channel",
            "plan:last_value",
            "--channel",
            "votes:barrier:t1,t2",
            socket=sock,
        )
        assert (result.returncode, result.stdout) == (0, "r-1\n")
        decls = [(c.name, c.reducer, list(c.barrier_tasks)) for c in fake.calls[0][1].channels]
        assert decls == [("plan", "last_value", []), ("votes", "barrier", ["t1", "t2"])]

    def test_show_lists_channels(self, fake: FakeState, sock: str) -> None:
        """`run show` lists the channels and the last committed step; --json has them too."""
        agentctl("run", "create", "--agent", "web", "--channel", "v:barrier:a,b", socket=sock)
        shown = agentctl("run", "show", "r-1", socket=sock).stdout
        assert "channel:    v:barrier:a,b\n" in shown
        assert "step:       0 (nothing committed yet)\n" in shown
        run = json.loads(agentctl("run", "show", "r-1", "--json", socket=sock).stdout)
        assert run["channels"] == [{"name": "v", "reducer": "barrier", "barrier_tasks": ["a", "b"]}]
        assert (run["step"], run["forked_from"]) == (0, "")

    @pytest.mark.parametrize(
        ("channels", "message"),
        [
            (["plan"], "--channel expects NAME:REDUCER[:TASK,...], got 'plan'"),
            ([":append"], "--channel expects NAME:REDUCER[:TASK,...], got ':append'"),
            (["p:sum"], "--channel 'p:sum': unknown reducer 'sum'; use one of last_value, "),
            (["v:barrier"], "--channel 'v:barrier': a barrier channel lists the tasks"),
            (["v:barrier:a,"], "--channel 'v:barrier:a,': a barrier channel lists the tasks"),
            (["p:append:a"], "--channel 'p:append:a': only a barrier channel takes a list"),
            (["p:append", "p:topic"], "--channel p is declared more than once"),
        ],
    )
    def test_bad_channel(
        self, fake: FakeState, sock: str, channels: list[str], message: str
    ) -> None:
        """A malformed --channel is refused with exit 2 before any call to the daemon."""
        flags = [arg for item in channels for arg in ("--channel", item)]
        result = agentctl("run", "create", "--agent", "web", *flags, socket=sock)
        assert result.returncode == 2
        assert result.stderr.startswith(f"agentctl: {message}")
        assert fake.calls == []


class TestStepCommand:
    def test_committed(self, fake: FakeState, run_id: str, sock: str) -> None:
        """Output lines are prefixed [NAME] on their own stream; the summary says committed."""
        result = agentctl(
            "step", run_id, "--task", "out:hello err:warn", "--task", "out:bye", socket=sock
        )
        assert result.returncode == 0
        assert result.stdout == "[t1] hello\n[t2] bye\n"
        assert result.stderr == "[t1] warn\nstep 1 committed (2 tasks, 0.21 s)\n"

    def test_request_fields(self, fake: FakeState, run_id: str, sock: str) -> None:
        """Each task is /bin/sh -c CMD, named by position or by NAME=, with the options."""
        result = agentctl(
            "step",
            run_id,
            "--task",
            "request",
            "--task",
            "build=request exit:2",
            "--task",
            "echo a=b",
            "--allow-failure",
            "build",
            "--timeout",
            "2.5",
            socket=sock,
        )
        assert result.returncode == 0, result.stderr
        tasks = step_of(fake).tasks
        assert [(t.name, list(t.argv), t.timeout_seconds, t.allow_failure) for t in tasks] == [
            ("t1", ["/bin/sh", "-c", "request"], 2.5, False),
            ("build", ["/bin/sh", "-c", "request exit:2"], 2.5, True),
            ("t3", ["/bin/sh", "-c", "echo a=b"], 2.5, False),
        ]

    def test_failed(self, run_id: str, sock: str) -> None:
        """A failing task fails the step: exit 1 and the task and reason in the summary."""
        result = agentctl(
            "step", run_id, "--task", "exit:0", "--task", "err:boom exit:1", socket=sock
        )
        assert result.returncode == 1
        assert result.stderr == "[t2] boom\nstep 1 failed: task t2: exited 1\n"

    def test_conflicts_listed(self, run_id: str, sock: str) -> None:
        """Conflicting changes fail the step, and each conflict is listed under the summary."""
        result = agentctl(
            "step", run_id, "--task", "a=change:x.md", "--task", "b=change:x.md", socket=sock
        )
        assert result.returncode == 1
        assert result.stderr == (
            "step 1 failed: conflicting changes\n  conflict: x.md: changed by a and b\n"
        )

    def test_killed_task(self, run_id: str, sock: str) -> None:
        """A task stopped for its wall time fails the step with the daemon's reason."""
        result = agentctl("step", run_id, "--task", "kill", socket=sock)
        assert result.returncode == 1
        assert result.stderr == (
            "step 1 failed: task t1: stopped for timeout (killed: wall time limit 1 s)\n"
        )

    def test_allow_failure(self, run_id: str, sock: str) -> None:
        """--allow-failure NAME lets that task exit non-zero without failing the step."""
        result = agentctl(
            "step", run_id, "--task", "lint=exit:1", "--allow-failure", "lint", socket=sock
        )
        assert (result.returncode, result.stderr) == (0, "step 1 committed (1 task, 0.21 s)\n")

    def test_pending_approval(self, run_id: str, sock: str, short_tmp: Path) -> None:
        """A step that needs approval exits 3 and says how an approver decides it."""
        result = agentctl("step", run_id, "--task", "approval", socket=sock)
        assert result.returncode == 3
        approver = short_tmp / "agentd-approver.sock"
        assert result.stderr == (
            f"step 1 pending approval: {APPROVAL_REASON}\n"
            f"  an approver decides: agentctl --socket {approver} approve {run_id} 1 [--reject]\n"
        )

    def test_request_approval_flag(self, run_id: str, sock: str) -> None:
        """--request-approval asks for an approver even for a step no trigger matches."""
        result = agentctl("step", run_id, "--request-approval", "--task", "out:x", socket=sock)
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith("step 1 pending approval: ")

    def test_lines_of_tasks_never_mix(self, run_id: str, sock: str) -> None:
        """A line split over chunks is written whole, after other tasks' complete lines."""
        result = agentctl(
            "step", run_id, "--task", "part:ab part:c out:d", "--task", "out:x out:y", socket=sock
        )
        assert result.stdout == "[t2] x\n[t2] y\n[t1] abcd\n"

    def test_last_line_without_newline(self, run_id: str, sock: str) -> None:
        """Output that does not end in a newline is written, prefixed, when the task ends."""
        result = agentctl("step", run_id, "--task", "out: part:tail", socket=sock)
        assert result.stdout == "[t1] \n[t1] tail\n"

    def test_broken_stream_keeps_output(self, run_id: str, sock: str) -> None:
        """When the stream breaks, the partial line already received is still written."""
        result = agentctl("step", run_id, "--task", "part:half abort", socket=sock)
        assert result.stdout == "[t1] half\n"
        assert_clean_error(result, 1, "agentd is shutting down")

    def test_no_name_prefix(self, run_id: str, sock: str) -> None:
        """--no-name-prefix passes the output through as it is."""
        result = agentctl("step", run_id, "--no-name-prefix", "--task", "part:a out:b", socket=sock)
        assert result.stdout == "ab\n"

    def test_json(self, run_id: str, sock: str) -> None:
        """--json prints only the step as JSON, each task's output included, at the end."""
        result = agentctl(
            "step", run_id, "--json", "--task", "out:hi err:oops change:f write", socket=sock
        )
        assert result.returncode == 0
        step = json.loads(result.stdout)
        assert (step["step"], step["state"], step["channels"]) == (1, "committed", {"notes": 1})
        task = step["tasks"][0]
        assert (task["name"], task["stdout"], task["stderr"]) == ("t1", "hi\n", "oops\n")
        assert (task["changed_paths"], task["writes"]) == (["f"], 1)
        assert task["outcome"]["summary"] == "exited 0"
        assert step["created_at"] == "2023-11-14T22:15:00Z"
        assert result.stderr == ""

    def test_streams_live(self, fake: FakeState, run_id: str, sock: str) -> None:
        """Each line is written and flushed as it arrives, before the step has finished."""
        argv = _argv(("step", run_id, "--task", "out:ready wait out:done"), sock)
        with subprocess.Popen(argv, stdout=subprocess.PIPE, env=_env()) as proc:
            assert proc.stdout is not None
            seen = read_until(proc.stdout, b"\n")
            assert seen == b"[t1] ready\n", "the first line did not arrive while the step ran"
            fake.gate.set()
            rest, _ = proc.communicate(timeout=20)
        assert (proc.returncode, rest) == (0, b"[t1] done\n")

    @pytest.mark.parametrize(
        ("flags", "message"),
        [
            ([], "step: no task given; add one --task CMD per task"),
            (["--task", ""], "--task '': no command to run"),
            (["--task", "  "], "--task '  ': no command to run"),
            (["--task", "build="], "--task 'build=': no command to run"),
            (["--task", "=make"], "--task '=make': no task name before `=`"),
            (
                ["--task", "CC=gcc make"],
                "--task 'CC=gcc make': 'CC' is not a task name (those are lower case); to run "
                "a command that sets CC, name the task: --task NAME='CC=gcc make'",
            ),
            (["--task", "a=x", "--task", "a=y"], "--task: task name a is used twice"),
            (["--task", "t2=x", "--task", "y"], "--task: task name t2 is used twice"),
            (
                ["--task", "x", "--allow-failure", "lint"],
                "--allow-failure lint: no task of that name (the tasks: t1)",
            ),
        ],
    )
    def test_bad_tasks(
        self, fake: FakeState, run_id: str, sock: str, flags: list[str], message: str
    ) -> None:
        """Malformed --task and --allow-failure are refused with exit 2 before any step call."""
        result = agentctl("step", run_id, *flags, socket=sock)
        assert result.returncode == 2
        assert result.stderr.startswith(f"agentctl: {message}")
        assert "Traceback" not in result.stderr
        assert "StreamStep" not in fake.call_names()

    def test_bad_timeout(self, fake: FakeState, run_id: str, sock: str) -> None:
        """A negative --timeout is a usage error, exit 2."""
        result = agentctl("step", run_id, "--task", "x", "--timeout", "-1", socket=sock)
        assert result.returncode == 2
        assert "expected a number of seconds >= 0" in result.stderr

    def test_unknown_run(self, sock: str) -> None:
        """A step in an unknown run is a plain NOT_FOUND line, exit 1."""
        assert_clean_error(
            agentctl("step", "r-9", "--task", "x", socket=sock), 1, "run r-9 not found"
        )

    def test_wrong_socket_hint(self, run_id: str, approver_sock: str, short_tmp: Path) -> None:
        """A step sent to the approver socket is refused with a hint naming the client socket."""
        result = agentctl("step", run_id, "--task", "x", socket=approver_sock)
        assert_clean_error(
            result,
            1,
            "the approver role may not call StreamStep; use the socket of a role that may "
            f"(this is done on the client socket: use agentctl --socket "
            f"{short_tmp / 'agentd.sock'} ...)",
        )


class TestApproveCommand:
    @pytest.fixture
    def pending(self, client: AgentdClient, run_id: str) -> StepReply:
        return client.step(run_id, [TaskSpec("deploy", ("/bin/sh", "-c", "approval out:x"))])

    def test_approve(
        self, fake: FakeState, pending: StepReply, run_id: str, approver_sock: str
    ) -> None:
        """Approving on the approver socket runs the step; committed is exit 0."""
        result = agentctl("approve", run_id, "1", socket=approver_sock)
        assert (result.returncode, result.stdout) == (0, "step 1 committed (1 task, 0.21 s)\n")
        request = fake.calls[-1][1]
        assert (request.run_id, request.step, request.approve) == (run_id, 1, True)

    def test_reject(
        self, fake: FakeState, pending: StepReply, run_id: str, approver_sock: str
    ) -> None:
        """--reject with --reason discards the step; that decision taking effect is exit 0."""
        result = agentctl(
            "approve", run_id, "1", "--reject", "--reason", "too risky", socket=approver_sock
        )
        assert (result.returncode, result.stdout) == (0, "step 1 discarded: too risky\n")
        assert (fake.calls[-1][1].approve, fake.calls[-1][1].reason) == (False, "too risky")

    def test_approved_step_fails(
        self, client: AgentdClient, run_id: str, approver_sock: str
    ) -> None:
        """An approved step whose task fails is exit 1, with the reason."""
        client.step(run_id, [TaskSpec("deploy", ("/bin/sh", "-c", "approval exit:4"))])
        result = agentctl("approve", run_id, "1", socket=approver_sock)
        assert (result.returncode, result.stdout) == (1, "step 1 failed: task deploy: exited 4\n")

    def test_json(self, pending: StepReply, run_id: str, approver_sock: str) -> None:
        """--json prints the decided step with who decided it."""
        result = agentctl("approve", run_id, "1", "--json", socket=approver_sock)
        step = json.loads(result.stdout)
        assert (step["state"], step["decided_by"], step["requested_by"]) == (
            "committed",
            "uid:2000",
            "uid:1000",
        )

    def test_client_socket_hint(
        self, fake: FakeState, pending: StepReply, run_id: str, sock: str, short_tmp: Path
    ) -> None:
        """On the client socket the role refusal says to use the approver socket."""
        result = agentctl("approve", run_id, "1", socket=sock)
        assert_clean_error(
            result,
            1,
            "the client role may not call Approve; use the socket of a role that may "
            "(approvals are made on the approver socket: use agentctl --socket "
            f"{short_tmp / 'agentd-approver.sock'} ...)",
        )
        assert result.stdout == ""

    def test_not_pending(self, run_id: str, approver_sock: str) -> None:
        """Approving a step that does not wait is the daemon's plain message, exit 1."""
        result = agentctl("approve", run_id, "7", socket=approver_sock)
        assert_clean_error(result, 1, f"step 7 of {run_id} is not waiting for approval")

    def test_bad_step_number(self, fake: FakeState, run_id: str, approver_sock: str) -> None:
        """A STEP that is not a number is a usage error, exit 2, with no call."""
        result = agentctl("approve", run_id, "last", socket=approver_sock)
        assert result.returncode == 2
        assert "expected a step number (0, 1, 2, ...), got 'last'" in result.stderr
        assert "Approve" not in fake.call_names()


class TestCheckpointsCommand:
    def test_table(self, client: AgentdClient, run_id: str, sock: str) -> None:
        """`checkpoints` prints STEP, COMMITTED, LAYERS and VERSIONS, one line per checkpoint."""
        client.step(run_id, [TaskSpec("a", ("/bin/sh", "-c", "write write"))])
        result = agentctl("checkpoints", run_id, socket=sock)
        assert result.returncode == 0
        assert result.stdout == (
            "STEP  COMMITTED             LAYERS  VERSIONS\n"
            "0     2023-11-14 22:13:20Z  1       -\n"
            "1     2023-11-14 22:15:00Z  2       notes=2\n"
        )

    def test_json(self, client: AgentdClient, run_id: str, sock: str) -> None:
        """`checkpoints --json` is {"checkpoints": [...]} with the API's field names."""
        client.step(run_id, [TaskSpec("a", ("/bin/sh", "-c", "write"))])
        result = agentctl("checkpoints", run_id, "--json", socket=sock)
        assert json.loads(result.stdout)["checkpoints"][1] == {
            "step": 1,
            "committed_at": "2023-11-14T22:15:00Z",
            "layers": 2,
            "versions": {"notes": 1},
        }

    def test_unknown_run(self, sock: str) -> None:
        """An unknown run is a plain NOT_FOUND line, exit 1."""
        assert_clean_error(agentctl("checkpoints", "r-9", socket=sock), 1, "run r-9 not found")


class TestRollbackCommand:
    def test_rollback(self, fake: FakeState, client: AgentdClient, run_id: str, sock: str) -> None:
        """`rollback RUN STEP` says where the run is now, and later checkpoints are gone."""
        for _ in range(2):
            client.step(run_id, [TaskSpec("a", ("/bin/sh", "-c", "exit:0"))])
        result = agentctl("rollback", run_id, "1", socket=sock)
        assert (result.returncode, result.stdout) == (0, f"{run_id} rolled back to step 1\n")
        assert [c.step for c in client.list_checkpoints(run_id)] == [0, 1]

    def test_no_such_checkpoint(self, run_id: str, sock: str) -> None:
        """Rolling back to a checkpoint that does not exist is exit 1 with the daemon's words."""
        result = agentctl("rollback", run_id, "5", socket=sock)
        assert_clean_error(result, 1, f"run {run_id} has no checkpoint 5")

    def test_json(self, run_id: str, sock: str) -> None:
        """`rollback --json` prints the run."""
        result = agentctl("rollback", run_id, "0", "--json", socket=sock)
        assert json.loads(result.stdout)["step"] == 0


class TestForkCommand:
    def test_prints_new_run_id(
        self, fake: FakeState, client: AgentdClient, run_id: str, sock: str
    ) -> None:
        """`fork RUN STEP --label` prints only the new run's id and passes the label on."""
        client.step(run_id, [TaskSpec("a", ("/bin/sh", "-c", "exit:0"))])
        result = agentctl("fork", run_id, "1", "--label", "retry", socket=sock)
        assert (result.returncode, result.stdout, result.stderr) == (0, "r-2\n", "")
        request = fake.calls[-1][1]
        assert (request.run_id, request.step, request.label) == (run_id, 1, "retry")

    def test_json_and_show(self, run_id: str, sock: str) -> None:
        """The fork's run says where it came from, in --json and in `run show`."""
        forked = json.loads(agentctl("fork", run_id, "0", "--json", socket=sock).stdout)
        assert (forked["forked_from"], forked["forked_at_step"]) == (run_id, 0)
        shown = agentctl("run", "show", forked["run_id"], socket=sock).stdout
        assert f"forked from: {run_id} at step 0\n" in shown

    def test_no_such_checkpoint(self, run_id: str, sock: str) -> None:
        """Forking from a checkpoint that does not exist is exit 1."""
        assert_clean_error(
            agentctl("fork", run_id, "3", socket=sock), 1, f"run {run_id} has no checkpoint 3"
        )


class TestExportCommand:
    def test_writes_file(self, run_id: str, sock: str, tmp_path: Path) -> None:
        """`export -o FILE` writes exactly the streamed bytes and leaves no temporary file."""
        target = tmp_path / "ws.tar"
        result = agentctl("export", run_id, "0", "-o", str(target), socket=sock)
        assert result.returncode == 0, result.stderr
        assert target.read_bytes() == b"".join(EXPORT_CHUNKS)
        assert os.listdir(tmp_path) == ["ws.tar"]
        assert result.stdout == f"exported step 0 of {run_id} to {target} (12.9 KiB)\n"

    def test_to_stdout(self, run_id: str, sock: str) -> None:
        """`export -o -` writes the tarball to stdout, byte for byte."""
        result = agentctl_bytes("export", run_id, "0", "-o", "-", socket=sock)
        assert (result.returncode, result.stderr) == (0, b"")
        assert result.stdout == b"".join(EXPORT_CHUNKS)

    def test_failure_leaves_target_alone(
        self, fake: FakeState, run_id: str, sock: str, tmp_path: Path
    ) -> None:
        """When the stream breaks midway the old file stays as it was, and no partial file."""
        target = tmp_path / "ws.tar"
        target.write_bytes(b"previous export")
        fake.export_fails = True
        result = agentctl("export", run_id, "0", "-o", str(target), socket=sock)
        assert_clean_error(result, 1, "agentd is shutting down")
        assert target.read_bytes() == b"previous export"
        assert os.listdir(tmp_path) == ["ws.tar"]

    def test_unwritable_target(self, fake: FakeState, run_id: str, sock: str) -> None:
        """A target in a missing directory is exit 2 before any export call."""
        result = agentctl("export", run_id, "0", "-o", "/nonexistent/dir/ws.tar", socket=sock)
        assert_clean_error(
            result, 2, "-o /nonexistent/dir/ws.tar: cannot write there: No such file or directory"
        )
        assert "ExportCheckpoint" not in fake.call_names()

    def test_output_required(self, run_id: str, sock: str) -> None:
        """Without -o, export is a usage error: the tarball must go somewhere explicit."""
        result = agentctl("export", run_id, "0", socket=sock)
        assert result.returncode == 2
        assert "the following arguments are required: -o/--output" in result.stderr

    def test_atomic_file_mode(self, tmp_path: Path) -> None:
        """A completed file gets the mode open() would give it, not the temporary's 0600."""
        mask = os.umask(0o022)
        try:
            with atomic_file(tmp_path / "f") as sink:
                sink.write(b"x")
        finally:
            os.umask(mask)
        assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


class TestTimelineCommand:
    @pytest.fixture
    def history(self, fake: FakeState, run_id: str) -> str:
        """Five attempts: committed, failed, conflicting, pending, then rejected."""

        def task(name: str, summary: str, wall: float, **fields: Any) -> pb.TaskReport:
            outcome = pb.Outcome(summary=summary, wall_seconds=wall)
            return pb.TaskReport(name=name, outcome=outcome, **fields)

        def attempt(i: int, step: int, state: int, **fields: Any) -> pb.StepReply:
            reply = pb.StepReply(run_id=run_id, step=step, state=state, **fields)  # type: ignore[arg-type]
            reply.created_at.FromSeconds(T0 + 60 * i)
            return reply

        fake.attempts[run_id] = [
            attempt(
                1,
                1,
                pb.STEP_STATE_COMMITTED,
                wall_seconds=0.2134,
                requested_by="uid:1000",
                tasks=[
                    task("build", "exited 0", 0.1, changed_paths=["a.txt", "b.txt"]),
                    task("lint", "exited 0", 0.05, writes=2),
                ],
            ),
            attempt(
                2,
                2,
                pb.STEP_STATE_FAILED,
                wall_seconds=1.02,
                requested_by="uid:1000",
                reason="task test: exited 1",
                tasks=[
                    task("gen", "exited 0", 0.3, changed_paths=[f"out/{n}" for n in range(5)]),
                    task("test", "exited 1", 1.0, failure="exited 1"),
                ],
            ),
            attempt(
                3,
                2,
                pb.STEP_STATE_FAILED,
                wall_seconds=0.5,
                requested_by="uid:1000",
                reason="conflicting changes",
                conflicts=["notes.md: changed by a and b"],
                tasks=[
                    task("a", "exited 0", 0.25, changed_paths=["notes.md\x1b[2J"]),
                    task("b", "exited 0", 0.5, changed_paths=["notes.md"]),
                ],
            ),
            attempt(
                4,
                2,
                pb.STEP_STATE_PENDING_APPROVAL,
                requested_by="uid:1000",
                reason=APPROVAL_REASON,
                tasks=[pb.TaskReport(name="deploy")],
            ),
            attempt(
                5,
                2,
                pb.STEP_STATE_DISCARDED,
                requested_by="uid:1000",
                decided_by="uid:2000",
                reason="too risky",
                tasks=[pb.TaskReport(name="deploy")],
            ),
        ]
        return run_id

    def test_timeline(self, history: str, sock: str) -> None:
        """Each attempt: step, state, when, how long, by whom; then reason, conflicts, tasks."""
        result = agentctl("timeline", history, socket=sock)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            "step 1  committed         2023-11-14 22:14:20Z  0.21 s  requested by uid:1000\n"
            "  build  exited 0  0.10 s  changed a.txt, b.txt\n"
            "  lint   exited 0  0.05 s  no changes; 2 channel writes\n"
            "step 2  failed            2023-11-14 22:15:20Z  1.02 s  requested by uid:1000\n"
            "  reason: task test: exited 1\n"
            "  gen   exited 0  0.30 s  changed out/0, out/1, out/2 and 2 more\n"
            "  test  exited 1  1.00 s  no changes\n"
            "        failed: exited 1\n"
            "step 2  failed            2023-11-14 22:16:20Z  0.50 s  requested by uid:1000\n"
            "  reason: conflicting changes\n"
            "  conflict: notes.md: changed by a and b\n"
            "  a  exited 0  0.25 s  changed notes.md\\u001b[2J\n"
            "  b  exited 0  0.50 s  changed notes.md\n"
            "step 2  pending approval  2023-11-14 22:17:20Z  -       requested by uid:1000\n"
            f"  reason: {APPROVAL_REASON}\n"
            "  deploy  not run  -\n"
            "step 2  discarded         2023-11-14 22:18:20Z  -       "
            "requested by uid:1000, decided by uid:2000\n"
            "  reason: too risky\n"
            "  deploy  not run  -\n"
        )

    def test_json(self, history: str, sock: str) -> None:
        """`timeline --json` lists every attempt with the API's field names."""
        result = agentctl("timeline", history, "--json", socket=sock)
        timeline = json.loads(result.stdout)
        assert timeline["run_id"] == history
        states = [(s["step"], s["state"]) for s in timeline["steps"]]
        assert states == [
            (1, "committed"),
            (2, "failed"),
            (2, "failed"),
            (2, "pending_approval"),
            (2, "discarded"),
        ]
        assert timeline["steps"][1]["tasks"][1]["failure"] == "exited 1"
        assert timeline["steps"][3]["tasks"][0]["outcome"] is None
        assert timeline["steps"][4]["decided_by"] == "uid:2000"

    def test_from_real_steps(self, client: AgentdClient, run_id: str, sock: str) -> None:
        """The timeline of steps run through the fake shows each attempt in order."""
        client.step(run_id, [TaskSpec("a", ("/bin/sh", "-c", "change:x"))])
        client.step(run_id, [TaskSpec("a", ("/bin/sh", "-c", "exit:3"))])
        lines = agentctl("timeline", run_id, socket=sock).stdout.splitlines()
        assert [line.split()[:3] for line in lines if line.startswith("step")] == [
            ["step", "1", "committed"],
            ["step", "2", "failed"],
        ]

    def test_no_steps(self, run_id: str, sock: str) -> None:
        """A run without steps prints nothing on stdout and a note on stderr."""
        result = agentctl("timeline", run_id, socket=sock)
        assert (result.returncode, result.stdout) == (0, "")
        assert result.stderr == f"run {run_id} has no steps yet\n"


class TestFormatting:
    def test_line_prefixer_keeps_bytes(self) -> None:
        """Output that is not UTF-8 passes through the prefixer unchanged."""

        class Sink:
            def __init__(self) -> None:
                self.data = b""

            def write(self, data: bytes) -> int:
                self.data += data
                return len(data)

            def flush(self) -> None:
                pass

        out, err = Sink(), Sink()
        prefixer = LinePrefixer(out, err)  # type: ignore[arg-type]
        prefixer.write(TaskOutput("t1", Stream.STDOUT, b"\xff\xfe\n\x00"))
        prefixer.finish()
        assert (out.data, err.data) == (b"[t1] \xff\xfe\n[t1] \x00\n", b"")

    def test_printable(self) -> None:
        """Escape sequences and other non-printable characters are shown escaped."""
        assert output.printable("a\x1b[31mb\tc") == "a\\u001b[31mb\\u0009c"

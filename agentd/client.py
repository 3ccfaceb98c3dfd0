"""A synchronous client for agentd's gRPC API over its unix socket.

    with AgentdClient() as client:                 # socket: see resolve_socket()
        run = client.create_run("cve-triage")
        for event in client.exec(run.run_id, ["python3", "-V"]):
            if isinstance(event, Output):
                ...                                # event.stream, event.data
            else:                                  # the last event is always an Outcome
                print(event.exit_code)
        client.close_run(run.run_id)

Steps (BSP supersteps: tasks in parallel, all their changes committed at the barrier or none):

        tasks = [TaskSpec("build", ["make"]), TaskSpec("lint", ["ruff", "check", "."])]
        for event in client.stream_step(run.run_id, tasks):
            ...                                    # TaskOutput, TaskReport, then a StepReply
        client.list_checkpoints(run.run_id)        # rollback(), fork(), export_checkpoint()

The client returns frozen dataclasses (`Run`, `Output`, `Outcome`, `StepReply`, ...), never
protobuf messages:
this module and `agentd.api` are the only users of the generated stubs, so nothing above it
(agentctl, agent frameworks) depends on them. Every failed call raises `ClientError`, whose
`code` is the gRPC status name ("NOT_FOUND", "PERMISSION_DENIED", ...). A tool that exits
non-zero or is killed is not an error: `exec` reports it in its final `Outcome`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc as pb_grpc
from agentd.api.gen.v1 import audit_pb2 as audit_pb
from agentd.api.gen.v1 import audit_pb2_grpc as audit_grpc
from agentd_client.connection import (
    DEV_SOCKET,
    MAX_MESSAGE_BYTES,
    SYSTEM_SOCKET,
    describe_failure,
    resolve_socket,
)

__all__ = [
    "DEV_SOCKET",
    "REDUCERS",
    "SYSTEM_SOCKET",
    "AgentdClient",
    "AuditClient",
    "AuditRecord",
    "ChannelDecl",
    "Checkpoint",
    "ClientError",
    "ExecEvent",
    "Outcome",
    "Output",
    "Run",
    "RunState",
    "SignedTreeHead",
    "Status",
    "StepEvent",
    "StepReply",
    "StepState",
    "StopReason",
    "Stream",
    "TaskOutput",
    "TaskReport",
    "TaskSpec",
    "resolve_socket",
]

#: Deadline of the unary calls, in seconds. Exec has none: the daemon enforces the tool's
#: wall time itself, and a client deadline would race with it.
DEFAULT_CALL_TIMEOUT = 60.0


class ClientError(Exception):
    """A call to agentd failed; `code` is the gRPC status name and `message` says what to do.

    Retrying helps only for UNAVAILABLE and RESOURCE_EXHAUSTED; anything else needs the
    request, the policy or the run's state changed first.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


def error_from_rpc(exc: grpc.RpcError, socket_path: str) -> ClientError:
    """Translates a grpc error into a ClientError; the one place where that happens."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    status = code_fn() if callable(code_fn) else None
    code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    details = str(details_fn() or "") if callable(details_fn) else ""
    return ClientError(code, describe_failure(code, details, socket_path))


class RunState(enum.StrEnum):
    """Whether a run still accepts work."""

    UNSPECIFIED = "unspecified"
    OPEN = "open"
    CLOSED = "closed"


class Stream(enum.StrEnum):
    """Which of the tool's output streams a chunk came from."""

    STDOUT = "stdout"
    STDERR = "stderr"


class StopReason(enum.StrEnum):
    """Why the daemon stopped the tool; NONE when the tool ended on its own."""

    NONE = "none"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    PIDS = "pids"
    OUTPUT = "output"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"
    QUOTA = "quota"


class StepState(enum.StrEnum):
    """Where a step stands; COMMITTED, FAILED and DISCARDED are final."""

    UNSPECIFIED = "unspecified"
    PENDING_APPROVAL = "pending_approval"  # waits for an approver (see AgentdClient.approve)
    RUNNING = "running"
    COMMITTED = "committed"  # every change of every task was applied, as one checkpoint
    FAILED = "failed"  # nothing was applied: a task failed, or two tasks conflicted
    DISCARDED = "discarded"  # rejected by an approver, or the run moved on before approval
    # The daemon died while it ran with network egress: nothing committed, effects possible;
    # nothing else runs on the run until an approver resolves it (AgentdClient.resolve).
    AMBIGUOUS = "ambiguous"
    ACCEPTED = "accepted"  # an ambiguous step taken as done: nothing committed


#: How a channel merges the writes of one step (see agentd.scheduler.channels).
REDUCERS = ("last_value", "append", "topic", "barrier")

_RUN_STATES = {
    pb.RUN_STATE_OPEN: RunState.OPEN,
    pb.RUN_STATE_CLOSED: RunState.CLOSED,
}
_STREAMS = {pb.STREAM_KIND_STDOUT: Stream.STDOUT, pb.STREAM_KIND_STDERR: Stream.STDERR}
_STOP_REASONS = {
    pb.STOP_REASON_NONE: StopReason.NONE,
    pb.STOP_REASON_TIMEOUT: StopReason.TIMEOUT,
    pb.STOP_REASON_MEMORY: StopReason.MEMORY,
    pb.STOP_REASON_PIDS: StopReason.PIDS,
    pb.STOP_REASON_OUTPUT: StopReason.OUTPUT,
    pb.STOP_REASON_CANCELLED: StopReason.CANCELLED,
    pb.STOP_REASON_SHUTDOWN: StopReason.SHUTDOWN,
    pb.STOP_REASON_QUOTA: StopReason.QUOTA,
}
_STEP_STATES = {
    pb.STEP_STATE_PENDING_APPROVAL: StepState.PENDING_APPROVAL,
    pb.STEP_STATE_RUNNING: StepState.RUNNING,
    pb.STEP_STATE_COMMITTED: StepState.COMMITTED,
    pb.STEP_STATE_FAILED: StepState.FAILED,
    pb.STEP_STATE_DISCARDED: StepState.DISCARDED,
    pb.STEP_STATE_AMBIGUOUS: StepState.AMBIGUOUS,
    pb.STEP_STATE_ACCEPTED: StepState.ACCEPTED,
}
RESOLUTIONS = {"retry": pb.RESOLUTION_RETRY, "accept": pb.RESOLUTION_ACCEPT,
               "abandon": pb.RESOLUTION_ABANDON}


def _time(msg: Timestamp) -> datetime:
    return msg.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True)
class ChannelDecl:
    """A channel of a run: run state written by tasks and merged at the barrier by `reducer`
    (one of REDUCERS); a barrier channel waits for all of `barrier_tasks` to have written."""

    name: str
    reducer: str
    barrier_tasks: tuple[str, ...] = ()

    def to_proto(self) -> pb.ChannelDecl:
        """The API message."""
        return pb.ChannelDecl(
            name=self.name, reducer=self.reducer, barrier_tasks=list(self.barrier_tasks)
        )

    @classmethod
    def from_proto(cls, msg: pb.ChannelDecl) -> ChannelDecl:
        """Converts the API message."""
        return cls(name=msg.name, reducer=msg.reducer, barrier_tasks=tuple(msg.barrier_tasks))


@dataclass(frozen=True)
class Run:
    """One execution of an agent, as the daemon reported it."""

    run_id: str
    agent: str
    stage: str
    state: RunState
    created_at: datetime | None
    closed_at: datetime | None
    policy_hash: str
    policy_file: str
    workspace: str  # "" once removed
    created_by: str
    tasks_run: int
    step: int = 0  # the last committed step; 0 before the first
    forked_from: str = ""  # the run this one was forked from, "" if none
    forked_at_step: int = 0
    channels: tuple[ChannelDecl, ...] = ()
    problem: str = ""  # why the run needs an operator (e.g. quarantined leftovers); "" if none

    @classmethod
    def from_proto(cls, msg: pb.Run) -> Run:
        """Converts the API message."""
        return cls(
            run_id=msg.run_id,
            agent=msg.agent,
            stage=msg.stage,
            state=_RUN_STATES.get(msg.state, RunState.UNSPECIFIED),
            created_at=(
                msg.created_at.ToDatetime(tzinfo=UTC) if msg.HasField("created_at") else None
            ),
            closed_at=msg.closed_at.ToDatetime(tzinfo=UTC) if msg.HasField("closed_at") else None,
            policy_hash=msg.policy_hash,
            policy_file=msg.policy_file,
            workspace=msg.workspace,
            created_by=msg.created_by,
            tasks_run=msg.tasks_run,
            step=msg.step,
            forked_from=msg.forked_from,
            forked_at_step=msg.forked_at_step,
            channels=tuple(ChannelDecl.from_proto(c) for c in msg.channels),
            problem=msg.problem,
        )


@dataclass(frozen=True)
class Output:
    """A chunk of the tool's stdout or stderr, in the order the tool produced it."""

    stream: Stream
    data: bytes


@dataclass(frozen=True)
class Outcome:
    """How the tool ended: the last event of every exec stream."""

    task_id: str
    exited: bool  # exit_code is meaningful only when set
    exit_code: int
    signal: int  # the killing signal, 0 if none
    stop_reason: StopReason
    wall_seconds: float
    cpu_seconds: float
    peak_memory_bytes: int
    stdout_bytes: int
    stderr_bytes: int
    summary: str  # "exited 0", "killed: memory limit 64 MiB"
    pids_limit_hit: bool  # a fork failed on the pids limit at least once
    # For exec (a step of one task): whether its changes were committed, as which step, and
    # if not, why. Unset in the outcomes of a multi-task step (see StepReply).
    committed: bool = False
    step: int = 0
    step_failure: str = ""
    base_step: int = 0  # the checkpoint the call ran on
    read_only: bool = False  # committed without a checkpoint: it changed nothing

    @classmethod
    def from_proto(cls, msg: pb.Outcome) -> Outcome:
        """Converts the API message."""
        return cls(
            task_id=msg.task_id,
            exited=msg.exited,
            exit_code=msg.exit_code,
            signal=msg.signal,
            stop_reason=_STOP_REASONS.get(msg.stop_reason, StopReason.NONE),
            wall_seconds=msg.wall_seconds,
            cpu_seconds=msg.cpu_seconds,
            peak_memory_bytes=msg.peak_memory_bytes,
            stdout_bytes=msg.stdout_bytes,
            stderr_bytes=msg.stderr_bytes,
            summary=msg.summary,
            pids_limit_hit=msg.pids_limit_hit,
            committed=msg.committed,
            step=msg.step,
            step_failure=msg.step_failure,
            base_step=msg.base_step,
            read_only=msg.read_only,
        )


ExecEvent = Output | Outcome


@dataclass(frozen=True)
class TaskSpec:
    """One task of a step: a tool call, named uniquely within the step.

    `timeout` is the tool's wall time in seconds (0: the policy's). With `allow_failure`, a
    non-zero exit does not fail the step (a task killed for a limit still does).
    """

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    cwd: str = ""
    timeout: float = 0.0
    allow_failure: bool = False

    def to_proto(self) -> pb.TaskSpec:
        """The API message."""
        return pb.TaskSpec(
            name=self.name,
            argv=list(self.argv),
            env=dict(self.env),
            stdin=self.stdin,
            cwd=self.cwd,
            timeout_seconds=self.timeout,
            allow_failure=self.allow_failure,
        )


@dataclass(frozen=True)
class TaskOutput:
    """A chunk of one task's stdout or stderr, as the task produced it."""

    task: str
    stream: Stream
    data: bytes


@dataclass(frozen=True)
class TaskReport:
    """How one task of a step ended and what it changed."""

    name: str
    outcome: Outcome | None  # None when the task did not run (e.g. pending approval)
    changed_paths: tuple[str, ...]  # relative to /workspace
    writes: int  # channel writes it made
    failure: str  # why this task failed the step, "" if it did not
    stdout: bytes
    stderr: bytes
    exec_denied: tuple[str, ...] = ()  # programs the kernel refused to execute for it

    @classmethod
    def from_proto(cls, msg: pb.TaskReport) -> TaskReport:
        """Converts the API message."""
        return cls(
            name=msg.name,
            outcome=Outcome.from_proto(msg.outcome) if msg.HasField("outcome") else None,
            changed_paths=tuple(msg.changed_paths),
            writes=msg.writes,
            failure=msg.failure,
            stdout=msg.stdout,
            stderr=msg.stderr,
            exec_denied=tuple(msg.exec_denied),
        )


@dataclass(frozen=True)
class StepReply:
    """One attempt at a step: what became of it, per task, and the channels after it."""

    run_id: str
    step: int  # the run's last committed step + 1; for a read-only step, the head it ran on
    state: StepState
    reason: str  # why it failed, is pending or was discarded; "" when committed
    conflicts: tuple[str, ...]
    tasks: tuple[TaskReport, ...]
    # Channel values after the step (decoded from JSON; the raw text if it is not JSON).
    channels: Mapping[str, Any]
    versions: Mapping[str, int]
    wall_seconds: float
    created_at: datetime | None
    requested_by: str
    decided_by: str  # the approver, for a step that needed one
    #: Channels left out of `channels` to keep the reply under the message limit -> bytes.
    channels_omitted: Mapping[str, int] = field(default_factory=dict)
    base_step: int = 0  # the checkpoint the step ran on
    read_only: bool = False  # committed without a checkpoint: it changed nothing

    @classmethod
    def from_proto(cls, msg: pb.StepReply) -> StepReply:
        """Converts the API message."""
        return cls(
            run_id=msg.run_id,
            step=msg.step,
            state=_STEP_STATES.get(msg.state, StepState.UNSPECIFIED),
            reason=msg.reason,
            conflicts=tuple(msg.conflicts),
            tasks=tuple(TaskReport.from_proto(t) for t in msg.tasks),
            channels={name: _json_value(text) for name, text in sorted(msg.channels.items())},
            versions=dict(sorted(msg.versions.items())),
            wall_seconds=msg.wall_seconds,
            created_at=_time(msg.created_at) if msg.HasField("created_at") else None,
            requested_by=msg.requested_by,
            decided_by=msg.decided_by,
            channels_omitted=dict(sorted(msg.channels_omitted.items())),
            base_step=msg.base_step,
            read_only=msg.read_only,
        )


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


StepEvent = TaskOutput | TaskReport | StepReply


@dataclass(frozen=True)
class Checkpoint:
    """A committed step the run can be rolled back to, forked from or exported."""

    step: int
    committed_at: datetime | None
    layers: int  # workspace layers under it, the base included
    versions: Mapping[str, int]  # channel name -> version

    @classmethod
    def from_proto(cls, msg: pb.Checkpoint) -> Checkpoint:
        """Converts the API message."""
        return cls(
            step=msg.step,
            committed_at=_time(msg.committed_at) if msg.HasField("committed_at") else None,
            layers=msg.layers,
            versions=dict(sorted(msg.versions.items())),
        )


#: The audit service's messages, as the daemon sends them (proofs need their exact bytes).
AuditRecord = audit_pb.AuditRecord
SignedTreeHead = audit_pb.SignedTreeHead


@dataclass(frozen=True)
class Status:
    """The daemon's health and load (`GetStatus`); see proto/agentd/v1/agentd.proto."""

    version: str
    uptime_seconds: float
    cgroup_backend: str
    cgroup_parent: str
    workers_in_use: int
    max_workers: int
    open_runs: int
    draining: bool
    warm_pool_depth: int
    warm_pool_size: int
    audit_writable: bool
    audit_problem: str
    audit_records: int
    audit_queue_depth: int
    audit_head_size: int
    audit_head_time: str
    state_free_bytes: int
    state_reserve_bytes: int
    metrics_socket: str
    metrics_listen: str

    @classmethod
    def from_proto(cls, msg: pb.Status) -> Status:
        return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class PolicyReload:
    """One agent's policy before and after `reload_policies` (effective content hashes)."""

    agent: str
    stage: str
    policy_file: str
    old_hash: str
    new_hash: str
    changed: bool
    clamped: tuple[str, ...]
    unreviewed: str = ""
    """The file's version when it waits for an approver (the agent keeps `new_hash`)."""

    @classmethod
    def from_proto(cls, msg: pb.PolicyReload) -> PolicyReload:
        return cls(msg.agent, msg.stage, msg.policy_file, msg.old_hash, msg.new_hash,
                   msg.changed, tuple(msg.clamped), msg.unreviewed)


@dataclass(frozen=True)
class StageCriterion:
    name: str
    met: bool
    figure: str
    records: tuple[int, ...]


@dataclass(frozen=True)
class StageStatus:
    """An agent's stage, the next gate's criteria and any pending promotion."""

    agent: str
    stage: str
    config_stage: str
    since_index: int
    next_stage: str
    criteria: tuple[StageCriterion, ...]
    pending_to: str
    pending_owner: str
    approvals: int
    approvals_needed: int
    next_stage_refuses: tuple[int, ...] = ()
    """Audit mode: records of calls the next stage would refuse, and ..."""
    next_stage_allows: tuple[int, ...] = ()
    """... would newly allow."""
    policy_source: str = ""
    unreviewed_source: str = ""
    """A policy file version waiting for an approver ("" if none), and its record."""
    unreviewed_index: int = -1
    config_ignored: bool = False
    """The config names another starting stage than the history began at (no effect)."""
    owner: str = ""
    evidence_tree_size: int = 0
    """The signed head (size and root) whose records the criteria were judged on."""
    evidence_root_hash: str = ""

    @classmethod
    def from_proto(cls, msg: pb.StageStatus) -> StageStatus:
        return cls(msg.agent, msg.stage, msg.config_stage, msg.since_index, msg.next_stage,
                   tuple(StageCriterion(c.name, c.met, c.figure, tuple(c.records))
                         for c in msg.criteria),
                   msg.pending_to, msg.pending_owner, msg.approvals, msg.approvals_needed,
                   tuple(msg.next_stage_refuses), tuple(msg.next_stage_allows),
                   msg.policy_source, msg.unreviewed_source, msg.unreviewed_index,
                   msg.config_ignored, msg.owner, msg.evidence_tree_size,
                   msg.evidence_root_hash)


@dataclass(frozen=True)
class StageChange:
    index: int
    time: str
    event: str
    stage: str
    previous: str
    actor: dict[str, Any]
    reason: str


class AuditClient:
    """The audit service of one agentd (any role's socket): records, tree heads, proofs.

    Returns the protobuf messages themselves: a reader checks hashes and signatures over
    their exact bytes (agentd.audit has the checks).
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = audit_grpc.AuditServiceStub(channel)

    def tree_head(self) -> audit_pb.SignedTreeHead:
        return self._stub.GetTreeHead(audit_pb.GetTreeHeadRequest())

    def tail(self, from_index: int = 0, *, run_id: str = "", event: str = "",
             follow: bool = False) -> Iterator[audit_pb.AuditRecord]:
        return iter(self._stub.Tail(audit_pb.TailRequest(
            from_index=from_index, run_id=run_id, event=event, follow=follow)))

    def query(self, *, run_id: str = "", event: str = "", limit: int = 0,
              since: Timestamp | None = None, until: Timestamp | None = None
              ) -> audit_pb.QueryResponse:
        request = audit_pb.QueryRequest(run_id=run_id, event=event, limit=limit)
        if since is not None:
            request.since.CopyFrom(since)
        if until is not None:
            request.until.CopyFrom(until)
        return self._stub.Query(request)

    def inclusion_proof(self, leaf_index: int, tree_size: int) -> audit_pb.InclusionProof:
        return self._stub.GetInclusionProof(audit_pb.GetInclusionProofRequest(
            leaf_index=leaf_index, tree_size=tree_size))

    def consistency_proof(self, first: int, second: int) -> audit_pb.ConsistencyProof:
        return self._stub.GetConsistencyProof(audit_pb.GetConsistencyProofRequest(
            first_tree_size=first, second_tree_size=second))


class AgentdClient:
    """A connection to one agentd over its unix socket; safe to share between threads."""

    def __init__(self, socket: str | None = None, *, timeout: float = DEFAULT_CALL_TIMEOUT):
        self.socket = resolve_socket(socket)
        self.timeout = timeout
        # An absolute target: "unix:relative" would depend on the cwd of whoever resolves it.
        self._channel = grpc.insecure_channel(
            f"unix:{os.path.abspath(self.socket)}",
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self._stub = pb_grpc.AgentdStub(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, for stubs of other agentd services."""
        return self._channel

    @property
    def audit(self) -> AuditClient:
        """The audit service on the same socket."""
        return AuditClient(self._channel)

    def close(self) -> None:
        """Closes the channel; streams still open are cancelled."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def error(self, exc: grpc.RpcError) -> ClientError:
        """Translates a grpc error raised by a call on `channel` into a ClientError."""
        return error_from_rpc(exc, self.socket)

    def create_run(self, agent: str, label: str = "", channels: Sequence[ChannelDecl] = ()) -> Run:
        """Creates a run of a registered agent, with the channels its tasks will write."""
        request = pb.CreateRunRequest(
            agent=agent, label=label, channels=[c.to_proto() for c in channels]
        )
        try:
            return Run.from_proto(self._stub.CreateRun(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def get_run(self, run_id: str) -> Run:
        """Returns one run; NOT_FOUND if there is no such run."""
        request = pb.GetRunRequest(run_id=run_id)
        try:
            return Run.from_proto(self._stub.GetRun(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def list_runs(self, agent: str = "", include_closed: bool = False) -> list[Run]:
        """Returns the open runs (and closed ones if asked), of one agent if `agent` is set."""
        request = pb.ListRunsRequest(agent=agent, include_closed=include_closed)
        try:
            response = self._stub.ListRuns(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None
        return [Run.from_proto(run) for run in response.runs]

    def close_run(self, run_id: str, keep_workspace: bool = False) -> Run:
        """Kills what still runs in the run and removes its workspace unless keep_workspace."""
        request = pb.CloseRunRequest(run_id=run_id, keep_workspace=keep_workspace)
        try:
            return Run.from_proto(self._stub.CloseRun(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def exec(
        self,
        run_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
        cwd: str = "",
        timeout: float = 0.0,
    ) -> Iterator[ExecEvent]:
        """Runs one tool call; yields Output chunks as they arrive, then exactly one Outcome.

        `timeout` is the tool's wall time in seconds (0: the policy's). Closing the iterator
        early cancels the call, and the daemon kills the tool.
        """
        request = pb.ExecRequest(
            run_id=run_id,
            argv=list(argv),
            env=dict(env or {}),
            stdin=stdin,
            cwd=cwd,
            timeout_seconds=timeout,
        )
        call = self._stub.Exec(request)
        return self._events(call)

    def _events(self, call: grpc.CallIterator[pb.ExecEvent]) -> Iterator[ExecEvent]:
        done = False
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "output":
                    stream = _STREAMS.get(event.output.stream, Stream.STDOUT)
                    yield Output(stream=stream, data=event.output.data)
                elif kind == "outcome":
                    done = True
                    yield Outcome.from_proto(event.outcome)
                    return
        except grpc.RpcError as exc:
            done = True
            raise self.error(exc) from None
        finally:
            if not done:
                _cancel(call)
        raise ClientError("INTERNAL", "agentd ended the exec stream without an outcome")

    def step(self, run_id: str, tasks: Sequence[TaskSpec], *,
             request_approval: bool = False) -> StepReply:
        """Runs one step and returns how it ended: committed, failed or pending approval.

        A failed step is not an error (nothing was applied; the reply says why). No deadline:
        the daemon enforces each task's wall time. `request_approval`: wait for an approver
        even if no task's argv[0] is an approval trigger.
        """
        request = pb.StepRequest(run_id=run_id, tasks=[t.to_proto() for t in tasks],
                                 request_approval=request_approval)
        try:
            return StepReply.from_proto(self._stub.Step(request))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def stream_step(self, run_id: str, tasks: Sequence[TaskSpec], *,
                    request_approval: bool = False) -> Iterator[StepEvent]:
        """Runs one step; yields TaskOutput chunks and a TaskReport per task as they happen,
        then exactly one StepReply.

        Closing the iterator early cancels the call: the daemon kills the tasks and applies
        nothing.
        """
        request = pb.StepRequest(run_id=run_id, tasks=[t.to_proto() for t in tasks],
                                 request_approval=request_approval)
        return self._step_events(self._stub.StreamStep(request))

    def _step_events(self, call: grpc.CallIterator[pb.StepEvent]) -> Iterator[StepEvent]:
        done = False
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "output":
                    chunk = event.output.chunk
                    stream = _STREAMS.get(chunk.stream, Stream.STDOUT)
                    yield TaskOutput(task=event.output.task, stream=stream, data=chunk.data)
                elif kind == "task_done":
                    yield TaskReport.from_proto(event.task_done)
                elif kind == "done":
                    done = True
                    yield StepReply.from_proto(event.done)
                    return
        except grpc.RpcError as exc:
            done = True
            raise self.error(exc) from None
        finally:
            if not done:
                _cancel(call)
        raise ClientError("INTERNAL", "agentd ended the step stream without a reply")

    def approve(self, run_id: str, step: int, approve: bool, reason: str = "") -> StepReply:
        """Approves (the step runs now, and the reply says how it ended) or rejects (it is
        discarded) a step that waits for approval.

        Only the approver role may call it, on the approver socket, and never for a step it
        requested itself: PERMISSION_DENIED otherwise.
        """
        request = pb.ApproveRequest(run_id=run_id, step=step, approve=approve, reason=reason)
        try:
            return StepReply.from_proto(self._stub.Approve(request))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def resolve(self, run_id: str, step: int, resolution: str, reason: str = "") -> StepReply:
        """Resolves an ambiguous step: "retry" (it runs now, and the reply says how it ended),
        "accept" (taken as done, nothing committed) or "abandon" (discarded). As `approve`:
        the approver role only, never for a step it requested itself."""
        request = pb.ResolveStepRequest(run_id=run_id, step=step, reason=reason,
                                        resolution=RESOLUTIONS[resolution])
        try:
            return StepReply.from_proto(self._stub.ResolveStep(request))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def wait_step(self, run_id: str, step: int, timeout: float | None = None) -> StepReply:
        """The step once it has ended: a step pending approval is waited for until an approver
        decides and it has run (DEADLINE_EXCEEDED after `timeout` seconds, None: no limit)."""
        try:
            return StepReply.from_proto(self._stub.WaitStep(
                pb.WaitStepRequest(run_id=run_id, step=step), timeout=timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def list_steps(self, run_id: str) -> list[StepReply]:
        """Every attempt at a step in the run, oldest first: its timeline."""
        request = pb.ListStepsRequest(run_id=run_id)
        try:
            response = self._stub.ListSteps(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None
        return [StepReply.from_proto(step) for step in response.steps]

    def status(self) -> Status:
        """The daemon's health and load."""
        try:
            return Status.from_proto(self._stub.GetStatus(pb.GetStatusRequest(),
                                                          timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def stage(self, agent: str) -> StageStatus:
        """`agent`'s stage and the next gate's criteria."""
        try:
            return StageStatus.from_proto(self._stub.GetStage(pb.GetStageRequest(agent=agent),
                                                              timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def stage_history(self, agent: str) -> list[StageChange]:
        try:
            reply = self._stub.StageHistory(pb.GetStageRequest(agent=agent), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None
        return [StageChange(c.index, c.time, c.event, c.stage, c.previous,
                            json.loads(c.actor_json or "{}"), c.reason) for c in reply.changes]

    def promote(self, agent: str, to: str, owner: str, reason: str) -> StageStatus:
        """A promotion request (admin socket)."""
        try:
            return StageStatus.from_proto(self._stub.PromoteStage(pb.PromoteStageRequest(
                agent=agent, to=to, owner=owner, reason=reason), timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def approve_stage(self, agent: str, approve: bool, reason: str = "") -> StageStatus:
        """An approver's decision on a pending promotion (approver socket)."""
        try:
            return StageStatus.from_proto(self._stub.ApproveStage(pb.ApproveStageRequest(
                agent=agent, approve=approve, reason=reason), timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def accept_policy(self, agent: str, source: str, reason: str = "") -> StageStatus:
        """An approver accepts `agent`'s unreviewed policy version (approver socket)."""
        try:
            return StageStatus.from_proto(self._stub.AcceptPolicy(pb.AcceptPolicyRequest(
                agent=agent, source=source, reason=reason), timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def reload_policies(self) -> list[PolicyReload]:
        """Every policy file read again and swapped in at once (admin socket only); a file
        that does not load replaces nothing (FAILED_PRECONDITION)."""
        try:
            reply = self._stub.ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None
        return [PolicyReload.from_proto(a) for a in reply.agents]

    def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """The run's checkpoints, oldest first."""
        request = pb.ListCheckpointsRequest(run_id=run_id)
        try:
            response = self._stub.ListCheckpoints(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None
        return [Checkpoint.from_proto(c) for c in response.checkpoints]

    def rollback(self, run_id: str, step: int) -> Run:
        """Makes checkpoint `step` the run's state; later checkpoints are dropped."""
        request = pb.RollbackRequest(run_id=run_id, step=step)
        try:
            return Run.from_proto(self._stub.Rollback(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def fork(self, run_id: str, step: int, label: str = "") -> Run:
        """Creates a new run that starts from checkpoint `step` of `run_id`; returns it."""
        request = pb.ForkRequest(run_id=run_id, step=step, label=label)
        try:
            return Run.from_proto(self._stub.Fork(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def export_checkpoint(self, run_id: str, step: int) -> Iterator[bytes]:
        """Yields a tarball of the workspace at checkpoint `step`, chunk by chunk.

        The tarball is complete only if the iterator ends without raising; closing it early
        cancels the export.
        """
        request = pb.ExportCheckpointRequest(run_id=run_id, step=step)
        return self._chunks(self._stub.ExportCheckpoint(request))

    def _chunks(self, call: grpc.CallIterator[pb.ExportChunk]) -> Iterator[bytes]:
        done = False
        try:
            for chunk in call:
                yield chunk.data
            done = True
        except grpc.RpcError as exc:
            done = True
            raise self.error(exc) from None
        finally:
            if not done:
                _cancel(call)

    def run_graph(self, graph: bytes, source: str, *, run_id: str = "",
                  inputs: Mapping[str, str] | None = None, approval_timeout: float = 0.0,
                  timeout: float | None = None) -> Iterator[GraphEvent]:
        """Runs a graph file on a run (a new one of the graph's agent if `run_id` is empty),
        yielding its events until the FINISHED one; closing the iterator early cancels the
        call, which stops the graph between its steps."""
        request = pb.RunGraphRequest(run_id=run_id, graph=graph, source=source,
                                     inputs=dict(inputs or {}),
                                     approval_timeout_seconds=approval_timeout)
        return self._graph_events(self._stub.RunGraph(request, timeout=timeout))

    def _graph_events(self, call: grpc.CallIterator[pb.GraphEvent]) -> Iterator[GraphEvent]:
        done = False
        try:
            for event in call:
                yield GraphEvent.from_proto(event)
            done = True
        except grpc.RpcError as exc:
            done = True
            raise self.error(exc) from None
        finally:
            if not done:
                _cancel(call)


@dataclass
class GraphEvent:
    """One event of RunGraph: kind is started, input, superstep, pending_approval, step or
    finished (then `stopped` and `reason` say how it ended)."""

    kind: str
    run_id: str
    step: int
    nodes: list[str]
    state: str
    read_only: bool
    reason: str
    stopped: bool
    supersteps: int

    @classmethod
    def from_proto(cls, msg: pb.GraphEvent) -> GraphEvent:
        kind = pb.GraphEventKind.Name(msg.kind).removeprefix("GRAPH_EVENT_KIND_").lower()
        state = (pb.StepState.Name(msg.state).removeprefix("STEP_STATE_").lower()
                 if msg.state else "")
        return cls(kind, msg.run_id, msg.step, list(msg.nodes), state, msg.read_only,
                   msg.reason, msg.stopped, msg.supersteps)


def _cancel(call: object) -> None:
    cancel = getattr(call, "cancel", None)
    if callable(cancel):
        cancel()

"""What the client sends and returns: plain dataclasses over the proto messages, shared by
the sync and the asyncio client so that both have one shape."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agentd_client.errors import FailedPrecondition
from agentd_client.v1 import agentd_pb2 as pb

#: Pauses before the 2nd, 3rd and 4th attempt of a call refused with a retryable status.
BACKOFF_SECONDS = (0.1, 0.4, 1.6)

_STATES = {pb.STEP_STATE_PENDING_APPROVAL: "pending_approval",
           pb.STEP_STATE_RUNNING: "running", pb.STEP_STATE_COMMITTED: "committed",
           pb.STEP_STATE_FAILED: "failed", pb.STEP_STATE_DISCARDED: "discarded",
           pb.STEP_STATE_AMBIGUOUS: "ambiguous", pb.STEP_STATE_ACCEPTED: "accepted"}

#: What an approver may do with an ambiguous step (`resolve_step`).
Resolution = Literal["retry", "accept", "abandon"]
_RESOLUTIONS = {"retry": pb.RESOLUTION_RETRY, "accept": pb.RESOLUTION_ACCEPT,
                "abandon": pb.RESOLUTION_ABANDON}


@dataclass(frozen=True)
class Task:
    """One tool call of a step (argv[0] absolute, or a name on the worker's PATH)."""

    argv: Sequence[str]
    name: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    cwd: str = ""
    timeout: float | None = None
    """The tool's wall time in seconds (None: the policy's)."""
    allow_failure: bool = False

    def to_proto(self, index: int) -> pb.TaskSpec:
        return pb.TaskSpec(name=self.name or f"t{index}", argv=list(self.argv),
                           env=dict(self.env), stdin=self.stdin, cwd=self.cwd,
                           timeout_seconds=self.timeout or 0.0,
                           allow_failure=self.allow_failure)


@dataclass(frozen=True)
class Output:
    """A chunk of a running tool's output, in the order it was produced."""

    stream: Literal["stdout", "stderr"]
    data: bytes
    task: str = ""


@dataclass(frozen=True)
class RunResult:
    """How one call ended, and what became of its changes."""

    exit_code: int
    """The tool's exit code; 128 + the signal when it was killed."""
    stdout: bytes
    stderr: bytes
    summary: str
    """"exited 0", "killed by signal 9 (SIGKILL): stopped for timeout", ..."""
    committed: bool
    """Its changes are the run's state now (False: it failed, nothing of it applies)."""
    step: int
    """The checkpoint the run is at after it (for a read-only call, the one it ran on)."""
    base_step: int
    """The checkpoint it ran on."""
    read_only: bool
    """It changed nothing, so no checkpoint was made."""
    failure: str = ""
    """Why nothing was committed ("" if committed)."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.committed


@dataclass(frozen=True)
class TaskResult:
    name: str
    exit_code: int
    summary: str
    stdout: bytes
    """At most 12 KiB of it in a unary step (`stream_step` has all of it)."""
    stderr: bytes
    failure: str
    changed_paths: tuple[str, ...]


@dataclass(frozen=True)
class StepResult:
    """One step: its state, per task, and the run's channels after it."""

    run_id: str
    step: int
    base_step: int
    state: str
    """committed, failed, pending_approval or discarded; after a daemon crash during a step
    with network egress, ambiguous (its external effects may have happened, nothing was
    committed: an approver resolves it), and accepted once an approver took it as done."""
    read_only: bool
    reason: str
    tasks: tuple[TaskResult, ...]
    channels: Mapping[str, Any]
    attempt: int = 0
    """The stored attempt: `wait_step(run, step, attempt=...)` waits for exactly this one."""

    @property
    def committed(self) -> bool:
        return self.state == "committed"


def exit_code(outcome: pb.Outcome) -> int:
    return outcome.exit_code if outcome.exited else 128 + outcome.signal


def run_result(outcome: pb.Outcome, stdout: bytes, stderr: bytes) -> RunResult:
    return RunResult(exit_code(outcome), stdout, stderr, outcome.summary, outcome.committed,
                     outcome.step, outcome.base_step, outcome.read_only, outcome.step_failure)


def step_result(reply: pb.StepReply) -> StepResult:
    def value(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            return text

    return StepResult(
        reply.run_id, reply.step, reply.base_step, _STATES.get(reply.state, "unspecified"),
        reply.read_only, reply.reason,
        tuple(TaskResult(t.name, exit_code(t.outcome), t.outcome.summary, t.stdout, t.stderr,
                         t.failure, tuple(t.changed_paths)) for t in reply.tasks),
        {name: value(text) for name, text in sorted(reply.channels.items())}, reply.attempt)


def output(chunk: pb.OutputChunk, task: str = "") -> Output:
    return Output("stderr" if chunk.stream == pb.STREAM_KIND_STDERR else "stdout", chunk.data,
                  task)


def exec_request(run_id: str, argv: Sequence[str], *, stdin: bytes, env: Mapping[str, str] | None,
                 cwd: str, timeout: float | None, expect_step: int | None) -> pb.ExecRequest:
    request = pb.ExecRequest(run_id=run_id, argv=list(argv), env=dict(env or {}), stdin=stdin,
                             cwd=cwd, timeout_seconds=timeout or 0.0)
    if expect_step is not None:
        request.expect_step = expect_step
    return request


def step_request(run_id: str, tasks: Sequence[Task], *, expect_step: int | None,
                 request_approval: bool) -> pb.StepRequest:
    request = pb.StepRequest(run_id=run_id, tasks=[t.to_proto(i) for i, t in enumerate(tasks)],
                             request_approval=request_approval)
    if expect_step is not None:
        request.expect_step = expect_step
    return request


def read_file_request(run_id: str, path: str, step: int | None) -> pb.ReadFileRequest:
    request = pb.ReadFileRequest(run_id=run_id, path=path)
    if step is not None:
        request.step = step
    return request


def write_file_request(run_id: str, path: str, data: bytes, mode: int,
                       expect_step: int | None) -> pb.WriteFileRequest:
    request = pb.WriteFileRequest(run_id=run_id, path=path, data=data, mode=mode)
    if expect_step is not None:
        request.expect_step = expect_step
    return request


def written_step(reply: pb.StepReply) -> int:
    """The checkpoint a write made; FailedPrecondition if it was not applied."""
    if _STATES.get(reply.state) != "committed":
        raise FailedPrecondition(f"the write of run {reply.run_id} was not applied: "
                                 f"{reply.reason}")
    return reply.step


def resolve_step_request(run_id: str, step: int, resolution: Resolution,
                         reason: str) -> pb.ResolveStepRequest:
    """ValueError for a resolution other than retry, accept or abandon (before any call)."""
    if resolution not in _RESOLUTIONS:
        raise ValueError(f"resolution must be retry, accept or abandon, not {resolution!r}")
    return pb.ResolveStepRequest(run_id=run_id, step=step,
                                 resolution=_RESOLUTIONS[resolution], reason=reason)


def wait_step_request(run_id: str, step: int, attempt: int | None) -> pb.WaitStepRequest:
    request = pb.WaitStepRequest(run_id=run_id, step=step)
    if attempt:
        request.attempt = attempt
    return request

"""The blocking client: one channel to one daemon socket, calls with deadlines, retries only
where the status says nothing was done (errors.RETRYABLE)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from agentd_client import types as t
from agentd_client.connection import CHANNEL_OPTIONS, resolve_socket
from agentd_client.errors import from_rpc, retryable
from agentd_client.v1 import agentd_pb2 as pb
from agentd_client.v1 import agentd_pb2_grpc as pb_grpc

R = TypeVar("R")


class Client:
    """A connection to agentd on its unix socket (`socket`, else $AGENTD_SOCKET, else
    ./var/run/agentd.sock in a checkout, else /run/agentd/agentd.sock).

    `timeout` is the deadline of the short calls in seconds; a tool's call (`run`, `stream`,
    `step`, `wait_step`) has none unless given `deadline`: the daemon enforces the tool's wall
    time itself. `retries` bounds the extra attempts of a call refused as UNAVAILABLE or
    RESOURCE_EXHAUSTED (nothing was done), with backoff.
    """

    def __init__(self, socket: str | None = None, *, timeout: float = 60.0,
                 retries: int = 3) -> None:
        self.socket = resolve_socket(socket)
        self.timeout = timeout
        self.retries = min(retries, len(t.BACKOFF_SECONDS))
        self._channel = grpc.insecure_channel(f"unix:{os.path.abspath(self.socket)}",
                                              options=list(CHANNEL_OPTIONS))
        self._stub = pb_grpc.AgentdStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _call(self, call: Callable[..., R], request: Any, deadline: float | None, *,
              idempotent: bool = False) -> R:
        """The call, sent again after a pause while `retryable` says so."""
        for attempt in range(self.retries + 1):
            try:
                return call(request, timeout=deadline)
            except grpc.RpcError as exc:
                if attempt < self.retries and retryable(exc, idempotent=idempotent):
                    time.sleep(t.BACKOFF_SECONDS[attempt])
                    continue
                raise from_rpc(exc, self.socket) from None
        raise AssertionError("unreachable")

    # -- runs ------------------------------------------------------------------------------

    def create_run(self, agent: str, *, label: str = "") -> str:
        """A new run of a registered agent; returns its id."""
        run = self._call(self._stub.CreateRun, pb.CreateRunRequest(agent=agent, label=label),
                         self.timeout)
        return run.run_id

    def close_run(self, run_id: str, *, keep_workspace: bool = False) -> None:
        self._call(self._stub.CloseRun,
                   pb.CloseRunRequest(run_id=run_id, keep_workspace=keep_workspace),
                   self.timeout)

    def head(self, run_id: str) -> int:
        """The run's current checkpoint (its last committed step)."""
        run = self._call(self._stub.GetRun, pb.GetRunRequest(run_id=run_id), self.timeout,
                         idempotent=True)
        return run.step

    def checkpoints(self, run_id: str) -> list[int]:
        reply = self._call(self._stub.ListCheckpoints,
                           pb.ListCheckpointsRequest(run_id=run_id), self.timeout,
                           idempotent=True)
        return [c.step for c in reply.checkpoints]

    def rollback(self, run_id: str, step: int) -> None:
        """The run's state becomes that checkpoint's (O(1)); ABORTED while a step runs."""
        self._call(self._stub.Rollback, pb.RollbackRequest(run_id=run_id, step=step),
                   self.timeout)

    def fork(self, run_id: str, step: int, *, label: str = "") -> str:
        """A new run sharing the checkpoint's state (O(1)); returns its id."""
        run = self._call(self._stub.Fork, pb.ForkRequest(run_id=run_id, step=step, label=label),
                         self.timeout)
        return run.run_id

    # -- calls -----------------------------------------------------------------------------

    def stream(self, run_id: str, argv: Sequence[str], *, stdin: bytes = b"",
               env: Mapping[str, str] | None = None, cwd: str = "",
               timeout: float | None = None, expect_step: int | None = None,
               deadline: float | None = None) -> Iterator[t.Output | t.RunResult]:
        """Runs one tool call as a step: its output as it comes, then its RunResult.
        ApprovalRequired if the call waits for an approver (then `wait_step`)."""
        request = t.exec_request(run_id, argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout,
                                 expect_step=expect_step)
        stdout, stderr = bytearray(), bytearray()
        for attempt in range(self.retries + 1):
            started = False
            try:
                for event in self._stub.Exec(request, timeout=deadline):
                    started = True
                    if event.HasField("output"):
                        chunk = t.output(event.output)
                        (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
                        yield chunk
                    else:
                        yield t.run_result(event.outcome, bytes(stdout), bytes(stderr))
                return
            except grpc.RpcError as exc:
                again = not started and attempt < self.retries
                if again and retryable(exc, idempotent=False):
                    time.sleep(t.BACKOFF_SECONDS[attempt])
                    continue
                raise from_rpc(exc, self.socket) from None

    def run(self, run_id: str, argv: Sequence[str], *, stdin: bytes = b"",
            env: Mapping[str, str] | None = None, cwd: str = "",
            timeout: float | None = None, expect_step: int | None = None,
            deadline: float | None = None) -> t.RunResult:
        """Runs one tool call as a step and returns how it ended, with all of its output."""
        for item in self.stream(run_id, argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout,
                                expect_step=expect_step, deadline=deadline):
            if isinstance(item, t.RunResult):
                return item
        raise AssertionError("agentd ended an Exec stream without its outcome")

    def step(self, run_id: str, tasks: Sequence[t.Task], *, expect_step: int | None = None,
             request_approval: bool = False, deadline: float | None = None) -> t.StepResult:
        """Runs the tasks as one BSP step: all on the same state, committed together or not
        at all. A step that waits for approval comes back as state pending_approval."""
        request = t.step_request(run_id, tasks, expect_step=expect_step,
                                 request_approval=request_approval)
        return t.step_result(self._call(self._stub.Step, request, deadline))

    def wait_step(self, run_id: str, step: int, *, attempt: int | None = None,
                  deadline: float | None = None
                  ) -> t.StepResult:
        """The step once it has ended: one waiting for approval, once an approver decided
        and it ran (committed), or rejected it (discarded); an ambiguous one once an approver
        resolved it (accepted, discarded, or retried and run). With `attempt` (from the reply or
        the ApprovalRequired), exactly that attempt, not a later one at the same number."""
        return t.step_result(self._call(
            self._stub.WaitStep, t.wait_step_request(run_id, step, attempt), deadline,
            idempotent=True))

    def resolve_step(self, run_id: str, step: int, resolution: t.Resolution, *,
                     reason: str = "", deadline: float | None = None) -> t.StepResult:
        """An approver's resolution of an ambiguous step (on the approver socket; not by the
        uid that requested it): "retry" runs its tasks again and returns how that ended,
        "accept" takes its external effects as done (state accepted, nothing committed),
        "abandon" discards it. FailedPrecondition naming the winner if already resolved."""
        return t.step_result(self._call(
            self._stub.ResolveStep, t.resolve_step_request(run_id, step, resolution, reason),
            deadline))

    # -- files -----------------------------------------------------------------------------

    def read_file(self, run_id: str, path: str, *, step: int | None = None,
                  timeout: float | None = None) -> bytes:
        """A workspace file at checkpoint `step` (default: the head), read without a step;
        symlinks are not followed, and at most about 4 MiB comes back (larger: a step)."""
        reply = self._call(self._stub.ReadFile, t.read_file_request(run_id, path, step),
                           timeout or self.timeout, idempotent=True)
        return reply.data

    def write_file(self, run_id: str, path: str, data: bytes, *, mode: int = 0o644,
                   expect_step: int | None = None, timeout: float | None = None) -> int:
        """Writes one workspace file as the next checkpoint, without a worker (queued behind
        a running step); returns that checkpoint. FailedPrecondition if it could not be
        applied (the quota, a directory in the way), with nothing changed."""
        reply = self._call(self._stub.WriteFile,
                           t.write_file_request(run_id, path, data, mode, expect_step),
                           timeout or self.timeout)
        return t.written_step(reply)

"""The asyncio client: the same methods as `Client`, awaited (grpc.aio)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from agentd_client import types as t
from agentd_client.connection import CHANNEL_OPTIONS, resolve_socket
from agentd_client.errors import from_rpc, retryable
from agentd_client.v1 import agentd_pb2 as pb
from agentd_client.v1 import agentd_pb2_grpc as pb_grpc

R = TypeVar("R")


class AsyncClient:
    """As `agentd_client.Client`, for asyncio programs (one channel per event loop)."""

    def __init__(self, socket: str | None = None, *, timeout: float = 60.0,
                 retries: int = 3) -> None:
        self.socket = resolve_socket(socket)
        self.timeout = timeout
        self.retries = min(retries, len(t.BACKOFF_SECONDS))
        self._channel = grpc.aio.insecure_channel(f"unix:{os.path.abspath(self.socket)}",
                                                  options=list(CHANNEL_OPTIONS))
        self._stub = pb_grpc.AgentdStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    async def _call(self, call: Callable[..., Awaitable[R]], request: Any,
                    deadline: float | None, *, idempotent: bool = False) -> R:
        for attempt in range(self.retries + 1):
            try:
                return await call(request, timeout=deadline)
            except grpc.RpcError as exc:
                if attempt < self.retries and retryable(exc, idempotent=idempotent):
                    await asyncio.sleep(t.BACKOFF_SECONDS[attempt])
                    continue
                raise from_rpc(exc, self.socket) from None
        raise AssertionError("unreachable")

    # -- runs ------------------------------------------------------------------------------

    async def create_run(self, agent: str, *, label: str = "") -> str:
        run = await self._call(self._stub.CreateRun,
                               pb.CreateRunRequest(agent=agent, label=label), self.timeout)
        return run.run_id

    async def close_run(self, run_id: str, *, keep_workspace: bool = False) -> None:
        await self._call(self._stub.CloseRun,
                         pb.CloseRunRequest(run_id=run_id, keep_workspace=keep_workspace),
                         self.timeout)

    async def head(self, run_id: str) -> int:
        run = await self._call(self._stub.GetRun, pb.GetRunRequest(run_id=run_id), self.timeout,
                         idempotent=True)
        return run.step

    async def checkpoints(self, run_id: str) -> list[int]:
        reply = await self._call(self._stub.ListCheckpoints,
                                 pb.ListCheckpointsRequest(run_id=run_id), self.timeout,
                           idempotent=True)
        return [c.step for c in reply.checkpoints]

    async def rollback(self, run_id: str, step: int) -> None:
        await self._call(self._stub.Rollback, pb.RollbackRequest(run_id=run_id, step=step),
                         self.timeout)

    async def fork(self, run_id: str, step: int, *, label: str = "") -> str:
        run = await self._call(self._stub.Fork,
                               pb.ForkRequest(run_id=run_id, step=step, label=label),
                               self.timeout)
        return run.run_id

    # -- calls -----------------------------------------------------------------------------

    async def stream(self, run_id: str, argv: Sequence[str], *, stdin: bytes = b"",
                     env: Mapping[str, str] | None = None, cwd: str = "",
                     timeout: float | None = None, expect_step: int | None = None,
                     deadline: float | None = None) -> AsyncIterator[t.Output | t.RunResult]:
        request = t.exec_request(run_id, argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout,
                                 expect_step=expect_step)
        stdout, stderr = bytearray(), bytearray()
        for attempt in range(self.retries + 1):
            started = False
            try:
                async for event in self._stub.Exec(request, timeout=deadline):
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
                    await asyncio.sleep(t.BACKOFF_SECONDS[attempt])
                    continue
                raise from_rpc(exc, self.socket) from None

    async def run(self, run_id: str, argv: Sequence[str], *, stdin: bytes = b"",
                  env: Mapping[str, str] | None = None, cwd: str = "",
                  timeout: float | None = None, expect_step: int | None = None,
                  deadline: float | None = None) -> t.RunResult:
        async for item in self.stream(run_id, argv, stdin=stdin, env=env, cwd=cwd,
                                      timeout=timeout, expect_step=expect_step,
                                      deadline=deadline):
            if isinstance(item, t.RunResult):
                return item
        raise AssertionError("agentd ended an Exec stream without its outcome")

    async def step(self, run_id: str, tasks: Sequence[t.Task], *,
                   expect_step: int | None = None, request_approval: bool = False,
                   deadline: float | None = None) -> t.StepResult:
        request = t.step_request(run_id, tasks, expect_step=expect_step,
                                 request_approval=request_approval)
        return t.step_result(await self._call(self._stub.Step, request, deadline))

    async def wait_step(self, run_id: str, step: int, *, attempt: int | None = None,
                        deadline: float | None = None
                        ) -> t.StepResult:
        return t.step_result(await self._call(
            self._stub.WaitStep, t.wait_step_request(run_id, step, attempt), deadline,
            idempotent=True))

    async def resolve_step(self, run_id: str, step: int, resolution: t.Resolution, *,
                           reason: str = "", deadline: float | None = None) -> t.StepResult:
        """As Client.resolve_step."""
        return t.step_result(await self._call(
            self._stub.ResolveStep, t.resolve_step_request(run_id, step, resolution, reason),
            deadline))

    # -- files -----------------------------------------------------------------------------

    async def read_file(self, run_id: str, path: str, *, step: int | None = None,
                        timeout: float | None = None) -> bytes:
        """As Client.read_file."""
        reply = await self._call(self._stub.ReadFile, t.read_file_request(run_id, path, step),
                                 timeout or self.timeout, idempotent=True)
        return reply.data

    async def write_file(self, run_id: str, path: str, data: bytes, *, mode: int = 0o644,
                         expect_step: int | None = None, timeout: float | None = None) -> int:
        """As Client.write_file."""
        reply = await self._call(self._stub.WriteFile,
                                 t.write_file_request(run_id, path, data, mode, expect_step),
                                 timeout or self.timeout)
        return t.written_step(reply)

"""The Agentd gRPC service: a thin adapter from protobuf to the scheduler.

Every method does the same things: take the caller bound by the interceptor, convert the
request, call the domain, convert the answer. Errors are raised as agentd errors and mapped
to statuses by the interceptor; no business logic lives here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from agentd.api import convert
from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from agentd.api.interceptor import current_caller
from agentd.errors import InvalidArgument
from agentd.scheduler.runs import RunManager
from agentd.scheduler.tasks import TaskRunner

# Output chunks buffered for a slow client before the worker's reader waits for it.
STREAM_BUFFER = 256


class AgentdServicer(agentd_pb2_grpc.AgentdServicer):
    def __init__(self, runs: RunManager, tasks: TaskRunner) -> None:
        self.runs = runs
        self.tasks = tasks

    async def CreateRun(self, request: pb.CreateRunRequest, context: Any) -> pb.Run:
        if not request.agent:
            raise InvalidArgument("agent is required: the name of a registered agent")
        run = await self.runs.create_run(request.agent, current_caller.get(), request.label)
        return convert.run_to_proto(run)

    async def GetRun(self, request: pb.GetRunRequest, context: Any) -> pb.Run:
        return convert.run_to_proto(self.runs.get_run(_run_id(request.run_id)))

    async def ListRuns(self, request: pb.ListRunsRequest, context: Any) -> pb.ListRunsResponse:
        runs = self.runs.list_runs(request.agent, request.include_closed)
        return pb.ListRunsResponse(runs=[convert.run_to_proto(r) for r in runs])

    async def CloseRun(self, request: pb.CloseRunRequest, context: Any) -> pb.Run:
        run = await self.runs.close_run(_run_id(request.run_id), current_caller.get(),
                                        keep_workspace=request.keep_workspace)
        return convert.run_to_proto(run)

    async def Exec(self, request: pb.ExecRequest, context: Any) -> AsyncIterator[pb.ExecEvent]:
        queue: asyncio.Queue[pb.ExecEvent | None] = asyncio.Queue(STREAM_BUFFER)

        async def on_output(kind: str, data: bytes) -> None:
            await queue.put(convert.output_event(kind, data))

        async def execute() -> pb.ExecEvent:
            try:
                result = await self.tasks.exec(convert.exec_request(request),
                                               current_caller.get(), on_output)
                return convert.outcome_event(result)
            finally:
                await queue.put(None)

        task = asyncio.get_running_loop().create_task(execute())
        try:
            while (event := await queue.get()) is not None:
                yield event
            yield await task
        finally:
            if not task.done():  # the caller went away: the worker is killed, not orphaned
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def _run_id(run_id: str) -> str:
    if not run_id:
        raise InvalidArgument("run_id is required")
    return run_id

"""The Agentd gRPC service: a thin adapter from protobuf to the scheduler.

Every method does the same things: take the caller bound by the interceptor, convert the
request, call the domain, convert the answer. Errors are raised as agentd errors and mapped
to statuses by the interceptor; no business logic lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from agentd.api import convert
from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from agentd.api.interceptor import current_caller
from agentd.api.limits import MAX_MESSAGE_BYTES, REPLY_HEADROOM
from agentd.errors import FailedPrecondition, InvalidArgument
from agentd.identity import Caller
from agentd.scheduler import files
from agentd.scheduler.agents import Reloaded
from agentd.scheduler.graph import GraphEvent, GraphRunner
from agentd.scheduler.plan import TaskRequest
from agentd.scheduler.runs import RunManager
from agentd.scheduler.stages import StageKeeper
from agentd.scheduler.steps import Resolution, StepResult, StepRunner
from agentd.scheduler.tasks import StepListener, TaskOutcome
from agentd.status import DaemonStatus

# Output chunks buffered for a slow client before the worker's reader waits for it.
STREAM_BUFFER = 256
# Step events (output chunks of at most 64 KiB) waiting for a slow streaming client before the
# task's output queue, and then its pipe, wait for it: a stalled caller costs about 1 MiB here.
STREAM_EVENTS = 16


class AgentdServicer(agentd_pb2_grpc.AgentdServicer):
    def __init__(self, runs: RunManager, steps: StepRunner,
                 status: Callable[[], DaemonStatus],
                 reload: Callable[[Caller], Awaitable[list[Reloaded]]],
                 stages: StageKeeper) -> None:
        self.runs = runs
        self.stages = stages
        self.status = status
        self.steps = steps
        self.reload = reload

    async def CreateRun(self, request: pb.CreateRunRequest, context: Any) -> pb.Run:
        if not request.agent:
            raise InvalidArgument("agent is required: the name of a registered agent")
        run = await self.runs.create_run(request.agent, current_caller.get(), request.label,
                                         convert.channel_specs(request.channels))
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
        task = TaskRequest(name="exec", argv=list(request.argv), env=dict(request.env),
                           stdin=request.stdin, cwd=request.cwd,
                           timeout_seconds=request.timeout_seconds)

        async def finish(result: StepResult) -> pb.ExecEvent:
            if result.state == "pending_approval":
                raise FailedPrecondition(f"step {result.step} {result.reason}; it runs once "
                                         "approved (`agentctl approve`); WaitStep on attempt "
                                         f"{result.attempt} returns it then")
            report = result.tasks[0] if result.tasks else None
            if report is None or report.result is None:
                raise FailedPrecondition(result.reason or "the tool did not run")
            if report.result.setup_failure is not None:
                raise FailedPrecondition(f"{report.result.setup_failure}; the tool did not run")
            event = convert.outcome_event(report.result)
            event.outcome.committed = result.state == "committed"
            event.outcome.step = result.step
            event.outcome.step_failure = "" if result.state == "committed" else result.reason
            event.outcome.base_step = max(result.base_step, 0)
            event.outcome.read_only = result.read_only
            return event

        async for item in _stream_step(
                lambda listener: self.steps.step(_run_id(request.run_id), [task],
                                                 current_caller.get(), listener,
                                                 task_events=False,
                                                 expect_step=_expected(request))):
            if isinstance(item, StepResult):
                yield await finish(item)
            elif isinstance(item, tuple):
                yield convert.output_event(item[1], item[2])

    async def Step(self, request: pb.StepRequest, context: Any) -> pb.StepReply:
        result = await self.steps.step(_run_id(request.run_id),
                                       convert.task_requests(request.tasks), current_caller.get(),
                                       request_approval=request.request_approval,
                                       expect_step=_expected(request))
        return convert.step_result(result)

    async def StreamStep(self, request: pb.StepRequest, context: Any
                         ) -> AsyncIterator[pb.StepEvent]:
        tasks = convert.task_requests(request.tasks)
        async for item in _stream_step(
                lambda listener: self.steps.step(_run_id(request.run_id), tasks,
                                                 current_caller.get(), listener,
                                                 request_approval=request.request_approval,
                                                 expect_step=_expected(request))):
            yield _step_event(item)

    async def Approve(self, request: pb.ApproveRequest, context: Any) -> pb.StepReply:
        result = await self.steps.approve(_run_id(request.run_id), request.step,
                                          request.approve, request.reason, current_caller.get())
        return convert.step_result(result)

    async def ResolveStep(self, request: pb.ResolveStepRequest, context: Any) -> pb.StepReply:
        result = await self.steps.resolve(_run_id(request.run_id), _step(request.step),
                                          _resolution(request.resolution), request.reason,
                                          current_caller.get())
        return convert.step_result(result)

    async def WaitStep(self, request: pb.WaitStepRequest, context: Any) -> pb.StepReply:
        if request.step < 1:
            raise InvalidArgument("step is required: the number of a step of the run (1 or more)")
        record = await self.steps.wait(_run_id(request.run_id), request.step,
                                       request.attempt if request.HasField("attempt") else None)
        return convert.step_record(record, with_output=True)

    async def ReadFile(self, request: pb.ReadFileRequest, context: Any) -> pb.ReadFileReply:
        data, mode, step = await files.read_file(
            self.runs, self.steps.layers, _run_id(request.run_id), request.path,
            request.step if request.HasField("step") else None,
            MAX_MESSAGE_BYTES - REPLY_HEADROOM)
        return pb.ReadFileReply(data=data, step=step, mode=mode)

    async def WriteFile(self, request: pb.WriteFileRequest, context: Any) -> pb.StepReply:
        result = await self.steps.write_file(
            _run_id(request.run_id), request.path, request.data, request.mode,
            current_caller.get(), _expected(request))
        return convert.step_result(result)

    async def ListSteps(self, request: pb.ListStepsRequest, context: Any
                        ) -> pb.ListStepsResponse:
        run_id = _run_id(request.run_id)
        self.runs.get_run(run_id)
        return pb.ListStepsResponse(steps=[convert.step_record(r)
                                           for r in self.runs.steps.attempts(run_id)])

    async def ListCheckpoints(self, request: pb.ListCheckpointsRequest, context: Any
                              ) -> pb.ListCheckpointsResponse:
        run_id = _run_id(request.run_id)
        self.runs.get_run(run_id)
        return pb.ListCheckpointsResponse(checkpoints=[
            convert.checkpoint(c) for c in self.runs.steps.checkpoints(run_id)])

    async def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.Run:
        run_id = _run_id(request.run_id)
        await self.steps.rollback(run_id, request.step, current_caller.get())
        return convert.run_to_proto(self.runs.get_run(run_id))

    async def Fork(self, request: pb.ForkRequest, context: Any) -> pb.Run:
        run = await self.runs.fork(_run_id(request.run_id), request.step, current_caller.get(),
                                   request.label)
        return convert.run_to_proto(run)

    async def ExportCheckpoint(self, request: pb.ExportCheckpointRequest, context: Any
                               ) -> AsyncIterator[pb.ExportChunk]:
        chunks = self.steps.export(_run_id(request.run_id), request.step, current_caller.get())
        async with contextlib.aclosing(chunks):  # a client gone stops the writer's thread
            async for chunk in chunks:
                yield pb.ExportChunk(data=chunk)


    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.Status:
        return convert.status(self.status())

    async def GetStage(self, request: pb.GetStageRequest, context: Any) -> pb.StageStatus:
        return convert.stage_status(await self.stages.status(_agent(request.agent)))

    async def StageHistory(self, request: pb.GetStageRequest, context: Any
                           ) -> pb.StageHistoryReply:
        changes = self.stages.history(_agent(request.agent))
        return pb.StageHistoryReply(changes=[convert.stage_change(c) for c in changes])

    async def PromoteStage(self, request: pb.PromoteStageRequest, context: Any
                           ) -> pb.StageStatus:
        status = await self.stages.request(_agent(request.agent), request.to, request.owner,
                                           request.reason, current_caller.get())
        return convert.stage_status(status)

    async def ApproveStage(self, request: pb.ApproveStageRequest, context: Any
                           ) -> pb.StageStatus:
        status = await self.stages.approve(_agent(request.agent), request.approve,
                                           request.reason, current_caller.get())
        return convert.stage_status(status)

    async def AcceptPolicy(self, request: pb.AcceptPolicyRequest, context: Any
                           ) -> pb.StageStatus:
        status = await self.stages.accept(_agent(request.agent), request.source,
                                          request.reason, current_caller.get())
        return convert.stage_status(status)

    async def ReloadPolicies(self, request: pb.ReloadPoliciesRequest, context: Any
                             ) -> pb.ReloadPoliciesReply:
        changes = await self.reload(current_caller.get())
        return pb.ReloadPoliciesReply(agents=[
            pb.PolicyReload(agent=c.agent, stage=c.stage, policy_file=c.policy_file,
                            old_hash=c.old_hash, new_hash=c.new_hash, changed=c.changed,
                            clamped=c.clamped, unreviewed=c.unreviewed) for c in changes])

    async def RunGraph(self, request: pb.RunGraphRequest, context: Any
                       ) -> AsyncIterator[pb.GraphEvent]:
        events = GraphRunner(self.steps).run(
            request.source, request.graph, request.run_id, dict(request.inputs),
            current_caller.get(), request.approval_timeout_seconds)
        async with contextlib.aclosing(events):  # a client gone stops the loop between steps
            async for event in events:
                yield _graph_event(event)

async def _stream_step(start: Callable[[StepListener], Awaitable[StepResult]]
                       ) -> AsyncIterator[Any]:
    """Runs a step, yielding its events as they happen and then its StepResult; a caller that
    goes away cancels the step (its workers are killed, nothing is applied)."""
    queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_EVENTS)
    done = object()

    async def listener(kind: str, payload: Any) -> None:
        await queue.put(payload)

    async def run() -> StepResult:
        try:
            return await start(listener)
        finally:
            await queue.put(done)

    task = asyncio.get_running_loop().create_task(run())
    try:
        while (item := await queue.get()) is not done:
            yield item
        yield await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _step_event(item: Any) -> pb.StepEvent:
    if isinstance(item, StepResult):
        return pb.StepEvent(done=convert.step_result(item))
    if isinstance(item, TaskOutcome):
        report = convert.task_report(item)
        report.ClearField("stdout")  # already streamed, chunk by chunk
        report.ClearField("stderr")
        return pb.StepEvent(task_done=report)
    name, kind, data = item
    return pb.StepEvent(output=pb.TaskOutput(task=name, chunk=convert.output_event(
        kind, data).output))


def _run_id(run_id: str) -> str:
    if not run_id:
        raise InvalidArgument("run_id is required")
    return run_id


def _expected(request: pb.StepRequest | pb.ExecRequest | pb.WriteFileRequest) -> int | None:
    """The checkpoint the caller built on, if it named one (proto3 `optional`)."""
    return request.expect_step if request.HasField("expect_step") else None


def _step(step: int) -> int:
    if step < 1:
        raise InvalidArgument("step is required: the number of a step of the run (1 or more)")
    return step


def _resolution(value: int) -> Resolution:
    """The proto enum as the scheduler's; UNSPECIFIED (or a value from a newer client) is
    INVALID_ARGUMENT naming the three."""
    names = {pb.RESOLUTION_RETRY: Resolution.RETRY, pb.RESOLUTION_ACCEPT: Resolution.ACCEPT,
             pb.RESOLUTION_ABANDON: Resolution.ABANDON}
    if value not in names:
        raise InvalidArgument("resolution is required: RETRY (run its tasks again), ACCEPT "
                              "(take its effects as done) or ABANDON (discard it)")
    return names[value]  # type: ignore[index]


def _agent(name: str) -> str:
    if not name:
        raise InvalidArgument("agent is required: the name of a registered agent")
    return name


def _graph_event(event: GraphEvent) -> pb.GraphEvent:
    return pb.GraphEvent(
        kind=pb.GraphEventKind.Value(f"GRAPH_EVENT_KIND_{event.kind.upper()}"),
        run_id=event.run_id, step=event.step, nodes=list(event.nodes),
        state=convert.STEP_STATES[event.state] if event.state else pb.STEP_STATE_UNSPECIFIED,
        read_only=event.read_only, reason=event.reason, stopped=event.stopped,
        supersteps=event.supersteps)

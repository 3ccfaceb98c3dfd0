"""Protobuf ↔ domain objects; nothing else in agentd touches the generated messages."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.limits import MAX_MESSAGE_BYTES, REPLY_HEADROOM
from agentd.sandbox.worker import WorkerResult
from agentd.scheduler import channels
from agentd.scheduler.plan import TaskRequest
from agentd.scheduler.stages import StageChange, StageStatus
from agentd.scheduler.steps import StepResult
from agentd.scheduler.tasks import TaskOutcome
from agentd.status import DaemonStatus
from agentd.store.runs import RunRecord, RunState
from agentd.store.steps import CheckpointRecord, StepRecord

STOP_REASONS = {
    None: pb.STOP_REASON_NONE, "timeout": pb.STOP_REASON_TIMEOUT,
    "memory": pb.STOP_REASON_MEMORY, "pids": pb.STOP_REASON_PIDS,
    "output": pb.STOP_REASON_OUTPUT, "cancelled": pb.STOP_REASON_CANCELLED,
    "shutdown": pb.STOP_REASON_SHUTDOWN, "quota": pb.STOP_REASON_QUOTA,
}
STREAMS = {"stdout": pb.STREAM_KIND_STDOUT, "stderr": pb.STREAM_KIND_STDERR}


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def run_to_proto(run: RunRecord) -> pb.Run:
    return pb.Run(
        run_id=run.run_id, agent=run.agent, stage=run.stage,
        state=pb.RUN_STATE_OPEN if run.state is RunState.OPEN else pb.RUN_STATE_CLOSED,
        created_at=_timestamp(run.created_at), closed_at=_timestamp(run.closed_at),
        policy_hash=run.policy_hash, policy_file=run.policy_file, workspace=run.workspace,
        created_by=run.created_by, tasks_run=run.tasks_run, step=run.step,
        forked_from=run.forked_from, forked_at_step=run.forked_at, problem=run.problem,
        channels=[pb.ChannelDecl(name=c.name, reducer=c.reducer, barrier_tasks=c.barrier_tasks)
                  for c in run.channels])


def output_event(kind: str, data: bytes) -> pb.ExecEvent:
    return pb.ExecEvent(output=pb.OutputChunk(stream=STREAMS[kind], data=data))


def outcome_event(result: WorkerResult) -> pb.ExecEvent:
    usage = result.usage
    return pb.ExecEvent(outcome=pb.Outcome(
        task_id=result.task_id, exited=result.exited, exit_code=result.exit_code,
        signal=result.signal, stop_reason=STOP_REASONS[result.stop_reason],
        wall_seconds=result.wall_seconds, cpu_seconds=usage.cpu_seconds,
        peak_memory_bytes=usage.peak_memory_bytes, stdout_bytes=result.stdout_bytes,
        stderr_bytes=result.stderr_bytes, summary=result.summary,
        pids_limit_hit=usage.pids_limit_hit))


STEP_STATES = {
    "pending_approval": pb.STEP_STATE_PENDING_APPROVAL, "running": pb.STEP_STATE_RUNNING,
    "committed": pb.STEP_STATE_COMMITTED, "failed": pb.STEP_STATE_FAILED,
    "discarded": pb.STEP_STATE_DISCARDED, "interrupted": pb.STEP_STATE_FAILED,
    "ambiguous": pb.STEP_STATE_AMBIGUOUS, "accepted": pb.STEP_STATE_ACCEPTED,
}


def channel_specs(decls: Iterable[pb.ChannelDecl]) -> list[channels.ChannelSpec]:
    return [channels.ChannelSpec(name=d.name, reducer=d.reducer,  # type: ignore[arg-type]
                                 barrier_tasks=tuple(d.barrier_tasks)) for d in decls]


def task_requests(tasks: Iterable[pb.TaskSpec]) -> list[TaskRequest]:
    return [TaskRequest(name=t.name, argv=list(t.argv), env=dict(t.env), stdin=t.stdin,
                        cwd=t.cwd, timeout_seconds=t.timeout_seconds,
                        allow_failure=t.allow_failure) for t in tasks]


def outcome(result: WorkerResult) -> pb.Outcome:
    return outcome_event(result).outcome


def task_report(report: TaskOutcome) -> pb.TaskReport:
    message = pb.TaskReport(name=report.name, changed_paths=report.changed_paths,
                            writes=len(report.writes), failure=report.failure,
                            stdout=report.stdout, stderr=report.stderr,
                            exec_denied=report.exec_denied)
    if report.result is not None:
        message.outcome.CopyFrom(outcome(report.result))
    return message


def step_result(result: StepResult) -> pb.StepReply:
    """The reply, with channel values capped so the whole stays under MAX_MESSAGE_BYTES."""
    reply = pb.StepReply(
        run_id=result.run_id, step=result.step, state=STEP_STATES[result.state],
        reason=result.reason, conflicts=result.conflicts,
        tasks=[task_report(t) for t in result.tasks],
        versions=result.versions, wall_seconds=result.wall_seconds,
        created_at=_timestamp(result.created_at), requested_by=result.requested_by,
        decided_by=result.decided_by, base_step=max(result.base_step, 0),
        read_only=result.read_only, attempt=result.attempt)
    kept, omitted = cap_channels(
        {k: json.dumps(v, sort_keys=True) for k, v in result.channels.items()},
        MAX_MESSAGE_BYTES - REPLY_HEADROOM - reply.ByteSize())
    reply.channels.update(kept)
    reply.channels_omitted.update(omitted)
    return reply


def cap_channels(encoded: dict[str, str], budget: int
                 ) -> tuple[dict[str, str], dict[str, int]]:
    """The channel values that fit in `budget` bytes, in name order, and the sizes of those
    left out. A value either goes whole or not at all: half a JSON document is no value."""
    kept: dict[str, str] = {}
    omitted: dict[str, int] = {}
    for name in sorted(encoded):
        size = len(encoded[name].encode())
        # map entry: tag + length + key + tag + length + value, generously
        cost = size + len(name.encode()) + 16
        if cost <= budget:
            kept[name] = encoded[name]
            budget -= cost
        else:
            omitted[name] = size
    return kept, omitted


def step_record(record: StepRecord, *, with_output: bool = False) -> pb.StepReply:
    """A stored attempt, for the timeline (task outcomes as summaries, not live objects); with
    `with_output` (WaitStep, one attempt), the output an approved step kept. A timeline never
    carries output: a run's attempts are unbounded, a reply is not."""
    reply = record.reply
    read_only = bool(reply.get("read_only", False))
    base_step = max(int(reply.get("base_step", record.step - 1)), 0)
    return pb.StepReply(
        # A read-only attempt is numbered as the next step; the run stayed at its base.
        run_id=record.run_id, step=base_step if read_only else record.step,
        state=STEP_STATES[record.state],
        reason=record.reason, conflicts=reply.get("conflicts", []),
        tasks=[_stored_task(t, with_output) for t in reply.get("tasks", [])] or [
                   pb.TaskReport(name=t["name"]) for t in record.request.get("tasks", [])],
        versions=reply.get("versions", {}), wall_seconds=reply.get("wall", 0.0),
        created_at=_timestamp(record.created_at), requested_by=record.requested_by,
        decided_by=record.decided_by,
        base_step=base_step, read_only=read_only, attempt=record.attempt)


def _stored_task(task: dict[str, Any], with_output: bool) -> pb.TaskReport:
    """A task as its attempt stored it: how it ended, and for an approved step the first
    bytes of its output (agentd/scheduler/steps.py KEPT_OUTPUT_BYTES)."""
    ended = task.get("outcome") or {}
    return pb.TaskReport(
        name=task["name"], failure=task.get("failure", ""),
        changed_paths=task.get("changed", []), writes=task.get("writes", 0),
        exec_denied=task.get("exec_denied", []),
        stdout=base64.b64decode(task.get("stdout", "")) if with_output else b"",
        stderr=base64.b64decode(task.get("stderr", "")) if with_output else b"",
        outcome=pb.Outcome(summary=ended.get("summary", ""), wall_seconds=ended.get("wall", 0.0),
                           exited=bool(ended.get("exited", False)),
                           exit_code=int(ended.get("exit_code") or 0),
                           signal=int(ended.get("signal") or 0)))


def checkpoint(record: CheckpointRecord) -> pb.Checkpoint:
    return pb.Checkpoint(step=record.step, committed_at=_timestamp(record.committed_at),
                         layers=len(record.layers),
                         versions={k: v.version for k, v in record.channels.items()})


def status(value: DaemonStatus) -> pb.Status:
    return pb.Status(**dataclasses.asdict(value))


def stage_status(status: StageStatus) -> pb.StageStatus:
    pending = status.pending
    return pb.StageStatus(
        agent=status.agent, stage=status.stage, config_stage=status.config_stage,
        since_index=status.since_index, next_stage=status.next_stage,
        criteria=[pb.StageCriterion(name=c.name, met=c.met, figure=c.figure,
                                    records=list(c.records)) for c in status.criteria],
        pending_to=pending.to if pending else "", pending_owner=pending.owner if pending else "",
        approvals=len(pending.approvers) if pending else 0,
        approvals_needed=status.approvals_needed,
        next_stage_refuses=list(status.next_refuses), next_stage_allows=list(status.next_allows),
        policy_source=status.policy_source, config_ignored=status.config_ignored,
        owner=status.owner, evidence_tree_size=status.evidence_head.get("tree_size", 0),
        evidence_root_hash=status.evidence_head.get("root_hash", ""),
        unreviewed_source=status.unreviewed.source if status.unreviewed else "",
        unreviewed_index=status.unreviewed.index if status.unreviewed else -1)


def stage_change(change: StageChange) -> pb.StageChange:
    return pb.StageChange(index=change.index, time=change.time, event=change.event,
                          stage=change.stage, previous=change.previous,
                          actor_json=json.dumps(dict(change.actor), sort_keys=True),
                          reason=change.reason)

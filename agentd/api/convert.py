"""Protobuf ↔ domain objects; nothing else in agentd touches the generated messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.sandbox.worker import WorkerResult
from agentd.scheduler.tasks import ExecRequest
from agentd.store.runs import RunRecord

STOP_REASONS = {
    None: pb.STOP_REASON_NONE, "timeout": pb.STOP_REASON_TIMEOUT,
    "memory": pb.STOP_REASON_MEMORY, "pids": pb.STOP_REASON_PIDS,
    "output": pb.STOP_REASON_OUTPUT, "cancelled": pb.STOP_REASON_CANCELLED,
    "shutdown": pb.STOP_REASON_SHUTDOWN,
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
        state=pb.RUN_STATE_OPEN if run.state == "open" else pb.RUN_STATE_CLOSED,
        created_at=_timestamp(run.created_at), closed_at=_timestamp(run.closed_at),
        policy_hash=run.policy_hash, policy_file=run.policy_file, workspace=run.workspace,
        created_by=run.created_by, execs=run.execs)


def exec_request(request: pb.ExecRequest) -> ExecRequest:
    return ExecRequest(run_id=request.run_id, argv=list(request.argv), env=dict(request.env),
                       stdin=request.stdin, cwd=request.cwd,
                       timeout_seconds=request.timeout_seconds)


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

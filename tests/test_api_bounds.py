"""Every request field is bounded; an unimplemented method is UNIMPLEMENTED; a missing cwd is
explained. All against the session's real daemon."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc, audit_pb2, audit_pb2_grpc
from tests.conftest import DaemonHandle, execute

pytestmark = pytest.mark.privileged

Stub = agentd_pb2_grpc.AgentdStub
HUGE = "x" * 4_000_000
LONG = "y" * 5000


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status of a call that must fail (a streaming call is read to its end)."""

    def run() -> None:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, str | bytes):
            list(result)  # type: ignore[call-overload]

    with pytest.raises(grpc.RpcError) as caught:
        run()
    return caught.value.code(), caught.value.details() or ""


def _requests(run_id: str) -> dict[str, Callable[[Stub], object]]:
    """One oversized field per RPC of the Agentd service."""
    task = pb.TaskSpec(name="t", argv=["/bin/true"])
    return {
        "CreateRun.label": lambda s: s.CreateRun(pb.CreateRunRequest(
            agent="shell-helper", label=LONG)),
        "CreateRun.channels": lambda s: s.CreateRun(pb.CreateRunRequest(
            agent="shell-helper", channels=[pb.ChannelDecl(name=f"c{i}", reducer="append")
                                            for i in range(300)])),
        "GetRun.run_id": lambda s: s.GetRun(pb.GetRunRequest(run_id=LONG)),
        "ListRuns.agent": lambda s: s.ListRuns(pb.ListRunsRequest(agent=LONG)),
        "CloseRun.run_id": lambda s: s.CloseRun(pb.CloseRunRequest(run_id=HUGE)),
        "Exec.env": lambda s: s.Exec(pb.ExecRequest(
            run_id=run_id, argv=["/bin/true"], env={f"V{i}": "1" for i in range(300)})),
        "Exec.cwd": lambda s: s.Exec(pb.ExecRequest(run_id=run_id, argv=["/bin/true"],
                                                    cwd="/workspace/" + LONG)),
        "Step.tasks": lambda s: s.Step(pb.StepRequest(run_id=run_id, tasks=[task] * 65)),
        "StreamStep.task name": lambda s: s.StreamStep(pb.StepRequest(
            run_id=run_id, tasks=[pb.TaskSpec(name=LONG, argv=["/bin/true"])])),
        "Approve.reason": lambda s: s.Approve(pb.ApproveRequest(run_id=run_id, step=1,
                                                                approve=False, reason=HUGE)),
        "ListSteps.run_id": lambda s: s.ListSteps(pb.ListStepsRequest(run_id=HUGE)),
        "ListCheckpoints.run_id": lambda s: s.ListCheckpoints(
            pb.ListCheckpointsRequest(run_id=HUGE)),
        "Rollback.run_id": lambda s: s.Rollback(pb.RollbackRequest(run_id=HUGE)),
        "Fork.label": lambda s: s.Fork(pb.ForkRequest(run_id=run_id, step=0, label=HUGE)),
        "ExportCheckpoint.run_id": lambda s: s.ExportCheckpoint(
            pb.ExportCheckpointRequest(run_id=HUGE)),
    }


class TestBounds:
    @pytest.mark.parametrize("name", sorted(_requests("r").keys()))
    def test_an_oversized_field_is_invalid_argument_and_changes_nothing(
            self, daemon: DaemonHandle, run_id: str, name: str) -> None:
        """Each RPC refuses its oversized field by name with INVALID_ARGUMENT, and no run is
        created, forked or changed."""
        admin = daemon.stub("admin")
        before = [(r.run_id, r.step) for r in admin.ListRuns(
            pb.ListRunsRequest(include_closed=True)).runs]
        code, details = _code(lambda: _requests(run_id)[name](admin))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert "at most" in details
        after = [(r.run_id, r.step) for r in admin.ListRuns(
            pb.ListRunsRequest(include_closed=True)).runs]
        assert after == before

    def test_audit_service_requests_are_bounded_too(self, daemon: DaemonHandle) -> None:
        """The audit service's string fields have the same bounds."""
        stub = audit_pb2_grpc.AuditServiceStub(daemon.channel())
        code, _ = _code(lambda: stub.Query(audit_pb2.QueryRequest(run_id=HUGE)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


class TestHealth:
    def test_list_and_watch_answer(self, daemon: DaemonHandle) -> None:
        """Health List lists the services as SERVING; Watch streams SERVING (neither is
        INTERNAL)."""
        stub = health_pb2_grpc.HealthStub(daemon.channel())
        listed = stub.List(health_pb2.HealthListRequest(), timeout=10)
        assert listed.statuses["agentd.v1.Agentd"].status == \
            health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


class TestMissingCwd:
    def test_a_missing_cwd_is_one_clear_message(self, stub: Stub, run_id: str) -> None:
        """An exec in a cwd that does not exist says which cwd and what to do, once, without
        the launcher's own report mixed in."""
        code, details = _code(lambda: execute(stub, run_id, ["/bin/true"],
                                              cwd="/workspace/nope"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "cwd /workspace/nope: No such file or directory in the worker" in details
        assert "join cgroup" not in details
        assert details.count("{") == 0

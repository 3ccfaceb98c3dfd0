"""Stages as state, against a real daemon: the log decides an agent's stage, a promotion is
refused with every unmet criterion and granted only after approvals from distinct uids that
are neither the requester's nor the owner's, and a stage written in the config afterwards is
ignored and reported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.audit.evidence import read_records
from tests.conftest import (
    CONFIG,
    REPO,
    TEST_GATES,
    DaemonHandle,
    daemon_base,
    sh,
    start_daemon,
    stop_daemon,
)

pytestmark = pytest.mark.privileged

# A gate into sandbox a test can meet in seconds (one run, two steps, a rollback, two people),
# and pilot demoting on a violation.
GATES = textwrap.dedent("""\
    gates:
      sandbox:
        min_runs: 1
        min_steps: 2
        max_failure_rate: 0.5
        rollback_drills: 1
        approvals: 2
      pilot:
        demote_on: [violation]
    """)


def _start(base: Path, config: str = CONFIG) -> DaemonHandle:
    """A daemon with GATES in its stages.yaml (start_daemon writes the shipped one; a policy
    reload reads the gates again, as it would after an operator's edit)."""
    handle = start_daemon(base, config)
    stages = base / "policies" / "stages.yaml"
    assert TEST_GATES in stages.read_text()
    stages.write_text(stages.read_text().replace(TEST_GATES, "\n" + GATES))
    handle.stub("admin").ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
    os.chmod(handle.socket("approver"), 0o666)  # what approver_group grants other people
    return handle


@pytest.fixture
def base() -> Iterator[Path]:
    base = daemon_base()
    yield base
    shutil.rmtree(base, ignore_errors=True)


def approve_as(uid: int, handle: DaemonHandle, agent: str) -> str:
    """ApproveStage from a process running as `uid` (another person)."""
    program = textwrap.dedent(f"""
        import grpc, os
        from agentd.api.gen.v1 import agentd_pb2 as pb, agentd_pb2_grpc
        os.setgroups([])
        os.setgid({uid})
        os.setuid({uid})
        stub = agentd_pb2_grpc.AgentdStub(
            grpc.insecure_channel("unix:{handle.socket('approver')}"))
        try:
            reply = stub.ApproveStage(pb.ApproveStageRequest(agent="{agent}", approve=True,
                                                             reason="looked at it"), timeout=60)
            print("OK", reply.stage, reply.approvals)
        except grpc.RpcError as exc:
            print(exc.code().name, exc.details())
        """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=90, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def stage_records(handle: DaemonHandle) -> list[dict[str, object]]:
    return [r for r in read_records(handle.base / "state" / "audit")
            if str(r["event"]).startswith("stage.")]


class TestStages:
    def test_each_agent_starts_at_its_config_stage_on_record(self, base: Path) -> None:
        handle = _start(base)
        try:
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert (status.stage, status.config_stage, status.next_stage) == (
                "prototype", "prototype", "sandbox")
            history = handle.stub().StageHistory(pb.GetStageRequest(agent="shell-helper"))
            assert [(c.event, c.stage) for c in history.changes] == [("stage.set", "prototype")]
            assert status.since_index == history.changes[0].index
        finally:
            stop_daemon(handle)

    def test_a_promotion_is_refused_with_every_unmet_criterion(self, base: Path) -> None:
        handle = _start(base)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                handle.stub("admin").PromoteStage(pb.PromoteStageRequest(
                    agent="shell-helper", to="sandbox", owner="alice", reason="ready"))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            detail = refused.value.details() or ""
            for unmet in ("runs: 0 of at least 1", "steps: 0 of at least 2",
                          "rollback drills: 0 of at least 1"):
                assert unmet in detail
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert {c.name: c.met for c in status.criteria} == {
                "runs": False, "steps": False, "failure rate": True, "violations": True,
                "rollback drills": False}
            with pytest.raises(grpc.RpcError) as client:
                handle.stub().PromoteStage(pb.PromoteStageRequest(
                    agent="shell-helper", to="sandbox", owner="alice", reason="ready"))
            assert client.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            stop_daemon(handle)

    def test_a_promotion_needs_two_other_people_and_changes_the_policy(
            self, base: Path) -> None:
        handle = _start(base)
        try:
            stub = handle.stub()
            run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
            assert sh(stub, run_id, "echo 1 > a").outcome.committed
            assert sh(stub, run_id, "echo 2 > b").outcome.committed
            stub.Rollback(pb.RollbackRequest(run_id=run_id, step=1))
            status = handle.stub("admin").PromoteStage(pb.PromoteStageRequest(
                agent="shell-helper", to="sandbox", owner="alice", reason="two clean steps"))
            assert (status.pending_to, status.approvals, status.approvals_needed) == (
                "sandbox", 0, 2)
            # The requester (root, uid 0) cannot approve; nor can one person twice.
            with pytest.raises(grpc.RpcError) as own:
                handle.stub("approver").ApproveStage(pb.ApproveStageRequest(
                    agent="shell-helper", approve=True))
            assert own.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert approve_as(1234, handle, "shell-helper") == "OK prototype 1"
            assert approve_as(1234, handle, "shell-helper").startswith("FAILED_PRECONDITION")
            assert approve_as(1235, handle, "shell-helper") == "OK sandbox 0"
            status = stub.GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert status.stage == "sandbox"
            [promoted] = [r for r in stage_records(handle) if r["event"] == "stage.promoted"]
            details = promoted["details"]
            assert details["approvers"] == [1234, 1235]  # type: ignore[index]
            assert details["owner"] == "alice"  # type: ignore[index]
            assert details["evidence"]["steps"]["met"] is True  # type: ignore[index]
            # New steps run under the sandbox policy: their records say so.
            later = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
            assert sh(stub, later, "true").outcome.committed
            allowed = [r for r in read_records(handle.base / "state" / "audit")
                       if r["event"] == "exec.allowed" and r["run_id"] == later]
            assert allowed[-1]["details"]["stage"] == "sandbox"  # type: ignore[index]
        finally:
            stop_daemon(handle)

    def test_a_stage_in_the_config_is_ignored_once_the_log_has_one(self, base: Path) -> None:
        handle = _start(base)
        stop_daemon(handle)
        moved = CONFIG.replace('[agents.shell-helper]\npolicy = "shell-helper.yaml"\n'
                               'stage = "prototype"',
                               '[agents.shell-helper]\npolicy = "shell-helper.yaml"\n'
                               'stage = "production"')
        assert moved != CONFIG
        handle = _start(base, moved)
        try:
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert (status.stage, status.config_stage) == ("prototype", "production")
            assert "stage.config_mismatch" in handle.log()
            done = subprocess.run(
                [sys.executable, "-m", "agentd.cli.main", "--socket", str(handle.socket()),
                 "stage", "status", "shell-helper"], capture_output=True, text=True,
                timeout=60, check=False, cwd=REPO)
            assert done.returncode == 0, done.stderr
            assert "the config says production: ignored" in done.stdout
        finally:
            stop_daemon(handle)

    def test_a_violation_at_pilot_demotes_at_once_and_stops_running_steps(
            self, base: Path) -> None:
        at_pilot = CONFIG.replace('[agents.shell-helper]\npolicy = "shell-helper.yaml"\n'
                                  'stage = "prototype"',
                                  '[agents.shell-helper]\npolicy = "shell-helper.yaml"\n'
                                  'stage = "pilot"')
        assert at_pilot != CONFIG
        handle = _start(base, at_pilot)
        try:
            stub = handle.stub()
            busy = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
            other = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
            long_step = stub.Step.future(pb.StepRequest(run_id=busy, tasks=[pb.TaskSpec(
                name="long", argv=["/bin/sh", "-c", "echo x > written; sleep 25"])]),
                timeout=60)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(
                    r["event"] == "exec.allowed" and r["run_id"] == busy
                    for r in read_records(handle.base / "state" / "audit")):
                time.sleep(0.05)
            time.sleep(0.5)  # the long task is running
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Exec(pb.ExecRequest(run_id=other, argv=["/usr/bin/curl", "x"])))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            reply = long_step.result(timeout=30)  # stopped long before its 25 s
            assert reply.state == pb.STEP_STATE_FAILED
            assert stub.GetRun(pb.GetRunRequest(run_id=busy)).step == 0  # nothing applied
            status = stub.GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert status.stage == "sandbox"
            history = stub.StageHistory(pb.GetStageRequest(agent="shell-helper")).changes
            assert [(c.event, c.stage) for c in history] == [("stage.set", "pilot"),
                                                             ("stage.demoted", "sandbox")]
            assert history[-1].reason.startswith("violation: exec refused:")
        finally:
            stop_daemon(handle)

"""Callers are identified by SO_PEERCRED in every mode, and approval means another uid.

The daemons here run without `allow_self_approval` unless a test says otherwise. A second
person is a real second uid: a subprocess that drops to uid 1234 before it connects to the
approver socket (opened to it with chmod, as a group would in production).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from tests.conftest import (
    CONFIG,
    REPO,
    DaemonHandle,
    daemon_base,
    execute,
    start_daemon,
    stop_daemon,
)

pytestmark = pytest.mark.privileged

STRICT = CONFIG.replace("allow_self_approval = true\n", "") + \
    '\n[agents.approvals]\npolicy = "approvals.yaml"\nstage = "prototype"\n'
LENIENT = CONFIG + '\n[agents.approvals]\npolicy = "approvals.yaml"\nstage = "prototype"\n'
OTHER_UID = 1234
RM = pb.TaskSpec(name="rm", argv=["/usr/bin/rm", "-f", "victim"])


def _daemon(config: str) -> Iterator[DaemonHandle]:
    base = daemon_base()
    (base / "policies").mkdir()
    shutil.copy(REPO / "tests" / "policy_cases" / "approvals.yaml", base / "policies")
    handle = start_daemon(base, config)
    try:
        yield handle
    finally:
        stop_daemon(handle)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def strict() -> Iterator[DaemonHandle]:
    yield from _daemon(STRICT)


@pytest.fixture(scope="module")
def lenient() -> Iterator[DaemonHandle]:
    yield from _daemon(LENIENT)


def _records(handle: DaemonHandle) -> list[dict[str, Any]]:
    return [json.loads(line) for seg in sorted((handle.base / "state" / "audit").glob(
        "audit-*.jsonl")) for line in seg.read_text().splitlines()]


def _pending_step(handle: DaemonHandle) -> tuple[str, int]:
    stub = handle.stub()
    run_id = stub.CreateRun(pb.CreateRunRequest(agent="approvals")).run_id
    execute(stub, run_id, ["/bin/sh", "-c", "echo v > victim"])
    reply = stub.Step(pb.StepRequest(run_id=run_id, tasks=[RM]), timeout=60)
    assert reply.state == pb.STEP_STATE_PENDING_APPROVAL
    return run_id, reply.step


def _approve_as(uid: int, socket: Path, run_id: str, step: int) -> subprocess.CompletedProcess[str]:
    """Approve from a process running as `uid` (a second person). It imports what it needs
    as root (the interpreter may live where uid 1234 cannot read), then drops to `uid`
    before it connects: the daemon sees only the uid of the connecting process."""
    program = textwrap.dedent(f"""
        import grpc, os, sys
        from agentd.api.gen.v1 import agentd_pb2 as pb, agentd_pb2_grpc
        os.setgroups([])
        os.setgid({uid})
        os.setuid({uid})
        stub = agentd_pb2_grpc.AgentdStub(grpc.insecure_channel("unix:{socket}"))
        try:
            reply = stub.Approve(pb.ApproveRequest(run_id="{run_id}", step={step},
                                                   approve=True, reason="second person"),
                                 timeout=60)
            print(pb.StepState.Name(reply.state))
        except grpc.RpcError as exc:
            print(exc.code().name, exc.details())
        """)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=90,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


class TestApprovalIdentity:
    def test_the_requesters_uid_cannot_approve(self, strict: DaemonHandle) -> None:
        """Requested as root on the client socket, approved as root on the approver socket:
        refused (another person is another uid), and the step stays pending."""
        run_id, step = _pending_step(strict)
        with pytest.raises(grpc.RpcError) as refused:
            strict.stub("approver").Approve(pb.ApproveRequest(
                run_id=run_id, step=step, approve=True, reason="me"), timeout=60)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "approver uid != requester uid" in (refused.value.details() or "")
        states = [s.state for s in strict.stub().ListSteps(
            pb.ListStepsRequest(run_id=run_id)).steps]
        assert states[-1] == pb.STEP_STATE_PENDING_APPROVAL

    def test_another_uid_approves_and_is_recorded(self, strict: DaemonHandle) -> None:
        """uid 1234 on the approver socket approves: the step runs and the approval record
        carries uid 1234 as the kernel reported it."""
        run_id, step = _pending_step(strict)
        socket = strict.socket("approver")
        os.chmod(socket, 0o666)  # what approver_group would grant uid 1234 in production
        done = _approve_as(OTHER_UID, socket, run_id, step)
        assert done.stdout.strip() == "STEP_STATE_COMMITTED", (done.stdout, done.stderr)
        approval = [r for r in _records(strict) if r["event"] == "step.approval"
                    and r.get("run_id") == run_id][-1]
        assert approval["actor"]["uid"] == OTHER_UID
        assert approval["details"]["self_approved"] is False

    def test_self_approval_when_allowed_is_recorded(self, lenient: DaemonHandle) -> None:
        """With allow_self_approval, the same uid may approve, and the record says so."""
        run_id, step = _pending_step(lenient)
        reply = lenient.stub("approver").Approve(pb.ApproveRequest(
            run_id=run_id, step=step, approve=True, reason="me"), timeout=60)
        assert reply.state == pb.STEP_STATE_COMMITTED
        approval = [r for r in _records(lenient) if r["event"] == "step.approval"
                    and r.get("run_id") == run_id][-1]
        assert approval["details"]["self_approved"] is True
        assert approval["actor"]["uid"] == 0


class TestPeerCredentials:
    def test_every_record_carries_the_callers_uid_and_pid(self, strict: DaemonHandle) -> None:
        """Without systemd too (this daemon made its own sockets), an Exec's records carry
        the uid, gid and pid of the process that called, read with SO_PEERCRED."""
        stub = strict.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="approvals")).run_id
        execute(stub, run_id, ["/bin/true"])
        allowed = [r for r in _records(strict) if r["event"] == "exec.allowed"
                   and r.get("run_id") == run_id][-1]
        assert allowed["actor"]["uid"] == os.getuid()
        assert allowed["actor"]["gid"] == os.getgid()
        assert allowed["actor"]["pid"] == os.getpid()

    def test_grpcs_own_socket_is_not_reachable(self, strict: DaemonHandle) -> None:
        """grpc listens only on private sockets in a 0700 directory; a call that reached one
        directly (here: as root) is refused, never served without an identity."""
        private = strict.base / "run" / "private"
        assert private.stat().st_mode & 0o777 == 0o700
        stub = pb_stub(private / "client.sock")
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateRun(pb.CreateRunRequest(agent="approvals"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def pb_stub(path: Path) -> Any:
    from agentd.api.gen.v1 import agentd_pb2_grpc

    return agentd_pb2_grpc.AgentdStub(grpc.insecure_channel(f"unix:{path}"))

"""Audit mode against a real daemon: every call is also decided under the next stage's policy,
never enforced; what the next stage would refuse or newly allow is on record (stage.shadow)
and in the stage evidence."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.audit.evidence import collect, read_records
from tests.conftest import CONFIG, REPO, DaemonHandle, daemon_base, sh, start_daemon, stop_daemon

pytestmark = pytest.mark.privileged

# At prototype it may sort but not cat; at sandbox the other way round; ls at both.
AUDITED = textwrap.dedent("""\
    apiVersion: agentd/v1
    kind: Policy
    name: audited
    stages:
      prototype:
        exec:
          allow: [/bin/sh, /usr/bin/ls, /usr/bin/sort]
        filesystem:
          read_only: [/usr, /bin, /lib, /lib64]
      sandbox:
        exec:
          allow: [/bin/sh, /usr/bin/ls, /usr/bin/cat]
    """)


@pytest.fixture(scope="module")
def handle() -> Iterator[DaemonHandle]:
    base = daemon_base()
    (base / "policies").mkdir(parents=True)
    (base / "policies" / "audited.yaml").write_text(AUDITED)
    config = CONFIG + textwrap.dedent("""
        [agents.audited]
        policy = "audited.yaml"
        stage = "prototype"
        audit_next_stage = true
        """)
    handle = start_daemon(base, config)
    try:
        yield handle
    finally:
        stop_daemon(handle)
        shutil.rmtree(base, ignore_errors=True)


def shadows(handle: DaemonHandle) -> list[dict[str, object]]:
    return [r for r in read_records(handle.base / "state" / "audit")
            if r["event"] == "stage.shadow"]


class TestAuditMode:
    def test_the_next_stage_is_recorded_never_enforced(self, handle: DaemonHandle) -> None:
        stub = handle.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="audited")).run_id
        # Enforced at prototype: sort runs (sandbox would refuse it), cat is refused (sandbox
        # would allow it), ls runs at both (nothing to record).
        sort = stub.Step(pb.StepRequest(run_id=run_id, tasks=[pb.TaskSpec(
            name="s", argv=["/usr/bin/sort"], stdin=b"b\na\n")]), timeout=60)
        assert sort.state == pb.STEP_STATE_COMMITTED
        assert sort.tasks[0].stdout == b"a\nb\n"
        with pytest.raises(grpc.RpcError) as refused:
            stub.Step(pb.StepRequest(run_id=run_id, tasks=[pb.TaskSpec(
                name="c", argv=["/usr/bin/cat", "/etc/hostname"])]), timeout=60)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert sh(stub, run_id, "ls /").outcome.committed
        records = shadows(handle)
        seen = [(r["details"]["task"], r["details"]["enforced"], r["details"]["next"])  # type: ignore[index]
                for r in records]
        assert seen == [("s", "allow", "refuse"), ("c", "refuse", "allow")]
        for rec in records:
            assert rec["details"]["stage"] == "prototype"  # type: ignore[index]
            assert rec["details"]["next_stage"] == "sandbox"  # type: ignore[index]
            assert rec["run_id"] == run_id
        assert "exec.allow" in records[0]["details"]["rule"]  # type: ignore[index]

    def test_an_agent_without_audit_mode_leaves_no_shadow(self, handle: DaemonHandle) -> None:
        stub = handle.stub()
        before = len(shadows(handle))
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration-userns")).run_id
        sh(stub, run_id, "true")
        assert len(shadows(handle)) == before

    def test_the_evidence_counts_them(self, handle: DaemonHandle) -> None:
        found = collect(read_records(handle.base / "state" / "audit"), "audited")
        evidence = found["prototype"]
        assert len(evidence.next_refuses) == 1
        assert len(evidence.next_allows) == 1
        done = subprocess.run(
            [sys.executable, "-m", "agentd.cli.main", "stage", "evidence", "audited", "--audit",
             str(handle.base / "state" / "audit")], cwd=REPO, capture_output=True, text=True,
            timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "audit mode, the next stage would refuse 1 call(s) (records " in done.stdout
        assert "and newly allow 1 (records " in done.stdout

    def test_stage_status_shows_them(self, handle: DaemonHandle) -> None:
        """What a reviewer reads before promotion: the same records, through the daemon."""
        status = handle.stub().GetStage(pb.GetStageRequest(agent="audited"))
        records = shadows(handle)
        assert list(status.next_stage_refuses) == [
            r["index"] for r in records if r["details"]["next"] == "refuse"]  # type: ignore[index]
        assert list(status.next_stage_allows) == [
            r["index"] for r in records if r["details"]["next"] == "allow"]  # type: ignore[index]
        done = subprocess.run(
            [sys.executable, "-m", "agentd.cli.main", "--socket", str(handle.socket()), "stage",
             "status", "audited"], cwd=REPO, capture_output=True, text=True, timeout=60,
            check=False)
        assert done.returncode == 0, done.stderr
        assert "audit mode: sandbox would refuse 1 call(s) (records " in done.stdout

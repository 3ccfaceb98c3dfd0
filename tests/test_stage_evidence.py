"""Stage evidence from the audit log alone: a real daemon does things an agent would, then
`agentctl stage evidence` recomputes the figures from a copy of the log, and refuses a copy
that does not verify."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.audit import segments
from agentd.audit.evidence import collect, read_records
from tests.conftest import REPO, daemon_base, sh, start_daemon, stop_daemon

pytestmark = pytest.mark.privileged


def agentctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentd.cli.main", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def log_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the audit log of a daemon that ran shell-helper (prototype) through commits,
    a failure, a refusal, a limit kill, a rollback, a fork and a close, and
    integration-userns (production) once."""
    base = daemon_base()
    handle = start_daemon(base)
    try:
        stub = handle.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
        assert sh(stub, run_id, "echo one > a").outcome.committed
        assert sh(stub, run_id, "echo two > b").outcome.committed
        assert not sh(stub, run_id, "exit 3").outcome.committed
        with pytest.raises(grpc.RpcError):
            list(stub.Exec(pb.ExecRequest(run_id=run_id, argv=["/usr/bin/curl", "x"])))
        slow = sh(stub, run_id, "sleep 5", timeout=1.0)
        assert slow.outcome.stop_reason == pb.STOP_REASON_TIMEOUT
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=1))
        fork = stub.Fork(pb.ForkRequest(run_id=run_id, step=1))
        assert sh(stub, fork.run_id, "echo three > c").outcome.committed
        stub.CloseRun(pb.CloseRunRequest(run_id=fork.run_id))
        stub.CloseRun(pb.CloseRunRequest(run_id=run_id))
        other = stub.CreateRun(pb.CreateRunRequest(agent="integration-userns")).run_id
        assert sh(stub, other, "true").outcome.committed
    finally:
        stop_daemon(handle)  # signs the last head
    copy = tmp_path_factory.mktemp("evidence") / "audit"
    shutil.copytree(base / "state" / "audit", copy)
    shutil.rmtree(base, ignore_errors=True)
    return copy


class TestEvidence:
    def test_the_figures_are_recomputed_from_a_copied_log(self, log_copy: Path) -> None:
        found = collect(read_records(log_copy), "shell-helper")
        assert set(found) == {"prototype"}
        evidence = found["prototype"]
        assert len(evidence.runs) == 2  # the run and its fork
        assert len(evidence.runs_closed) == 2
        assert len(evidence.steps_committed) == 3
        assert len(evidence.steps_failed) == 2  # exit 3, and the step stopped for time
        assert evidence.failure_rate == pytest.approx(2 / 5)
        events = sorted(event for _, event, _ in evidence.violations)
        assert events == ["exec.exited", "exec.refused"]
        assert len(evidence.rollbacks) == 1
        assert len(evidence.policy_hashes) == 1
        records = {r["index"]: r for r in read_records(log_copy)}
        for index in evidence.steps_committed:
            assert records[index]["event"] == "step.committing"
        for index, event, _ in evidence.violations:
            assert records[index]["event"] == event
        assert set(collect(read_records(log_copy), "integration-userns")) == {"production"}

    def test_agentctl_prints_them_with_their_record_indexes(self, log_copy: Path) -> None:
        done = agentctl("stage", "evidence", "shell-helper", "--audit", str(log_copy))
        assert done.returncode == 0, done.stderr
        assert "verified; evidence over records 0.." in done.stdout
        assert "shell-helper at prototype:" in done.stdout
        assert "steps: 3 committed (records " in done.stdout
        assert "failure rate 40.0%" in done.stdout
        assert "violations: 2" in done.stdout
        assert "rollback drills: 1 (records " in done.stdout

    def test_a_log_that_does_not_verify_gives_no_evidence(self, log_copy: Path,
                                                          tmp_path: Path) -> None:
        forged = tmp_path / "audit"
        shutil.copytree(log_copy, forged)
        first = segments.segment_path(forged, segments.list_segments(forged)[0])
        lines = first.read_bytes().split(b"\n")
        for n, line in enumerate(lines):
            if b'"step.failed"' in line:  # make a failure look like nothing happened
                record = json.loads(line)
                record["event"] = "step.noted"
                lines[n] = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
                break
        first.write_bytes(b"\n".join(lines))
        done = agentctl("stage", "evidence", "shell-helper", "--audit", str(forged))
        assert done.returncode == 2
        assert "does not verify, so no evidence is computed from it" in done.stderr


class TestUnusedGrants:
    def test_lint_flags_what_the_agent_never_ran_at_a_stage_it_ran_at(
            self, log_copy: Path) -> None:
        done = agentctl("policy", "lint", "policies/shell-helper.yaml", "--usage", str(log_copy),
                        "--agent", "shell-helper")
        assert done.returncode == 1, done.stdout + done.stderr
        unused = [line for line in done.stdout.splitlines() if "[unused-grant]" in line]
        # The agent's tasks ran /bin/sh only (every task was `sh -c ...`), all at prototype.
        assert any(": prototype: exec.allow: /usr/bin/cat: no task ran it" in line
                   for line in unused), unused
        assert not any("exec.allow: /bin/sh:" in line for line in unused)
        assert all(": prototype: " in line for line in unused)  # no run at other stages

    def test_usage_from_a_log_that_does_not_verify_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "audit").mkdir()
        done = agentctl("policy", "lint", "policies/shell-helper.yaml", "--usage",
                        str(tmp_path / "audit"), "--agent", "shell-helper")
        assert done.returncode == 2
        assert "does not verify, so it is not used" in done.stderr

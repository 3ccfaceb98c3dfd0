"""The audit log's tail is signed before anything is acknowledged, and a witness holding an
earlier head detects a log that was truncated, rolled back or forked.

Everything runs against the real daemon of the session (tests/conftest.py) and the real
`agentctl`, as subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from agentd.audit import verify
from tests.conftest import DaemonHandle, execute

pytestmark = pytest.mark.privileged


def _witness(daemon: DaemonHandle, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd.cli.main", "--socket", str(daemon.socket()), "audit",
         "witness", "--state", str(state), *extra],
        capture_output=True, text=True, timeout=60, check=False)


def _audit_dir(daemon: DaemonHandle) -> Path:
    return daemon.base / "state" / "audit"


class TestSignedBeforeAcknowledged:
    def test_a_refused_call_is_covered_by_a_signed_head_when_refused(
            self, daemon: DaemonHandle, stub: object, run_id: str) -> None:
        """A call refused by policy gets PERMISSION_DENIED only after a signed head covers
        its record: the files verify strictly (no unsigned tail) the moment it returns."""
        with pytest.raises(grpc.RpcError) as refused:
            execute(stub, run_id, ["/opt/not-granted"])  # type: ignore[arg-type]
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        report = verify(_audit_dir(daemon))
        assert report.ok, report.problems
        records = [json.loads(line) for seg in sorted(_audit_dir(daemon).glob("audit-*.jsonl"))
                   for line in seg.read_text().splitlines()]
        refusals = [r for r in records if r["event"] == "exec.refused"
                    and r.get("run_id") == run_id]
        assert refusals
        assert report.last_head is not None
        assert report.last_head.tree_size > refusals[-1]["index"]


class TestWitness:
    def test_first_use_then_growth(self, daemon: DaemonHandle, stub: object, run_id: str,
                                   tmp_path: Path) -> None:
        """The first run trusts the head it sees (and says so); after more records, the next
        run checks the consistency proof and accepts the growth."""
        state = tmp_path / "witness.json"
        key = _audit_dir(daemon) / "audit.pub"
        first = _witness(daemon, state, "--key", str(key))
        assert first.returncode == 0, first.stderr
        assert "first use" in first.stdout
        size = json.loads(state.read_text())["tree_size"]
        execute(stub, run_id, ["/bin/true"])  # type: ignore[arg-type]
        second = _witness(daemon, state)
        assert second.returncode == 0, second.stderr
        assert "consistent: the log grew by" in second.stdout
        assert json.loads(state.read_text())["tree_size"] > size

    def test_a_truncated_log_is_refused(self, daemon: DaemonHandle, tmp_path: Path) -> None:
        """A witness that saw a larger log than the daemon now shows refuses it, and keeps its
        state."""
        state = tmp_path / "witness.json"
        assert _witness(daemon, state, "--key",
                        str(_audit_dir(daemon) / "audit.pub")).returncode == 0
        saved = json.loads(state.read_text())
        saved["tree_size"] += 1000
        state.write_text(json.dumps(saved))
        done = _witness(daemon, state)
        assert done.returncode == 1
        assert "older than the witness saw" in done.stderr
        assert json.loads(state.read_text()) == saved

    def test_a_forked_log_is_refused(self, daemon: DaemonHandle, stub: object, run_id: str,
                                     tmp_path: Path) -> None:
        """A witness whose earlier head does not extend to the current one (another history
        of the same size) refuses: the consistency proof fails."""
        state = tmp_path / "witness.json"
        assert _witness(daemon, state, "--key",
                        str(_audit_dir(daemon) / "audit.pub")).returncode == 0
        saved = json.loads(state.read_text())
        saved["root_hash"] = "00" * 32  # the same size, another history
        state.write_text(json.dumps(saved))
        execute(stub, run_id, ["/bin/true"])  # type: ignore[arg-type]
        done = _witness(daemon, state)
        assert done.returncode == 1
        assert "does not extend" in done.stderr

    def test_another_key_is_refused(self, daemon: DaemonHandle, tmp_path: Path) -> None:
        """Heads signed by a key other than the witness's are refused."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            PublicFormat,
        )

        other = tmp_path / "other.pub"
        other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        done = _witness(daemon, tmp_path / "witness.json", "--key", str(other))
        assert done.returncode == 1
        assert "not signed by the witness's key" in done.stderr
        assert not (tmp_path / "witness.json").exists()

    def test_the_first_run_needs_a_key(self, daemon: DaemonHandle, tmp_path: Path) -> None:
        """Without a state file and without --key, the witness says what it needs."""
        done = _witness(daemon, tmp_path / "witness.json")
        assert done.returncode != 0
        assert "--key" in done.stderr


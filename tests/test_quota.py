"""Workspace quotas (limits.workspace, limits.inodes) and the state disk's reserve, enforced by
the kernel (a tmpfs upper per task) and at commit, tried for real by shell-helper agents.

shell-helper's workspace quota is 128 MiB and 20,000 inodes (policies/shell-helper.yaml); its
file_size limit (64 MiB) is why the writers here write several files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.audit import verify
from agentd.sandbox import libc
from tests.conftest import CONFIG, DaemonHandle, daemon_base, execute, start_daemon, stop_daemon

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def _sh(handle: DaemonHandle, run_id: str, script: str, role: str = "client") -> Any:
    return execute(handle.stub(role), run_id, ["/bin/sh", "-c", script]).outcome


class TestQuota:
    def test_a_task_past_the_quota_is_stopped_for_quota(self, daemon: DaemonHandle) -> None:
        """Writing 200 MiB into a 128 MiB workspace: the kernel refuses the writes, the task
        is stopped with stop reason QUOTA, nothing is applied, and the run goes on."""
        stub = daemon.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
        try:
            outcome = _sh(daemon, run_id, "for i in 1 2 3 4; do head -c 50000000 /dev/zero"
                                          " > f$i; done; echo done")
            assert outcome.stop_reason == pb.STOP_REASON_QUOTA, outcome
            assert not outcome.committed
            after = _sh(daemon, run_id, "ls | wc -l; echo ok > small")
            assert after.committed
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run_id))

    def test_too_many_files_is_stopped_for_quota(self, daemon: DaemonHandle) -> None:
        """25,000 files in a run whose quota is 20,000 inodes stops the task for quota."""
        stub = daemon.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
        try:
            outcome = _sh(daemon, run_id,
                          "i=0; while [ $i -lt 25000 ]; do : > f$i || exit 1; i=$((i+1)); done")
            assert outcome.stop_reason == pb.STOP_REASON_QUOTA, outcome
            assert not outcome.committed
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run_id))

    def test_a_commit_past_the_quota_fails_the_step(self, daemon: DaemonHandle) -> None:
        """Two tasks of one step write 80 MB each: each fits its own upper, together they
        pass 128 MiB, so the commit refuses the step naming limits.workspace; nothing is
        applied and the next step sees the workspace as before."""
        stub = daemon.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
        try:
            reply = stub.Step(pb.StepRequest(run_id=run_id, tasks=[
                pb.TaskSpec(name=name, argv=["/bin/sh", "-c",
                                             f"head -c 40000000 /dev/zero > {name}1;"
                                             f" head -c 40000000 /dev/zero > {name}2"])
                for name in ("a", "b")
            ]), timeout=120)
            assert reply.state == pb.STEP_STATE_FAILED
            assert "limits.workspace" in reply.reason, reply.reason
            listing = execute(stub, run_id, ["/bin/sh", "-c", "ls"])
            assert listing.text == ""
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run_id))

    def test_the_quota_counts_what_earlier_steps_committed(self, daemon: DaemonHandle) -> None:
        """After 100 MB committed, the next task's upper holds only what is left: writing
        50 MiB more is stopped for quota."""
        stub = daemon.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
        try:
            assert _sh(daemon, run_id, "head -c 50000000 /dev/zero > a;"
                                       " head -c 50000000 /dev/zero > b").committed
            outcome = _sh(daemon, run_id, "head -c 50000000 /dev/zero > second")
            assert outcome.stop_reason == pb.STOP_REASON_QUOTA, outcome
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run_id))


@pytest.fixture
def small_disk() -> Iterator[DaemonHandle]:
    """A daemon whose state directory is a 112 MiB filesystem keeping a 16 MiB reserve."""
    base = daemon_base()
    state = base / "state"
    state.mkdir()
    libc.mount("tmpfs", str(state), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV,
               f"size={112 * MiB},mode=0755")
    config = CONFIG.replace("[daemon]\n", f"[daemon]\nstate_reserve = {16 * MiB}\n", 1)
    handle = start_daemon(base, config)
    try:
        yield handle
    finally:
        stop_daemon(handle)
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-R", "-l", str(state)], check=False)
        shutil.rmtree(base, ignore_errors=True)


class TestStateDiskReserve:
    def test_workspaces_cannot_fill_the_state_disk(self, small_disk: DaemonHandle) -> None:
        """Runs commit 30 MiB each until the disk is down to its reserve: that commit fails
        with the reason (nothing applied), other work goes on and is recorded, the admin's
        close frees the space, the refused step then commits, and the log verifies."""
        stub = small_disk.stub()
        runs = [stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
                for _ in range(4)]
        results = [_sh(small_disk, r, "head -c 30000000 /dev/zero > blob") for r in runs]
        assert results[0].committed
        refused = [r for r in results if not r.committed]
        assert refused, "the disk never filled"
        assert "state_reserve" in refused[0].step_failure, refused[0].step_failure
        other = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
        assert _sh(small_disk, other, "echo still serving").committed
        for run_id, result in zip(runs, results, strict=True):
            if result.committed:
                small_disk.stub("admin").CloseRun(pb.CloseRunRequest(run_id=run_id))
        last = next(r for r, res in zip(runs, results, strict=True) if not res.committed)
        assert _sh(small_disk, last, "head -c 30000000 /dev/zero > blob").committed
        audit_dir = small_disk.base / "state" / "audit"
        report = verify(audit_dir)
        assert report.ok, report.problems
        events = [json.loads(line)["event"] for seg in sorted(audit_dir.glob("audit-*.jsonl"))
                  for line in seg.read_text().splitlines()]
        assert "step.failed" in events
        assert events.count("run.closed") >= 1


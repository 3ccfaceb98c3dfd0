"""Stages as state, against a real daemon: the log decides an agent's stage, a promotion is
refused with every unmet criterion and granted only after approvals from distinct uids that
are neither the requester's nor the owner's, and a stage written in the config afterwards is
ignored and reported."""

from __future__ import annotations

import contextlib
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


def _start(base: Path, config: str = CONFIG, gates: str = GATES, *,
           restart: bool = False) -> DaemonHandle:
    """A daemon with `gates` in its stages.yaml (start_daemon writes the shipped one; a policy
    reload reads the gates again, as it would after an operator's edit). A restart keeps the
    files as the test left them."""
    handle = start_daemon(base, config, keep_files=restart)
    stages = base / "policies" / "stages.yaml"
    if TEST_GATES in stages.read_text():  # else a restart: the gates are in place already
        stages.write_text(stages.read_text().replace(TEST_GATES, "\n" + gates))
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
    return _as_user(uid, handle, f"""
        reply = stub.ApproveStage(pb.ApproveStageRequest(agent="{agent}", approve=True,
                                                         reason="looked at it"), timeout=60)
        print("OK", reply.stage, reply.approvals)""")


def accept_as(uid: int, handle: DaemonHandle, agent: str, source: str) -> str:
    """AcceptPolicy from a process running as `uid`."""
    return _as_user(uid, handle, f"""
        reply = stub.AcceptPolicy(pb.AcceptPolicyRequest(agent="{agent}", source="{source}",
                                                         reason="read the diff"), timeout=60)
        print("OK", reply.policy_source, reply.unreviewed_source or "-")""")


def _as_user(uid: int, handle: DaemonHandle, call: str) -> str:
    """Runs `call` (with `stub` on the approver socket) in a process running as `uid`;
    prints OK ... or the status code and details."""
    body = textwrap.indent(textwrap.dedent(call).strip(), "    ")
    program = textwrap.dedent(f"""
        import grpc, os
        from agentd.api.gen.v1 import agentd_pb2 as pb, agentd_pb2_grpc
        os.setgroups([])
        os.setgid({uid})
        os.setuid({uid})
        stub = agentd_pb2_grpc.AgentdStub(
            grpc.insecure_channel("unix:{handle.socket('approver')}"))
        try:
        """) + body + textwrap.dedent("""
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
            # The config still names the starting stage: nothing to report.
            assert (status.config_stage, status.config_ignored) == ("prototype", False)
            [promoted] = [r for r in stage_records(handle) if r["event"] == "stage.promoted"]
            details = promoted["details"]
            assert details["approvers"] == [1234, 1235]  # type: ignore[index]
            assert details["owner"] == "alice"  # type: ignore[index]
            assert details["evidence"]["steps"]["met"] is True  # type: ignore[index]
            # Judged at a signed head, named in the record; the owner now answers for it.
            head = details["evidence_head"]  # type: ignore[index]
            assert head["tree_size"] == details["evidence_tree_size"]  # type: ignore[index]
            assert len(head["root_hash"]) == 64  # type: ignore[index]
            assert status.owner == "alice"
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
            assert status.config_ignored
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


def _meet_the_sandbox_gate(handle: DaemonHandle) -> None:
    """One run, two committed steps and a rollback drill: GATES' sandbox criteria."""
    stub = handle.stub()
    run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
    assert sh(stub, run_id, "echo 1 > a").outcome.committed
    assert sh(stub, run_id, "echo 2 > b").outcome.committed
    stub.Rollback(pb.RollbackRequest(run_id=run_id, step=1))


def _md5sum(handle: DaemonHandle) -> grpc.StatusCode:
    """Runs /usr/bin/md5sum, which only the edited policy grants: OK or the refusal's code."""
    stub = handle.stub()
    run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
    try:
        reply = stub.Step(pb.StepRequest(run_id=run_id, tasks=[pb.TaskSpec(
            name="sum", argv=["/usr/bin/md5sum"], stdin=b"x")]), timeout=60)
    except grpc.RpcError as exc:
        return exc.code()
    assert reply.state == pb.STEP_STATE_COMMITTED, reply.reason
    return grpc.StatusCode.OK


class TestReviewedPolicies:
    def test_a_pending_promotion_survives_a_restart(self, base: Path) -> None:
        handle = _start(base)
        try:
            _meet_the_sandbox_gate(handle)
            handle.stub("admin").PromoteStage(pb.PromoteStageRequest(
                agent="shell-helper", to="sandbox", owner="alice", reason="ready"))
            assert approve_as(1234, handle, "shell-helper") == "OK prototype 1"
        finally:
            stop_daemon(handle)
        handle = _start(base, restart=True)
        try:
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert (status.pending_to, status.pending_owner, status.approvals) == (
                "sandbox", "alice", 1)
            # The rebuilt request still knows who asked and who approved.
            assert approve_as(1234, handle, "shell-helper").startswith("FAILED_PRECONDITION")
            with pytest.raises(grpc.RpcError) as own:
                handle.stub("approver").ApproveStage(pb.ApproveStageRequest(
                    agent="shell-helper", approve=True))
            assert own.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert approve_as(1235, handle, "shell-helper") == "OK sandbox 0"
        finally:
            stop_daemon(handle)

    def test_a_version_found_at_start_and_accepted_survives_the_next_edit(
            self, base: Path) -> None:
        """An edit found at start (not by a reload) is kept as a copy before its record, so
        once accepted it is what a later start runs, whatever the file says by then."""
        handle = _start(base)
        try:
            _meet_the_sandbox_gate(handle)
            handle.stub("admin").PromoteStage(pb.PromoteStageRequest(
                agent="shell-helper", to="sandbox", owner="alice", reason="ready"))
            approve_as(1234, handle, "shell-helper")
            assert approve_as(1235, handle, "shell-helper") == "OK sandbox 0"
        finally:
            stop_daemon(handle)
        policy = base / "policies" / "shell-helper.yaml"
        original = policy.read_text()
        policy.write_text(original.replace(
            "        - /usr/bin/wc\n", "        - /usr/bin/wc\n        - /usr/bin/md5sum\n"))
        handle = _start(base, restart=True)
        try:
            found = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert found.unreviewed_source not in ("", found.policy_source)
            assert accept_as(1234, handle, "shell-helper", found.unreviewed_source) == (
                f"OK {found.unreviewed_source} -")
        finally:
            stop_daemon(handle)
        policy.write_text(original)  # edited again: the accepted version is not the file's
        handle = _start(base, restart=True)
        try:
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert status.policy_source == found.unreviewed_source
            assert status.unreviewed_source not in ("", found.unreviewed_source)
            assert _md5sum(handle) == grpc.StatusCode.OK
        finally:
            stop_daemon(handle)

    def test_a_changed_policy_waits_for_an_approver(self, base: Path) -> None:
        """After a promotion, an edited policy file is unreviewed: validated, recorded with
        its diff, shown, never in force (across a restart too) until another person accepts
        exactly that version."""
        handle = _start(base)
        try:
            _meet_the_sandbox_gate(handle)
            handle.stub("admin").PromoteStage(pb.PromoteStageRequest(
                agent="shell-helper", to="sandbox", owner="alice", reason="ready"))
            approve_as(1234, handle, "shell-helper")
            assert approve_as(1235, handle, "shell-helper") == "OK sandbox 0"
            accepted = handle.stub().GetStage(pb.GetStageRequest(
                agent="shell-helper")).policy_source
            assert accepted.startswith("sha256:")
            assert _md5sum(handle) == grpc.StatusCode.PERMISSION_DENIED

            policy = base / "policies" / "shell-helper.yaml"
            policy.write_text(policy.read_text().replace(
                "        - /usr/bin/wc\n", "        - /usr/bin/wc\n        - /usr/bin/md5sum\n"))
            reply = handle.stub("admin").ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
            [entry] = [a for a in reply.agents if a.agent == "shell-helper"]
            assert entry.unreviewed.startswith("sha256:")
            assert not entry.changed  # the accepted version stays in force
            assert _md5sum(handle) == grpc.StatusCode.PERMISSION_DENIED
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert (status.policy_source, status.unreviewed_source) == (accepted,
                                                                        entry.unreviewed)
            [noted] = [r for r in read_records(base / "state" / "audit")
                       if r["event"] == "policy.unreviewed"]
            assert noted["index"] == status.unreviewed_index
            assert any("/usr/bin/md5sum" in line
                       for line in noted["details"]["diff"])  # type: ignore[index]
            # Whoever loaded it (root, by ReloadPolicies) cannot accept it; a wrong or short
            # hash accepts nothing.
            with pytest.raises(grpc.RpcError) as own:
                handle.stub("approver").AcceptPolicy(pb.AcceptPolicyRequest(
                    agent="shell-helper", source=entry.unreviewed))
            assert own.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as admin:  # the admin socket is not a person's
                handle.stub("admin").AcceptPolicy(pb.AcceptPolicyRequest(
                    agent="shell-helper", source=entry.unreviewed))
            assert admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert accept_as(1234, handle, "shell-helper", accepted).startswith(
                "FAILED_PRECONDITION")
            # A prefix, however long, is no version: an author could have made two files
            # that share it, one for the review and one to swap in.
            for prefix in (entry.unreviewed[:19], entry.unreviewed[7:19],
                           entry.unreviewed[:-1]):
                assert accept_as(1234, handle, "shell-helper", prefix).startswith(
                    "INVALID_ARGUMENT")
            other = "sha256:" + ("0" * 64 if entry.unreviewed[7] != "0" else "1" * 64)
            assert accept_as(1234, handle, "shell-helper", other).startswith(
                "FAILED_PRECONDITION")
            # A broken file is refused as ever, and the unreviewed version stays as it was.
            good = policy.read_text()
            policy.write_text(good + "bogus: 1\n")
            with pytest.raises(grpc.RpcError) as broken:
                handle.stub("admin").ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
            assert broken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            policy.write_text(good)
        finally:
            stop_daemon(handle)

        handle = _start(base, restart=True)
        try:
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert (status.stage, status.policy_source, status.unreviewed_source) == (
                "sandbox", accepted, entry.unreviewed)
            assert _md5sum(handle) == grpc.StatusCode.PERMISSION_DENIED
            assert len([r for r in read_records(base / "state" / "audit")
                        if r["event"] == "policy.unreviewed"]) == 1  # once per version
            # The whole hash, with or without its "sha256:" prefix.
            assert accept_as(1234, handle, "shell-helper",
                             entry.unreviewed.removeprefix("sha256:")) == (
                f"OK {entry.unreviewed} -")
            assert _md5sum(handle) == grpc.StatusCode.OK
            [acceptance] = [r for r in read_records(base / "state" / "audit")
                            if r["event"] == "policy.accepted"]
            assert acceptance["actor"]["uid"] == 1234  # type: ignore[index]
            assert acceptance["details"]["previous"] == accepted  # type: ignore[index]
        finally:
            stop_daemon(handle)
        handle = _start(base, restart=True)
        try:  # the accepted version is the pinned one from now on
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert (status.policy_source, status.unreviewed_source) == (entry.unreviewed, "")
            assert _md5sum(handle) == grpc.StatusCode.OK
        finally:
            stop_daemon(handle)

    def test_a_file_edited_before_the_promotion_is_not_promoted_with_it(
            self, base: Path) -> None:
        """The approvers judged the version in force; an edit not yet loaded is not read by
        the promotion (only a reload reads files, on record), and the reload after it finds
        the edit unreviewed."""
        handle = _start(base)
        try:
            _meet_the_sandbox_gate(handle)
            before = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            policy = base / "policies" / "shell-helper.yaml"
            policy.write_text(policy.read_text().replace(
                "        - /usr/bin/wc\n", "        - /usr/bin/wc\n        - /usr/bin/md5sum\n"))
            handle.stub("admin").PromoteStage(pb.PromoteStageRequest(
                agent="shell-helper", to="sandbox", owner="alice", reason="ready"))
            approve_as(1234, handle, "shell-helper")
            assert approve_as(1235, handle, "shell-helper") == "OK sandbox 0"
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert (status.policy_source, status.unreviewed_source) == (
                before.policy_source, "")
            assert _md5sum(handle) == grpc.StatusCode.PERMISSION_DENIED
            handle.stub("admin").ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
            status = handle.stub().GetStage(pb.GetStageRequest(agent="shell-helper"))
            assert status.policy_source == before.policy_source
            assert status.unreviewed_source not in ("", before.policy_source)
            assert status.unreviewed_index > 0  # on record
            assert _md5sum(handle) == grpc.StatusCode.PERMISSION_DENIED
            # Loaded by root's reload: root may not accept it.
            with pytest.raises(grpc.RpcError) as root:
                handle.stub("approver").AcceptPolicy(pb.AcceptPolicyRequest(
                    agent="shell-helper", source=status.unreviewed_source))
            assert root.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert accept_as(1234, handle, "shell-helper",
                             status.unreviewed_source).startswith("OK")
            assert _md5sum(handle) == grpc.StatusCode.OK
        finally:
            stop_daemon(handle)

    def test_an_agent_never_promoted_takes_its_file_at_reload(self, base: Path) -> None:
        handle = _start(base)
        try:
            policy = base / "policies" / "shell-helper.yaml"
            policy.write_text(policy.read_text().replace(
                "        - /usr/bin/wc\n", "        - /usr/bin/wc\n        - /usr/bin/md5sum\n"))
            reply = handle.stub("admin").ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
            [entry] = [a for a in reply.agents if a.agent == "shell-helper"]
            assert (entry.changed, entry.unreviewed) == (True, "")
            assert _md5sum(handle) == grpc.StatusCode.OK
        finally:
            stop_daemon(handle)


FAILURE_GATES = GATES.replace("  pilot:\n", "    demote_on: [failure]\n  pilot:\n")


class TestFailureDemotion:
    def test_a_run_closed_on_an_unresolved_failure_demotes(self, base: Path) -> None:
        at_sandbox = CONFIG.replace('[agents.shell-helper]\npolicy = "shell-helper.yaml"\n'
                                    'stage = "prototype"',
                                    '[agents.shell-helper]\npolicy = "shell-helper.yaml"\n'
                                    'stage = "sandbox"')
        assert at_sandbox != CONFIG
        assert "demote_on: [failure]" in FAILURE_GATES
        handle = _start(base, at_sandbox, FAILURE_GATES)
        try:
            stub = handle.stub()
            # A failure resolved by a rollback, then a close: no demotion.
            resolved = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
            assert not sh(stub, resolved, "exit 3").outcome.committed
            stub.Rollback(pb.RollbackRequest(run_id=resolved, step=0))
            stub.CloseRun(pb.CloseRunRequest(run_id=resolved))
            # A failure resolved by a later commit that changes state: none either.
            retried = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
            assert not sh(stub, retried, "exit 3").outcome.committed
            assert sh(stub, retried, "echo fixed > result").outcome.committed
            stub.CloseRun(pb.CloseRunRequest(run_id=retried))
            # A step the daemon stopped (the run closed under it) is not the agent's failure.
            cancelled = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
            replies = stub.Exec(pb.ExecRequest(run_id=cancelled,
                                               argv=["/bin/sh", "-c", "echo started; sleep 20"]),
                                timeout=60)
            assert next(iter(replies)).output.data == b"started\n"
            stub.CloseRun(pb.CloseRunRequest(run_id=cancelled))
            with contextlib.suppress(grpc.RpcError):
                list(replies)
            assert stub.GetStage(pb.GetStageRequest(agent="shell-helper")).stage == "sandbox"
            # A step that changes nothing resolves nothing: `true` is no way around it.
            failed = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
            assert not sh(stub, failed, "exit 3").outcome.committed
            assert sh(stub, failed, "true").outcome.read_only
            stub.CloseRun(pb.CloseRunRequest(run_id=failed))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and stub.GetStage(pb.GetStageRequest(
                    agent="shell-helper")).stage != "prototype":
                time.sleep(0.05)
            history = stub.StageHistory(pb.GetStageRequest(agent="shell-helper")).changes
            assert [(c.event, c.stage) for c in history] == [("stage.set", "sandbox"),
                                                             ("stage.demoted", "prototype")]
            assert history[-1].reason.startswith("failure: run closed after step 1 failed")
        finally:
            stop_daemon(handle)

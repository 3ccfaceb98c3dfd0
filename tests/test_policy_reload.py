"""Policy reload against a real daemon: the admin's ReloadPolicies and SIGHUP swap every
policy in at once, on record; a file that fails validation replaces nothing; only admin may.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from agentd.client import AgentdClient
from tests.conftest import DaemonHandle, daemon_base, start_daemon, stop_daemon

pytestmark = pytest.mark.privileged

TR = "        - /usr/bin/tr\n"
ANCHOR = "        - /usr/bin/sleep\n"


@pytest.fixture
def handle() -> Iterator[DaemonHandle]:
    handle = start_daemon(daemon_base())
    try:
        yield handle
    finally:
        stop_daemon(handle)


def tr_decision(handle: DaemonHandle) -> str:
    """What a step running /usr/bin/tr gets from shell-helper now: allow or refuse."""
    stub = handle.stub()
    run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
    task = pb.TaskSpec(name="t", argv=["/usr/bin/tr", "a", "b"], stdin=b"aaa")
    try:
        reply = stub.Step(pb.StepRequest(run_id=run_id, tasks=[task]), timeout=60)
        assert reply.tasks[0].stdout == b"bbb", reply
        return "allow"
    except grpc.RpcError as exc:
        refused = exc.code() == grpc.StatusCode.PERMISSION_DENIED
        return "refuse" if refused else f"error {exc.code()}: {exc.details()}"
    finally:
        stub.CloseRun(pb.CloseRunRequest(run_id=run_id))


def records(handle: DaemonHandle, event: str) -> list[dict[str, object]]:
    with AgentdClient(str(handle.socket())) as client:
        found = client.audit.query(event=event).records
    return [json.loads(r.record) for r in found]


def admin(handle: DaemonHandle) -> agentd_pb2_grpc.AgentdStub:
    return handle.stub("admin")


class TestReload:
    def test_a_reload_swaps_the_new_policy_in_on_record(self, handle: DaemonHandle) -> None:
        policy = handle.base / "policies" / "shell-helper.yaml"
        assert tr_decision(handle) == "refuse"
        text = policy.read_text()
        assert ANCHOR in text
        policy.write_text(text.replace(ANCHOR, ANCHOR + TR))
        reply = admin(handle).ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
        changed = {a.agent: a for a in reply.agents}
        assert changed["shell-helper"].changed
        assert not changed["cve-triage"].changed
        assert tr_decision(handle) == "allow"
        [record] = records(handle, "policy.reloaded")
        agents = record["details"]["agents"]  # type: ignore[index]
        assert agents["shell-helper"]["new_hash"] == changed["shell-helper"].new_hash
        assert agents["shell-helper"]["old_hash"] == changed["shell-helper"].old_hash
        assert record["actor"]["uid"] == 0  # type: ignore[index]

    def test_a_broken_file_replaces_nothing(self, handle: DaemonHandle) -> None:
        policy = handle.base / "policies" / "shell-helper.yaml"
        good = policy.read_text()
        # Valid except one typo, and the typo comes with a grant: neither may take effect.
        policy.write_text(good.replace(ANCHOR, ANCHOR + TR).replace(
            "    limits:\n", "    limits:\n      colour: blue\n", 1))
        with pytest.raises(grpc.RpcError) as caught:
            admin(handle).ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        detail = caught.value.details() or ""
        assert "policies not reloaded; the ones in force stay" in detail
        assert "shell-helper.yaml:" in detail
        assert "colour" in detail
        assert tr_decision(handle) == "refuse"
        [refused] = records(handle, "policy.reload_refused")
        assert "colour" in str(refused["details"])
        assert records(handle, "policy.reloaded") == []

    def test_sighup_reloads_as_the_system(self, handle: DaemonHandle) -> None:
        policy = handle.base / "policies" / "shell-helper.yaml"
        policy.write_text(policy.read_text().replace(ANCHOR, ANCHOR + TR))
        handle.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not records(handle, "policy.reloaded") and time.monotonic() < deadline:
            time.sleep(0.1)
        [record] = records(handle, "policy.reloaded")
        assert record["actor"] == {"role": "system", "socket": ""}
        assert tr_decision(handle) == "allow"
        assert handle.process.poll() is None  # SIGHUP does not stop it

    def test_only_the_admin_may_reload(self, handle: DaemonHandle) -> None:
        for role in ("client", "approver"):
            with pytest.raises(grpc.RpcError) as caught:
                handle.stub(role).ReloadPolicies(pb.ReloadPoliciesRequest(), timeout=60)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert records(handle, "policy.reloaded") == []

"""The registry's stage changes read no file, and an agent promoted before policy versions
were pinned is pinned at start (on record): without a daemon, on a real audit log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.audit import AuditLog
from agentd.audit.evidence import read_records
from agentd.config import Config, load_config
from agentd.identity import SYSTEM
from agentd.scheduler.agents import AgentRegistry
from agentd.scheduler.stages import open_stages
from agentd.store.policies import PolicyCopies, source_hash
from tests.conftest import write_daemon_dir


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write_daemon_dir(tmp_path))


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog.open(tmp_path / "audit")
    yield log
    log.close()


def test_a_stage_change_reads_no_file(config: Config) -> None:
    """A demotion or promotion re-clamps one agent from memory: another agent's broken file
    and a stages.yaml edited but not reloaded change nothing (a reload reads them, on
    record, and refuses the broken one)."""
    registry = AgentRegistry.load(config)
    loaded = registry.get("shell-helper").policy
    policies = config.daemon.policy_dir
    (policies / "cve-triage.yaml").write_text("bogus: [\n")
    stages = policies / config.daemon.stages_file
    stages.write_text(stages.read_text().replace("      pids: 256\n", "      pids: 8\n", 1))
    at_sandbox = registry.restage("shell-helper", stage="sandbox")
    assert at_sandbox.stage == "sandbox"
    registry.replace(at_sandbox)
    back = registry.restage("shell-helper", stage="prototype")
    assert (back.policy.content_hash, back.policy.pids) == (loaded.content_hash, 32)
    registry.replace(back)
    # The edit would have clamped it, had anything read the file:
    (policies / "cve-triage.yaml").write_text(
        (Path(__file__).parents[1] / "policies" / "cve-triage.yaml").read_text())
    prepared, _ = registry.prepare_reload()
    assert prepared.agents["shell-helper"].policy.pids == 8
    (policies / "cve-triage.yaml").write_text("bogus: [\n")
    with pytest.raises(Exception, match="cve-triage"):
        registry.prepare_reload()


def test_an_agent_promoted_before_pinning_is_pinned_at_start(
        config: Config, audit: AuditLog, tmp_path: Path) -> None:
    # What a daemon before pinned versions wrote: a promotion naming no policy version.
    audit.append_sync("stage.set", actor=SYSTEM.actor(),
                      details={"agent": "shell-helper", "stage": "prototype"})
    audit.append_sync("stage.promoted", actor={"uid": 1234},
                      details={"agent": "shell-helper", "from": "prototype", "to": "sandbox",
                               "owner": "alice", "reason": "before pinning"})
    registry, keeper = open_stages(config, audit, tmp_path / "audit", SYSTEM.actor())
    policy_file = config.daemon.policy_dir / "shell-helper.yaml"
    found = source_hash(policy_file.read_bytes())
    [pinned] = [r for r in read_records(tmp_path / "audit") if r["event"] == "policy.pinned"]
    assert pinned["details"]["source"] == found  # type: ignore[index]
    assert registry.pins["shell-helper"] == found
    assert registry.get("shell-helper").stage == keeper.stage("shell-helper") == "sandbox"
    # From now on an edit waits for review, like any pinned agent's.
    policy_file.write_text(policy_file.read_text().replace(
        "        - /usr/bin/wc\n", "        - /usr/bin/wc\n        - /usr/bin/md5sum\n"))
    _, changes = registry.prepare_reload()
    [entry] = [c for c in changes if c.agent == "shell-helper"]
    assert entry.unreviewed == source_hash(policy_file.read_bytes())
    assert not entry.changed
    # Pinned once: a second start finds the pin on record and writes none.
    again, _ = open_stages(config, audit, tmp_path / "audit", SYSTEM.actor())
    assert len([r for r in read_records(tmp_path / "audit")
                if r["event"] == "policy.pinned"]) == 1
    assert again.pins["shell-helper"] == found


def test_an_unreviewed_file_that_cannot_run_never_blocks_a_demotion_or_a_start(
        config: Config, audit: AuditLog, tmp_path: Path) -> None:
    """A pinned agent's file edited so that it has no section at or below the agent's stage:
    valid, so a reload takes it as unreviewed (saying it cannot run there); a demotion still
    re-clamps the pinned version, and a start still loads it."""
    policy_file = config.daemon.policy_dir / "shell-helper.yaml"
    pinned = source_hash(policy_file.read_bytes())
    PolicyCopies(config.daemon.state_dir / "policies").keep(policy_file.read_bytes())
    audit.append_sync("stage.set", actor=SYSTEM.actor(),
                      details={"agent": "shell-helper", "stage": "prototype"})
    audit.append_sync("stage.promoted", actor={"uid": 1234}, details={
        "agent": "shell-helper", "from": "prototype", "to": "sandbox", "owner": "alice",
        "reason": "ready", "policy_source": pinned})
    registry, _ = open_stages(config, audit, tmp_path / "audit", SYSTEM.actor())
    assert (registry.get("shell-helper").stage, registry.pins["shell-helper"]) == (
        "sandbox", pinned)
    text = policy_file.read_text()
    assert "\n  prototype:\n" in text
    policy_file.write_text(text.replace("\n  prototype:\n", "\n  pilot:\n"))
    prepared, changes = registry.prepare_reload()
    registry.swap(prepared)
    [entry] = [c for c in changes if c.agent == "shell-helper"]
    assert entry.unreviewed == source_hash(policy_file.read_bytes())
    assert "no section at or below" in registry.get("shell-helper").file_problem
    lower = registry.restage("shell-helper", stage="prototype")  # the demotion's re-clamp
    assert (lower.stage, lower.source) == ("prototype", pinned)
    again, _ = open_stages(config, audit, tmp_path / "audit", SYSTEM.actor())  # a restart
    assert (again.get("shell-helper").stage, again.get("shell-helper").source) == (
        "sandbox", pinned)
    [noted] = [r for r in read_records(tmp_path / "audit") if r["event"] == "policy.unreviewed"]
    assert "no section at or below" in noted["details"]["cannot_run"]  # type: ignore[index]

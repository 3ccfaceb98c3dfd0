"""Effective policies: clamping to the stage ceiling, notes, rules and the content hash."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from agentd.errors import InvalidArgument, PermissionDenied, PolicyError
from agentd.policy import (
    STAGES,
    EffectivePolicy,
    StageCeilings,
    effective_policy,
    load_policy,
    load_stage_ceilings,
)
from agentd.policy.effective import RULE_FIELDS, content_hash_of

REPO = Path(__file__).resolve().parent.parent
CASES = REPO / "tests" / "policy_cases"
TIGHT = CASES / "good" / "stages-tight.yaml"
WIDE = CASES / "good" / "wide.yaml"


@pytest.fixture
def shipped() -> StageCeilings:
    return load_stage_ceilings(REPO / "policies" / "stages.yaml")


@pytest.fixture
def tight() -> StageCeilings:
    return load_stage_ceilings(TIGHT)


@pytest.fixture
def clamped(tight: StageCeilings) -> EffectivePolicy:
    return effective_policy(load_policy(WIDE), "prototype", tight)


class TestClamping:
    def test_exec_entries_outside_ceiling_dropped(self, clamped: EffectivePolicy) -> None:
        """Exec entries not within a ceiling entry are dropped whole, not narrowed."""
        assert clamped.exec_allow == ("/usr/bin/python3", "/bin/sh")
        assert set(clamped.exec_dropped) == {"/bin/bash", "/usr/", "/opt/tool"}

    def test_read_only_outside_ceiling_dropped(self, clamped: EffectivePolicy) -> None:
        """Read-only paths at or below a ceiling path stay; others are dropped."""
        assert clamped.read_only == ("/usr/lib",)

    def test_workspace_and_limits_lowered(self, clamped: EffectivePolicy) -> None:
        """The workspace mode and each limit become the more restrictive of the two."""
        assert clamped.workspace == "read_only"
        assert clamped.memory_bytes == 256 << 20
        assert clamped.cpu == 0.5
        assert clamped.wall_seconds == 30.0
        assert clamped.pids == 16  # the policy's own, below the ceiling's 32
        assert clamped.tmp_bytes == 64 << 20  # default on both sides

    def test_every_clamp_is_a_note(self, clamped: EffectivePolicy) -> None:
        """Each drop and each lowering is a note naming the stages file and line."""
        at = f"({TIGHT}:"
        assert clamped.notes == (
            f"exec.allow: /bin/bash dropped: not allowed at stage prototype {at}7)",
            f"exec.allow: /usr/ dropped: not allowed at stage prototype {at}7)",
            f"exec.allow: /opt/tool dropped: not allowed at stage prototype {at}7)",
            f"filesystem.read_only: /home dropped: not allowed at stage prototype {at}9)",
            f"filesystem.read_only: /etc dropped: not allowed at stage prototype {at}9)",
            "filesystem.workspace: read_write lowered to read_only: the most allowed at stage"
            f" prototype {at}10)",
            f"limits.memory: 1GiB lowered to 256MiB: the most allowed at stage prototype {at}12)",
            f"limits.cpu: 2 lowered to 0.5: the most allowed at stage prototype {at}14)",
            f"limits.wall_time: 5m lowered to 30s: the most allowed at stage prototype {at}15)",
        )

    def test_rule_points_at_whoever_decided(self, clamped: EffectivePolicy) -> None:
        """rule() names the ceiling's line when the ceiling decided, else the policy's."""
        assert clamped.rule("limits.memory") == f"{TIGHT}:12 stages.prototype.limits.memory"
        assert clamped.rule("filesystem.workspace") == (
            f"{TIGHT}:10 stages.prototype.filesystem.workspace"
        )
        assert clamped.rule("limits.pids") == f"{WIDE}:16 stages.prototype.limits.pids"
        assert clamped.rule("exec.allow") == f"{WIDE}:8 stages.prototype.exec.allow"
        assert clamped.rule("env.allow") == f"{WIDE}:13 stages.prototype.env.allow"
        assert clamped.rule("limits.tmp") == f"{WIDE}:6 stages.prototype.limits.tmp (default)"
        assert clamped.exec_dropped["/bin/bash"] == f"{TIGHT}:7 stages.prototype.exec.allow"

    def test_rule_of_inherited_field(self, shipped: StageCeilings) -> None:
        """An inherited field's rule is the line in the lower section that wrote it."""
        path = CASES / "good" / "inherit.yaml"
        eff = effective_policy(load_policy(path), "production", shipped)
        assert eff.rule("limits.wall_time") == f"{path}:25 stages.pilot.limits.wall_time"
        assert eff.rule("limits.memory") == f"{path}:17 stages.prototype.limits.memory"
        assert eff.rule("exec.allow") == f"{path}:28 stages.production.exec.allow"

    def test_unknown_rule_field(self, clamped: EffectivePolicy) -> None:
        """Asking for the rule of a field that does not exist is a programming error."""
        with pytest.raises(ValueError, match="no policy field 'memory'"):
            clamped.rule("memory")

    def test_env_and_user_namespace_from_policy(self, shipped: StageCeilings) -> None:
        """The ceiling has no say over env and user_namespace."""
        policy = load_policy(CASES / "integration.yaml")
        eff = effective_policy(policy, "production", shipped)
        assert eff.user_namespace is True
        assert dict(eff.env_set) == {"LANG": "C.UTF-8"}
        assert eff.env_allow == ("GREETING", "FOO")
        assert eff.env_log == ("LANG",)

    @pytest.mark.parametrize(
        "path",
        [
            REPO / "policies" / "cve-triage.yaml",
            REPO / "policies" / "shell-helper.yaml",
            CASES / "integration.yaml",
        ],
        ids=lambda p: p.name,
    )
    def test_shipped_policies_fit_shipped_ceilings(
        self, path: Path, shipped: StageCeilings
    ) -> None:
        """The example and integration policies need no clamping at any stage they declare."""
        policy = load_policy(path)
        for stage in STAGES[STAGES.index(policy.declared_stages()[0]):]:
            assert effective_policy(policy, stage, shipped).notes == (), stage


class TestAvailability:
    def test_undeclared_stage_denied(self, shipped: StageCeilings) -> None:
        """A stage with no section at or below it is refused, naming the policy's stages line."""
        path = CASES / "good" / "pilot-only.yaml"
        with pytest.raises(PermissionDenied) as info:
            effective_policy(load_policy(path), "sandbox", shipped)
        assert info.value.rule == f"{path}:5 stages"
        assert "declares no section at or below stage sandbox" in str(info.value)
        assert info.value.code == "PERMISSION_DENIED"

    def test_higher_stage_inherits(self, shipped: StageCeilings) -> None:
        """A stage above the only declared one inherits it."""
        eff = effective_policy(load_policy(CASES / "good" / "pilot-only.yaml"), "production",
                               shipped)
        assert eff.exec_allow == ("/bin/sh",)

    def test_unknown_stage(self, shipped: StageCeilings) -> None:
        """An unknown stage name is INVALID_ARGUMENT."""
        with pytest.raises(InvalidArgument, match="unknown stage 'staging'"):
            effective_policy(load_policy(CASES / "good" / "minimal.yaml"), "staging", shipped)


class TestContentHash:
    def test_format_and_definition(self, clamped: EffectivePolicy) -> None:
        """content_hash is sha256 of the canonical JSON of the effective fields."""
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", clamped.content_hash)
        assert clamped.content_hash == content_hash_of(clamped.hashed_fields())
        assert {"notes", "source", "rules", "exec_dropped"}.isdisjoint(clamped.hashed_fields())

    def test_stable_across_loads_and_paths(self, tmp_path: Path, tight: StageCeilings) -> None:
        """Loading the same content twice, or from another path, gives the same hash."""
        copy = tmp_path / "elsewhere.yaml"
        shutil.copy(WIDE, copy)
        first = effective_policy(load_policy(WIDE), "prototype", tight)
        again = effective_policy(load_policy(WIDE), "prototype", tight)
        moved = effective_policy(load_policy(copy), "prototype", tight)
        assert first.content_hash == again.content_hash == moved.content_hash
        assert first.source != moved.source

    def test_changes_when_a_limit_changes(self, tmp_path: Path, shipped: StageCeilings) -> None:
        """Changing one limit changes the hash; a comment does not."""
        text = (CASES / "integration.yaml").read_text()
        before = effective_policy(load_policy(CASES / "integration.yaml"), "prototype", shipped)
        commented = tmp_path / "commented.yaml"
        commented.write_text("# a new comment\n" + text)
        changed = tmp_path / "changed.yaml"
        changed.write_text(text.replace("pids: 32", "pids: 33"))
        after_comment = effective_policy(load_policy(commented), "prototype", shipped)
        after_change = effective_policy(load_policy(changed), "prototype", shipped)
        assert after_comment.content_hash == before.content_hash
        assert after_change.content_hash != before.content_hash
        assert after_change.pids == 33

    def test_changes_with_stage(self, shipped: StageCeilings) -> None:
        """The same rules at another stage hash differently (the stage is part of it)."""
        policy = load_policy(CASES / "good" / "minimal.yaml")
        hashes = {effective_policy(policy, s, shipped).content_hash for s in STAGES}
        assert len(hashes) == len(STAGES)


class TestEffectivePolicyValue:
    def test_json_round_trip(self, clamped: EffectivePolicy) -> None:
        """to_json/from_json give back an equal effective policy."""
        assert EffectivePolicy.from_json(clamped.to_json()) == clamped

    def test_tampered_json_refused(self, clamped: EffectivePolicy) -> None:
        """from_json refuses data whose fields no longer match content_hash."""
        data = clamped.to_json()
        data["memory_bytes"] += 1
        with pytest.raises(ValueError, match="does not match"):
            EffectivePolicy.from_json(data)

    def test_direct_construction_has_safe_defaults(self) -> None:
        """Built directly (for tests above this layer), it has the policy defaults."""
        eff = EffectivePolicy(agent_policy="t", stage="prototype")
        assert eff.exec_allow == ()
        assert eff.memory_bytes == 256 << 20
        assert eff.rule("exec.allow") == "<memory> stages.prototype.exec.allow"
        assert hash(eff) == hash(EffectivePolicy(agent_policy="t", stage="prototype"))

    def test_rule_fields_cover_stage_rules(self) -> None:
        """Every limit has a rule field."""
        assert {f for f in RULE_FIELDS if f.startswith("limits.")} == {
            "limits.memory", "limits.pids", "limits.cpu", "limits.wall_time", "limits.output",
            "limits.tmp", "limits.open_files", "limits.file_size", "limits.writes",
            "limits.channel_state", "limits.workspace", "limits.inodes",
        }


class TestApprovalRules:
    """approval.required_for: which steps wait for a human."""

    def _policy(self, tmp_path: Path, triggers: str) -> Path:
        path = tmp_path / "p.yaml"
        path.write_text(
            "apiVersion: agentd/v1\nkind: Policy\nname: p\nstages:\n  prototype:\n"
            "    exec: {allow: [/bin/sh]}\n  pilot:\n"
            f"    approval: {{required_for: {triggers}}}\n")
        return path

    def test_triggers_reach_the_effective_policy(self, tmp_path: Path) -> None:
        """Declared triggers appear at the stage that declares them, and not below it."""
        ceilings = load_stage_ceilings(REPO / "policies" / "stages.yaml")
        policy = load_policy(self._policy(tmp_path, "[exec:/usr/bin/rm, user_namespace]"))
        pilot = effective_policy(policy, "pilot", ceilings)
        assert pilot.approval_required_for == ("exec:/usr/bin/rm", "user_namespace")
        assert ":8 " in pilot.rule("approval.required_for")
        assert effective_policy(policy, "prototype", ceilings).approval_required_for == ()

    def test_unknown_trigger_names_the_line(self, tmp_path: Path) -> None:
        """An unknown trigger is an error with the file, line and field."""
        with pytest.raises(PolicyError) as caught:
            load_policy(self._policy(tmp_path, "[network]"))
        assert caught.value.line == 8
        assert caught.value.field is not None
        assert "approval.required_for" in caught.value.field


class TestExecLibraries:
    """exec.libraries: validated like every field, bounded by the stage ceiling."""

    POLICY = """apiVersion: agentd/v1
kind: Policy
name: libs
stages:
  prototype:
    exec:
      allow: [/usr/bin/python3]
      libraries: [/usr/lib/python3.11/lib-dynload, /opt/plugins]
"""

    def test_libraries_outside_the_ceiling_are_dropped_with_a_note(
            self, tmp_path: Path, shipped: StageCeilings) -> None:
        path = tmp_path / "libs.yaml"
        path.write_text(self.POLICY)
        eff = effective_policy(load_policy(path), "prototype", shipped)
        assert eff.exec_libraries == ("/usr/lib/python3.11/lib-dynload",)
        assert any(n.startswith("exec.libraries: /opt/plugins dropped") for n in eff.notes)
        assert eff.rule("exec.libraries").endswith("stages.prototype.exec.libraries")

    def test_a_relative_library_directory_is_an_error_with_its_line(
            self, tmp_path: Path) -> None:
        path = tmp_path / "libs.yaml"
        path.write_text(self.POLICY.replace("/opt/plugins", "opt/plugins"))
        with pytest.raises(PolicyError) as caught:
            load_policy(path)
        assert f"{path}:8: stages.prototype.exec.libraries" in str(caught.value)

"""The policy documents: safe defaults, stage inheritance, and validation without a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agentd.policy import Policy, StageRules, load_policy
from agentd.policy.rules import CeilingRules, Limits

CASES = Path(__file__).resolve().parent / "policy_cases"


def document(**stages: Any) -> dict[str, Any]:
    return {"apiVersion": "agentd/v1", "kind": "Policy", "name": "doc", "stages": stages}


class TestDefaults:
    def test_stage_defaults_grant_nothing_extra(self) -> None:
        """An empty stage section runs nothing, sees no host path, and gets default limits."""
        rules = StageRules()
        assert rules.exec.allow == ()
        assert rules.filesystem.read_only == ()
        assert rules.filesystem.workspace == "read_write"
        assert rules.network == "none"
        assert rules.user_namespace is False
        assert (rules.env.set, rules.env.allow, rules.env.log) == ({}, (), ())

    def test_limit_defaults(self) -> None:
        """Default limits: 256MiB, 64 pids, 1 core, 60s, 1MiB output, 64MiB /tmp, 256, 1GiB."""
        limits = Limits()
        assert limits.memory == 256 << 20
        assert limits.pids == 64
        assert limits.cpu == 1.0
        assert limits.wall_time == 60.0
        assert limits.output == 1 << 20
        assert limits.tmp == 64 << 20
        assert limits.open_files == 256
        assert limits.file_size == 1 << 30

    def test_ceiling_bounds_every_section_of_a_stage(self) -> None:
        """A ceiling has a section for every section of a policy's stage, and by default it
        allows no user namespace and denies the loader's variables."""
        assert set(CeilingRules.model_fields) == set(StageRules.model_fields)
        ceiling = CeilingRules()
        assert ceiling.user_namespace is False
        assert "LD_*" in ceiling.env.deny


class TestInheritance:
    @pytest.fixture
    def policy(self) -> Policy:
        return load_policy(CASES / "good" / "inherit.yaml")

    def test_undeclared_stage_inherits_lower(self, policy: Policy) -> None:
        """sandbox, not declared, has exactly prototype's rules."""
        sandbox, prototype = policy.resolve("sandbox"), policy.resolve("prototype")
        assert sandbox is not None
        assert prototype is not None
        assert sandbox.rules == prototype.rules
        assert sandbox.base == "prototype"

    def test_mappings_merge_key_by_key(self, policy: Policy) -> None:
        """pilot changes one filesystem key and one limit; the other keys are inherited."""
        pilot = policy.resolve("pilot")
        assert pilot is not None
        rules = pilot.rules
        assert rules.filesystem.workspace == "read_write"
        assert rules.filesystem.read_only == ("/usr", "/etc/ssl")
        assert rules.limits.wall_time == 300.0
        assert rules.limits.memory == 512 << 20
        assert rules.env.set == {"LANG": "C.UTF-8", "TZ": "UTC"}
        assert rules.env.allow == ("FOO",)

    def test_lists_and_scalars_replace(self, policy: Policy) -> None:
        """production's exec.allow replaces the inherited list; its scalar overrides."""
        production = policy.resolve("production")
        assert production is not None
        assert production.rules.exec.allow == ("/usr/bin/python3",)
        assert production.rules.user_namespace is True
        assert production.rules.limits.wall_time == 300.0  # from pilot, the nearest lower

    def test_origin_records_declaring_stage(self, policy: Policy) -> None:
        """Each field remembers which declared section wrote the value in force."""
        production = policy.resolve("production")
        assert production is not None
        origin = production.origin
        assert origin["exec.allow"] == "production"
        assert origin["limits.wall_time"] == "pilot"
        assert origin["limits.memory"] == "prototype"
        assert origin["env.set.LANG"] == "prototype"
        assert origin["env.set.TZ"] == "pilot"
        assert "limits.pids" not in origin  # a default, written nowhere

    def test_defaults_never_hide_inherited_values(self, policy: Policy) -> None:
        """A higher section that omits a field keeps the lower value, not the default."""
        production = policy.resolve("production")
        assert production is not None
        assert production.rules.filesystem.read_only == ("/usr", "/etc/ssl")
        assert production.rules.env.log == ("LANG",)

    def test_no_section_at_or_below(self) -> None:
        """A stage below every declared section is not available (None); higher ones are."""
        policy = load_policy(CASES / "good" / "pilot-only.yaml")
        assert policy.resolve("prototype") is None
        assert policy.resolve("sandbox") is None
        production = policy.resolve("production")
        assert production is not None
        assert production.base == "pilot"
        assert production.rules.exec.allow == ("/bin/sh",)

    def test_unknown_stage(self) -> None:
        """Resolving a stage that does not exist is a programming error."""
        policy = load_policy(CASES / "good" / "minimal.yaml")
        with pytest.raises(ValueError, match="unknown stage 'staging'"):
            policy.resolve("staging")


class TestValidationWithoutFile:
    def test_model_validate(self) -> None:
        """A policy can be validated from a dict; its source is then <memory>."""
        policy = Policy.model_validate(document(prototype={"exec": {"allow": ["/bin/sh"]}}))
        assert policy.source == "<memory>"
        assert policy.declared_stages() == ("prototype",)

    def test_frozen(self) -> None:
        """Validated documents cannot be changed."""
        policy = Policy.model_validate(document(prototype={}))
        with pytest.raises(ValidationError):
            policy.name = "other"

    def test_env_log_checked_after_inheritance(self) -> None:
        """env.log must name variables set or allowed at every stage it applies to."""
        data = document(
            prototype={"env": {"allow": ["A"], "log": ["A"]}},
            pilot={"env": {"allow": []}},
        )
        with pytest.raises(ValidationError) as info:
            Policy.model_validate(data)
        assert "A is in env.log but neither in env.set nor env.allow at stage pilot" in str(
            info.value
        )

    def test_paths_normalised(self) -> None:
        """Paths are stored in their one normal spelling."""
        policy = Policy.model_validate(
            document(prototype={
                "exec": {"allow": ["/usr//lib/git-core/", "/usr/bin/./python3"]},
                "filesystem": {"read_only": ["/etc/ssl/"]},
            })
        )
        resolved = policy.resolve("prototype")
        assert resolved is not None
        assert resolved.rules.exec.allow == ("/usr/lib/git-core/", "/usr/bin/python3")
        assert resolved.rules.filesystem.read_only == ("/etc/ssl",)

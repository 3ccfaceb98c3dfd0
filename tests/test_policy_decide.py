"""decide_exec: allow or refuse one tool call, with the rule's file and line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agentd.errors import InvalidArgument, PermissionDenied
from agentd.policy import (
    EffectivePolicy,
    decide_exec,
    effective_policy,
    load_policy,
    load_stage_ceilings,
)

REPO = Path(__file__).resolve().parent.parent
CASES = REPO / "tests" / "policy_cases"
STAGES_FILE = REPO / "policies" / "stages.yaml"
CVE = REPO / "policies" / "cve-triage.yaml"
INTEGRATION = CASES / "integration.yaml"


def line_of(path: Path, text: str, after: str | None = None) -> int:
    """The 1-based line of the first line equal to `text` (stripped), after line `after`."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    start = lines.index(after) + 1 if after else 0
    return lines.index(text, start) + 1


def effective(path: Path, stage: str = "prototype") -> EffectivePolicy:
    return effective_policy(load_policy(path), stage, load_stage_ceilings(STAGES_FILE))


@pytest.fixture
def cve() -> EffectivePolicy:
    return effective(CVE)


@pytest.fixture
def integration() -> EffectivePolicy:
    return effective(INTEGRATION)


class TestAllowed:
    @pytest.mark.parametrize(
        "executable",
        ["/bin/sh", "/usr/bin/python3", "/usr/bin/cat", "/bin/cat", "/bin/ls", "/usr/bin/id"],
    )
    def test_cve_triage_tools(self, cve: EffectivePolicy, executable: str) -> None:
        """The cve-triage example allows its interpreters and tools at prototype."""
        decide_exec(cve, executable, {}, "/workspace", 10)

    @pytest.mark.parametrize(
        "executable", ["/bin/sh", "/usr/bin/cat", "/bin/ls", "/usr/bin/id", "/bin/echo"]
    )
    def test_shell_helper_tools(self, executable: str) -> None:
        """The shell-helper example allows the shell and its file tools at prototype."""
        decide_exec(effective(REPO / "policies" / "shell-helper.yaml"), executable, {},
                    "/workspace", 10)

    def test_tree_entry(self, integration: EffectivePolicy) -> None:
        """An entry ending in '/' allows every executable below it."""
        decide_exec(integration, "/usr/lib/git-core/git", {}, "/workspace", 1)
        decide_exec(integration, "/usr/sbin/ip", {}, "/workspace", 1)

    def test_env_cwd_and_timeout_within_policy(self, integration: EffectivePolicy) -> None:
        """Allowed variables, cwd under /workspace or /tmp, and a timeout up to wall_time pass."""
        decide_exec(integration, "/bin/sh", {"GREETING": "hi", "FOO": ""}, "/workspace/sub", 30)
        decide_exec(integration, "/bin/sh", {}, "/tmp", 0)
        decide_exec(integration, "/bin/sh", {}, "/tmp/a/b", 0.5)


class TestRefused:
    def test_executable_not_allowed(self, cve: EffectivePolicy) -> None:
        """An executable outside exec.allow is refused, citing the policy's exec.allow line."""
        with pytest.raises(PermissionDenied) as info:
            decide_exec(cve, "/usr/bin/curl", {}, "/workspace", 10)
        allow = line_of(CVE, "allow:", after="exec:")
        assert info.value.message == (
            "/usr/bin/curl is not in exec.allow; add it to the policy to allow it"
            f" (rule: {CVE}:{allow} stages.prototype.exec.allow)"
        )
        assert info.value.rule == f"{CVE}:{allow} stages.prototype.exec.allow"

    def test_tree_is_not_a_string_prefix(self, integration: EffectivePolicy) -> None:
        """/usr/lib/ does not allow /usr/libexec/... (whole path components only)."""
        with pytest.raises(PermissionDenied, match=r"is not in exec\.allow"):
            decide_exec(integration, "/usr/libexec/tool", {}, "/workspace", 1)

    def test_exec_dropped_by_ceiling_cites_ceiling(self) -> None:
        """An executable the policy grants but the stage does not cites the stages file."""
        tight = CASES / "good" / "stages-tight.yaml"
        eff = effective_policy(load_policy(CASES / "good" / "wide.yaml"), "prototype",
                               load_stage_ceilings(tight))
        with pytest.raises(PermissionDenied) as info:
            decide_exec(eff, "/bin/bash", {}, "/workspace", 1)
        assert info.value.rule == f"{tight}:7 stages.prototype.exec.allow"
        assert "allowed by policy wide (/bin/bash) but not at stage prototype" in str(info.value)

    def test_nothing_allowed_by_default(self) -> None:
        """With no exec.allow written, nothing runs, and the rule says it is the default."""
        minimal = CASES / "good" / "minimal.yaml"
        with pytest.raises(PermissionDenied) as info:
            decide_exec(effective(minimal), "/bin/sh", {}, "/workspace", 1)
        assert info.value.rule == f"{minimal}:6 stages.prototype.exec.allow (default)"

    def test_env_not_allowed(self, integration: EffectivePolicy) -> None:
        """A variable outside env.allow is refused by name, citing env.allow's line."""
        with pytest.raises(PermissionDenied) as info:
            decide_exec(integration, "/bin/sh", {"GREETING": "hi", "LD_PRELOAD": "/x.so"},
                        "/workspace", 1)
        assert "environment variable LD_PRELOAD is not in env.allow" in info.value.message
        line = line_of(INTEGRATION, "allow: [GREETING, FOO]")
        assert info.value.rule == f"{INTEGRATION}:{line} stages.prototype.env.allow"

    def test_env_set_by_policy_not_overridable(self, integration: EffectivePolicy) -> None:
        """A variable the policy sets may not be changed by a call unless it is allowed."""
        with pytest.raises(PermissionDenied, match="LANG is set by the policy"):
            decide_exec(integration, "/bin/sh", {"LANG": "C"}, "/workspace", 1)

    def test_timeout_over_wall_time(self, integration: EffectivePolicy) -> None:
        """A timeout longer than limits.wall_time is refused, citing wall_time's line."""
        with pytest.raises(PermissionDenied) as info:
            decide_exec(integration, "/bin/sh", {}, "/workspace", 31)
        assert "longer than limits.wall_time (30s)" in info.value.message
        line = line_of(INTEGRATION, "wall_time: 30s")
        assert info.value.rule == f"{INTEGRATION}:{line} stages.prototype.limits.wall_time"

    def test_infinite_timeout(self, integration: EffectivePolicy) -> None:
        """An infinite timeout is longer than any wall_time."""
        with pytest.raises(PermissionDenied):
            decide_exec(integration, "/bin/sh", {}, "/workspace", math.inf)


class TestMalformed:
    @pytest.mark.parametrize(
        ("executable", "message"),
        [
            ("sh", "is not absolute"),
            ("/bin/../bin/sh", "is not normalised"),
            ("/usr/bin/", "is not normalised"),
            ("", "is empty"),
            ("/bin/s\0h", "NUL byte"),
        ],
    )
    def test_executable(self, integration: EffectivePolicy, executable: str, message: str) -> None:
        """The executable must be an absolute normalised path."""
        with pytest.raises(InvalidArgument, match=message):
            decide_exec(integration, executable, {}, "/workspace", 1)

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"1BAD": "x"}, "name '1BAD' is not valid"),
            ({"A=B": "x"}, "name 'A=B' is not valid"),
            ({"": "x"}, "name '' is not valid"),
            ({"GREETING": "a\0b"}, "GREETING contains a NUL byte"),
        ],
    )
    def test_env(self, integration: EffectivePolicy, env: dict[str, str], message: str) -> None:
        """Invalid variable names and NUL in values are malformed requests."""
        with pytest.raises(InvalidArgument, match=message):
            decide_exec(integration, "/bin/sh", env, "/workspace", 1)

    @pytest.mark.parametrize(
        ("cwd", "message"),
        [
            ("workspace", "is not absolute"),
            ("/workspace/", "is not normalised"),
            ("/workspace/../etc", "is not normalised"),
            ("/etc", "outside the worker's working places; use /workspace or /tmp"),
            ("/workspacex", "outside the worker's working places"),
            ("/", "outside the worker's working places"),
        ],
    )
    def test_cwd(self, integration: EffectivePolicy, cwd: str, message: str) -> None:
        """cwd must be absolute, normalised, and under /workspace or /tmp."""
        with pytest.raises(InvalidArgument, match=message):
            decide_exec(integration, "/bin/sh", {}, cwd, 1)

    def test_cwd_workspace_without_workspace(self) -> None:
        """With workspace none, /workspace is not a valid cwd; /tmp still is."""
        eff = EffectivePolicy(agent_policy="t", stage="prototype", exec_allow=("/bin/sh",),
                              workspace="none")
        with pytest.raises(InvalidArgument, match="no workspace at stage prototype"):
            decide_exec(eff, "/bin/sh", {}, "/workspace", 1)
        decide_exec(eff, "/bin/sh", {}, "/tmp", 1)

    @pytest.mark.parametrize("timeout", [-1, -0.001, math.nan])
    def test_timeout(self, integration: EffectivePolicy, timeout: float) -> None:
        """A negative or NaN timeout is malformed."""
        with pytest.raises(InvalidArgument, match="timeout_seconds"):
            decide_exec(integration, "/bin/sh", {}, "/workspace", timeout)

    def test_malformed_before_refused(self, cve: EffectivePolicy) -> None:
        """A request that is both refused and malformed is reported as malformed."""
        with pytest.raises(InvalidArgument):
            decide_exec(cve, "/usr/bin/curl", {}, "/etc", 1)

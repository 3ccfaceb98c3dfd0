"""Allow or refuse one tool call against an effective policy: `decide_exec`.

Pure: it looks at strings and numbers only, never at the filesystem. The caller resolves the
executable to an absolute path first (inside the worker's view), and the sandbox enforces the
same allow list again in the kernel (Landlock, mounts); this check exists so that a refusal
is a clear PERMISSION_DENIED naming the rule, before any process is started.

Order of checks: first everything that makes the request malformed (INVALID_ARGUMENT: the
caller's bug, whatever the policy), then the policy's decisions (PERMISSION_DENIED: the
request is fine, the policy says no), so that the same bad request always gets the same
answer under any policy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from agentd.errors import InvalidArgument, PermissionDenied
from agentd.policy.approvals import approval_triggers
from agentd.policy.effective import EffectivePolicy
from agentd.policy.paths import check_worker_path, is_at_or_below, matching_exec_entry
from agentd.policy.rules import ENV_NAME_PATTERN, check_env_name
from agentd.policy.sizes import format_duration

WORKSPACE_DIR: Final = "/workspace"
TMP_DIR: Final = "/tmp"


@dataclass(frozen=True)
class CallDecision:
    """An allowed call: the program as the worker will run it, its working directory, and
    the approval triggers it matches (empty: it may run at once)."""

    executable: str
    cwd: str
    triggers: tuple[str, ...]


def decide_call(eff: EffectivePolicy, argv0: str, env: Mapping[str, str], cwd: str,
                timeout_seconds: float) -> CallDecision:
    """Everything the policy decides about one tool call, in the order the scheduler asks it
    (scheduler/plan.py) and `agentctl policy test` replays it: argv[0] resolved on the worker's
    PATH, the working directory (the workspace, or /tmp without one), allow or refuse
    (raises, as `decide_exec`), then the approval triggers."""
    executable = resolve_executable(argv0, eff)
    cwd = cwd or (WORKSPACE_DIR if eff.workspace != "none" else TMP_DIR)
    decide_exec(eff, executable, env, cwd, timeout_seconds)
    return CallDecision(executable, cwd, tuple(approval_triggers(eff, [executable])))


VerdictKind = Literal["allow", "approval", "refuse", "invalid"]


@dataclass(frozen=True)
class Verdict:
    """`decide_call`'s answer as a value: allow, approval (allowed, a person must approve),
    refuse (the policy says no) or invalid (malformed, whatever the policy)."""

    verdict: VerdictKind
    detail: str
    rule: str = ""
    executable: str = ""
    triggers: tuple[str, ...] = ()


def judge(eff: EffectivePolicy, argv0: str, env: Mapping[str, str], cwd: str,
          timeout_seconds: float) -> Verdict:
    """`decide_call`, answered instead of raised (policy tests, audit mode)."""
    try:
        decided = decide_call(eff, argv0, env, cwd, timeout_seconds)
    except PermissionDenied as exc:
        return Verdict("refuse", exc.message, exc.rule or "")
    except InvalidArgument as exc:
        return Verdict("invalid", exc.message)
    if decided.triggers:
        return Verdict("approval", f"{decided.executable} needs approval "
                       f"({', '.join(decided.triggers)})", eff.rule("approval.required_for"),
                       decided.executable, decided.triggers)
    return Verdict("allow", f"{decided.executable} may run", eff.rule("exec.allow"),
                   decided.executable)


def decide_exec(
    eff: EffectivePolicy,
    executable: str,
    env: Mapping[str, str],
    cwd: str,
    timeout_seconds: float,
) -> None:
    """Return None when `eff` allows running `executable` with `env` in `cwd`; raise otherwise.

    `env` holds only the variables the caller asks for (not env.set, which the worker always
    gets). `timeout_seconds` of 0 means "no timeout of my own": limits.wall_time applies.

    Raises InvalidArgument for a malformed request and PermissionDenied, with the rule's
    file:line, for a request the policy refuses.
    """
    _check_request(eff, executable, env, cwd, timeout_seconds)

    if matching_exec_entry(eff.exec_allow, executable) is None:
        granted = matching_exec_entry(eff.exec_dropped, executable)
        if granted is not None:
            raise PermissionDenied(
                f"{executable} is allowed by policy {eff.agent_policy} ({granted}) but not at"
                f" stage {eff.stage}; the stage's ceiling must allow it first",
                rule=eff.exec_dropped[granted],
            )
        raise PermissionDenied(
            f"{executable} is not in exec.allow; add it to the policy to allow it",
            rule=eff.rule("exec.allow"),
        )

    for name in sorted(env):
        if name in eff.env_allow:
            continue
        if name in eff.env_set:
            raise PermissionDenied(
                f"environment variable {name} is set by the policy (env.set) and is not in"
                " env.allow, so a call may not change it; drop it from the call or add it to"
                " env.allow",
                rule=eff.rule("env.allow"),
            )
        raise PermissionDenied(
            f"environment variable {name} is not in env.allow; add it to the policy to let"
            " calls set it",
            rule=eff.rule("env.allow"),
        )

    if timeout_seconds > eff.wall_seconds:
        most = format_duration(eff.wall_seconds)
        raise PermissionDenied(
            f"timeout {timeout_seconds:g}s is longer than limits.wall_time ({most}) at stage"
            f" {eff.stage}; ask for at most {most}",
            rule=eff.rule("limits.wall_time"),
        )


def _check_request(
    eff: EffectivePolicy,
    executable: str,
    env: Mapping[str, str],
    cwd: str,
    timeout_seconds: float,
) -> None:
    """Raise InvalidArgument for anything malformed, whatever the policy says."""
    if not isinstance(executable, str):
        raise InvalidArgument("the executable must be a string path")
    problem = check_worker_path(executable, "executable")
    if problem is not None:
        raise InvalidArgument(problem)

    for name, value in env.items():
        try:
            check_env_name(name)
        except ValueError:
            raise InvalidArgument(
                f"environment variable name {name!r} is not valid; names match"
                f" {ENV_NAME_PATTERN}"
            ) from None
        if not isinstance(value, str):
            raise InvalidArgument(f"the value of environment variable {name} must be a string")
        if "\0" in value:
            raise InvalidArgument(
                f"the value of environment variable {name} contains a NUL byte; remove it"
            )

    problem = check_worker_path(cwd, "cwd") if isinstance(cwd, str) else "cwd must be a path"
    if problem is not None:
        raise InvalidArgument(problem)
    if is_at_or_below(cwd, WORKSPACE_DIR):
        if eff.workspace == "none":
            raise InvalidArgument(
                f"cwd {cwd} is in /workspace, but this agent has no workspace at stage"
                f" {eff.stage} (filesystem.workspace: none); use /tmp"
            )
    elif not is_at_or_below(cwd, TMP_DIR):
        places = "/tmp" if eff.workspace == "none" else "/workspace or /tmp"
        raise InvalidArgument(
            f"cwd {cwd} is outside the worker's working places; use {places} or a directory"
            " below it"
        )

    if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, int | float):
        raise InvalidArgument("timeout_seconds must be a number of seconds")
    if math.isnan(timeout_seconds) or timeout_seconds < 0:
        raise InvalidArgument(
            f"timeout_seconds {timeout_seconds} is not a duration; give 0 (the policy's"
            " limit) or a positive number of seconds"
        )


DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def resolve_executable(name: str, policy: EffectivePolicy) -> str:
    """argv[0] as the worker will see it: absolute as given, or found on the worker's PATH.

    Granted paths are bound at the same place inside the worker, so looking on the host,
    within the read-only grants, finds what the worker would find.
    """
    if name.startswith("/"):
        return os.path.normpath(name)
    if "/" in name:
        raise InvalidArgument(f"argv[0] {name!r} must be an absolute path or a bare name")
    path = policy.env_set.get("PATH", DEFAULT_PATH)
    for directory in path.split(":"):
        candidate = os.path.join(directory, name)
        if (any(is_at_or_below(candidate, root.rstrip("/") or "/") for root in policy.read_only)
                and os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            return candidate
    raise InvalidArgument(f"{name!r} was not found on the worker's PATH ({path}); give an "
                          "absolute path")

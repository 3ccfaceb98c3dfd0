"""`agentctl policy diff`: what changes between two versions of a policy, per stage, in
capabilities rather than lines.

Both sides are compared as effective policies (after inheritance and the stage ceiling), so
moving a rule between stage sections, reordering a list or adding a comment shows nothing,
while any grant, approval or limit that moves is shown with its direction: `+` becomes
allowed (looser), `-` becomes refused (stricter), `~` a limit that moves (with which way).
Pure: two `EffectivePolicy`s in, lines out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agentd.policy.effective import EffectivePolicy
from agentd.policy.egress import secret_from_text
from agentd.policy.sizes import format_duration, format_size


@dataclass(frozen=True)
class Change:
    """One capability that moves: `looser` if the new policy allows more."""

    field: str
    text: str
    looser: bool

    def line(self) -> str:
        return f"  {'+' if self.looser else '-'} {self.field}: {self.text}"


_LISTS_ALLOW: tuple[tuple[str, str, str], ...] = (
    # (field, attribute, noun): more entries allow more
    ("exec.allow", "exec_allow", "may run"),
    ("exec.libraries", "exec_libraries", "may load code from"),
    ("filesystem.read_only", "read_only", "may read"),
    ("env.allow", "env_allow", "may receive from the caller"),
    ("env.log", "env_log", "logs the value of"),
)
# (field, attribute, formatter): a larger number allows more
_LIMITS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("limits.memory", "memory_bytes", lambda n: format_size(int(n))),
    ("limits.pids", "pids", lambda n: f"{int(n)} processes"),
    ("limits.cpu", "cpu", lambda n: f"{n:g} CPU"),
    ("limits.wall_time", "wall_seconds", format_duration),
    ("limits.output", "output_bytes", lambda n: format_size(int(n))),
    ("limits.tmp", "tmp_bytes", lambda n: format_size(int(n))),
    ("limits.open_files", "open_files", lambda n: f"{int(n)} files"),
    ("limits.file_size", "file_size_bytes", lambda n: format_size(int(n))),
    ("limits.writes", "writes_bytes", lambda n: format_size(int(n))),
    ("limits.workspace", "workspace_bytes", lambda n: format_size(int(n))),
    ("limits.inodes", "inodes", lambda n: f"{int(n)} files"),
    ("limits.channel_state", "channel_state_bytes", lambda n: format_size(int(n))),
)
_EGRESS_LIMITS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("network.limits.bytes", "egress_bytes", lambda n: format_size(int(n))),
    ("network.limits.connections_per_second", "egress_connections_per_second",
     lambda n: f"{n:g} connections per second"),
)
_WORKSPACE_ORDER = {"none": 0, "read_only": 1, "read_write": 2}


def diff(old: EffectivePolicy, new: EffectivePolicy) -> list[Change]:
    """Every capability that differs between `old` and `new` (one stage of each)."""
    changes: list[Change] = []
    for field, attribute, verb in _LISTS_ALLOW:
        before, after = set(getattr(old, attribute)), set(getattr(new, attribute))
        changes += [Change(field, f"{verb} {v}", True) for v in sorted(after - before)]
        changes += [Change(field, f"no longer {verb} {v}", False) for v in sorted(before - after)]
    # Approval triggers work the other way: one more trigger is stricter.
    before, after = set(old.approval_required_for), set(new.approval_required_for)
    changes += [Change("approval.required_for", f"needs approval for {t}", False)
                for t in sorted(after - before)]
    changes += [Change("approval.required_for", f"no longer needs approval for {t}", True)
                for t in sorted(before - after)]
    for key in sorted(set(old.env_set) | set(new.env_set)):
        a, b = old.env_set.get(key), new.env_set.get(key)
        if a != b:
            text = (f"sets {key}={b}" if a is None else f"no longer sets {key}" if b is None
                    else f"sets {key}={b} (was {a})")
            changes.append(Change("env.set", text, b is not None and a is None))
    if old.workspace != new.workspace:
        changes.append(Change("filesystem.workspace", f"workspace {old.workspace} -> "
                              f"{new.workspace}", _WORKSPACE_ORDER.get(new.workspace, 0)
                              > _WORKSPACE_ORDER.get(old.workspace, 0)))
    if old.network != new.network:
        changes.append(Change("network", f"network {old.network} -> {new.network}",
                              new.network != "none"))
    before, after = set(old.egress), set(new.egress)
    changes += [Change("network.egress", f"may connect to {e}", True)
                for e in sorted(after - before)]
    changes += [Change("network.egress", f"no longer may connect to {e}", False)
                for e in sorted(before - after)]
    before, after = set(old.egress_secrets), set(new.egress_secrets)
    changes += [Change("network.secrets", f"sends {secret_from_text(t).in_words()}", True)
                for t in sorted(after - before)]
    changes += [Change("network.secrets",
                       f"no longer sends the secret {secret_from_text(t).name!r}"
                       f" ({', '.join(secret_from_text(t).domains)})", False)
                for t in sorted(before - after)]
    if old.network == new.network == "egress":
        for field, attribute, show in _EGRESS_LIMITS:
            a, b = getattr(old, attribute), getattr(new, attribute)
            if a != b:
                changes.append(Change(field, f"{show(a)} -> {show(b)}", b > a))
    if old.user_namespace != new.user_namespace:
        changes.append(Change("user_namespace", "may create a user namespace"
                              if new.user_namespace else "no longer gets a user namespace",
                              new.user_namespace))
    for field, attribute, show in _LIMITS:
        a, b = getattr(old, attribute), getattr(new, attribute)
        if a != b:
            changes.append(Change(field, f"{show(a)} -> {show(b)}", b > a))
    return changes


def render(stage: str, old: EffectivePolicy | None, new: EffectivePolicy | None,
           changes: Sequence[Change]) -> list[str]:
    """One stage's section of the diff."""
    if old is None and new is not None:
        return [f"stage {stage}: new (the old policy did not declare it)"]
    if new is None:
        return [f"stage {stage}: removed (the new policy does not declare it)"]
    if not changes:
        return [f"stage {stage}: no change in what the agent may do"]
    looser = sum(c.looser for c in changes)
    return [f"stage {stage}: {looser} looser, {len(changes) - looser} stricter",
            *(c.line() for c in changes)]

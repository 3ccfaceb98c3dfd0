"""Clamping an agent's policy to its stage's ceiling: `effective_policy`.

The agent's policy says what the agent wants at a stage; `policies/stages.yaml` says the most
any agent may have there. The effective policy is the intersection, computed field by field:

    exec.allow            entries not within a ceiling entry are dropped (not narrowed)
    exec.libraries        directories not at or below a ceiling directory are dropped
    filesystem.read_only  paths not at or below a ceiling path are dropped
    filesystem.workspace  the more restrictive: none < read_only < read_write
    network               none where either side says none; else the policy's egress entries
                          that a ceiling entry covers (others dropped), limits the lower
    limits.*              the lower of the two
    user_namespace        true only where the ceiling allows it
    env.set, env.allow    names matching the ceiling's env.deny (LD_*, PYTHONSTARTUP, BASH_ENV,
                          ...: what changes loading or execution) are dropped; env.log follows
    approval.required_for the policy's triggers plus every trigger the ceiling requires

`CLAMPED` lists every policy field the clamp decides; a test checks it against the model, so
a new policy field cannot be added without a ceiling.

An entry is dropped rather than narrowed (`/usr/` against a ceiling of `/usr/bin/` is dropped,
not turned into `/usr/bin/`) so that the effective policy never contains a rule nobody wrote.
Every change is recorded in `notes` with the ceiling's file and line, because a clamp that
happens silently looks, to the person debugging a refusal, like a policy that lies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Final

from agentd.errors import InvalidArgument, PermissionDenied
from agentd.policy.effective import EffectivePolicy
from agentd.policy.egress import covers, parse_rule, parse_secret, uncovered_domains
from agentd.policy.model import STAGES, Document, Policy, ResolvedStage, StageCeilings
from agentd.policy.paths import exec_entry_covers, is_at_or_below
from agentd.policy.rules import (
    WORKSPACE_ORDER,
    CeilingRules,
    Limits,
    Network,
    NetworkLimits,
    NetworkRules,
    StageRules,
    env_denied,
)
from agentd.policy.sizes import format_duration, format_size

# limits field -> (EffectivePolicy attribute, how to show a value in a note)
_LIMITS: Final[dict[str, tuple[str, Callable[[float], str]]]] = {
    "memory": ("memory_bytes", lambda v: format_size(int(v))),
    "pids": ("pids", lambda v: str(int(v))),
    "cpu": ("cpu", lambda v: f"{v:g}"),
    "wall_time": ("wall_seconds", format_duration),
    "output": ("output_bytes", lambda v: format_size(int(v))),
    "tmp": ("tmp_bytes", lambda v: format_size(int(v))),
    "open_files": ("open_files", lambda v: str(int(v))),
    "file_size": ("file_size_bytes", lambda v: format_size(int(v))),
    "writes": ("writes_bytes", lambda v: format_size(int(v))),
    "workspace": ("workspace_bytes", lambda v: format_size(int(v))),
    "inodes": ("inodes", lambda v: str(int(v))),
    "channel_state": ("channel_state_bytes", lambda v: format_size(int(v))),
}
assert set(_LIMITS) == set(Limits.model_fields)

# Every leaf field of a stage section, as the clamp decides it (see the module docstring).
CLAMPED: Final[frozenset[str]] = frozenset({
    "exec.allow", "exec.libraries", "filesystem.read_only", "filesystem.workspace", "network",
    "user_namespace", "env.set", "env.allow", "env.log", "approval.required_for",
    *(f"limits.{name}" for name in _LIMITS),
})


def effective_policy(policy: Policy, stage: str, ceilings: StageCeilings) -> EffectivePolicy:
    """`policy` at `stage`, clamped to the stage's ceiling, with a note for every clamp.

    Raises InvalidArgument for an unknown stage name, and PermissionDenied when the policy
    declares no section at or below `stage` (the agent may not run there at all).
    """
    if stage not in STAGES:
        raise InvalidArgument(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    resolved = policy.resolve(stage)
    if resolved is None:
        raise PermissionDenied(
            f"policy {policy.name} declares no section at or below stage {stage}, so the agent"
            f" cannot run at {stage}; add stages.{stage} to the policy to allow it",
            rule=policy.where("stages"),
        )
    return _Clamp(policy, resolved, ceilings).run()


class _Clamp:
    """One clamping of one resolved stage; collects the notes and the rule of each field."""

    def __init__(self, policy: Policy, resolved: ResolvedStage, ceilings: StageCeilings) -> None:
        self.policy = policy
        self.resolved = resolved
        self.stage = resolved.stage
        self.ceilings = ceilings
        self.notes: list[str] = []
        self.rules: dict[str, str] = {}

    def run(self) -> EffectivePolicy:
        wants: StageRules = self.resolved.rules
        ceiling: CeilingRules = self.ceilings.ceiling(self.stage)
        for field in ("exec.allow", "exec.libraries", "filesystem.read_only", "network",
                      "user_namespace", "env.set", "env.allow", "env.log"):
            self.rules[field] = self._policy_rule(field)

        exec_allow: list[str] = []
        exec_dropped: dict[str, str] = {}
        for entry in wants.exec.allow:
            if any(exec_entry_covers(top, entry) for top in ceiling.exec.allow):
                exec_allow.append(entry)
            else:
                exec_dropped[entry] = self._ceiling_rule("exec.allow")
                self._dropped("exec.allow", entry)

        exec_libraries: list[str] = []
        for path in wants.exec.libraries:
            if any(is_at_or_below(path, top) for top in ceiling.exec.libraries):
                exec_libraries.append(path)
            else:
                self._dropped("exec.libraries", path)

        read_only: list[str] = []
        for path in wants.filesystem.read_only:
            if any(is_at_or_below(path, top) for top in ceiling.filesystem.read_only):
                read_only.append(path)
            else:
                self._dropped("filesystem.read_only", path)

        workspace = wants.filesystem.workspace
        self.rules["filesystem.workspace"] = self._policy_rule("filesystem.workspace")
        top = ceiling.filesystem.workspace
        if WORKSPACE_ORDER.index(top) < WORKSPACE_ORDER.index(workspace):
            self._lowered("filesystem.workspace", workspace, top)
            workspace = top

        limits: dict[str, float] = {}
        for name, (attribute, show) in _LIMITS.items():
            wanted: float = getattr(wants.limits, name)
            most: float = getattr(ceiling.limits, name)
            self.rules[f"limits.{name}"] = self._policy_rule(f"limits.{name}")
            if most < wanted:
                self._lowered(f"limits.{name}", show(wanted), show(most))
                wanted = most
            limits[attribute] = wanted

        network, egress, egress_bytes, egress_rate, secrets = self._network(wants, ceiling)

        user_namespace = wants.user_namespace
        if user_namespace and not ceiling.user_namespace:
            self._lowered("user_namespace", "true", "false")
            user_namespace = False

        env = wants.env
        env_set = {name: value for name, value in env.set.items()
                   if not self._env_denied("env.set", name, ceiling)}
        env_allow = tuple(name for name in env.allow
                          if not self._env_denied("env.allow", name, ceiling))

        self.rules["approval.required_for"] = self._policy_rule("approval.required_for")
        triggers = list(wants.approval.required_for)
        for trigger in ceiling.approval.required_for:
            # A user_namespace trigger on an agent without one could never fire: no note.
            if trigger not in triggers and (user_namespace or trigger != "user_namespace"):
                triggers.append(trigger)
                self.rules["approval.required_for"] = self._ceiling_rule(
                    "approval.required_for")
                where = _at(self.ceilings, f"stages.{self.stage}.approval.required_for",
                            f"stages.{self.stage}")
                self.notes.append(f"approval.required_for: {trigger} added: required at stage"
                                  f" {self.stage} ({where})")
        return EffectivePolicy(
            agent_policy=self.policy.name,
            stage=self.stage,
            source=self.policy.source,
            exec_allow=tuple(exec_allow),
            exec_libraries=tuple(exec_libraries),
            read_only=tuple(read_only),
            workspace=workspace,
            network=network,
            egress=egress,
            egress_bytes=egress_bytes,
            egress_connections_per_second=egress_rate,
            egress_secrets=secrets,
            user_namespace=user_namespace,
            env_set=env_set,
            env_allow=env_allow,
            env_log=tuple(n for n in env.log if n in env_set or n in env_allow),
            memory_bytes=int(limits["memory_bytes"]),
            pids=int(limits["pids"]),
            cpu=float(limits["cpu"]),
            wall_seconds=float(limits["wall_seconds"]),
            output_bytes=int(limits["output_bytes"]),
            tmp_bytes=int(limits["tmp_bytes"]),
            open_files=int(limits["open_files"]),
            file_size_bytes=int(limits["file_size_bytes"]),
            writes_bytes=int(limits["writes_bytes"]),
            workspace_bytes=int(limits["workspace_bytes"]),
            inodes=int(limits["inodes"]),
            channel_state_bytes=int(limits["channel_state_bytes"]),
            approval_required_for=tuple(triggers),
            notes=tuple(self.notes),
            rules=dict(self.rules),
            exec_dropped=exec_dropped,
        )

    def _network(self, wants: StageRules, ceiling: CeilingRules
                 ) -> tuple[Network, tuple[str, ...], int, float, tuple[str, ...]]:
        """(network, egress entries, bytes, connections per second, secrets) after the
        ceiling: an entry no ceiling entry covers is dropped, limits are lowered, a secret the
        ceiling does not name (or whose domains lost their entries) is dropped; nothing left
        is none."""
        defaults = NetworkLimits()
        nothing: tuple[Network, tuple[str, ...], int, float, tuple[str, ...]] = (
            "none", (), int(defaults.bytes), float(defaults.connections_per_second), ())
        if not isinstance(wants.network, NetworkRules):
            return nothing
        if ceiling.network == "none":
            self._lowered("network", "egress", "none")
            return nothing
        tops = [parse_rule(e, any_port=True) for e in ceiling.network.egress]
        kept = []
        for entry in wants.network.egress:
            if any(covers(top, parse_rule(entry)) for top in tops):
                kept.append(entry)
            else:
                self.rules["network"] = self._ceiling_rule("network")
                self._dropped("network.egress", entry)
        if not kept:
            return nothing
        size, rate = int(wants.network.limits.bytes), wants.network.limits.connections_per_second
        most = ceiling.network.limits
        if most.bytes < size:
            self._lowered("network.limits.bytes", format_size(size), format_size(most.bytes))
            size = int(most.bytes)
        if most.connections_per_second < rate:
            self._lowered("network.limits.connections_per_second", f"{rate:g}",
                          f"{most.connections_per_second:g}")
            rate = most.connections_per_second
        secrets = []
        kept_rules = [parse_rule(e) for e in kept]
        for grant in wants.network.secrets:
            secret = parse_secret(grant.model_dump())
            allowed = ceiling.network.secrets.get(secret.name)
            if allowed is None:
                self.rules["network"] = self._ceiling_rule("network")
                self._dropped("network.secrets", secret.name)
                continue
            # Where it may go is the ceiling's to say, not only the policy's egress: a
            # wildcard egress ceiling must not let a policy send a token to any name under it.
            bounds = [parse_rule(f"{a}:443") for a in allowed]
            outside = [d for d in secret.domains
                       if uncovered_domains(replace(secret, domains=(d,)), bounds)]
            missing = list(dict.fromkeys(outside + uncovered_domains(secret, kept_rules)))
            if missing:
                self.rules["network"] = self._ceiling_rule("network")
                self._dropped("network.secrets", f"{secret.name} for {', '.join(missing)}")
                domains = tuple(d for d in secret.domains if d not in missing)
                if not domains:
                    continue
                secret = replace(secret, domains=domains)
            secrets.append(secret.to_text())
        return "egress", tuple(kept), size, float(rate), tuple(secrets)

    def _policy_rule(self, field: str) -> str:
        """Where the policy writes `field` for this stage (maybe inherited, maybe default)."""
        declaring = self.resolved.origin.get(field, self.resolved.base)
        return self.policy.where(
            f"stages.{declaring}.{field}", fallback=f"stages.{self.resolved.base}"
        )

    def _ceiling_rule(self, field: str) -> str:
        return self.ceilings.where(f"stages.{self.stage}.{field}", fallback=f"stages.{self.stage}")

    def _env_denied(self, field: str, name: str, ceiling: CeilingRules) -> bool:
        """Whether the ceiling denies variable `name`; notes the drop if so."""
        pattern = env_denied(name, ceiling.env.deny)
        if pattern is None:
            return False
        self.rules[field] = self._ceiling_rule("env.deny")
        self.notes.append(
            f"{field}: {name} dropped: {pattern} changes how programs load or run and is"
            f" denied at stage {self.stage}"
            f" ({_at(self.ceilings, f'stages.{self.stage}.env.deny', f'stages.{self.stage}')})"
        )
        return True

    def _dropped(self, field: str, entry: str) -> None:
        self.notes.append(
            f"{field}: {entry} dropped: not allowed at stage {self.stage}"
            f" ({_at(self.ceilings, f'stages.{self.stage}.{field}', f'stages.{self.stage}')})"
        )

    def _lowered(self, field: str, wanted: str, most: str) -> None:
        self.rules[field] = self._ceiling_rule(field)
        self.notes.append(
            f"{field}: {wanted} lowered to {most}: the most allowed at stage {self.stage}"
            f" ({_at(self.ceilings, f'stages.{self.stage}.{field}', f'stages.{self.stage}')})"
        )


def _at(document: Document, field: str, fallback: str) -> str:
    """`"<file>:<line>"` of `field`, or of `fallback` when `field` is not written."""
    line = document.line(field) or document.line(fallback)
    return document.source if line is None else f"{document.source}:{line}"

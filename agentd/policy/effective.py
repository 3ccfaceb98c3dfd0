"""The effective policy: what one agent may do at one stage on this host, as plain values.

This is what everything below the policy layer works from: the scheduler turns it into a
`WorkerSpec`, the audit log records its `content_hash`, a refusal quotes `rule(field)`. It
holds no pydantic model and no reference to the files, so it can be stored, compared and
sent to another process (`to_json` / `from_json`) without the policy files at hand.

`content_hash` covers exactly the fields that change what a worker may do, plus the policy
name and stage; it leaves out `source`, `notes` and the rule locations, so that moving a file
or adding a comment does not make the same capabilities look like a new policy version, while
any change of a capability or a limit does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from agentd.policy.rules import Network, Workspace

# Field names a rule can be asked for, as written in a stage section.
RULE_FIELDS: Final[tuple[str, ...]] = (
    "exec.allow",
    "exec.libraries",
    "filesystem.read_only",
    "filesystem.workspace",
    "network",
    "user_namespace",
    "env.set",
    "env.allow",
    "env.log",
    "limits.memory",
    "limits.pids",
    "limits.cpu",
    "limits.wall_time",
    "limits.output",
    "limits.tmp",
    "limits.open_files",
    "limits.file_size",
    "limits.writes",
    "limits.workspace",
    "limits.inodes",
    "limits.channel_state",
    "approval.required_for",
)
# RULE_FIELDS name -> EffectivePolicy attribute, where the two differ (see `attribute_of`).
_ATTRIBUTES: Final = {"filesystem.read_only": "read_only", "filesystem.workspace": "workspace",
                      "limits.memory": "memory_bytes", "limits.wall_time": "wall_seconds",
                      "limits.output": "output_bytes", "limits.tmp": "tmp_bytes",
                      "limits.file_size": "file_size_bytes", "limits.writes": "writes_bytes",
                      "limits.channel_state": "channel_state_bytes",
                      "limits.workspace": "workspace_bytes"}


def attribute_of(field: str) -> str:
    """The EffectivePolicy attribute that holds RULE_FIELDS `field` ("limits.memory" ->
    "memory_bytes", "env.allow" -> "env_allow")."""
    return _ATTRIBUTES.get(field) or field.removeprefix("limits.").replace(".", "_")


# Fields that are about where things came from, not what the worker may do.
_NOT_HASHED: Final = frozenset({"source", "content_hash", "notes", "rules", "exec_dropped"})
_EGRESS_FIELDS: Final = frozenset({"egress", "egress_bytes", "egress_connections_per_second",
                                   "egress_secrets"})


@dataclass(frozen=True, kw_only=True)
class EffectivePolicy:
    """An agent's policy at one stage, clamped to the host's ceiling for that stage.

    Build it with `agentd.policy.effective_policy`; constructing one directly (defaults are the
    safe policy defaults) is meant for tests of the layers above. Treat `env_set` as read-only.
    """

    agent_policy: str
    """The policy's name."""
    stage: str
    source: str = "<memory>"
    """The policy file it was loaded from."""
    content_hash: str = field(init=False)
    """"sha256:<hex>" of the canonical JSON of the effective fields."""
    exec_allow: tuple[str, ...] = ()
    exec_libraries: tuple[str, ...] = ()
    """Host directories mapped executable for code loaded at run time (see ExecRules)."""
    read_only: tuple[str, ...] = ()
    workspace: Workspace = "read_write"
    network: Network = "none"
    """none (loopback only), or egress: TCP to `egress`, through the daemon's proxy."""
    egress: tuple[str, ...] = ()
    """Canonical egress entries (agentd/policy/egress.py), after the stage ceiling."""
    egress_bytes: int = 64 << 20
    """Bytes both ways over all of a task's connections."""
    egress_connections_per_second: float = 10.0
    egress_secrets: tuple[str, ...] = ()
    """Secrets the proxy sends as headers (SecretRule.to_text, agentd/policy/egress.py), after
    the stage ceiling; only names, never values."""
    user_namespace: bool = False
    env_set: Mapping[str, str] = field(default_factory=dict)
    env_allow: tuple[str, ...] = ()
    env_log: tuple[str, ...] = ()
    memory_bytes: int = 256 << 20
    pids: int = 64
    cpu: float = 1.0
    wall_seconds: float = 60.0
    output_bytes: int = 1 << 20
    tmp_bytes: int = 64 << 20
    open_files: int = 256
    file_size_bytes: int = 1 << 30
    writes_bytes: int = 1 << 20
    workspace_bytes: int = 1 << 30
    inodes: int = 100_000
    channel_state_bytes: int = 1 << 20
    approval_required_for: tuple[str, ...] = ()
    """Approval triggers (see ApprovalRules): a step matching one waits for Approve."""
    notes: tuple[str, ...] = ()
    """What the stage ceiling changed, one human-readable line each."""
    rules: Mapping[str, str] = field(default_factory=dict)
    """Field (one of RULE_FIELDS) -> "file:line dotted.field" of the rule that decides it."""
    exec_dropped: Mapping[str, str] = field(default_factory=dict)
    """Exec entries the policy grants but the stage ceiling does not -> the ceiling's rule."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "env_set", dict(self.env_set))
        object.__setattr__(self, "cpu", float(self.cpu))
        object.__setattr__(self, "wall_seconds", float(self.wall_seconds))
        object.__setattr__(self, "egress_connections_per_second",
                           float(self.egress_connections_per_second))
        if self.network == "none" and (self.egress or self.egress_secrets):
            raise ValueError("egress entries with network none; an egress policy says"
                             " network='egress'")
        object.__setattr__(self, "content_hash", content_hash_of(self.hashed_fields()))

    def __hash__(self) -> int:
        # env_set is a dict, so the generated hash would fail; equal objects share the hash.
        return hash((self.content_hash, self.source, self.notes))

    def rule(self, field: str) -> str:
        """Where the rule deciding `field` ("exec.allow", "limits.wall_time", ...) is written.

        The policy's line when the policy decided it, the stages file's line when the stage
        ceiling did; e.g. "policies/cve-triage.yaml:12 stages.prototype.exec.allow".
        """
        if field not in RULE_FIELDS:
            raise ValueError(f"no policy field {field!r}; fields are {', '.join(RULE_FIELDS)}")
        return self.rules.get(field) or f"{self.source} stages.{self.stage}.{field}"

    def hashed_fields(self) -> dict[str, Any]:
        """The fields the content hash covers, as JSON values. Without egress, the egress
        fields are left out, so that a policy's hash is the one it had before they existed
        (pinned versions and the audit log's policy_hash stay comparable)."""
        skip = (_NOT_HASHED | (_EGRESS_FIELDS if self.network == "none" else frozenset())
                | (frozenset() if self.egress_secrets else {"egress_secrets"}))
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in fields(self)
            if f.name not in skip
        }

    def to_json(self) -> dict[str, Any]:
        """Every field as JSON values (lists for tuples), for storage or another process."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EffectivePolicy:
        """The inverse of `to_json`; refuses data whose `content_hash` does not match."""
        values = {k: v for k, v in data.items() if k != "content_hash"}
        for name in ("exec_allow", "exec_libraries", "read_only", "env_allow", "env_log", "notes",
                     "approval_required_for", "egress", "egress_secrets"):
            if name in values:
                values[name] = tuple(values[name])
        effective = cls(**values)
        if "content_hash" in data and data["content_hash"] != effective.content_hash:
            raise ValueError(
                f"content_hash {data['content_hash']} does not match the fields"
                f" ({effective.content_hash}); the stored effective policy was altered"
            )
        return effective


def content_hash_of(values: Mapping[str, Any]) -> str:
    """"sha256:<hex>" of `values` as canonical JSON (sorted keys, no spaces, UTF-8)."""
    canonical = json.dumps(
        values, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value

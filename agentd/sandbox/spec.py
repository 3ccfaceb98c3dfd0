"""What the sandbox is asked to run, and what it reports back.

`WorkerSpec` is everything the launcher needs to build one confined worker: it is resolved
from an effective policy and a tool call by the scheduler, so the sandbox never reads a
policy file. It crosses the daemon→launcher socket as JSON, hence plain fields only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Resource limits of one worker; None means 'no limit of that kind'."""

    memory_bytes: int | None = None
    pids: int | None = None
    cpu: float | None = None  # cores, e.g. 0.5
    wall_seconds: float = 60.0
    output_bytes: int = 1 << 20  # stdout + stderr together
    tmp_bytes: int = 64 << 20
    open_files: int = 256
    file_size_bytes: int | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """One tool call, fully resolved. Paths in `argv`, `cwd` and the mounts are as the worker sees
    them, except the `read_only` sources and the workspace's layers, upper and work dir, which
    are host paths."""

    task_id: str
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str = "/workspace"
    hostname: str = "agentd"
    uid: int = 65534
    gid: int = 65534
    user_namespace: bool = False
    # Host paths bound read-only at the same path inside the worker.
    read_only: tuple[str, ...] = ()
    workspace_writable: bool = True
    # Or the run's layer stack (host paths, lowest first) mounted with overlayfs at /workspace,
    # writes going to this task's own upper (and its overlay work dir).
    workspace_layers: tuple[str, ...] = ()
    workspace_upper: str | None = None
    workspace_work: str | None = None
    # The upper is a tmpfs sized to the run's remaining workspace quota: full means `quota`.
    workspace_quota: bool = False
    # Paths (inside the worker) that may be executed; a path ending in "/" allows a tree.
    exec_allow: tuple[str, ...] = ()
    # Host paths (real) bound executable over themselves; every other read-only grant is
    # noexec (see agentd/policy/execset.py). And granted paths withheld (bound noexec).
    exec_binds: tuple[str, ...] = ()
    exec_withheld: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    # Network egress: the worker joins a slot namespace the daemon made (agentd/sandbox/
    # egress.py; its fd travels with the spawn) and resolves names through this address.
    nameserver: str = ""
    egress_ports: tuple[int, ...] = ()  # TCP ports Landlock lets it connect to
    # A trust bundle (host path: the host's CAs and the run's egress CA) mounted read-only
    # over the worker's /etc/ssl/certs/ca-certificates.crt; "" leaves the trust store alone.
    ca_bundle: str = ""
    seccomp: bool = True
    landlock: bool = True

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every value, and this runs per spawn (and
        # per pool look-up); the fields are plain values, the one nested dataclass is limits.
        data = {f.name: getattr(self, f.name) for f in _SPEC_FIELDS}
        data["limits"] = dict(vars(self.limits))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerSpec:
        limits = Limits(**data.pop("limits"))
        for name in ("argv", "read_only", "exec_allow", "exec_binds", "exec_withheld",
                     "workspace_layers", "egress_ports"):
            data[name] = tuple(data[name])
        return cls(limits=limits, **data)


_SPEC_FIELDS = dataclasses.fields(WorkerSpec)

# What a prebuilt worker (agentd/sandbox/pool.py) is handed at call time; every other field,
# and any field added later, is part of the shape it was built with before the call.
CALL_FIELDS = ("task_id", "argv", "env", "cwd", "workspace_layers", "workspace_upper",
               "workspace_work", "workspace_quota")
CALL_LIMITS = ("wall_seconds", "output_bytes", "open_files", "file_size_bytes")


def shape_of(spec: WorkerSpec) -> str:
    """The digest of what a worker is built with before its call: namespaces, root (grants,
    executable binds, /tmp), cgroup limits, identity. A prebuilt worker serves only a spec of
    its own shape, so it is never shared across policies (or approvals)."""
    data = spec.to_json()
    for name in CALL_FIELDS:
        del data[name]
    for name in CALL_LIMITS:
        del data["limits"][name]
    data["has_workspace"] = bool(spec.workspace_layers and spec.workspace_upper
                                 and spec.workspace_work)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ResourceUsage:
    """What a worker's cgroup measured."""

    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0
    oom_killed: bool = False
    pids_limit_hit: bool = False


@dataclass(frozen=True)
class SetupFailure:
    """The worker could not be built: which setup action failed and with which errno (an
    action, not a step: a step is a unit of a run)."""

    action: str
    errno: int
    message: str

    def __str__(self) -> str:
        return f"worker setup failed at '{self.action}': {self.message}"

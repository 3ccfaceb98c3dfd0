"""The daemon's configuration: one TOML file, validated by pydantic, unknown keys refused.

Relative paths are resolved against the directory of the config file, so the development
config in the repository (`agentd.dev.toml`) keeps everything under the checkout.
"""

from __future__ import annotations

import grp
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from agentd.errors import InvalidArgument

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


class _Strict(BaseModel):
    # strict: "5" is not 5 and true is not 1; a config value has the type it is documented with.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# Paths are written as strings in TOML: the one coercion allowed.
ConfigPath = Annotated[Path, Strict(False)]


class DaemonSection(_Strict):
    """Where the daemon keeps things and how it talks."""

    state_dir: ConfigPath = Path("/var/lib/agentd")
    runtime_dir: ConfigPath = Path("/run/agentd")
    policy_dir: ConfigPath = Path("/etc/agentd/policies")
    stages_file: str = "stages.yaml"
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Group that owns the client socket (mode 0660); "" keeps root's group.
    socket_group: str = ""
    approver_group: str = ""
    # Approval means another person: an Approve from the requester's own uid is refused unless
    # this is true (a development convenience for one person at one machine; every use is
    # recorded on the approval record and logged as a warning).
    allow_self_approval: bool = False
    worker_uid: int = Field(default=65534, ge=1)
    worker_gid: int = Field(default=65534, ge=1)
    # Where agentd's cgroup subtree lives; "" means under the daemon's own cgroup.
    cgroup_parent: str = ""
    # auto tries v2, then hybrid (v1 limits + the unified mount's cgroup.kill), then v1.
    cgroup_backend: Literal["auto", "v2", "hybrid", "v1"] = "auto"
    # On SIGTERM running tool calls are killed at once; this is how long their calls then have
    # to deliver the outcome before the servers close.
    drain_seconds: float = Field(default=10.0, ge=0)
    max_concurrent_workers: int = Field(default=64, ge=1)
    # Workers prebuilt per shape (policy and approvals) in use, taken by calls and refilled in
    # the background (agentd/sandbox/pool.py); 0 builds every worker at call time.
    warm_pool: int = Field(default=2, ge=0, le=32)
    # Bytes of the state filesystem that workspace commits never use: room kept for the audit
    # log and the state database when workspaces fill the disk.
    state_reserve: int = Field(default=64 << 20, ge=0)
    # A worker launcher that does not answer the daemon's ping for this long is replaced.
    launcher_timeout_seconds: float = Field(default=5.0, gt=0)
    # A run's layer stack this deep is squashed into one layer in the background: overlayfs
    # mounts at most 500 lowers, kernels before 6.8 fit about 140 in one mount's options, and
    # every lower costs at each mount.
    squash_depth: int = Field(default=100, ge=2, le=400)
    # Largest tarball ExportCheckpoint sends (bytes; sparse files count by their data only);
    # past it the export ends with RESOURCE_EXHAUSTED.
    max_export_bytes: int = Field(default=16 << 30, ge=1 << 20)
    # Seconds between signed tree heads of the audit log when idle.
    tree_head_interval: float = Field(default=60.0, gt=0)
    # Prometheus metrics: always on <runtime_dir>/agentd-metrics.sock (0660, this group; ""
    # keeps root's), and on this loopback "host:port" too if set (e.g. "127.0.0.1:9464").
    metrics_group: str = ""
    metrics_listen: str = ""
    # Network egress (docs/architecture.md, "Network egress"): off, a policy's egress is
    # refused; on, the daemon makes its egress namespace, resolver and proxy at start.
    # egress_upstream: the DNS server allowed names go to ("" : the first nameserver of
    # /etc/resolv.conf); egress_uplink_netns: a namespace file to connect out from ("": the
    # daemon's own), e.g. /run/netns/uplink.
    # egress_credentials_dir: where the secrets policies name are read from ("": systemd's
    # $CREDENTIALS_DIRECTORY, else /etc/agentd/credentials; one file per secret, mode 0600).
    # egress_upstream_ca: a PEM file of CAs trusted for destinations the proxy ends TLS for,
    # besides the host's (a private CA).
    egress: bool = False
    egress_upstream: str = ""
    egress_uplink_netns: str = ""
    egress_credentials_dir: str = ""
    egress_upstream_ca: str = ""

    @field_validator("egress_upstream")
    @classmethod
    def _ipv4_address(cls, value: str) -> str:
        if value:
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IPv4 address; write e.g."
                                 " \"192.0.2.53\"") from None
        return value

    @field_validator("egress_upstream_ca")
    @classmethod
    def _pem_file(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError(f"{value!r} is not a file; name a PEM file of CA certificates, or"
                             " leave egress_upstream_ca out to trust the host's")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _loopback_only(cls, value: str) -> str:
        if not value:
            return value
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port; write e.g. \"127.0.0.1:9464\"")
        if not loopback:
            raise ValueError(f"{host!r} is not a loopback address: metrics are served on "
                             "loopback only (127.0.0.1, ::1 or localhost); scrape remote hosts "
                             "through the unix socket and a local agent")
        return value

    @field_validator("socket_group", "approver_group", "metrics_group")
    @classmethod
    def _group_exists(cls, value: str) -> str:
        if value:
            try:
                grp.getgrnam(value)
            except KeyError:
                raise ValueError(f"group {value!r} does not exist on this host; create it "
                                 "(systemd-sysusers) or leave the field empty") from None
        return value


class AgentSection(_Strict):
    """A registered agent: its policy file (in policy_dir) and its stage."""

    policy: str
    stage: Literal["prototype", "sandbox", "pilot", "production"] = "prototype"
    # Audit mode: every call is also decided under the next stage's effective policy, never
    # enforced; where the two differ (the next stage would refuse, or newly allow) a
    # `stage.shadow` record says so: the evidence a reviewer reads before a promotion.
    audit_next_stage: bool = False


class Config(_Strict):
    daemon: DaemonSection = DaemonSection()
    agents: dict[str, AgentSection] = {}

    @field_validator("agents")
    @classmethod
    def _agent_names(cls, agents: dict[str, AgentSection]) -> dict[str, AgentSection]:
        for name in agents:
            if not _NAME.match(name):
                raise ValueError(f"agent name {name!r} must match {_NAME.pattern}")
        return agents

    @property
    def socket_path(self) -> Path:
        return self.daemon.runtime_dir / "agentd.sock"

    def role_sockets(self) -> dict[str, Path]:
        """One unix socket per role; the filesystem permissions on each carry the role."""
        run = self.daemon.runtime_dir
        return {"client": run / "agentd.sock", "approver": run / "agentd-approver.sock",
                "admin": run / "agentd-admin.sock"}

    @property
    def metrics_socket(self) -> Path:
        return self.daemon.runtime_dir / "agentd-metrics.sock"


def load_config(path: str | Path) -> Config:
    """Reads and validates the config; InvalidArgument names the file and the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid TOML: {exc}") from None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise InvalidArgument(f"{path}: {problems}") from None
    base = path.resolve().parent
    daemon = config.daemon.model_copy(update={
        name: (base / getattr(config.daemon, name)).resolve()
        for name in ("state_dir", "runtime_dir", "policy_dir")})
    return config.model_copy(update={"daemon": daemon})

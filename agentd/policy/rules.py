"""The sections of one stage: what an agent may execute, see, set and use.

These models are shared by agent policies (`stages.<stage>` of a Policy) and host ceilings
(`stages.<stage>` of StageCeilings). Every field has a default that grants nothing beyond the
minimum a worker needs, so a field left out never widens what an agent can do; an unknown field
is an error (`extra="forbid"`), never ignored, because a misspelt `read_onyl:` that silently did
nothing would be a policy that says one thing and enforces another.

Inheritance between stages works on what was *written* (pydantic's `model_fields_set`), not on
the defaults, so a default in a higher stage never hides a value inherited from a lower one;
see `agentd.policy.model`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from agentd.policy.egress import (
    canonical_ceiling_entry,
    canonical_entry,
    parse_rules,
    parse_secret,
    uncovered_domains,
)
from agentd.policy.paths import ExecEntry, HostPath
from agentd.policy.sizes import Cores, Duration, Size

Workspace = Literal["read_write", "read_only", "none"]
Network = Literal["none", "egress"]
"""An effective policy's network: none (loopback only) or egress (its `egress` entries)."""

# Most restrictive first: clamping takes the lower of the policy's and the ceiling's.
WORKSPACE_ORDER: Final[tuple[Workspace, ...]] = ("none", "read_only", "read_write")

ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME = re.compile(ENV_NAME_PATTERN)
PID_MAX_LIMIT: Final = 4_194_304  # the kernel's upper bound for pids.max and pid numbers
NR_OPEN_MAX: Final = 1_048_576  # default fs.nr_open: RLIMIT_NOFILE cannot exceed it


def check_env_name(value: Any) -> str:
    """Return `value` if it is a portable environment variable name, else raise ValueError."""
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an environment variable name; use letters, digits and _,"
            " not starting with a digit (e.g. PYTHONPATH)"
        )
    return value


def _check_env_value(value: Any) -> str:
    if not isinstance(value, str):
        message = f"{value!r} is not a string; quote the value, e.g. \"{value}\""
        raise ValueError(message)  # noqa: TRY004 - pydantic reports ValueError, not TypeError
    if "\0" in value:
        raise ValueError("the value contains a NUL byte, which cannot be passed to a process")
    return value


EnvName = Annotated[
    str,
    BeforeValidator(check_env_name),
    WithJsonSchema({"type": "string", "pattern": ENV_NAME_PATTERN}),
]
EnvValue = Annotated[str, BeforeValidator(_check_env_value), WithJsonSchema({"type": "string"})]


def _no_duplicates(values: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse a list that names the same thing twice (after normalisation)."""
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{value} is listed twice (after normalisation); remove one")
        seen.add(value)
    return values


class Rules(BaseModel):
    """Base of every section: frozen, unknown fields refused, field docstrings in the schema."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ExecRules(Rules):
    """What may be executed. Matched against the executable path the caller gives (argv[0])."""

    allow: tuple[ExecEntry, ...] = ()
    """Absolute paths of executables, or directories ending in '/' for every executable below
    them. Empty (the default): nothing may run."""

    libraries: tuple[HostPath, ...] = ()
    """Host directories of code the granted programs load at run time (dlopen: Python's
    lib-dynload, plugins) that must be mapped executable in the worker. The shared libraries a
    granted program links against are found from its ELF headers and need no entry here."""

    _unique = field_validator("allow", "libraries")(_no_duplicates)


class FilesystemRules(Rules):
    """What of the host the worker sees, besides its own /tmp."""

    read_only: tuple[HostPath, ...] = ()
    """Host paths bound read-only at the same place inside the worker."""

    workspace: Workspace = "read_write"
    """How the run's workspace is mounted at /workspace: read_write, read_only or none."""

    _unique = field_validator("read_only")(_no_duplicates)


class EnvRules(Rules):
    """The worker's environment: nothing of the daemon's environment is passed on."""

    set: dict[EnvName, EnvValue] = Field(default_factory=dict)
    """Variables always set in the worker."""

    allow: tuple[EnvName, ...] = ()
    """Names the caller may set per call; any other name is refused."""

    log: tuple[EnvName, ...] = ()
    """Names whose values may be written to the audit log; must be in set or allow. Values of
    other variables are recorded as redacted."""

    _unique = field_validator("allow", "log")(_no_duplicates)


class Limits(Rules):
    """Resource limits of one task (its whole process tree)."""

    memory: Size = Field(default="256MiB", validate_default=True)
    """Memory of the task's cgroup (memory.max), e.g. 512MiB."""

    pids: int = Field(default=64, strict=True, gt=0, le=PID_MAX_LIMIT)
    """Processes and threads at once (pids.max)."""

    cpu: Cores = 1.0
    """CPU cores (cpu.max), may be fractional."""

    wall_time: Duration = Field(default="60s", validate_default=True)
    """Wall-clock time before the task is killed, e.g. 60s, 5m."""

    output: Size = Field(default="1MiB", validate_default=True)
    """Bytes of stdout and stderr kept together; the rest is cut off."""

    tmp: Size = Field(default="64MiB", validate_default=True)
    """Size of the worker's private /tmp (tmpfs)."""

    open_files: int = Field(default=256, strict=True, gt=0, le=NR_OPEN_MAX)
    """Open file descriptors per process (RLIMIT_NOFILE)."""

    file_size: Size = Field(default="1GiB", validate_default=True)
    """Largest file a process may write (RLIMIT_FSIZE)."""
    writes: Size = Field(default="1MiB", validate_default=True)
    """Bytes of structured results a task may write to $AGENTD_WRITES_FD in one step."""
    workspace: Size = Field(default="1GiB", validate_default=True)
    """Bytes a run's workspace may take on disk (its layers) and a task may write at once
    (its upper is a tmpfs of the remaining size); past it the task stops (`quota`) or the
    step fails at commit, applying nothing."""
    inodes: int = Field(default=100_000, strict=True, gt=0, le=1 << 31)
    """Files and directories a run's workspace may hold, likewise."""
    channel_state: Size = Field(default="1MiB", validate_default=True)
    """Bytes of a run's channel state (the sum of its values as canonical JSON); a step whose
    result would be larger fails at the barrier and applies nothing."""


EgressEntry = Annotated[str, BeforeValidator(canonical_entry),
                       WithJsonSchema({"type": "string", "examples": [
                           "api.example.org:443", "*.example.org:443", "192.0.2.10:80",
                           "198.51.100.0/24:443"]})]
CeilingEgressEntry = Annotated[str, BeforeValidator(canonical_ceiling_entry),
                              WithJsonSchema({"type": "string", "examples": [
                                  "*.example.org:*", "198.51.100.0/24:443"]})]


class NetworkLimits(Rules):
    """Per task: what its connections through the egress proxy may use."""

    bytes: Size = Field(default="64MiB", validate_default=True)
    """Bytes sent and received over all its connections together; past it the proxy closes
    them and refuses new ones."""

    connections_per_second: float = Field(default=10.0, gt=0, le=10_000)
    """New connections per second (a token bucket of one second's worth); over it a
    connection is refused."""


class SecretGrant(Rules):
    """A secret the daemon's egress proxy adds to HTTPS requests for named domains. Its value
    is the file `name` in the daemon's credentials directory, never in a policy, a request,
    the worker or the audit log (which records the name)."""

    name: str
    """The credential file's name (letters, digits, '.', '_', '-')."""
    header: str
    """The HTTP header it is sent in, e.g. Authorization (replacing any the worker sent)."""
    format: str = "{secret}"
    """The header's value, with {secret} standing for the file's content: 'Bearer {secret}'."""
    domains: tuple[str, ...] = Field(min_length=1)
    """Names (or *.wildcards) it is sent to; each must be reachable by an egress entry."""

    @model_validator(mode="after")
    def _valid(self) -> SecretGrant:
        parse_secret({"name": self.name, "header": self.header, "format": self.format,
                      "domains": list(self.domains)})
        return self


class NetworkRules(Rules):
    """Network egress of a stage: TCP (or UDP, /udp) to the destinations listed, through the
    daemon's resolver, egress proxy and UDP relay; everything else refused
    (agentd/policy/egress.py)."""

    egress: tuple[EgressEntry, ...] = Field(min_length=1)
    """Destinations: HOST:PORT, CIDR:PORT, DOMAIN:PORT or *.DOMAIN:PORT, TCP unless /udp
    follows (never port 53/udp: DNS goes to the daemon's resolver); at least one."""

    limits: NetworkLimits = Field(default_factory=NetworkLimits)
    """Bytes and connection rate per task."""

    secrets: tuple[SecretGrant, ...] = ()
    """Secrets the egress proxy sends as HTTP headers to named domains (see SecretGrant)."""

    _unique = field_validator("egress")(_no_duplicates)

    @field_validator("secrets")
    @classmethod
    def _secrets_reachable(cls, secrets: tuple[SecretGrant, ...], info: ValidationInfo
                           ) -> tuple[SecretGrant, ...]:
        names = [s.name for s in secrets]
        if len(set(names)) != len(names):
            raise ValueError("a secret is listed twice in network.secrets; list each once")
        rules = parse_rules(info.data.get("egress", ()))
        for secret in secrets:
            missing = uncovered_domains(parse_secret(secret.model_dump()), rules)
            if missing:
                raise ValueError(f"secret {secret.name} names {', '.join(missing)}, which no"
                                 " domain egress entry reaches; add e.g."
                                 f" {missing[0].removeprefix('*.')}:443 to network.egress")
        return secrets


class NetworkCeiling(Rules):
    """The most network egress any agent may have at a stage."""

    egress: tuple[CeilingEgressEntry, ...] = Field(min_length=1)
    """Destinations a policy may list: an entry of a policy is kept only if one of these covers
    it (a wildcard covers names under it, a network the addresses inside; `*` any port)."""

    limits: NetworkLimits = Field(default_factory=NetworkLimits)
    """The highest per-task egress limits at this stage."""

    secrets: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    """The daemon's secrets a policy may have sent at this stage, each with the names (or
    *.wildcards) it may go to: `{gh-token: [api.github.com]}`. None by default. A policy's
    secret is kept only for the domains listed here for it."""

    @field_validator("secrets")
    @classmethod
    def _secret_domains(cls, secrets: dict[str, tuple[str, ...]]
                        ) -> dict[str, tuple[str, ...]]:
        return {name: parse_secret({"name": name, "header": "Authorization",
                                    "domains": list(domains)}).domains
                for name, domains in secrets.items()}

    _unique = field_validator("egress")(_no_duplicates)


def _network_value(value: Any) -> Any:
    """`none`, or a mapping with `egress:`; say what to write for anything else."""
    if value == "none" or isinstance(value, (dict, NetworkRules, NetworkCeiling)):
        return value
    raise ValueError(
        f"network {value!r} is not valid; write network: none (loopback only, the default) or"
        " network: {egress: [api.example.org:443]}"
    )


def _check_approval_trigger(value: Any) -> str:
    """`exec` (every step), `exec:/path` or `exec:/tree/` (steps running it), `user_namespace`."""
    if value in ("exec", "user_namespace"):
        return str(value)
    if isinstance(value, str) and value.startswith("exec:/") and ".." not in value:
        return value
    raise ValueError(
        f"{value!r} is not an approval trigger; use exec (every step), exec:/usr/bin/tool or"
        " exec:/usr/bin/ (steps running that executable or one below that directory), or"
        " user_namespace"
    )


ApprovalTrigger = Annotated[str, BeforeValidator(_check_approval_trigger),
                            WithJsonSchema({"type": "string"})]


class ApprovalRules(Rules):
    """What needs a human's approval before a step may run at this stage."""

    required_for: tuple[ApprovalTrigger, ...] = ()
    """Triggers: exec (every step), exec:/path or exec:/dir/ (a step with a task running that
    executable), user_namespace. A matching step waits, persisted, for Approve."""

    _unique = field_validator("required_for")(_no_duplicates)


# Variables that change how programs are loaded or what they execute: a worker that may set
# one runs code the exec rules never saw (LD_PRELOAD, a Python startup file, a shell's ENV).
DANGEROUS_ENV: Final[tuple[str, ...]] = (
    "LD_*", "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
    "MALLOC_*", "GLIBC_TUNABLES", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS",
    "PYTHONSTARTUP", "PYTHONHOME", "PYTHONINSPECT", "PYTHONEXECUTABLE",
    "PYTHONUSERBASE", "PYTHONBREAKPOINT", "PERL5OPT", "PERL5DB", "PERLLIB", "PERL5LIB",
    "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "NODE_PATH", "BASH_ENV", "ENV", "SHELLOPTS",
    "BASHOPTS", "PS4", "PROMPT_COMMAND", "IFS", "CDPATH", "GIT_*",
    "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
)


def env_denied(name: str, patterns: Iterable[str]) -> str | None:
    """The ceiling pattern (`NAME` or `PREFIX*`) that denies `name`, if any."""
    for pattern in patterns:
        if (pattern.endswith("*") and name.startswith(pattern[:-1])) or name == pattern:
            return pattern
    return None


def _check_env_pattern(value: Any) -> str:
    if isinstance(value, str) and value:
        check_env_name(value.removesuffix("*") or "X")
        return value
    raise ValueError(f"{value!r} is not an environment variable name or NAME* prefix")


EnvPattern = Annotated[str, BeforeValidator(_check_env_pattern),
                       WithJsonSchema({"type": "string"})]


class EnvCeiling(Rules):
    """Which environment variables no agent may set at a stage."""

    deny: tuple[EnvPattern, ...] = DANGEROUS_ENV
    """Names (or NAME* prefixes) dropped from a policy's env.set and env.allow at this stage.
    The default lists the variables that change how programs load or what they execute
    (LD_*, PYTHONSTARTUP, PERL5OPT, BASH_ENV, ...); a ceiling that writes its own list
    replaces it."""

    _unique = field_validator("deny")(_no_duplicates)


class CeilingRules(Rules):
    """The most any agent may have at one stage of `policies/stages.yaml`."""

    user_namespace: bool = Field(default=False, strict=True)
    """Whether an agent may have a user namespace at this stage (false: it is dropped)."""

    env: EnvCeiling = Field(default_factory=EnvCeiling)
    """Environment variables no agent may set at this stage."""

    approval: ApprovalRules = Field(default_factory=ApprovalRules)
    """Approval triggers every agent has at this stage, on top of its policy's own."""

    exec: ExecRules = Field(default_factory=ExecRules)
    """The most an agent may execute at this stage."""

    filesystem: FilesystemRules = Field(default_factory=FilesystemRules)
    """The host paths an agent may see, and the most workspace access, at this stage."""

    network: Literal["none"] | NetworkCeiling = "none"
    """none (loopback only), or the egress destinations and limits a policy may have."""

    limits: Limits = Field(default_factory=Limits)
    """The highest limits an agent may have at this stage."""

    _network = field_validator("network", mode="before")(_network_value)


class StageRules(Rules):
    """What an agent may do at one stage, before the host ceiling is applied."""

    exec: ExecRules = Field(default_factory=ExecRules)
    """What the agent may execute."""

    filesystem: FilesystemRules = Field(default_factory=FilesystemRules)
    """Host paths (read-only) and the workspace mode."""

    network: Literal["none"] | NetworkRules = "none"
    """none (loopback only, the default), or {egress: [...], limits: {...}}: TCP or UDP to
    the destinations listed, through the daemon's resolver, proxy and UDP relay, each
    connection or flow recorded."""

    user_namespace: bool = Field(default=False, strict=True)
    """Run the worker in a user namespace (its root is not the host's root)."""

    env: EnvRules = Field(default_factory=EnvRules)
    """Environment variables set, allowed and logged."""

    limits: Limits = Field(default_factory=Limits)
    """Resource limits; each is lowered to the stage's ceiling."""
    approval: ApprovalRules = Field(default_factory=ApprovalRules)
    """Steps that wait for an approver before they run."""

    _network = field_validator("network", mode="before")(_network_value)

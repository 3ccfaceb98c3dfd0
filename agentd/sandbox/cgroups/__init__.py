"""The cgroup driver: one task cgroup per worker, for limits, accounting and a total kill.

Interface first, backends apart (containerd's cgroups1/cgroups2 split):

    probe()  ──▶ CgroupDriver ("v2" or "v1")      chosen once at start-up
                   │ create(task, limits)          one TaskCgroup per worker
                   ▼
                 TaskCgroup                        join_paths / add_pid → usage → kill → remove

Glossary: a *hierarchy* is one mounted cgroup tree (cgroup v2 has one; v1 has one per
controller or group of co-mounted controllers). agentd's *parent* is the cgroup under which
it creates task cgroups, in every hierarchy it uses; a *task cgroup* is `<parent>/<task id>`
(v1) or `<parent>/workers/<task id>` (v2). Paths of cgroups are written as the kernel shows
them in /proc/self/cgroup (`/system.slice/agentd.service`), directories as absolute host
paths (`/sys/fs/cgroup/system.slice/agentd.service`).

Backends (`v2.py`, `v1.py`):

- **v2**, the production target: a cgroup2 mount at `root` whose delegated cgroup offers the
  cpu, memory and pids controllers (systemd `Delegate=yes`).
- **v1**: the legacy per-controller hierarchies. On a *hybrid* host, where a cgroup2 mount
  beside them carries no controllers, the v1 backend also puts each task in a cgroup there,
  for the atomic `cgroup.kill` and the `populated` event; limits and accounting stay in v1.

Choosing at start-up by probing (rather than by configuration) means one package runs on
every host the project supports; `prefer` exists for tests and for operators who must pin
one. Probing has side effects on purpose: it creates agentd's parent cgroups (and, for v2,
moves the daemon into its leaf), so that a driver it returns is known to work.

Errors: a cgroup file the kernel refuses becomes `CgroupError` (an `Unavailable`: the host
cannot confine work right now) whose message names the file and the errno text; a bad name
or limit is `InvalidArgument`; creating a task cgroup that exists is `FailedPrecondition`.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from agentd.errors import FailedPrecondition, InvalidArgument, Unavailable
from agentd.sandbox.spec import Limits, ResourceUsage

__all__ = [
    "KILL_TIMEOUT",
    "CgroupDriver",
    "CgroupError",
    "CgroupLimits",
    "Hierarchy",
    "TaskCgroup",
    "find_hierarchies",
    "probe",
]

# How long kill() waits for a cgroup to become empty before it gives up with an error.
KILL_TIMEOUT = 5.0
# cgroup v1's and v2's CFS period; the quota is a share of it.
CPU_PERIOD_US = 100_000
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class CgroupError(Unavailable):
    """The kernel refused a cgroup operation; the message names the file. Fail the task and
    keep the daemon running: the host cannot confine work the way the policy asks."""


@dataclass(frozen=True)
class CgroupLimits:
    """The limits a task cgroup enforces; None leaves that resource unlimited."""

    memory_bytes: int | None = None  # hard limit, swap off, OOM kills the group where possible
    pids: int | None = None  # processes and threads together
    cpu: float | None = None  # cores, e.g. 0.5

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and self.memory_bytes < 1 << 20:
            raise InvalidArgument(f"memory limit {self.memory_bytes} is below 1 MiB")
        if self.pids is not None and self.pids < 1:
            raise InvalidArgument(f"pids limit {self.pids} must be at least 1")
        if self.cpu is not None and not (math.isfinite(self.cpu) and self.cpu > 0):
            raise InvalidArgument(f"cpu limit {self.cpu} must be a positive number of cores")

    @classmethod
    def from_limits(cls, limits: Limits) -> CgroupLimits:
        """The cgroup part of a worker's limits."""
        return cls(memory_bytes=limits.memory_bytes, pids=limits.pids, cpu=limits.cpu)

    def cpu_quota_us(self) -> int | None:
        """The CFS quota per CPU_PERIOD_US for `cpu` (the kernel's minimum is 1 ms)."""
        return None if self.cpu is None else max(1000, round(self.cpu * CPU_PERIOD_US))


class TaskCgroup(Protocol):
    """One worker's cgroup. Life: create → join_paths/add_pid → usage… → kill → remove.
    Methods may be called from any thread; kill() and remove() may be called repeatedly."""

    name: str

    def join_paths(self) -> list[str]:
        """Files a freshly forked child writes "0" into to join this cgroup (one cgroup.procs
        per hierarchy), before it unshares its cgroup namespace."""
        ...

    def add_pid(self, pid: int) -> None:
        """Moves process `pid` (all its threads) into this cgroup, from the parent's side."""
        ...

    def clone_into(self) -> str | None:
        """The directory a new process can be cloned straight into (clone3 with
        CLONE_INTO_CGROUP: no migration, no cgroup.procs write); None where one directory is
        not the whole cgroup (v1 and hybrid: one per hierarchy)."""
        ...

    def kill(self) -> None:
        """SIGKILLs every process in the cgroup and returns once it is empty (CgroupError if
        that takes longer than KILL_TIMEOUT). Nothing survives: not a setsid()'d grandchild,
        not a fork loop."""
        ...

    def populated(self) -> bool:
        """Whether any process is in the cgroup."""
        ...

    def usage(self) -> ResourceUsage:
        """What the cgroup has measured so far; call before remove()."""
        ...

    def remove(self) -> None:
        """kill(), then removes the cgroup from every hierarchy; idempotent."""
        ...


class CgroupDriver(Protocol):
    """Makes task cgroups under agentd's parent on one backend."""

    name: str  # "v2" or "v1"

    def create(self, name: str, limits: CgroupLimits) -> TaskCgroup:
        """A new task cgroup `name` with `limits`; FailedPrecondition if it exists."""
        ...

    def cleanup_stale(self) -> list[str]:
        """Kills and removes every task cgroup under agentd's parent (left by a crash);
        returns their names, sorted. Only call when no task of this daemon is running."""
        ...

    def describe(self) -> dict[str, str]:
        """Backend, parent directories and controllers, for the start-up log."""
        ...


# ---- file helpers shared by the backends ---------------------------------------------------


def read_text(path: str) -> str:
    """A cgroup file's content; CgroupError naming the file if the kernel refuses."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror or exc}") from exc


def write_text(path: str, value: str) -> None:
    """Writes `value` into a cgroup file in one write(2), as the kernel expects."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def read_keyed(path: str) -> dict[str, int]:
    """A flat-keyed file ("populated 1", "oom_kill 0", "max 3") as a dict."""
    out: dict[str, int] = {}
    for line in read_text(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def procs(directory: str) -> set[int]:
    """Pids in cgroup `directory` and its descendants; empty if it does not exist."""
    found: set[int] = set()
    try:
        with open(os.path.join(directory, "cgroup.procs")) as f:
            found.update(int(p) for p in f.read().split() if p != "0")
        children = [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return found
    except OSError as exc:
        raise CgroupError(f"cannot list processes of {directory}: {exc.strerror}") from exc
    for child in children:
        found |= procs(child)
    return found


def signal_all(pids: Iterable[int]) -> None:
    """SIGKILLs each pid; one that is already gone is fine."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until(done: Callable[[], bool], deadline: float) -> bool:
    """Polls `done` with a backoff from 1 ms to 20 ms until it holds or `deadline` passes."""
    delay = 0.001
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def make_task_dir(directory: str) -> None:
    """mkdir of a new task cgroup; FailedPrecondition if it exists."""
    try:
        os.mkdir(directory)
    except FileExistsError as exc:
        raise FailedPrecondition(f"task cgroup {directory} already exists") from exc
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {directory}: {exc.strerror}") from exc


def remove_tree(directory: str, deadline: float) -> None:
    """rmdir of a cgroup and any cgroups below it, bottom-up; a missing one is fine. EBUSY
    (a process still leaving) is retried until `deadline`."""
    try:
        children = [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for child in children:
        remove_tree(child, deadline)
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise CgroupError(f"cannot remove cgroup {directory}: {exc.strerror}") from exc
            time.sleep(0.005)


def check_task_name(name: str) -> None:
    """Task ids become directory names: one path component, no control-file look-alikes."""
    if not _TASK_NAME.fullmatch(name) or name.startswith("cgroup."):
        raise InvalidArgument(f"task cgroup name {name!r} must match {_TASK_NAME.pattern}")


# ---- where the hierarchies are --------------------------------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy, and where this process sits in it."""

    mount: str  # mount point, e.g. /sys/fs/cgroup/memory
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: from the mount options (with "name=…"); v2: empty here
    own: str | None  # this process's cgroup, relative to the mount; None if outside it

    def directory(self, cgroup: str) -> str:
        """The directory of cgroup path `cgroup` ("/a/b") in this hierarchy."""
        return self.mount + (cgroup if cgroup != "/" else "")

    def resolve_parent(self, parent: str | None, default: str) -> str:
        """`parent` as a cgroup path: absolute as given, relative to this process's cgroup
        (`own`) otherwise; `default` (relative; "" is `own` itself) when None."""
        wanted = default if parent is None else parent
        if not wanted.startswith("/"):
            if self.own is None:
                raise Unavailable(f"this process's cgroup is outside the mount {self.mount}: "
                                  f"give agentd's parent cgroup as an absolute path")
            wanted = self.own.rstrip("/") + "/" + wanted
        parts = [p for p in wanted.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InvalidArgument(f"cgroup parent {parent!r} must not contain '.' or '..'")
        return "/" + "/".join(parts)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_hierarchies(root: str = "/sys/fs/cgroup", *, pid: str = "self") -> list[Hierarchy]:
    """The cgroup and cgroup2 mounts at or below `root`, from /proc/<pid>/mountinfo, with
    `pid`'s cgroup in each from /proc/<pid>/cgroup. First mount of a hierarchy wins."""
    root = os.path.normpath(root)
    with open(f"/proc/{pid}/cgroup") as f:
        membership = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    try:
        with open("/proc/cgroups") as f:
            known = {line.split()[0] for line in f if line.strip() and not line.startswith("#")}
    except FileNotFoundError:  # a kernel built without cgroup v1 support
        known = set()
    found: list[Hierarchy] = []
    seen: set[tuple[int, frozenset[str]]] = set()
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            mount_root, point = _unescape(fields[3]), _unescape(fields[4])
            if fstype not in ("cgroup", "cgroup2") or not (
                    point == root or point.startswith(root.rstrip("/") + "/")):
                continue
            version = 2 if fstype == "cgroup2" else 1
            controllers = frozenset(o for o in options if o in known or o.startswith("name="))
            if (version, controllers) in seen:
                continue
            seen.add((version, controllers))
            own = None
            for _, listed, path in membership:
                if (version == 2 and listed == "") or (
                        version == 1 and listed and frozenset(listed.split(",")) == controllers):
                    own = path
            if own is not None and mount_root != "/":
                inside = own == mount_root or own.startswith(mount_root + "/")
                own = (own[len(mount_root):] or "/") if inside else None
            found.append(Hierarchy(point, version, controllers, own))
    return found


def probe(*, root: str = "/sys/fs/cgroup", parent: str | None = None,
          prefer: str | None = None) -> CgroupDriver:
    """The best usable backend under `root`: v2, else v1 with the hybrid cgroup2 mount, else
    pure v1. `parent` is agentd's parent cgroup in every hierarchy (absolute, or relative to
    this process's cgroup; default "agentd" for v1, the delegated cgroup itself for v2).
    `prefer` is "v2", "hybrid" (v1 limits, cgroup2 kill) or "v1" (the cgroup2 mount ignored)
    and makes any other backend an error. Raises Unavailable naming what is missing."""
    from agentd.sandbox.cgroups import v1, v2

    if prefer not in (None, "v2", "hybrid", "v1"):
        raise InvalidArgument(f"unknown cgroup backend {prefer!r}: use 'v2', 'hybrid' or 'v1'")
    if not os.path.isdir(root):
        raise Unavailable(f"no cgroup filesystem: {root} is not a directory")
    hierarchies = find_hierarchies(root)
    openers: list[tuple[str, Callable[[], CgroupDriver]]] = [
        ("v2", lambda: v2.V2Driver.open(hierarchies, root=root, parent=parent)),
        ("hybrid", lambda: v1.V1Driver.open(hierarchies, parent=parent, unified=True)),
        ("v1", lambda: v1.V1Driver.open(hierarchies, parent=parent, unified=False)),
    ]
    problems: list[str] = []
    for backend, opener in openers:
        if prefer not in (None, backend):
            continue
        try:
            return opener()
        except Unavailable as exc:
            if prefer is not None:
                raise
            problems.append(f"{backend}: {exc}")
    raise Unavailable(f"no usable cgroup backend under {root}: " + "; ".join(problems))

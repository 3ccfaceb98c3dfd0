"""cgroup v2 backend: the production target, agentd under systemd with `Delegate=yes`.

Layout, for the default parent (the delegated cgroup, e.g. the unit's own cgroup):

    /system.slice/agentd.service            delegated to agentd; subtree_control: +cpu +memory …
    ├── daemon                              the daemon (and launcher) processes, moved here
    └── workers                             subtree_control: +cpu +memory +pids (+io)
        └── t-3f2a…                         one task cgroup per worker: limits, kill, stats

Why the leaf move: v2's no-internal-processes rule lets a non-root cgroup either hold
processes or distribute controllers to children, never both. systemd starts the daemon *in*
the delegated cgroup, so before agentd can enable controllers in its `cgroup.subtree_control`
it moves every process of that cgroup into the `daemon` leaf (children forked later are born
there). The alternatives are worse: enabling nothing and putting tasks beside the daemon
gives no limits; asking systemd for a sub-unit per task (transient scopes over D-Bus) costs
a round trip per spawn and a dependency on the bus. `workers/` keeps agentd's own cgroups
(daemon, anything added later) apart from task cgroups, so cleanup_stale() removes every
child of `workers/` without having to recognise names. A driver opened by a process already
in `<delegated>/daemon` (a restart of the driver) treats `<delegated>` as the delegated cgroup.

A `parent` given explicitly replaces the delegated cgroup as the place of `workers/`; when it
lies below the delegated cgroup, the controllers are enabled on the way down (moving the
delegated cgroup's processes to its `daemon` leaf if needed). Only controllers that are missing are
ever written, so a parent prepared by an operator is left as it is.

Kill is `cgroup.kill` (kernel ≥ 5.14): one write, atomic with respect to fork, recursive.
On older kernels: freeze (`cgroup.freeze`; unlike v1, a frozen v2 task dies of SIGKILL at
once, measured on 6.18), signal every pid, thaw, repeat until `populated 0`. A task gets
`memory.oom.group=1`, so an OOM kill takes the whole task rather than one process,
`memory.swap.max=0` with a memory limit, and `cpu.max` "<quota> 100000". Peak memory is
`memory.peak` (kernel ≥ 5.19), else the highest `memory.current` seen by usage() and kill().
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from collections.abc import Iterable, Sequence

from agentd.errors import FailedPrecondition, Unavailable
from agentd.sandbox.cgroups import (
    CPU_PERIOD_US,
    KILL_TIMEOUT,
    CgroupError,
    CgroupLimits,
    Hierarchy,
    check_task_name,
    make_task_dir,
    procs,
    read_keyed,
    read_text,
    remove_tree,
    signal_all,
    wait_until,
    write_text,
)
from agentd.sandbox.spec import ResourceUsage

REQUIRED = frozenset({"cpu", "memory", "pids"})
OPTIONAL = frozenset({"io"})
DAEMON_LEAF = "daemon"
WORKERS = "workers"
_FREEZE_WAIT = 0.5


class V2Task:
    """One task cgroup in the cgroup2 hierarchy: `<parent>/workers/<name>`."""

    def __init__(self, name: str, directory: str, *, has_kill: bool) -> None:
        self.name = name
        self.directory = directory
        self._has_kill = has_kill
        self._peak_seen = 0  # highest memory.current sampled, where memory.peak is missing

    def join_paths(self) -> list[str]:
        return [os.path.join(self.directory, "cgroup.procs")]

    def add_pid(self, pid: int) -> None:
        write_text(os.path.join(self.directory, "cgroup.procs"), str(pid))

    def clone_into(self) -> str | None:
        return self.directory

    def populated(self) -> bool:
        if not os.path.isdir(self.directory):
            return False
        return read_keyed(os.path.join(self.directory, "cgroup.events")).get("populated", 0) > 0

    def _sample_memory(self) -> None:
        current = os.path.join(self.directory, "memory.current")
        if os.path.exists(current):
            self._peak_seen = max(self._peak_seen, int(read_text(current)))

    def _freeze_and_kill(self, deadline: float) -> None:
        """Fallback without cgroup.kill: freeze, SIGKILL every pid, thaw (always)."""
        write_text(os.path.join(self.directory, "cgroup.freeze"), "1")
        try:
            events = os.path.join(self.directory, "cgroup.events")
            wait_until(lambda: read_keyed(events).get("frozen") == 1,
                       min(deadline, time.monotonic() + _FREEZE_WAIT))
            signal_all(procs(self.directory))
        finally:
            write_text(os.path.join(self.directory, "cgroup.freeze"), "0")

    def kill(self) -> None:
        if not os.path.isdir(self.directory):
            return
        self._sample_memory()
        deadline = time.monotonic() + KILL_TIMEOUT
        while self.populated():
            if time.monotonic() >= deadline:
                raise CgroupError(f"task cgroup {self.directory} still has processes "
                                  f"{sorted(procs(self.directory))} {KILL_TIMEOUT:.0f} s "
                                  f"after SIGKILL")
            if self._has_kill:
                write_text(os.path.join(self.directory, "cgroup.kill"), "1")
            else:
                self._freeze_and_kill(deadline)
            wait_until(lambda: not self.populated(), min(deadline, time.monotonic() + 0.25))

    def usage(self) -> ResourceUsage:
        def path(name: str) -> str:
            return os.path.join(self.directory, name)

        self._sample_memory()
        peak = (int(read_text(path("memory.peak"))) if os.path.exists(path("memory.peak"))
                else self._peak_seen)
        memory_events = read_keyed(path("memory.events")) if os.path.exists(
            path("memory.events")) else {}
        pids_events = read_keyed(path("pids.events")) if os.path.exists(
            path("pids.events")) else {}
        return ResourceUsage(
            cpu_seconds=read_keyed(path("cpu.stat")).get("usage_usec", 0) / 1e6,
            peak_memory_bytes=peak,
            oom_killed=memory_events.get("oom_kill", 0) > 0,
            pids_limit_hit=pids_events.get("max", 0) > 0,
        )

    def remove(self) -> None:
        self.kill()
        remove_tree(self.directory, time.monotonic() + KILL_TIMEOUT)

    def __repr__(self) -> str:
        return f"V2Task({self.name!r}, {self.directory!r})"


class V2Driver:
    """Task cgroups under `<parent>/workers` in a cgroup2 hierarchy with controllers."""

    name = "v2"

    def __init__(self, mount: str, parent: str, daemon_leaf: str | None,
                 controllers: frozenset[str], *, has_kill: bool) -> None:
        self._mount = mount
        self._parent = parent  # directory of agentd's parent cgroup
        self._workers = os.path.join(parent, WORKERS)
        self._daemon_leaf = daemon_leaf  # where the daemon's processes were moved, if they were
        self._controllers = controllers  # enabled for task cgroups
        self._has_kill = has_kill

    @classmethod
    def open(cls, hierarchies: Sequence[Hierarchy], *, root: str, parent: str | None,
             required: Iterable[str] = REQUIRED, cgroup_kill: bool = True) -> V2Driver:
        """Sets up the layout above on the cgroup2 mount at `root`; Unavailable naming the
        file and the controllers that are missing. `required` and `cgroup_kill=False` (the
        freezer path of kernels before 5.14) are for tests."""
        need = frozenset(required)
        h = next((h for h in hierarchies
                  if h.version == 2 and h.mount == os.path.normpath(root)), None)
        if h is None:
            raise Unavailable(f"{root} is not a cgroup2 mount")
        own = h.own
        delegated = own
        if own is not None and os.path.basename(own) == DAEMON_LEAF:
            delegated = os.path.dirname(own)  # a driver reopened from inside our own leaf
        base = dataclasses.replace(h, own=delegated).resolve_parent(parent, "")
        if delegated is not None and _below(base, delegated):
            top = delegated
        else:
            top = base
            while not os.path.isdir(h.directory(top)):
                top = os.path.dirname(top)
        available = frozenset(read_text(os.path.join(h.directory(top), "cgroup.controllers"))
                              .split())
        if missing := need - available:
            raise Unavailable(
                f"cgroup v2 controllers {', '.join(sorted(missing))} are not available in "
                f"{h.directory(top)}/cgroup.controllers; run agentd under systemd with "
                f"Delegate=yes (or give a parent cgroup that has them)")
        enable = (need | OPTIONAL) & available
        chain = [top]
        for part in os.path.relpath(base, top).split("/"):
            if part != ".":
                chain.append(os.path.join(chain[-1], part))
        chain.append(os.path.join(base, WORKERS))
        leaf = None
        for cgroup in chain:
            directory = h.directory(cgroup)
            _mkdir(directory)
            moved = _enable(directory, enable, own=cgroup == delegated)
            leaf = moved or leaf
        workers = h.directory(os.path.join(base, WORKERS))
        has_kill = cgroup_kill and os.path.exists(os.path.join(workers, "cgroup.kill"))
        return cls(h.mount, h.directory(base), leaf, enable, has_kill=has_kill)

    def _task(self, name: str) -> V2Task:
        return V2Task(name, os.path.join(self._workers, name), has_kill=self._has_kill)

    def create(self, name: str, limits: CgroupLimits) -> V2Task:
        check_task_name(name)
        task = self._task(name)
        if os.path.exists(task.directory):
            raise FailedPrecondition(f"task cgroup {name} already exists: {task.directory}")
        make_task_dir(task.directory)
        try:
            _apply(task.directory, limits)
        except BaseException:
            remove_tree(task.directory, time.monotonic() + 1.0)
            raise
        return task

    def cleanup_stale(self) -> list[str]:
        try:
            names = sorted(e.name for e in os.scandir(self._workers)
                           if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        for name in names:
            self._task(name).remove()
        return names

    def describe(self) -> dict[str, str]:
        return {"backend": "v2", "mount": self._mount, "parent": self._parent,
                "parent.workers": self._workers, "daemon_leaf": self._daemon_leaf or "",
                "controllers": ",".join(sorted(self._controllers)),
                "kill": "cgroup.kill" if self._has_kill else "freezer"}


def _below(path: str, ancestor: str) -> bool:
    return ancestor in ("/", path) or path.startswith(ancestor + "/")


def _mkdir(directory: str) -> None:
    try:
        os.mkdir(directory)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {directory}: {exc.strerror}") from exc


def _enable(directory: str, controllers: frozenset[str], *, own: bool) -> str | None:
    """Enables the missing `controllers` for the children of `directory`. When the kernel
    refuses because the cgroup holds processes (EBUSY) and it is this process's delegated
    cgroup, they move to its daemon leaf and the write is retried; returns that leaf if so."""
    control = os.path.join(directory, "cgroup.subtree_control")
    leaf = None
    for _ in range(5):
        todo = controllers - frozenset(read_text(control).split())
        if not todo:
            return leaf
        try:
            fd = os.open(control, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, " ".join(f"+{c}" for c in sorted(todo)).encode())
            finally:
                os.close(fd)
            continue
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise CgroupError(f"cannot enable {', '.join(sorted(todo))} in {control}: "
                                  f"{exc.strerror}") from exc
        if not own:
            raise Unavailable(f"{directory} holds processes that are not agentd's, so it "
                              f"cannot pass controllers to its children (no internal processes)")
        leaf = os.path.join(directory, DAEMON_LEAF)
        _mkdir(leaf)
        _move(read_text(os.path.join(directory, "cgroup.procs")).split(),
              os.path.join(leaf, "cgroup.procs"))
    raise CgroupError(f"cannot enable controllers in {control}: processes keep arriving")


def _move(pids: list[str], procs_file: str) -> None:
    """Writes each pid into `procs_file`; a process that exited meanwhile is skipped."""
    for pid in pids:
        try:
            fd = os.open(procs_file, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, pid.encode())
            finally:
                os.close(fd)
        except ProcessLookupError:
            continue
        except OSError as exc:
            raise CgroupError(f"cannot move process {pid} into {procs_file}: "
                              f"{exc.strerror}") from exc


def _apply(directory: str, limits: CgroupLimits) -> None:
    """Writes the limits; a limit whose controller is not enabled is an error, not a no-op."""
    def write(name: str, value: str, *, optional: bool = False) -> None:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            write_text(path, value)
        elif not optional:
            controller = name.partition(".")[0]
            raise CgroupError(f"cannot enforce the limit: {path} does not exist (controller "
                              f"{controller} not enabled in {os.path.dirname(directory)})")

    write("memory.oom.group", "1", optional=True)
    if limits.memory_bytes is not None:
        write("memory.max", str(limits.memory_bytes))
        write("memory.swap.max", "0", optional=True)
    if limits.pids is not None:
        write("pids.max", str(limits.pids))
    if (quota := limits.cpu_quota_us()) is not None:
        write("cpu.max", f"{quota} {CPU_PERIOD_US}")

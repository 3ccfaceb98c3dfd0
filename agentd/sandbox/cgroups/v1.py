"""cgroup v1 backend, with the hybrid host's controller-less cgroup2 mount when there is one.

Layout: in each hierarchy agentd uses (memory, pids, cpu, cpuacct, freezer; co-mounted
controllers share one), task `t` lives at `<parent>/t`, where `<parent>` defaults to
`<this process's cgroup in that hierarchy>/agentd`. v1 has no no-internal-processes rule,
so the daemon stays where it is. On a hybrid host the task also gets `<parent>/t` in the
cgroup2 mount (usually /sys/fs/cgroup/unified): no limits there, only membership.

Killing a whole cgroup is the hard part, because v1 has no atomic "kill everything":

- Reading cgroup.procs and signalling each pid races with fork(): a process that forks in a
  loop, or forks and exits so its pid keeps changing, can always produce a child the list
  missed. Repeating until empty usually wins, but "usually" is not the promise.
- The freezer closes the race: with the cgroup FROZEN no task runs, so none can fork; every
  pid read then is final. SIGKILL is queued to each, then THAWED lets them run straight into
  their deaths (a frozen v1 task does not die until thawed: measured on 6.18). Any process
  that was half-way through joining is caught by the next round.
- On a hybrid host the cgroup2 `cgroup.kill` (kernel ≥ 5.14) does the same in the kernel,
  atomically with respect to fork, in one write; the freezer round is then only the
  fallback for a process that is in a v1 cgroup but not (yet) in the cgroup2 one.

Either way kill() returns only when no hierarchy lists a process, or fails after
KILL_TIMEOUT with the pids that remain (a task stuck in uninterruptible sleep, say).

Accounting comes from v1's own files: cpuacct.usage (ns), memory.max_usage_in_bytes, the
`oom_kill` line of memory.oom_control and the `max` line of pids.events. Swap is kept out of
a memory limit by setting memory.memsw.limit_in_bytes to the same value (when swap
accounting exists) and memory.swappiness to 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

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

REQUIRED = ("memory", "pids", "cpu", "cpuacct")
# How long one freezer round waits for FREEZING to become FROZEN before it signals anyway
# (a task in uninterruptible sleep can hold a cgroup in FREEZING).
_FREEZE_WAIT = 0.5


class V1Task:
    """A task cgroup in every v1 hierarchy agentd uses (and in the cgroup2 mount if hybrid)."""

    def __init__(self, name: str, dirs: dict[str, str], unified: str | None) -> None:
        self.name = name
        self.dirs = dirs  # controller → directory (co-mounted controllers share one)
        self.unified = unified  # directory in the cgroup2 mount, if hybrid

    def directories(self) -> list[str]:
        """Every directory of this task cgroup, one per hierarchy."""
        unique = list(dict.fromkeys(self.dirs.values()))
        return unique + ([self.unified] if self.unified else [])

    def join_paths(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.directories()]

    def add_pid(self, pid: int) -> None:
        for path in self.join_paths():
            write_text(path, str(pid))

    def clone_into(self) -> str | None:
        return None  # one directory per hierarchy: joined by cgroup.procs writes

    def _pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.directories():
            found |= procs(directory)
        return found

    def populated(self) -> bool:
        if self.unified and os.path.isdir(self.unified) and read_keyed(
                os.path.join(self.unified, "cgroup.events")).get("populated"):
            return True
        return bool(self._pids())

    def _freeze_and_kill(self, freezer: str, deadline: float) -> None:
        """One freezer round: FROZEN, SIGKILL every pid, THAWED (always, even on error)."""
        state = os.path.join(freezer, "freezer.state")
        write_text(state, "FROZEN")
        try:
            wait_until(lambda: read_text(state).strip() == "FROZEN",
                       min(deadline, time.monotonic() + _FREEZE_WAIT))
            signal_all(self._pids())
        finally:
            write_text(state, "THAWED")

    def kill(self) -> None:
        deadline = time.monotonic() + KILL_TIMEOUT
        freezer = self.dirs.get("freezer")
        first = True
        while True:
            pids = self._pids()
            if not pids:
                return
            if time.monotonic() >= deadline:
                raise CgroupError(f"task cgroup {self.name} still has processes "
                                  f"{sorted(pids)} {KILL_TIMEOUT:.0f} s after SIGKILL")
            use_kill = self.unified is not None and os.path.isdir(self.unified)
            if use_kill:
                write_text(os.path.join(self.unified or "", "cgroup.kill"), "1")
            if freezer is not None and os.path.isdir(freezer) and not (use_kill and first):
                self._freeze_and_kill(freezer, deadline)
            elif not use_kill:
                signal_all(pids)
            first = False
            wait_until(lambda: not self._pids(), min(deadline, time.monotonic() + 0.25))

    def usage(self) -> ResourceUsage:
        memory, pids, cpuacct = self.dirs["memory"], self.dirs["pids"], self.dirs["cpuacct"]
        return ResourceUsage(
            cpu_seconds=int(read_text(os.path.join(cpuacct, "cpuacct.usage"))) / 1e9,
            peak_memory_bytes=int(read_text(os.path.join(memory, "memory.max_usage_in_bytes"))),
            oom_killed=read_keyed(os.path.join(memory, "memory.oom_control")).get(
                "oom_kill", 0) > 0,
            pids_limit_hit=read_keyed(os.path.join(pids, "pids.events")).get("max", 0) > 0,
        )

    def remove(self) -> None:
        self.kill()
        deadline = time.monotonic() + KILL_TIMEOUT
        for directory in self.directories():
            remove_tree(directory, deadline)

    def __repr__(self) -> str:
        return f"V1Task({self.name!r}, {self.directories()})"


class V1Driver:
    """Task cgroups in the v1 hierarchies, plus the cgroup2 mount for kill on hybrid hosts."""

    name = "v1"

    def __init__(self, parents: dict[str, str], unified: str | None) -> None:
        self._parents = parents  # controller → agentd's parent directory in its hierarchy
        self._unified = unified  # agentd's parent directory in the cgroup2 mount, if hybrid

    @classmethod
    def open(cls, hierarchies: Sequence[Hierarchy], *, parent: str | None,
             unified: bool) -> V1Driver:
        """Finds the hierarchies and creates agentd's parent in each; Unavailable naming what
        is missing (freezer is needed unless the cgroup2 mount provides cgroup.kill)."""
        parents: dict[str, str] = {}
        for h in hierarchies:
            for controller in sorted(h.controllers & {*REQUIRED, "freezer"}):
                if h.version == 1 and controller not in parents:
                    parents[controller] = h.directory(h.resolve_parent(parent, "agentd"))
        missing = [c for c in (*REQUIRED, *(() if unified else ("freezer",)))
                   if c not in parents]
        if missing:
            raise Unavailable(f"cgroup v1 controllers not mounted: {', '.join(missing)}")
        v2 = [h for h in hierarchies if h.version == 2]
        if unified and not v2:
            raise Unavailable("no cgroup2 mount beside the v1 hierarchies (not a hybrid host)")
        unified_dir = v2[0].directory(v2[0].resolve_parent(parent, "agentd")) if unified else None
        created: list[str] = []
        usable = False
        try:
            for directory in [*parents.values(), *([unified_dir] if unified_dir else [])]:
                _makedirs(directory, created)
            usable = unified_dir is None or os.path.exists(os.path.join(unified_dir, "cgroup.kill"))
        finally:
            if not usable:  # undo a half-made or unusable layout
                for directory in reversed(created):
                    remove_tree(directory, time.monotonic())
        if not usable:
            raise Unavailable(f"{unified_dir} has no cgroup.kill (kernel older than 5.14)")
        return cls(parents, unified_dir)

    def _task(self, name: str) -> V1Task:
        return V1Task(name, {c: os.path.join(d, name) for c, d in self._parents.items()},
                      os.path.join(self._unified, name) if self._unified else None)

    def create(self, name: str, limits: CgroupLimits) -> V1Task:
        check_task_name(name)
        task = self._task(name)
        if existing := [d for d in task.directories() if os.path.exists(d)]:
            raise FailedPrecondition(f"task cgroup {name} already exists: {existing[0]}")
        made: list[str] = []
        try:
            for directory in task.directories():
                make_task_dir(directory)
                made.append(directory)
            _apply(task, limits)
        except BaseException:
            for directory in reversed(made):
                remove_tree(directory, time.monotonic() + 1.0)
            raise
        return task

    def cleanup_stale(self) -> list[str]:
        names: set[str] = set()
        for directory in {*self._parents.values(), *([self._unified] if self._unified else [])}:
            try:
                names.update(e.name for e in os.scandir(directory)
                             if e.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                continue
        for name in sorted(names):
            self._task(name).remove()
        return sorted(names)

    def describe(self) -> dict[str, str]:
        info = {"backend": "hybrid" if self._unified else "v1",
                "kill": "cgroup.kill, freezer fallback" if self._unified else "freezer",
                "controllers": ",".join(sorted(self._parents))}
        info.update({f"parent.{c}": d for c, d in sorted(self._parents.items())})
        if self._unified:
            info["parent.unified"] = self._unified
        return info


def _makedirs(directory: str, created: list[str]) -> None:
    """mkdir -p that records what it made, so a failed open() can undo it."""
    if os.path.isdir(directory):
        return
    _makedirs(os.path.dirname(directory), created)
    try:
        os.mkdir(directory)
        created.append(directory)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {directory}: {exc.strerror}") from exc


def _apply(task: V1Task, limits: CgroupLimits) -> None:
    """Writes the limits into a fresh task cgroup (memsw after the memory limit: it must
    never be below it)."""
    if limits.memory_bytes is not None:
        memory = task.dirs["memory"]
        write_text(os.path.join(memory, "memory.limit_in_bytes"), str(limits.memory_bytes))
        memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
            write_text(memsw, str(limits.memory_bytes))
        write_text(os.path.join(memory, "memory.swappiness"), "0")
    if limits.pids is not None:
        write_text(os.path.join(task.dirs["pids"], "pids.max"), str(limits.pids))
    if (quota := limits.cpu_quota_us()) is not None:
        cpu = task.dirs["cpu"]
        write_text(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
        write_text(os.path.join(cpu, "cpu.cfs_quota_us"), str(quota))

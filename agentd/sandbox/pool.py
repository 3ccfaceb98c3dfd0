"""The warm pool: workers prebuilt per shape, so a call does not wait for clone and mounts.

A worker's set-up is mostly independent of the call: its namespaces, its root (the policy's
read-only grants, the executable binds, /proc, /dev, /tmp), its cgroup with the policy's
limits. That part is its *shape* (`spec.shape_of`: everything but argv, env, cwd, the
workspace's layers and upper, and the limits applied at exec). The launcher builds
`size` workers of each shape in use ahead of time (`contain.prebuilt`), each in its own
cgroup, and parks them on a control socket. A call of that shape takes one: the daemon builds
the run's workspace as a detached overlay mount (`mounts.open_workspace`, the same mount a cold
worker makes itself) and the launcher hands the worker the spec, the tool's fds and that
mount; the worker attaches it, sets the call's rlimits, drops every privilege, applies
Landlock and seccomp exactly as a cold worker does, and execs.

What holds:
- A prebuilt worker serves one call, then it is gone (it execs the tool): never reused.
- It serves only a spec of its own shape, checked by the launcher and again by the worker;
  shapes are digests of policy-derived fields, so it is never shared across policies or
  approvals, and it is taken by one call of one run.
- Nothing of the tool runs before the call: until then the worker only waits on its socket.
- Shapes are learnt from calls (the first call of a shape is served cold) and kept for the
  `max_shapes` most recently used; a shape whose workers keep failing to build is dropped.
- User-namespace workers and kernels before 6.8 (no `lowerdir+`, so no detached overlay) are
  always built cold.
- The pool refills in the background once the calls that took from it are done (none
  still running); a launcher restart empties it.

Cost: each prebuilt worker is a clone of the launcher (a Python process, mostly shared
copy-on-write pages) plus its root's mounts; `make bench` measures it (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import structlog

from agentd import metrics
from agentd.sandbox import overlay
from agentd.sandbox.cgroups import CgroupDriver, CgroupLimits, TaskCgroup
from agentd.sandbox.launcher_client import LauncherClient
from agentd.sandbox.spec import WorkerSpec, shape_of

log = structlog.get_logger("agentd.pool")

# Consecutive prebuilds of one shape that died before "ready" after which the shape is dropped.
MAX_FAILURES = 3


@dataclass(frozen=True)
class Prebuilt:
    """A taken worker: its slot in the launcher and its cgroup (the call's from now on)."""

    slot: int
    cgroup: TaskCgroup


@dataclass
class _Entry:
    slot: int
    shape: str
    cgroup: TaskCgroup
    ready: bool = False


class WarmPool:
    """The daemon's side of the pool; every method runs on the event loop."""

    def __init__(self, launcher: LauncherClient, cgroups: CgroupDriver, *, size: int,
                 max_shapes: int = 8) -> None:
        self.size = size
        self.max_shapes = max_shapes
        self._launcher = launcher
        self._cgroups = cgroups
        self._entries: dict[int, _Entry] = {}
        self._ready: dict[str, collections.deque[int]] = {}
        self._shapes: collections.OrderedDict[str, WorkerSpec] = collections.OrderedDict()
        self._failures: dict[str, int] = {}
        self._slots = itertools.count(1)
        self._refilling: set[str] = set()
        self._taken = 0  # prebuilt workers taken whose calls' workers have not exited yet
        self._owed: set[str] = set()  # shapes to refill once none is
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        launcher.on_pool_event = self._on_event
        launcher.on_pool_reset = self._on_reset

    @property
    def depth(self) -> int:
        """Prebuilt workers ready to be taken now."""
        return sum(len(q) for q in self._ready.values())

    @property
    def capacity(self) -> int:
        """How many workers the pool aims to hold for the shapes it keeps."""
        return self.size * len(self._shapes)

    def serves(self, spec: WorkerSpec) -> bool:
        # An egress worker joins a slot made for its call: never prebuilt.
        return (self.size > 0 and not spec.user_namespace and not spec.nameserver
                and overlay.DETACHED)

    def take(self, spec: WorkerSpec) -> Prebuilt | None:
        """A ready worker of `spec`'s shape, or None (then the call is built cold, and the
        shape, remembered, is filled in the background at once). A taken worker is replaced
        when its call's worker has exited (`refill`): building one costs a few ms of CPU,
        which would otherwise compete with the very call that took it."""
        if self._closed or not self.serves(spec):
            return None
        shape = shape_of(spec)
        self._remember(shape, spec)
        taken = None
        queue = self._ready.get(shape)
        while queue and taken is None:
            entry = self._entries.pop(queue.popleft(), None)
            if entry is not None:
                taken = Prebuilt(entry.slot, entry.cgroup)
        if taken is None:
            self._refill(shape)
        else:
            self._taken += 1
        self._publish()
        return taken

    def refill(self, spec: WorkerSpec) -> None:
        """The call that took a worker of `spec`'s shape is done with it: its successor is
        built once no taken worker is still running (the launcher's one loop also answers
        running workers' execs; a 16-task step would otherwise wait behind 16 clones)."""
        self._taken = max(0, self._taken - 1)
        if not self._closed and self.serves(spec):
            self._owed.add(shape_of(spec))
        if self._taken == 0:
            owed, self._owed = self._owed, set()
            for shape in owed:
                self._refill(shape)

    def _remember(self, shape: str, spec: WorkerSpec) -> None:
        if shape in self._shapes:
            self._shapes.move_to_end(shape)
            return
        if self._failures.get(shape, 0) >= MAX_FAILURES:
            return
        # What a prebuilt worker is built from: the call's own fields are not its business.
        self._shapes[shape] = dataclasses.replace(spec, task_id="prebuilt", argv=("-",),
                                                  env={}, cwd="/")
        while len(self._shapes) > self.max_shapes:
            old, _ = self._shapes.popitem(last=False)
            self._drop_shape(old)

    def _drop_shape(self, shape: str) -> None:
        self._ready.pop(shape, None)
        for entry in [e for e in self._entries.values() if e.shape == shape]:
            self._launcher.discard(entry.slot)  # its "pool_exited" removes the cgroup

    def _refill(self, shape: str) -> None:
        if shape in self._refilling or shape not in self._shapes or self._closed:
            return
        self._refilling.add(shape)
        self._spawn(self._fill(shape))

    async def _fill(self, shape: str) -> None:
        try:
            while not self._closed and shape in self._shapes:
                have = sum(1 for e in self._entries.values() if e.shape == shape)
                if have >= self.size:
                    return
                template = self._shapes[shape]
                slot = next(self._slots)
                cgroup = await asyncio.to_thread(
                    self._cgroups.create, f"prebuilt-{slot}",
                    CgroupLimits.from_limits(template.limits))
                self._entries[slot] = _Entry(slot, shape, cgroup)
                try:
                    self._launcher.prebuild(slot, template, cgroup.join_paths())
                except OSError as exc:
                    log.warning("pool.prebuild_failed", error=str(exc))
                    self._forget(slot)
                    return
        except Exception as exc:  # a pool that cannot fill serves cold; never fails a call
            log.warning("pool.fill_failed", error=str(exc))
        finally:
            self._refilling.discard(shape)

    def _on_event(self, op: str, slot: int, message: dict[str, Any]) -> None:
        entry = self._entries.get(slot)
        if entry is None:
            return  # taken (its exit is the call's), or forgotten already
        if op == "ready":
            entry.ready = True
            self._failures.pop(entry.shape, None)
            self._ready.setdefault(entry.shape, collections.deque()).append(slot)
        else:  # pool_exited: discarded, or it could not be built
            self._forget(slot)
            if message.get("action"):
                failures = self._failures.get(entry.shape, 0) + 1
                self._failures[entry.shape] = failures
                log.warning("pool.prebuild_died", slot=slot, action=message.get("action"),
                            errno=message.get("errno"), message=message.get("message"),
                            failures=failures)
                if failures >= MAX_FAILURES:
                    log.error("pool.shape_dropped", failures=failures,
                              reason="its workers keep failing to build; calls of it are "
                                     "built cold")
                    self._shapes.pop(entry.shape, None)
                    self._drop_shape(entry.shape)
                else:
                    self._refill(entry.shape)
        self._publish()

    def _forget(self, slot: int) -> None:
        entry = self._entries.pop(slot, None)
        if entry is None:
            return
        queue = self._ready.get(entry.shape)
        if queue is not None and slot in queue:
            queue.remove(slot)
        self._spawn(asyncio.to_thread(entry.cgroup.remove))

    def _on_reset(self) -> None:
        """The launcher was replaced: every prebuilt worker died with the old one."""
        for slot in list(self._entries):
            self._forget(slot)
        self._ready.clear()
        self._publish()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _publish(self) -> None:
        metrics.WARM_POOL_DEPTH.set(self.depth)

    async def close(self) -> None:
        """After the launcher stopped (its workers are dead): removes the pool's cgroups."""
        self._closed = True
        for slot in list(self._entries):
            self._forget(slot)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

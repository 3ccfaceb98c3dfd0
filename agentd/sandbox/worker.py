"""One worker's life as the daemon sees it: cgroup, spawn, output, limits, kill, cleanup.

A worker is stopped by killing its whole cgroup (never by signalling a pid): on timeout, on
output overrun, on a pids or memory limit, on cancel and on shutdown. Whatever happens, the
cgroup is removed before `run()` returns, so a finished task leaves no process, cgroup or
mount behind (its mounts lived in its mount namespace, gone with its last process).

stdout and stderr are two pipes read by the event loop; chunks are delivered in the order
the daemon reads them, which keeps each stream's own order exactly and the interleaving of
the two as close to production order as two pipes allow. At most QUEUE_BYTES wait for the
consumer: past that the daemon stops reading the pipes until the consumer drains the queue,
so a tool whose caller is slow blocks in write(2) (backpressure to the pipe) and daemon
memory stays bounded per worker however many callers stop reading.

Wall time is the daemon's to enforce: the timer kills the cgroup, and if the launcher does
not report the exit within REAP_GRACE (a stopped or stuck launcher), an empty cgroup is taken
as the truth and the worker completes as killed; a late report is then ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from agentd import metrics
from agentd.sandbox import mounts
from agentd.sandbox.cgroups import CgroupDriver, CgroupLimits, TaskCgroup
from agentd.sandbox.launcher_client import LauncherClient, SetupError, Spawned
from agentd.sandbox.pool import Prebuilt, WarmPool
from agentd.sandbox.spec import ResourceUsage, SetupFailure, WorkerSpec


def workspace_full(path: str) -> bool:
    """Whether the filesystem holding `path` has no block or no inode left."""
    st = os.statvfs(path)
    return st.f_bavail == 0 or st.f_favail == 0

log = structlog.get_logger("agentd.worker")

STDOUT, STDERR = "stdout", "stderr"
# How often a running worker's cgroup is checked for an OOM kill or a refused fork.
LIMIT_POLL_SECONDS = 0.05
# Output bytes read from the pipes but not yet taken by the consumer, before reading pauses.
QUEUE_BYTES = 512 * 1024
# How long after its cgroup was killed a worker waits for the launcher's exit report.
REAP_GRACE = 2.0

OutputSink = Callable[[str, bytes], Awaitable[None]]
# Clean-ups of prebuilt workers taken but never run, until they finish.
_RELEASES: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class WorkerResult:
    """How a tool ended. A failing tool is a result, not an error."""

    task_id: str
    exited: bool
    exit_code: int
    signal: int
    stop_reason: str | None  # timeout | memory | pids | output | cancelled | shutdown
    wall_seconds: float
    usage: ResourceUsage
    stdout_bytes: int
    stderr_bytes: int
    setup_failure: SetupFailure | None = None
    exec_denied: int = 0  # execs the kernel refused it (agentd/sandbox/execwatch.py)
    net_refused: int = 0  # network calls refused inside it (agentd/sandbox/netwatch.py)

    @property
    def summary(self) -> str:
        if self.setup_failure is not None:
            return str(self.setup_failure)
        how = (f"exited {self.exit_code}" if self.exited
               else f"killed by signal {self.signal} ({signal.Signals(self.signal).name})")
        return how if self.stop_reason is None else f"{how}: stopped for {self.stop_reason}"


class Worker:
    """Runs one WorkerSpec to completion; `stop(reason)` may be called from anywhere."""

    def __init__(self, spec: WorkerSpec, *, launcher: LauncherClient, cgroups: CgroupDriver,
                 extra_fds: tuple[int, ...] = (), pool: WarmPool | None = None,
                 netns_fd: int = -1) -> None:
        """`extra_fds` become fds 3, 4, ... in the tool; the caller keeps and closes them.
        With a `pool`, a prebuilt worker of the spec's shape is taken if one is ready.
        `netns_fd`: the egress slot's namespace (the caller keeps it)."""
        self.spec = spec
        self._netns_fd = netns_fd
        self._pool = pool
        self._prebuilt: Prebuilt | None = None
        self._looked = False  # the pool was asked (take_prebuilt)
        self._ran = False
        self._extra_fds = extra_fds
        self._launcher = launcher
        self._cgroups = cgroups
        self._cgroup: TaskCgroup | None = None
        self._stop_reason: str | None = None
        self._killing: asyncio.Task[None] | None = None
        self._output = {STDOUT: 0, STDERR: 0}
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._queued = 0  # bytes in _queue
        self._readers: dict[int, str] = {}  # open pipes: fd -> stream kind
        self._paused = False
        self._spawned: Spawned | None = None
        self._marks: list[tuple[str, float]] = []
        self._exited = False

    def stop(self, reason: str) -> None:
        """Kills the whole worker (first reason wins); returns at once, the kill runs async."""
        if self._exited and reason != "output":
            return  # the tool had already ended: nothing was stopped for `reason`
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._cgroup is not None and self._killing is None:
            self._killing = asyncio.get_running_loop().create_task(self._kill_and_reap())

    async def _kill_and_reap(self) -> None:
        """Kills the cgroup; completes the worker itself if the launcher never reports."""
        assert self._cgroup is not None
        try:
            await asyncio.to_thread(self._cgroup.kill)
        finally:
            spawned = self._spawned
            if spawned is not None and not spawned.exited.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(spawned.exited), REAP_GRACE)
                if not spawned.exited.done() and not await asyncio.to_thread(
                        self._cgroup.populated):
                    log.warning("worker.reaped_without_launcher", task_id=self.spec.task_id,
                                reason=self._stop_reason)
                    self._launcher.abandon(spawned, status=signal.SIGKILL)
                    self._queue.put_nowait(None)  # the pipes may never close: output ends here

    def take_prebuilt(self) -> str:
        """Takes a prebuilt worker of the spec's shape from the pool, if one is ready, and
        returns the name of the cgroup the task will run in (`prebuilt-N`, or the task id for
        a cold worker), for the exec.allowed record: after a crash, the cgroups removed at
        the next start are named, and this maps them to their tasks. Call `run` or
        `release_unused` after it."""
        if self._pool is not None and not self._looked:
            self._prebuilt = self._pool.take(self.spec)
        self._looked = True  # once: the record names the cgroup the task really runs in
        return self._prebuilt.cgroup.name if self._prebuilt else self.spec.task_id

    def release_unused(self) -> None:
        """`run` was never called (the record before it could not be written): the taken
        prebuilt worker is let go and its cgroup removed."""
        if self._prebuilt is None or self._ran or self._pool is None:
            return
        self._launcher.discard(self._prebuilt.slot)
        cgroup, spec, pool = self._prebuilt.cgroup, self.spec, self._pool
        self._prebuilt = None

        async def remove() -> None:
            try:
                await asyncio.to_thread(cgroup.remove)
            finally:
                pool.refill(spec)

        task = asyncio.get_running_loop().create_task(remove())
        _RELEASES.add(task)
        task.add_done_callback(_RELEASES.discard)

    async def run(self, stdin: bytes, on_output: OutputSink) -> WorkerResult:
        self._ran = True
        self._mark("begin")
        self.take_prebuilt()
        if self._prebuilt is not None:
            self._cgroup = self._prebuilt.cgroup  # built with the limits of this shape
        else:
            self._cgroup = await asyncio.to_thread(
                self._cgroups.create, self.spec.task_id,
                CgroupLimits.from_limits(self.spec.limits))
        self._mark("cgroup created")
        started_at = time.monotonic()
        try:
            return await self._run(stdin, on_output, started_at)
        finally:
            try:
                cgroup = self._cgroup
                if self._killing is not None:
                    with contextlib.suppress(Exception):
                        await self._killing
                await asyncio.to_thread(cgroup.remove)
                self._mark("cgroup removed")
                log.debug("worker.timing", task_id=self.spec.task_id, **self._phases())
                metrics.observe_phases(metrics.SPAWN_SECONDS, self._spans())
            finally:
                if self._prebuilt is not None and self._pool is not None:
                    self._pool.refill(self.spec)  # however this worker ended

    def _mark(self, phase: str) -> None:
        self._marks.append((phase, time.perf_counter()))

    def _spans(self) -> dict[str, float]:
        """The metrics' phases (ms): cgroup, launch (to the tool's execve), run, cleanup."""
        at = dict(self._marks)
        spans = {"cgroup_ms": ("begin", "cgroup created"), "launch_ms": ("cgroup created",
                                                                         "started"),
                 "run_ms": ("started", "exited"), "cleanup_ms": ("exited", "cgroup removed")}
        return {name: (at[b] - at[a]) * 1e3 for name, (a, b) in spans.items()
                if a in at and b in at}

    def _phases(self) -> dict[str, float]:
        """Milliseconds between successive marks: where a worker's time went."""
        return {f"{name}_ms": round((t - prev) * 1e3, 3)
                for (_, prev), (name, t) in zip(self._marks, self._marks[1:], strict=False)}

    async def _run(self, stdin: bytes, on_output: OutputSink, started_at: float
                   ) -> WorkerResult:
        assert self._cgroup is not None
        loop = asyncio.get_running_loop()
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        workspace_fd = cgroup_fd = -1
        try:
            if self._prebuilt is not None:
                workspace_fd = await self._open_workspace()
            elif (directory := self._cgroup.clone_into()) is not None:
                cgroup_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            spawned = await self._launcher.spawn(
                self.spec, self._cgroup.join_paths(), (in_r, out_w, err_w, *self._extra_fds),
                pooled=self._prebuilt.slot if self._prebuilt else 0, workspace_fd=workspace_fd,
                cgroup_fd=cgroup_fd, netns_fd=self._netns_fd)
        finally:
            for fd in (in_r, out_w, err_w, workspace_fd, cgroup_fd):
                if fd >= 0:
                    os.close(fd)
        self._spawned = spawned
        for fd, kind in ((out_r, STDOUT), (err_r, STDERR)):
            os.set_blocking(fd, False)
            self._readers[fd] = kind
            loop.add_reader(fd, self._on_readable, fd, kind)
        spawned.exited.add_done_callback(self._on_exit)
        feeder = loop.create_task(self._feed_stdin(in_w, stdin))
        timer = loop.call_later(self.spec.limits.wall_seconds, self.stop, "timeout")
        watcher = loop.create_task(self._watch_limits())
        failure: SetupFailure | None = None
        try:
            self._mark("spawn sent")
            try:
                await spawned.started
            except SetupError as exc:
                failure = exc.failure
            self._mark("started")
            metrics.SPAWNS.labels("prebuilt" if spawned.prebuilt
                                  else "cold_into_cgroup" if spawned.into_cgroup
                                  else "cold").inc()
            while (item := await self._queue.get()) is not None:
                self._queued -= len(item[1])
                self._resume_reading()
                await on_output(*item)
            self._mark("output closed")
            status = await spawned.exited
            self._mark("exited")
        except asyncio.CancelledError:
            self.stop("cancelled")
            raise
        finally:
            timer.cancel()
            watcher.cancel()
            feeder.cancel()
            for fd in (out_r, err_r):
                loop.remove_reader(fd)
                os.close(fd)
        usage = await asyncio.to_thread(self._cgroup.usage)
        self._mark("usage read")
        # A limit that ended the tool is its stop reason even when the kernel acted before the
        # watcher did: the OOM killer, or a refused fork the tool died of.
        if self._stop_reason is None and usage.oom_killed:
            self._stop_reason = "memory"
        elif self._stop_reason is None and usage.pids_limit_hit:
            self._stop_reason = "pids"
        elif (self._stop_reason is None and self.spec.workspace_quota
              and self.spec.workspace_upper
              and await asyncio.to_thread(workspace_full, self.spec.workspace_upper)):
            # The kernel refused a write at the quota and the tool ended before the watcher
            # looked: the quota still ended its work.
            self._stop_reason = "quota"
        return WorkerResult(
            task_id=self.spec.task_id, exited=os.WIFEXITED(status),
            exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1,
            signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
            stop_reason=self._stop_reason, wall_seconds=time.monotonic() - started_at,
            usage=usage, stdout_bytes=self._output[STDOUT], stderr_bytes=self._output[STDERR],
            setup_failure=failure, exec_denied=spawned.exec_denied,
            net_refused=spawned.net_refused)

    def _on_exit(self, _: asyncio.Future[int]) -> None:
        # pid 1 is gone, so is its pid namespace: a timer firing now stops nothing.
        self._exited = True

    def _resume_reading(self) -> None:
        if self._paused and self._queued <= QUEUE_BYTES // 2:
            self._paused = False
            loop = asyncio.get_running_loop()
            for fd, kind in self._readers.items():
                loop.add_reader(fd, self._on_readable, fd, kind)

    def _on_readable(self, fd: int, kind: str) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        loop = asyncio.get_running_loop()
        if not data:
            loop.remove_reader(fd)
            del self._readers[fd]
            if not self._readers:
                self._queue.put_nowait(None)
            return
        room = self.spec.limits.output_bytes - self._output[STDOUT] - self._output[STDERR]
        if len(data) > room:
            data = data[:max(room, 0)]
            self.stop("output")
        if data:
            self._output[kind] += len(data)
            self._queued += len(data)
            self._queue.put_nowait((kind, data))
        if self._queued >= QUEUE_BYTES and not self._paused:
            self._paused = True  # the tool blocks in write(2) until the consumer catches up
            for open_fd in self._readers:
                loop.remove_reader(open_fd)

    async def _open_workspace(self) -> int:
        """The workspace mount a prebuilt worker attaches, built here (-1: none). If it cannot
        be built, the prebuilt worker is let go and the call is built cold, where the same
        error is reported as the worker's own set-up failure."""
        try:
            fd = await asyncio.to_thread(mounts.open_workspace, self.spec)
        except OSError as exc:
            assert self._prebuilt is not None
            log.info("pool.workspace_cold", task_id=self.spec.task_id, error=str(exc))
            self._launcher.discard(self._prebuilt.slot)
            self._prebuilt = dataclasses.replace(self._prebuilt, slot=0)
            return -1
        return -1 if fd is None else fd

    async def _feed_stdin(self, fd: int, data: bytes) -> None:
        """Writes stdin without blocking the loop; a tool that never reads it just never gets it."""
        try:
            os.set_blocking(fd, False)
            view = memoryview(data)
            while view:
                try:
                    written = os.write(fd, view)
                    view = view[written:]
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        except (BrokenPipeError, OSError):
            pass
        finally:
            os.close(fd)

    async def _watch_limits(self) -> None:
        """Stops a worker whose memory limit OOM-killed a process, whose fork was refused, or
        whose upper (a tmpfs sized to the run's remaining quota) is full."""
        assert self._cgroup is not None
        while True:
            await asyncio.sleep(LIMIT_POLL_SECONDS)
            usage = await asyncio.to_thread(self._cgroup.usage)
            if usage.oom_killed:
                self.stop("memory")
                return
            if usage.pids_limit_hit:
                self.stop("pids")
                return
            upper = self.spec.workspace_upper
            if self.spec.workspace_quota and upper and await asyncio.to_thread(
                    workspace_full, upper):
                self.stop("quota")
                return

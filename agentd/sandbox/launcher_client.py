"""The daemon's side of the launcher protocol (see `agentd.sandbox.launcher` for the diagram).

Starts the launcher process before the daemon has any thread, then turns its messages into
per-spawn futures on the daemon's event loop. If the launcher dies (it should not), every
pending spawn fails with UNAVAILABLE and the next spawn starts a new launcher: starting one
from a threaded process is safe because subprocess execs right after its fork.

A watchdog pings the launcher every `timeout / 4` seconds; a launcher that does not answer
within `timeout` (stopped, wedged) is SIGKILLed (its workers die with it: PDEATHSIG, and
their cgroups are killed by their Worker) and replaced at once. Spawns it had not started fail
with UNAVAILABLE, started ones complete as killed. Every future is resolved at most once
(checked with `done()`), and a message read on an old launcher's socket (a generation that is
no longer current) is dropped, so a late report can never complete a call twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agentd.errors import Unavailable
from agentd.sandbox.execwatch import ExecAttempt
from agentd.sandbox.launcher import recv_message, send_message
from agentd.sandbox.spec import SetupFailure, WorkerSpec

log = structlog.get_logger("agentd.launcher")

# Seconds without a pong before the launcher is declared stuck and replaced.
DEFAULT_TIMEOUT = 5.0


@dataclass
class Spawned:
    """Futures that resolve as the launcher reports on one worker."""

    started: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop()
                                         .create_future())
    exited: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop()
                                        .create_future())
    failure: SetupFailure | None = None
    task_id: str = ""
    exec_denied: int = 0  # execs the kernel refused it (execwatch), all of them counted
    net_refused: int = 0  # network calls refused inside it (netwatch), all of them counted
    into_cgroup: bool = False  # the launcher cloned it straight into its cgroup
    prebuilt: bool = False  # a warm-pool worker took the call (not served cold instead)


class SetupError(Exception):
    """The worker could not be built; `failure` says at which setup action and why."""

    def __init__(self, failure: SetupFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


class LauncherClient:
    """Owns the launcher process and the socket to it."""

    def __init__(self, new_root: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.new_root = new_root
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._pending: dict[int, Spawned] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0  # which launcher the current socket talks to
        self._pong = 0  # the last ping sequence number answered
        self._pong_event: asyncio.Event | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # Called on the event loop for every refused exec a worker attempted (execwatch).
        self.on_exec_attempt: Callable[[ExecAttempt], None] = _log_attempt
        # And for every network call refused inside an egress worker (netwatch): its task id
        # and the record's details.
        self.on_net_attempt: Callable[[str, dict[str, Any]], None] = _log_net_attempt
        # The warm pool's (agentd/sandbox/pool.py): a prebuilt worker is "ready" or
        # "pool_exited" (with the launcher's message); and every prebuilt worker is gone.
        self.on_pool_event: Callable[[str, int, dict[str, Any]], None] = _ignore_pool_event
        self.on_pool_reset: Callable[[], None] = _ignore_reset

    def start(self) -> None:
        """Starts the launcher; call before the daemon starts any thread."""
        # Worker roots are built on this directory, each in its worker's own mount namespace;
        # 0711 so that a worker in a user namespace (no privilege over host inodes) can reach it.
        os.makedirs(self.new_root, mode=0o711, exist_ok=True)
        os.chmod(self.new_root, 0o711)  # noqa: S103 - crossable but not listable, on purpose
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "agentd.sandbox.launcher", str(theirs.fileno()), self.new_root],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._generation += 1
        if self._loop is not None:
            self._loop.add_reader(ours.fileno(), self._on_readable, self._generation)
        log.info("launcher.started", pid=self._process.pid, generation=self._generation)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts delivering launcher messages on `loop`, and the watchdog."""
        self._loop = loop
        if self._sock is not None:
            loop.add_reader(self._sock.fileno(), self._on_readable, self._generation)
        self._pong_event = asyncio.Event()
        self._watchdog = loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Pings the launcher; one that does not answer in `timeout` is killed and replaced."""
        assert self._pong_event is not None
        for seq in itertools.count(1):
            await asyncio.sleep(self.timeout / 4)
            if self._sock is None:
                continue
            generation = self._generation
            self._pong_event.clear()
            try:
                send_message(self._sock, {"op": "ping", "seq": seq})
                async with asyncio.timeout(self.timeout):
                    while self._pong < seq:
                        await self._pong_event.wait()
                        self._pong_event.clear()
            except TimeoutError:
                if generation == self._generation and self._sock is not None:
                    self._on_readable(generation)  # a stalled loop may not have read it yet
                if self._pong < seq and generation == self._generation:
                    self._launcher_stuck()
            except OSError:
                pass  # the launcher died: the socket's EOF handles that

    def _launcher_stuck(self) -> None:
        log.error("launcher.unresponsive", pid=self.pid, timeout_seconds=self.timeout)
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self._launcher_gone()
        self.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _ensure_running(self) -> socket.socket:
        if self._sock is None or (self._process and self._process.poll() is not None):
            self._restart()
        assert self._sock is not None
        return self._sock

    async def spawn(self, spec: WorkerSpec, join_paths: list[str], fds: tuple[int, ...], *,
                    pooled: int = 0, workspace_fd: int = -1, cgroup_fd: int = -1,
                    netns_fd: int = -1) -> Spawned:
        """Asks for a worker with stdin, stdout, stderr and extras `fds`; the caller keeps (and
        closes) its copies. `pooled`: the prebuilt worker's slot, handed the spec, the fds and
        the detached workspace mount `workspace_fd` (the launcher serves the call cold if that
        worker is gone). `cgroup_fd`: a cgroup v2 directory to clone the worker straight into
        (`join_paths` are the fallback). `netns_fd`: the egress slot the worker joins."""
        sock = self._ensure_running()
        request_id = next(self._ids)
        spawned = Spawned(task_id=spec.task_id)
        self._pending[request_id] = spawned
        message: dict[str, Any] = {"op": "spawn", "id": request_id, "spec": spec.to_json(),
                                   "join": join_paths}
        sent = list(fds)
        if pooled:
            message.update(pooled=pooled, workspace=workspace_fd >= 0)
            if workspace_fd >= 0:
                sent.append(workspace_fd)
        elif cgroup_fd >= 0:
            message["cgroup_fd"] = True
            sent.append(cgroup_fd)
        if netns_fd >= 0 and not pooled:  # last: the launcher pops it first
            message["netns_fd"] = True
            sent.append(netns_fd)
        try:
            send_message(sock, message, sent)
        except OSError as exc:
            del self._pending[request_id]
            raise Unavailable(f"cannot reach the worker launcher: {exc}") from exc
        return spawned

    def prebuild(self, slot: int, shape: WorkerSpec, join_paths: list[str]) -> None:
        """Asks for a prebuilt worker of `shape` in slot `slot`, in the cgroup `join_paths`;
        "ready" or "pool_exited" comes back through `on_pool_event`."""
        send_message(self._ensure_running(), {"op": "prebuild", "slot": slot,
                                              "spec": shape.to_json(), "join": join_paths})

    def discard(self, slot: int) -> None:
        """Lets the prebuilt worker in `slot` exit unused ("pool_exited" follows)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                send_message(self._sock, {"op": "discard", "slot": slot})

    def abandon(self, spawned: Spawned, status: int) -> None:
        """Completes `spawned` without the launcher (its worker's cgroup is empty and the
        launcher did not report); whatever the launcher says about it later is ignored."""
        for request_id, pending in list(self._pending.items()):
            if pending is spawned:
                del self._pending[request_id]
        _resolve(spawned.started, 0)
        _resolve(spawned.exited, status)

    def _restart(self) -> None:
        log.error("launcher.restarting", previous_pid=self.pid)
        self._close_socket()
        self.on_pool_reset()
        self.start()

    def _on_readable(self, generation: int) -> None:
        if generation != self._generation or self._sock is None:
            return  # a message from a launcher that was replaced
        try:
            message, fds = recv_message(self._sock)
        except BlockingIOError:
            return
        except OSError:
            message, fds = None, []
        if message is None:
            for fd in fds:
                os.close(fd)
            self._launcher_gone()
            return
        self._dispatch(message, fds)

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        op = message.get("op")
        if op == "pong":
            self._pong = max(self._pong, int(message.get("seq") or 0))
            if self._pong_event is not None:
                self._pong_event.set()
            return
        if op == "notice":
            log.warning("launcher.notice", **{k: v for k, v in message.items() if k != "op"})
            return
        if op in ("ready", "pool_exited"):
            self.on_pool_event(str(op), int(message.get("slot") or 0), message)
            return
        spawned = self._pending.get(int(message.get("id") or 0))
        if spawned is None:
            log.info("launcher.late_message", op=op, id=message.get("id"))
            return
        if op == "exec_denied":
            self.on_exec_attempt(ExecAttempt(
                spawned.task_id, int(message["pid"]), str(message["path"]),
                str(message["reason"]), bool(message["refused"])))
        elif op == "net_refused":
            self.on_net_attempt(spawned.task_id, {k: v for k, v in message.items()
                                                  if k not in ("op", "id")})
        elif op == "started":
            spawned.into_cgroup = bool(message.get("into_cgroup"))
            spawned.prebuilt = bool(message.get("prebuilt"))
            _resolve(spawned.started, int(message["pid"]))
        elif op == "failed":
            spawned.failure = SetupFailure(str(message.get("action")), int(message.get("errno", 0)),
                                           str(message.get("message")))
            _fail(spawned.started, SetupError(spawned.failure))
        elif op == "exited":
            del self._pending[int(message["id"])]
            spawned.exec_denied = int(message.get("exec_denied", 0))
            spawned.net_refused = int(message.get("net_refused", 0))
            _fail(spawned.started, SetupError(SetupFailure(
                "unknown", 0, "the worker exited before it reported")))
            _resolve(spawned.exited, int(message["status"]))

    def _launcher_gone(self) -> None:
        """Fails spawns the launcher had not started; started ones complete as killed (their
        workers die with the launcher)."""
        log.error("launcher.died", pid=self.pid)
        self._close_socket()
        error = Unavailable("the worker launcher died; the call was not run, retry it")
        for spawned in self._pending.values():
            if spawned.started.done() and not spawned.started.exception():
                _resolve(spawned.exited, signal.SIGKILL)
            else:
                _fail(spawned.started, error)
                _fail(spawned.exited, error)
        self._pending.clear()
        self.on_pool_reset()  # prebuilt workers died with the launcher

    def _close_socket(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._process is not None:
            self._process.wait()

    def stop(self) -> None:
        """Asks the launcher to kill every worker and exit, and waits for it."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                send_message(self._sock, {"op": "shutdown"})
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._close_socket()


def _resolve(future: asyncio.Future[int], value: int) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[int], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # consumed here: no 'never retrieved' warning


def _ignore_pool_event(op: str, slot: int, message: dict[str, Any]) -> None:
    pass


def _ignore_reset() -> None:
    pass


def _log_attempt(attempt: ExecAttempt) -> None:
    log.info("exec.denied", task_id=attempt.key, path=attempt.path, reason=attempt.reason)


def _log_net_attempt(task_id: str, details: dict[str, Any]) -> None:
    log.info("net.refused", task_id=task_id, **details)

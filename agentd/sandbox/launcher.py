"""The launcher: a single-threaded process that clones workers for the daemon.

The daemon is multi-threaded (gRPC) and fork() from a threaded process is unsafe, so it never
forks a worker itself. It starts this process once, before any thread exists, and talks to it
over a SOCK_SEQPACKET socketpair (one JSON message per packet, fds passed with SCM_RIGHTS):

    daemon                              launcher                          worker
      │ spawn{id,spec,join} + fds ─────▶ │   (stdin, stdout, stderr, then extras → 3, 4, …)
      │                                  │ clone(NEWPID|NEWNS|…) ──────────▶ │ blocks on go pipe
      │                                  │ pid → cgroup.procs; uid/gid maps  │
      │                                  │ go ─────────────────────────────▶ │ contain(): mounts,
      │                                  │                                   │ privileges, seccomp
      │                                  │ ◀──── exec-watch listener fd (err socket, SCM_RIGHTS)
      │ ◀── exec_denied{id,path,…}       │ answers each exec (CONTINUE), records refusals
      │ ◀── net_refused{id,destination,…}│ and an egress worker's network calls (netwatch)
      │                                  │ ◀───────── err pipe EOF (execve)  │ execve → tool
      │ ◀── started{id,pid}              │   or ◀── {action,errno,message}, exit 127
      │ ◀── failed{id,action,errno,message}│
      │                                  │ pidfd readable → waitpid
      │ ◀── exited{id,status,…}          │
      │ prebuild{slot,spec,join} ───────▶│ clone ──▶ prebuilt(): joins its cgroup, root,
      │ ◀── ready{slot}                  │ ◀── "r" on its control socket, then waits
      │ spawn{…,pooled=slot} + fds ─────▶│ spec + fds + workspace mount ──▶ the rest of
      │                                  │   contain(), as above (or served cold)
      │ ◀── pool_exited{slot,…}          │ (a prebuilt worker died or was discarded)
      │ ping{seq} ──────────────────────▶│ (the daemon's watchdog; no pong in time:
      │ ◀── pong{seq}                    │  SIGKILL and a new launcher)
      │ shutdown{} ─────────────────────▶│ SIGKILL every worker, exit

Everything is event-driven (selectors over the socket, the error sockets, the exec-watch
listeners and pidfds), so a slow
worker setup never delays another spawn. The launcher dies with the daemon (PDEATHSIG), and
each worker dies with the launcher (its own PDEATHSIG) and, being pid 1 of its pid namespace,
takes every process of its namespace with it.

clone() vs fork()+unshare(): clone puts the child in its new pid namespace at once (it is
pid 1 without a second fork) and costs one process instead of two; the price is that the
child runs Python without os.fork()'s after-fork hooks, which is safe only because this
process never starts a thread.
"""

from __future__ import annotations

import array
import json
import os
import selectors
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from agentd.sandbox import execwatch, libc, namespaces, seccomp
from agentd.sandbox.contain import contain, prebuilt
from agentd.sandbox.netwatch import NetAttempt
from agentd.sandbox.spec import WorkerSpec, shape_of

MAX_MESSAGE = 1 << 20
FDS_PER_SPAWN = 3
# A worker's in-worker network refusals passed on to the daemon (its egress task records at
# most 128 refusals); the rest are counted in `exited`.
MAX_NET_RECORDS = 256
LAUNCHER_ACTION = "join cgroup / map ids"  # the launcher's own part of a worker's set-up


def _first_cause(error: bytes | bytearray) -> dict[str, Any]:
    """The report that says why a worker did not start. The worker's own report is the cause;
    the launcher's (e.g. EPIPE writing "go" to a worker that had already failed) is only a
    consequence, used when the worker said nothing."""
    text = error.decode(errors="replace")
    decoder = json.JSONDecoder()
    reports: list[dict[str, Any]] = []
    at = 0
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return {"action": "unknown", "errno": 0, "message": text}
        if isinstance(value, dict):
            reports.append(value)
    own = [r for r in reports if r.get("action") != LAUNCHER_ACTION]
    return (own or reports or [{"action": "unknown", "errno": 0, "message": text}])[0]


def recv_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Reads one packet and the fds that came with it; (None, []) when the peer is gone."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(
        16 * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if not msg:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(msg), list(fds)


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None
                 ) -> None:
    ancdata = []
    if fds:
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([json.dumps(message).encode()], ancdata)


@dataclass
class _Child:
    request_id: int
    pid: int
    err_fd: int
    pidfd: int
    error: bytearray = field(default_factory=bytearray)
    reported: bool = False
    watch_fd: int = -1  # its exec-watch listener (agentd/sandbox/execwatch.py)
    denied: int = 0
    # An egress worker: the TCP ports its Landlock allows (its network calls are watched
    # too, agentd/sandbox/netwatch.py), and how many of them were refused.
    ports: frozenset[int] | None = None
    net_refused: int = 0
    # A prebuilt worker (warm pool): its slot, shape and control socket; request_id is 0
    # until a spawn takes it.
    slot: int = 0
    shape: str = ""
    ctl_fd: int = -1
    ready: bool = False
    into_cgroup: bool = False  # cloned straight into its cgroup (CLONE_INTO_CGROUP)


class Launcher:
    """The launcher's event loop; one instance per launcher process."""

    def __init__(self, sock: socket.socket, new_root: str) -> None:
        self.sock = sock
        self.new_root = new_root
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, _Child] = {}
        self.pool: dict[int, _Child] = {}  # slot -> prebuilt worker not taken yet
        self.clone_into_cgroup = True  # until the kernel refuses it once
        self.seccomp_program = seccomp.build_filter()
        self.egress_seccomp_program = seccomp.build_filter(raw_sockets=False)

    def serve(self) -> None:
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        while True:
            for key, _ in self.selector.select():
                if key.data is None:
                    if not self._on_request():
                        self._kill_all()
                        return
                else:
                    kind, child = key.data
                    # An earlier event of this batch may have closed this fd (the exit).
                    if kind == "err":
                        if not child.reported:
                            self._on_error_pipe(child)
                    elif kind == "watch":
                        if child.watch_fd >= 0:
                            self._on_watch(child)
                    elif kind == "ctl":
                        if child.ctl_fd >= 0 and not child.ready:
                            self._on_ready(child)
                    else:
                        self._on_exit(child)

    def _on_request(self) -> bool:
        message, fds = recv_message(self.sock)
        if message is None or message.get("op") == "shutdown":
            return False
        if message.get("op") == "ping":  # the daemon's watchdog: we are still serving
            send_message(self.sock, {"op": "pong", "seq": message.get("seq")})
        elif message.get("op") == "spawn" and len(fds) >= FDS_PER_SPAWN:
            if message.get("pooled"):
                self._take(message, fds)
            else:
                self._spawn(message, fds)
        elif message.get("op") == "prebuild":
            self._prebuild(message)
        elif message.get("op") == "discard":
            child = self.pool.pop(int(message.get("slot") or 0), None)
            if child is not None:
                self._close_ctl(child)  # EOF: the worker exits; its exit is reported
        else:
            for fd in fds:
                os.close(fd)
            send_message(self.sock, {"op": "failed", "id": message.get("id"), "action": "protocol",
                                     "errno": 0, "message": f"bad request {message.get('op')!r}"})
        return True

    def _spawn(self, message: dict[str, Any], fds: list[int]) -> None:
        request_id = int(message["id"])
        spec = WorkerSpec.from_json(message["spec"])
        # The egress slot's network namespace (last fd), then cgroup v2's directory, to clone
        # the worker straight into.
        netns_fd = fds.pop() if message.get("netns_fd") else -1
        cgroup_fd = fds.pop() if message.get("cgroup_fd") else -1
        join = list(message.get("join", []))
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        # A socket, not a pipe: the worker also sends its exec-watch listener fd through it.
        err_sock, err_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        err_r, err_w = err_sock.detach(), err_theirs.detach()
        try:
            pid = self._clone(namespaces.clone_flags(spec), cgroup_fd)
        except OSError as exc:
            for fd in (go_r, go_w, err_r, err_w, *fds,
                       *(fd for fd in (cgroup_fd, netns_fd) if fd >= 0)):
                os.close(fd)
            self._report_failure(request_id, "clone", exc)
            return
        into_cgroup = cgroup_fd >= 0 and self.clone_into_cgroup
        if cgroup_fd >= 0:
            os.close(cgroup_fd)  # the worker has no use for it either
        if into_cgroup:
            join = []  # born in its cgroup
        # Who joins the cgroup: the worker itself, so that a slow cgroup.procs write (an RCU
        # grace period on v1, up to ~20 ms) stalls only that worker, not this loop and every
        # spawn behind it; the launcher only where the worker cannot (in a user namespace it
        # has no right to the host's cgroup files).
        own_join = () if spec.user_namespace else tuple(join)
        if pid == 0:  # the worker
            program = self.egress_seccomp_program if spec.nameserver else self.seccomp_program
            contain(spec, new_root=self.new_root, seccomp_program=program, go_fd=go_r,
                    err_fd=err_w, fds=tuple(fds), join=own_join, netns_fd=netns_fd)
        for fd in (go_r, err_w, *fds, *([netns_fd] if netns_fd >= 0 else [])):
            os.close(fd)
        child = _Child(request_id, pid, err_r, os.pidfd_open(pid), into_cgroup=into_cgroup,
                       ports=frozenset(spec.egress_ports) if spec.nameserver else None)
        self._release(child, spec, [] if own_join else join, go_w)

    def _clone(self, flags: int, cgroup_fd: int) -> int:
        """clone(), into the cgroup `cgroup_fd` where the kernel can (CLONE_INTO_CGROUP); if it
        cannot (before 5.7, or a refusal), plain clone from then on, and the cgroup is joined
        by cgroup.procs writes as on v1."""
        if cgroup_fd >= 0 and self.clone_into_cgroup:
            try:
                return libc.clone_into_cgroup(flags, cgroup_fd)
            except OSError as exc:
                self.clone_into_cgroup = False
                send_message(self.sock, {"op": "notice", "what": "clone_into_cgroup_off",
                                         "errno": exc.errno or 0, "message": str(exc)})
        return libc.clone(flags)

    def _prebuild(self, message: dict[str, Any]) -> None:
        """A warm-pool worker of the spec's shape (contain.prebuilt), into cgroup `join`; the
        daemon hears "ready" (or "pool_exited" if it dies first)."""
        slot = int(message["slot"])
        spec = WorkerSpec.from_json(message["spec"])
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        err_sock, err_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ctl_sock, ctl_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        err_r, err_w = err_sock.detach(), err_theirs.detach()
        ctl_r, ctl_w = ctl_sock.detach(), ctl_theirs.detach()
        try:
            pid = libc.clone(namespaces.clone_flags(spec))
        except OSError as exc:
            for fd in (go_r, go_w, err_r, err_w, ctl_r, ctl_w):
                os.close(fd)
            send_message(self.sock, {"op": "pool_exited", "slot": slot, "action": "clone",
                                     "errno": exc.errno or 0, "message": str(exc)})
            return
        if pid == 0:  # the worker, until its call
            prebuilt(spec, new_root=self.new_root, seccomp_program=self.seccomp_program,
                     go_fd=go_r, err_fd=err_w, ctl_fd=ctl_w,
                     join=tuple(message.get("join", [])))
        for fd in (go_r, err_w, ctl_w):
            os.close(fd)
        child = _Child(0, pid, err_r, os.pidfd_open(pid), slot=slot, shape=shape_of(spec),
                       ctl_fd=ctl_r)
        self.pool[slot] = child
        self._release(child, spec, [], go_w)  # it joins its cgroup itself
        self.selector.register(ctl_r, selectors.EVENT_READ, ("ctl", child))

    def _release(self, child: _Child, spec: WorkerSpec, join: list[str], go_w: int) -> None:
        """The launcher's part of a new worker's set-up: its cgroup, its id maps, "go"."""
        self.children[child.pid] = child
        try:
            for path in join:
                with open(path, "w") as f:
                    f.write(str(child.pid))
            namespaces.from_parent(child.pid, spec)
            os.write(go_w, b"g")
        except OSError as exc:
            os.kill(child.pid, signal.SIGKILL)
            child.error += json.dumps({"action": LAUNCHER_ACTION, "errno": exc.errno or 0,
                                       "message": str(exc)}).encode()
        finally:
            os.close(go_w)
        self.selector.register(child.err_fd, selectors.EVENT_READ, ("err", child))
        self.selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child))

    def _on_ready(self, child: _Child) -> None:
        try:
            said = os.read(child.ctl_fd, 1)
        except OSError:
            said = b""
        if said != b"r":  # it died: its exit says so
            self._close_ctl(child)
            return
        child.ready = True
        self.selector.unregister(child.ctl_fd)
        send_message(self.sock, {"op": "ready", "slot": child.slot})

    def _close_ctl(self, child: _Child) -> None:
        if child.ctl_fd >= 0:
            if not child.ready:
                self.selector.unregister(child.ctl_fd)
            os.close(child.ctl_fd)
            child.ctl_fd = -1

    def _take(self, message: dict[str, Any], fds: list[int]) -> None:
        """A spawn on a prebuilt worker: the call (spec, the tool's fds, the workspace mount
        last) goes to the worker, which confines itself and execs. A slot that is gone, not
        ready or of another shape is not used: the spawn is served cold, into the same cgroup."""
        request_id = int(message["id"])
        child = self.pool.pop(int(message["pooled"]), None)
        shape = shape_of(WorkerSpec.from_json(dict(message["spec"])))
        if child is None or not child.ready or child.shape != shape or child.ctl_fd < 0:
            if child is not None:
                self._close_ctl(child)
                os.kill(child.pid, signal.SIGKILL)
            if message.get("workspace"):
                os.close(fds.pop())  # the cold worker mounts its workspace itself
            self._spawn(message, fds)
            return
        child.request_id = request_id
        ctl = socket.socket(fileno=os.dup(child.ctl_fd))
        try:
            send_message(ctl, {"spec": message["spec"],
                               "workspace": bool(message.get("workspace"))}, fds)
        except OSError:
            os.kill(child.pid, signal.SIGKILL)  # its exit reports the failure
        finally:
            ctl.close()
            for fd in fds:
                os.close(fd)
            self._close_ctl(child)

    def _read_error_socket(self, child: _Child) -> bytes | None:
        """One packet of the worker (None at EOF): an error report, or its exec-watch listener,
        passed on to the daemon at once (the worker's execve waits for the daemon's answer)."""
        sock = socket.socket(fileno=os.dup(child.err_fd))
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4, socket.MSG_CMSG_CLOEXEC)
        finally:
            sock.close()
        if not data and not fds:
            return None
        for fd in fds:
            if data == b"w" and child.watch_fd < 0:
                child.watch_fd = fd
                self.selector.register(fd, selectors.EVENT_READ, ("watch", child))
            else:
                os.close(fd)
        return b"" if data == b"w" else data

    def _on_watch(self, child: _Child) -> None:
        """The worker called execve/execveat (let the kernel decide, record a refusal) or, an
        egress worker, a network call (refuse what its own kernel would, on record)."""
        try:
            attempt = execwatch.answer(child.watch_fd, child.ports)
        except execwatch.Gone:
            self._unwatch(child)
            return
        if attempt is None:
            return
        if isinstance(attempt, NetAttempt):
            child.net_refused += 1
            if child.net_refused <= MAX_NET_RECORDS:
                send_message(self.sock, {"op": "net_refused", "id": child.request_id,
                                         **attempt.details()})
            return
        child.denied += 1
        if child.denied <= execwatch.MAX_RECORDS:
            pid, path, reason, refused = attempt
            send_message(self.sock, {"op": "exec_denied", "id": child.request_id, "pid": pid,
                                     "path": path[:execwatch.MAX_PATH], "reason": reason,
                                     "refused": refused})

    def _unwatch(self, child: _Child) -> None:
        if child.watch_fd >= 0:
            self.selector.unregister(child.watch_fd)
            os.close(child.watch_fd)
            child.watch_fd = -1

    def _on_error_pipe(self, child: _Child) -> None:
        data = self._read_error_socket(child)
        if data is None:
            self._report_start(child)
        else:
            child.error += data

    def _report_start(self, child: _Child) -> None:
        """At EOF of the error socket: the worker either exec'd (no data) or said why not."""
        self.selector.unregister(child.err_fd)
        os.close(child.err_fd)
        child.reported = True
        if not child.request_id:
            return  # a prebuilt worker died before its call: its exit says so
        if not child.error:
            send_message(self.sock, {"op": "started", "id": child.request_id, "pid": child.pid,
                                     "into_cgroup": child.into_cgroup,
                                     "prebuilt": bool(child.slot)})
            return
        report = _first_cause(child.error)
        send_message(self.sock, {"op": "failed", "id": child.request_id, **report})

    def _on_exit(self, child: _Child) -> None:
        if not child.reported:  # the worker died; its end of the socket is closed
            while (data := self._read_error_socket(child)) is not None:
                child.error += data
            self._report_start(child)
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        _, status = os.waitpid(child.pid, 0)
        del self.children[child.pid]
        # pid 1 of its namespace is gone, so is every process of it: no exec is pending.
        self._unwatch(child)
        if not child.request_id:  # a prebuilt worker that was never taken
            self._close_ctl(child)
            self.pool.pop(child.slot, None)
            report = _first_cause(child.error) if child.error else {}
            send_message(self.sock, {"op": "pool_exited", "slot": child.slot, **report})
            return
        send_message(self.sock, {"op": "exited", "id": child.request_id, "status": status,
                                 "exec_denied": child.denied, "net_refused": child.net_refused})

    def _report_failure(self, request_id: int, action: str, exc: OSError) -> None:
        send_message(self.sock, {"op": "failed", "id": request_id, "action": action,
                                 "errno": exc.errno or 0, "message": str(exc)})
        send_message(self.sock, {"op": "exited", "id": request_id, "status": 127 << 8})

    def _kill_all(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def main() -> None:
    """Entry point: `python -m agentd.sandbox.launcher FD NEW_ROOT` (started by the daemon)."""
    sock = libc.serve_the_daemon(int(sys.argv[1]))
    Launcher(sock, sys.argv[2]).serve()


if __name__ == "__main__":
    main()

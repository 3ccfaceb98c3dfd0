"""Socket activation for grpc.aio, which cannot serve on a socket it did not create.

systemd creates agentd's role sockets (agentd*.socket: path, mode, group) and passes them,
listening, as LISTEN_FDS. grpcio's Python server only has `add_insecure_port(address)`, which
creates, binds and listens itself; nothing in the Python API adopts a descriptor (grpc core's
systemd support, grpc/grpc#30485, needs a build against libsystemd that the PyPI wheels are
not, and `grpc_server_add_channel_from_fd` is not exposed). The choices were:

1. Ignore the passed sockets and bind our own at the same path: the path then points at the
   daemon's socket, and once the daemon stops nothing re-creates systemd's, so the next
   connection cannot activate anything. Not activation at all.
2. systemd-socket-proxyd in front of agentd: a unit per role, a process per role, and the
   daemon sees the proxy as its peer.
3. Accept on the passed sockets in agentd's own event loop and splice each connection to
   a private socket that grpc listens on. (chosen)

(3) keeps what activation is for (the sockets exist from boot, with systemd's modes and
groups; connections made while agentd starts or restarts wait in the backlog) and gains what
grpcio otherwise withholds: SO_PEERCRED of the caller, read at accept(). It reaches the gRPC
handlers through the peer address: the forwarder binds its upstream end to a unique abstract
name before connecting, grpc reports that name as `context.peer()` ("unix-abstract:..."),
and `peer_of()` maps it back to the credentials and role recorded at accept. A caller cannot
forge one: the private sockets are in a 0700 root directory, and the table is in-process.

The cost is one more copy of every byte through the daemon's event loop: a few hundred
microseconds per unary call and hundreds of MiB/s of throughput on a development machine,
against control messages and tool output that the policies' output limits bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from agentd import systemd
from agentd.errors import FailedPrecondition

ROLES = ("client", "approver", "admin")
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a forwarded connection, as the kernel reported it."""

    role: str
    uid: int
    gid: int
    pid: int


# grpc peer string ("unix-abstract:agentd-peer/...") -> Peer, for the live connections.
_peers: dict[str, Peer] = {}


def peer_of(grpc_peer: str) -> Peer | None:
    """The credentials behind `context.peer()` of a call that came through a Forwarder, or
    None for a connection made straight to grpc's socket (development mode)."""
    return _peers.get(grpc_peer)


def inherited_sockets(fds: dict[str, list[int]]) -> dict[str, socket.socket]:
    """The role sockets among the descriptors systemd passed (`agentd.systemd.listen_fds()`).

    Raises FailedPrecondition when a descriptor is not a listening unix stream socket named
    after a role: that is a unit file out of step with the daemon, and serving anyway could
    give a socket's callers the wrong role.
    """
    sockets: dict[str, socket.socket] = {}
    for name, numbers in fds.items():
        if name not in ROLES or len(numbers) != 1:
            raise FailedPrecondition(
                f"systemd passed {len(numbers)} socket(s) named {name!r}; agentd expects one "
                f"per role, named {', '.join(ROLES)} (FileDescriptorName= in agentd*.socket)")
        sock = socket.socket(fileno=numbers[0])
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            sock.detach()
            raise FailedPrecondition(
                f"the socket named {name!r} is not a listening unix stream socket; use "
                "ListenStream=/run/agentd/<name>.sock in its .socket unit")
        sock.setblocking(False)
        sockets[name] = sock
    return sockets


@dataclass
class Activation:
    """The daemon's whole use of this module: where grpc listens, and the forwarders.

        act = Activation.from_environment(config.daemon.runtime_dir)
        servers = Servers(act.grpc_sockets(config.role_sockets()), groups, registrations)
        await servers.start()          # grpc listens (privately, for the passed roles)
        ...recovery...
        await act.start()              # accept the callers queued in systemd's sockets
        systemd.notify("READY=1")
        ...
        await act.stop_accepting()     # drain: new callers queue for the next start
        await servers.stop(grace)      # in-flight calls finish (through the forwarders)
        await act.close()              # what is left is dropped

    Without socket activation (development mode, tests) it passes the public paths through
    and starts nothing, so the daemon has one code path.
    """

    private_dir: Path
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    forwarders: list[Forwarder] = field(default_factory=list)

    @classmethod
    def from_environment(cls, runtime_dir: Path) -> Activation:
        """Takes the sockets systemd passed (and removes LISTEN_* from the environment)."""
        return cls(private_dir=runtime_dir / "private",
                   sockets=inherited_sockets(systemd.listen_fds()))

    own_paths: list[Path] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.sockets)

    def bind_own(self, public: dict[str, Path], modes: dict[str, int],
                 groups: dict[str, str]) -> None:
        """Without systemd: creates the role sockets the daemon would have been passed, with
        their modes and groups, so that every mode accepts callers the same way (and reads
        their SO_PEERCRED). A socket left by a killed daemon is replaced."""
        previous = os.umask(0o077)
        try:
            for role, path in public.items():
                if role in self.sockets:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.bind(str(path))
                sock.listen(128)
                sock.setblocking(False)
                group = groups.get(role, "")
                if group:
                    os.chown(path, 0, grp.getgrnam(group).gr_gid)
                os.chmod(path, modes[role])
                self.sockets[role] = sock
                self.own_paths.append(path)
        finally:
            os.umask(previous)

    def grpc_sockets(self, public: dict[str, Path]) -> dict[str, Path]:
        """Where each role's grpc server must listen: a private path for a role whose socket
        systemd passed, the public path (bound by the daemon itself) for the others."""
        if self.active:
            self.private_dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.private_dir, 0o700)  # also when an older start left it wider
        return {role: self.private_dir / f"{role}.sock" if role in self.sockets else path
                for role, path in public.items()}

    async def start(self) -> None:
        """Starts accepting on the passed sockets; call once grpc listens on grpc_sockets()."""
        for role, sock in self.sockets.items():
            forwarder = Forwarder(role, sock, str(self.private_dir / f"{role}.sock"))
            await forwarder.start()
            self.forwarders.append(forwarder)

    async def stop_accepting(self) -> None:
        """Stops accepting; live connections go on. systemd keeps the sockets listening, so
        a caller arriving now waits in the backlog for the next start (after a restart), or
        starts agentd again (after a stop)."""
        for forwarder in self.forwarders:
            await forwarder.stop_accepting()

    async def close(self) -> None:
        """Stops accepting and drops the live connections; removes the sockets it made."""
        for forwarder in self.forwarders:
            await forwarder.close()
        self.forwarders.clear()
        for path in self.own_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class Forwarder:
    """Accepts on one role's public socket and splices each connection to grpc's private one.

    Lifecycle: `start()` after grpc listens on `upstream`; `stop_accepting()` when draining
    begins (the public socket stays open in systemd, so new callers queue for the next start);
    `close()` once grpc has stopped, to drop whatever connection is left.
    """

    def __init__(self, role: str, listener: socket.socket, upstream: str,
                 *, max_connections: int = 256) -> None:
        self.role = role
        self.listener = listener
        self.upstream = upstream
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._nonce = os.urandom(8).hex()
        self._count = 0

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accepted, sock=self.listener)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()  # closes this process's copy of the listening socket
            await self._server.wait_closed()
            self._server = None

    async def close(self) -> None:
        await self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            writer.close()  # the caller sees a reset; grpc clients retry with backoff
            return
        self._tasks.add(task)
        try:
            await self._forward(reader, writer)
        except OSError:
            pass  # grpc's socket is gone (daemon stopping) or the caller left: close below
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("socket")
        pid, uid, gid = struct.unpack(
            "3i", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        self._count += 1
        name = f"agentd-peer/{self.role}/{self._nonce}/{self._count}"
        key = f"unix-abstract:{name}"
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            up.bind(b"\0" + name.encode())
            up.setblocking(False)
            _peers[key] = Peer(role=self.role, uid=uid, gid=gid, pid=pid)
            await asyncio.get_running_loop().sock_connect(up, self.upstream)
            up_reader, up_writer = await asyncio.open_unix_connection(sock=up)
        except BaseException:
            _peers.pop(key, None)
            up.close()
            raise
        try:
            await _splice(reader, writer, up_reader, up_writer)
        finally:
            _peers.pop(key, None)
            up_writer.close()


async def _splice(a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
                  b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter) -> None:
    """Copy both ways until both ends have sent EOF; an error on either tears down both."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # half-close: the other side sees the EOF too
        except OSError:
            a_writer.close()  # the other pump then reads EOF and ends
            b_writer.close()

    await asyncio.gather(pump(a_reader, b_writer), pump(b_reader, a_writer))

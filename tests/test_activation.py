"""agentd.activation: a real grpc.aio server behind a Forwarder on real unix sockets, as
agentd runs under socket activation; the caller's credentials must reach the handler."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd import activation
from agentd.errors import FailedPrecondition


def _listener(path: Path) -> socket.socket:
    """A listening socket like the one systemd passes for a ListenStream= path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


class _Health(health_pb2_grpc.HealthServicer):
    """Records what the handler learns about its caller."""

    def __init__(self) -> None:
        self.peers: list[activation.Peer | None] = []

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        self.peers.append(activation.peer_of(context.peer()))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _with_forwarded_grpc(tmp_path: Path,
                         body: Callable[[str, _Health, activation.Forwarder], Awaitable[None]],
                         ) -> None:
    """Runs `body(public_address, servicer, forwarder)` with grpc listening privately."""
    private = tmp_path / "private.sock"
    public = tmp_path / "public.sock"

    async def run() -> None:
        servicer = _Health()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{private}")
        await server.start()
        forwarder = activation.Forwarder("client", _listener(public), str(private))
        await forwarder.start()
        try:
            await body(f"unix:{public}", servicer, forwarder)
        finally:
            await forwarder.close()
            await server.stop(None)

    asyncio.run(run())


async def _check(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


class TestForwarder:
    def test_grpc_call_carries_the_callers_credentials(self, tmp_path: Path) -> None:
        """A call through the public socket is served, and the handler gets the caller's
        uid, gid and pid as the kernel saw them, with the socket's role."""

        seen: list[activation.Peer | None] = []

        async def body(address: str, servicer: _Health, _: activation.Forwarder) -> None:
            await _check(address)
            seen.extend(servicer.peers)

        _with_forwarded_grpc(tmp_path, body)
        assert seen == [activation.Peer(role="client", uid=os.getuid(), gid=os.getgid(),
                                        pid=os.getpid())]

    def test_direct_connection_has_no_peer(self, tmp_path: Path) -> None:
        """A connection straight to grpc's socket (development mode) maps to no peer."""
        seen: list[activation.Peer | None] = []

        async def body(address: str, servicer: _Health, _: activation.Forwarder) -> None:
            await _check(f"unix:{tmp_path / 'private.sock'}")
            seen.extend(servicer.peers)

        _with_forwarded_grpc(tmp_path, body)
        assert seen == [None]

    def test_many_calls_and_connections(self, tmp_path: Path) -> None:
        """Concurrent channels each get through, and their table entries go when they close."""

        async def body(address: str, servicer: _Health, fwd: activation.Forwarder) -> None:
            await asyncio.gather(*(_check(address) for _ in range(20)))
            for _ in range(100):  # the forwarder sees the EOFs shortly after the channels close
                if fwd.connections == 0:
                    break
                await asyncio.sleep(0.02)
            assert fwd.connections == 0
            assert len(servicer.peers) == 20
            assert all(p is not None and p.pid == os.getpid() for p in servicer.peers)

        _with_forwarded_grpc(tmp_path, body)
        assert activation._peers == {}


def _with_echo(tmp_path: Path, body: Callable[[Path, activation.Forwarder], Awaitable[None]],
               max_connections: int = 256) -> None:
    """Runs `body(public_path, forwarder)` with an echo server (until EOF) as the upstream."""
    private = tmp_path / "echo.sock"
    public = tmp_path / "public.sock"

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def run() -> None:
        server = await asyncio.start_unix_server(echo, path=str(private))
        forwarder = activation.Forwarder("admin", _listener(public), str(private),
                                         max_connections=max_connections)
        await forwarder.start()
        try:
            await body(public, forwarder)
        finally:
            await forwarder.close()
            server.close()
            await server.wait_closed()

    asyncio.run(run())


class TestSplice:
    def test_bulk_bytes_and_half_close(self, tmp_path: Path) -> None:
        """4 MiB arrive intact both ways, and the caller's EOF reaches the upstream, whose
        own EOF comes back."""
        payload = os.urandom(4 << 20)

        async def body(public: Path, _: activation.Forwarder) -> None:
            reader, writer = await asyncio.open_unix_connection(str(public))

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            received = await asyncio.wait_for(reader.read(), timeout=30)  # until EOF
            await sender
            writer.close()
            assert received == payload

        _with_echo(tmp_path, body)

    def test_connections_past_the_limit_are_closed(self, tmp_path: Path) -> None:
        """Past max_connections a new caller is closed at once; the others are unaffected."""

        async def body(public: Path, fwd: activation.Forwarder) -> None:
            r1, w1 = await asyncio.open_unix_connection(str(public))
            w1.write(b"ping")
            assert await asyncio.wait_for(r1.readexactly(4), 10) == b"ping"
            r2, w2 = await asyncio.open_unix_connection(str(public))
            assert await asyncio.wait_for(r2.read(), 10) == b""
            w2.close()
            w1.write(b"pong")
            assert await asyncio.wait_for(r1.readexactly(4), 10) == b"pong"
            w1.close()

        _with_echo(tmp_path, body, max_connections=1)

    def test_close_drops_live_connections(self, tmp_path: Path) -> None:
        """close() ends the connections still open: a stopping daemon leaves none behind."""

        async def body(public: Path, fwd: activation.Forwarder) -> None:
            reader, writer = await asyncio.open_unix_connection(str(public))
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
            await fwd.close()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()

        _with_echo(tmp_path, body)

    def test_stop_accepting_keeps_live_connections(self, tmp_path: Path) -> None:
        """Draining: no new connection is accepted, the live one still carries bytes."""

        async def body(public: Path, fwd: activation.Forwarder) -> None:
            reader, writer = await asyncio.open_unix_connection(str(public))
            writer.write(b"a")
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"a"
            await fwd.stop_accepting()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_unix_connection(str(public))  # nobody else holds it here
            writer.write(b"b")
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"b"
            writer.close()

        _with_echo(tmp_path, body)

    def test_upstream_gone_closes_the_caller(self, tmp_path: Path) -> None:
        """With nothing listening on the private socket, the caller is closed, not hung."""
        public = tmp_path / "public.sock"

        async def run() -> None:
            forwarder = activation.Forwarder("client", _listener(public),
                                             str(tmp_path / "nobody.sock"))
            await forwarder.start()
            try:
                reader, writer = await asyncio.open_unix_connection(str(public))
                assert await asyncio.wait_for(reader.read(), 10) == b""
                writer.close()
            finally:
                await forwarder.close()

        asyncio.run(run())


class TestInheritedSockets:
    def test_role_sockets(self, tmp_path: Path) -> None:
        """Listening unix stream sockets named after roles are returned, non-blocking."""
        sockets = {role: _listener(tmp_path / f"{role}.sock") for role in ("client", "admin")}
        got = activation.inherited_sockets({r: [s.detach()] for r, s in sockets.items()})
        try:
            assert sorted(got) == ["admin", "client"]
            assert got["client"].getsockname() == str(tmp_path / "client.sock")
            assert not got["admin"].getblocking()
        finally:
            for sock in got.values():
                sock.close()

    def test_unknown_name_is_refused(self, tmp_path: Path) -> None:
        """A name that is no role is a unit file out of step with the daemon."""
        with _listener(tmp_path / "x.sock") as sock, pytest.raises(FailedPrecondition,
                                                                  match="FileDescriptorName"):
            activation.inherited_sockets({"unknown": [sock.fileno()]})

    def test_not_listening_is_refused(self, tmp_path: Path) -> None:
        """A datagram socket (ListenDatagram= by mistake) is refused, and left open."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(tmp_path / "d.sock"))
            with pytest.raises(FailedPrecondition, match="ListenStream"):
                activation.inherited_sockets({"client": [sock.fileno()]})
            assert sock.fileno() >= 0


class TestActivation:
    def test_not_activated_passes_the_public_paths_through(self, tmp_path: Path) -> None:
        """Without passed sockets grpc binds the public paths itself (development mode)."""
        act = activation.Activation(private_dir=tmp_path / "private")
        public = {"client": tmp_path / "agentd.sock", "admin": tmp_path / "agentd-admin.sock"}
        assert not act.active
        assert act.grpc_sockets(public) == public
        assert not (tmp_path / "private").exists()

    def test_passed_roles_listen_privately(self, tmp_path: Path) -> None:
        """A passed role's grpc server listens in a 0700 directory; the rest stay public,
        and a call through the passed socket reaches grpc."""
        passed = _listener(tmp_path / "agentd.sock")
        act = activation.Activation(private_dir=tmp_path / "private",
                                    sockets={"client": passed})
        public = {"client": tmp_path / "agentd.sock", "admin": tmp_path / "agentd-admin.sock"}
        where = act.grpc_sockets(public)
        assert where == {"client": tmp_path / "private" / "client.sock",
                         "admin": tmp_path / "agentd-admin.sock"}
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700

        async def run() -> None:
            servicer = _Health()
            server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            server.add_insecure_port(f"unix:{where['client']}")
            await server.start()
            await act.start()
            try:
                await _check(f"unix:{tmp_path / 'agentd.sock'}")
                assert [p.role for p in servicer.peers if p] == ["client"]
            finally:
                await server.stop(None)
                await act.close()

        asyncio.run(run())

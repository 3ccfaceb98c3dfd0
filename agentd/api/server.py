"""The gRPC servers: one grpc.aio server per role socket, each with health and reflection.

A server per socket (rather than one server on three ports) is what lets the interceptor know
the role of a call: grpc.aio tells a handler nothing about the port it came in on. The sockets
are created under umask 077 and then opened up to exactly their role's group.
"""

from __future__ import annotations

import contextlib
import grp
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentd.api.audit_service import AuditServicer
from agentd.api.gen.v1 import agentd_pb2, agentd_pb2_grpc, audit_pb2, audit_pb2_grpc
from agentd.api.interceptor import DenialRecorder, RoleInterceptor
from agentd.api.limits import MAX_MESSAGE_BYTES
from agentd.api.service import AgentdServicer
from agentd.audit import AuditLog
from agentd.scheduler.plan import MAX_ARGV_BYTES, MAX_STDIN_BYTES

# Mode of each role's socket; the group comes from the config (socket_group, approver_group).
SOCKET_MODES = {"client": 0o660, "approver": 0o660, "admin": 0o600}

Registration = Callable[[grpc.aio.Server], list[str]]
MAX_REQUEST_BYTES = MAX_STDIN_BYTES + MAX_ARGV_BYTES + (1 << 20)


def agentd_registration(servicer: AgentdServicer) -> Registration:
    def register(server: grpc.aio.Server) -> list[str]:
        agentd_pb2_grpc.add_AgentdServicer_to_server(servicer, server)
        return [agentd_pb2.DESCRIPTOR.services_by_name["Agentd"].full_name]
    return register


def audit_registration(audit: AuditLog) -> Registration:
    servicer = AuditServicer(audit)

    def register(server: grpc.aio.Server) -> list[str]:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)
        return [audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name]
    return register


class _Health(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """grpcio-health-checking's servicer, with List (which the library leaves unimplemented):
    every service this daemon reports on, and its status."""

    async def List(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
        statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in statuses.items()})


class Servers:
    """Starts and stops the role servers together; owns the shared health status."""

    def __init__(self, sockets: dict[str, Path], groups: dict[str, str],
                 registrations: list[Registration], on_denied: DenialRecorder, *,
                 public: dict[str, Path] | None = None) -> None:
        """`sockets`: where grpc listens per role; `public`: the role sockets callers connect
        to (through the forwarder), which is what a caller's record names."""
        self.on_denied = on_denied
        self.sockets = sockets
        self.public = public or sockets
        self.groups = groups
        self.registrations = registrations
        self.health = _Health()
        self._servers: list[grpc.aio.Server] = []
        self._services: list[str] = []

    async def start(self) -> None:
        previous = os.umask(0o077)
        try:
            for role, path in self.sockets.items():
                self._servers.append(await self._start_one(role, path))
        finally:
            os.umask(previous)
        for role, path in self.sockets.items():
            group = self.groups.get(role, "")
            if group:
                os.chown(path, 0, grp.getgrnam(group).gr_gid)
            os.chmod(path, SOCKET_MODES[role])
        for name in ["", *self._services]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _start_one(self, role: str, path: Path) -> grpc.aio.Server:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket left by a daemon that was killed
        server = grpc.aio.server(
            interceptors=[RoleInterceptor(role, str(self.public[role]), self.on_denied)],
            # Room for the largest valid Exec (stdin and argv), so the daemon's own size checks
            # answer with their explanation instead of gRPC's generic limit.
            # Replies are capped below the limit the client agreed to receive (api/limits.py).
            options=[("grpc.so_reuseport", 0),
                     ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        names: list[str] = []
        for register in self.registrations:
            names += register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [*names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(services, server)
        self._services = names
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        return server

    async def not_serving(self) -> None:
        """Tells health checkers the daemon is going away (drain has begun)."""
        for name in ["", *self._services]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        for server in self._servers:
            await server.stop(grace)
        for path in self.sockets.values():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def wait(self) -> None:
        if self._servers:
            await self._servers[0].wait_for_termination()

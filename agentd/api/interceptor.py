"""Binds each call to its caller's role, checks the role may call the method, maps errors.

One interceptor instance per listening socket: the socket a call arrived on is its role
(see `agentd.identity`). Every service method is wrapped here once, so the servicers carry
no error handling and no authorisation of their own.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from agentd import activation
from agentd.api import bounds
from agentd.api.errors import map_stream, map_unary
from agentd.errors import PermissionDenied
from agentd.identity import Caller

log = structlog.get_logger("agentd.api")

current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("current_caller")

# Which roles may call what; a method not listed is open to every role (health, reflection,
# reading the audit log). Admin may call everything.
PERMISSIONS: dict[str, frozenset[str]] = {
    "/agentd.v1.Agentd/CreateRun": frozenset({"client", "admin"}),
    "/agentd.v1.Agentd/CloseRun": frozenset({"client", "admin"}),
    "/agentd.v1.Agentd/Exec": frozenset({"client", "admin"}),
    "/agentd.v1.Agentd/Step": frozenset({"client", "admin"}),
    "/agentd.v1.Agentd/StreamStep": frozenset({"client", "admin"}),
    "/agentd.v1.Agentd/Rollback": frozenset({"client", "admin"}),
    "/agentd.v1.Agentd/WriteFile": frozenset({"client", "admin"}),
    # A run's files are the client's, like an export of them; the approver sees the request.
    "/agentd.v1.Agentd/ReadFile": frozenset({"client", "admin"}),
    "/agentd.v1.Agentd/Fork": frozenset({"client", "admin"}),
    "/agentd.v1.Agentd/ExportCheckpoint": frozenset({"client", "admin"}),
    "/agentd.v1.Agentd/Approve": frozenset({"approver", "admin"}),
    # An ambiguous step's effects are judged like an approval: by an approver.
    "/agentd.v1.Agentd/ResolveStep": frozenset({"approver", "admin"}),
    "/agentd.v1.Agentd/ReloadPolicies": frozenset({"admin"}),
    "/agentd.v1.Agentd/PromoteStage": frozenset({"admin"}),
    "/agentd.v1.Agentd/ApproveStage": frozenset({"approver", "admin"}),
    "/agentd.v1.Agentd/AcceptPolicy": frozenset({"approver", "admin"}),
    "/agentd.v1.Agentd/RunGraph": frozenset({"client", "admin"}),
}


def _denied(method: str, role: str) -> PermissionDenied:
    return PermissionDenied(f"the {role} role may not call {method.rsplit('/', 1)[-1]}; use the "
                            "socket of a role that may", rule=f"api roles: {method}")


# Records a refusal (caller, method, rule) before the caller hears of it.
DenialRecorder = Callable[[Caller, str, PermissionDenied], Awaitable[None]]


class RoleInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Sets `current_caller`, enforces PERMISSIONS and maps exceptions to statuses."""

    def __init__(self, role: str, socket_path: str, on_denied: DenialRecorder) -> None:
        self.role = role
        self.socket_path = socket_path
        self.on_denied = on_denied

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        allowed = PERMISSIONS.get(method)
        role = self.role
        permitted = allowed is None or role in allowed or role == "admin"
        metadata = dict(handler_call_details.invocation_metadata or ())
        claimed = str(metadata.get("agentd-caller-name", ""))[:100]

        async def bind(context: Any) -> None:
            # Every connection comes through the daemon's forwarder, which read SO_PEERCRED.
            creds = activation.peer_of(context.peer())
            if creds is None or creds.role != role:
                raise PermissionDenied(
                    "the caller's identity is unknown (the connection did not come through "
                    "agentd's own role socket); connect to the role socket, not grpc's",
                    rule="identity: SO_PEERCRED at accept")
            caller = Caller(role=role, socket=self.socket_path,
                            peer=f"uid={creds.uid} gid={creds.gid} pid={creds.pid}",
                            claimed_name=claimed, uid=creds.uid, gid=creds.gid, pid=creds.pid)
            current_caller.set(caller)
            if not permitted:
                denied = _denied(method, role)
                await self.on_denied(caller, method, denied)
                raise denied

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                await bind(context)
                bounds.check(request)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                map_unary(method, unary), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: Any) -> Any:
                await bind(context)
                bounds.check(request)
                result = inner_stream(request, context)
                if inspect.isawaitable(result):
                    await result  # a handler that streams with context.write (health Watch)
                    return
                async for item in result:
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                map_stream(method, stream), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # stream-unary / stream-stream: none in agentd's API

"""The one place where agentd errors become gRPC statuses.

An `AgentdError` becomes the status its class names, with its message. Anything else is a
bug: it becomes INTERNAL with an incident id, and the id is logged with the traceback so an
operator can find it from what the caller saw.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from agentd.errors import AgentdError

log = structlog.get_logger("agentd.api")


def status_of(error: AgentdError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException,
                     method: str) -> None:
    """Ends the call with the status `exc` maps to; never returns."""
    if isinstance(exc, AgentdError):
        await context.abort(status_of(exc), exc.message)
    if isinstance(exc, NotImplementedError):
        # A method a library declares but does not implement: the caller's answer is
        # UNIMPLEMENTED, never INTERNAL.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{method.rsplit('/', 1)[-1]} is not implemented by agentd")
    incident = "inc-" + secrets.token_hex(6)
    log.error("api.internal_error", incident=incident, method=method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error in agentd (incident {incident}); the daemon's log has "
                        "the details under this id")


def map_unary(method: str, behaviour: Callable[[Any, Any], Awaitable[Any]]
              ) -> Callable[[Any, Any], Awaitable[Any]]:
    async def wrapper(request: Any, context: Any) -> Any:
        try:
            return await behaviour(request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await abort_with(context, exc, method)
    return wrapper


def map_stream(method: str, behaviour: Callable[[Any, Any], AsyncIterator[Any]]
               ) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for item in behaviour(request, context):
                yield item
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await abort_with(context, exc, method)
    return wrapper

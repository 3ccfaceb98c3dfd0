"""A small exception tree, one class per gRPC status agentd uses, so that a framework catches
what it can act on (`Aborted`: read the new state; `ApprovalRequired`: wait for a person)
instead of matching status codes.

    AgentdError
    ├── InvalidArgument       the request is malformed; change it
    ├── PermissionDenied      the policy or the caller's role refuses; `rule` names the rule
    ├── NotFound              no such run, step or agent
    ├── FailedPrecondition    the run's state does not allow it (closed, a step waits, ...)
    │   └── ApprovalRequired  the call waits for an approver; `step` is its number
    ├── Aborted               the head moved (expect_step) or a rollback met a running step
    ├── ResourceExhausted     a limit of the daemon; safe to retry later
    ├── DeadlineExceeded      the caller's deadline passed
    ├── Unavailable           the daemon is unreachable or draining; safe to retry
    └── Internal              a bug in agentd (the message carries an incident id)
"""

from __future__ import annotations

import re

import grpc

from agentd_client.connection import describe_failure


class AgentdError(Exception):
    """A call to agentd failed; `code` is the gRPC status name, `message` says what to do."""

    code = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AgentdError):
    code = "INVALID_ARGUMENT"


class PermissionDenied(AgentdError):
    code = "PERMISSION_DENIED"

    @property
    def rule(self) -> str:
        """The policy rule named by the refusal ("" if none)."""
        found = re.search(r"\(rule: ([^)]*)\)", self.message)
        return found.group(1) if found else ""


class NotFound(AgentdError):
    code = "NOT_FOUND"


class FailedPrecondition(AgentdError):
    code = "FAILED_PRECONDITION"


class ApprovalRequired(FailedPrecondition):
    """The call became step `step` (stored as `attempt`), which waits for an approver:
    `wait_step(run, step, attempt=attempt)` returns it once someone decided and it ran."""

    def __init__(self, message: str, step: int, attempt: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.attempt = attempt


class Aborted(AgentdError):
    code = "ABORTED"


class ResourceExhausted(AgentdError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(AgentdError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(AgentdError):
    code = "UNAVAILABLE"


class Internal(AgentdError):
    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[AgentdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.INTERNAL: Internal,
}

#: The codes a call may be sent again after (with a pause), when they say nothing was done.
#: Nothing else is retried: ABORTED needs a new decision, DEADLINE_EXCEEDED may have run.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

# UNAVAILABLE also means "the connection broke", possibly after the daemon committed a step
# whose reply was lost: a call that changes state is sent again only when the failure shows
# it never ran (no connection, or the daemon's own refusal at the door).
_NEVER_RAN = ("failed to connect", "Connection refused", "No such file or directory",
              "agentd is shutting down", "the call was not run")
# Raised by grpc on the receiving side, after the sender did the work.
_TOO_LARGE = ("Received message larger than max", "Sent message larger than max")

_PENDING = re.compile(r"^step (\d+) needs approval")
_ATTEMPT = re.compile(r"WaitStep on attempt (\d+)")


def from_rpc(exc: grpc.RpcError, socket_path: str) -> AgentdError:
    """The exception for a failed call; the one place where status codes are read."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    status = code_fn() if callable(code_fn) else None
    details = str(details_fn() or "") if callable(details_fn) else ""
    name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    message = describe_failure(name, details, socket_path)
    pending = _PENDING.match(details)
    if status is grpc.StatusCode.FAILED_PRECONDITION and pending:
        attempt = _ATTEMPT.search(details)
        return ApprovalRequired(message, int(pending.group(1)),
                                int(attempt.group(1)) if attempt else None)
    kind = _BY_CODE.get(status, AgentdError) if isinstance(status, grpc.StatusCode) \
        else AgentdError
    return kind(message)


def retryable(exc: grpc.RpcError, *, idempotent: bool) -> bool:
    """Whether sending the call again cannot do twice what it did once."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = str(details_fn() or "") if callable(details_fn) else ""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return not details.startswith(_TOO_LARGE)  # the daemon refused it at once
    if code is grpc.StatusCode.UNAVAILABLE:
        return idempotent or any(sign in details for sign in _NEVER_RAN)
    return False

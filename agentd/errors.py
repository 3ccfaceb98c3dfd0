"""The errors agentd reports to callers, one class per gRPC status code.

    AgentdError                      base; never raised itself
    ├── InvalidArgument              the request or a file is malformed      INVALID_ARGUMENT
    │   └── PolicyError              a policy file is wrong (file, line, field)
    ├── PermissionDenied             refused by a policy rule or a role        PERMISSION_DENIED
    ├── NotFound                     no such run, agent or checkpoint          NOT_FOUND
    ├── FailedPrecondition           right request, wrong state                FAILED_PRECONDITION
    ├── Aborted                      lost a race: another step holds the run    ABORTED
    ├── ResourceExhausted            a limit of the host or of the daemon      RESOURCE_EXHAUSTED
    ├── DeadlineExceeded             the caller's deadline passed              DEADLINE_EXCEEDED
    ├── Unavailable                  the daemon cannot take work right now     UNAVAILABLE
    └── Internal                     a bug; carries an incident id             INTERNAL

The layers below the API (policy, sandbox, scheduler, audit) raise these; `agentd.api.errors`
is the one place that turns them into gRPC statuses. A tool that fails, is killed or runs out
of memory is *not* an error: it is an outcome, reported by a successful call.

The status code is kept as its name (a string) so that nothing below the API imports grpc.
"""

from __future__ import annotations


class AgentdError(Exception):
    """Base of every error agentd reports; catch it at the API boundary only."""

    code: str = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(AgentdError):
    """The request is malformed; the caller must fix it before retrying."""

    code = "INVALID_ARGUMENT"


class PolicyError(InvalidArgument):
    """A policy or stage file is wrong; the message names the file, line and field."""

    def __init__(self, message: str, *, file: str, line: int | None, field: str | None) -> None:
        where = file if line is None else f"{file}:{line}"
        prefix = f"{where}: {field}: " if field else f"{where}: "
        super().__init__(prefix + message)
        self.file = file
        self.line = line
        self.field = field
        self.detail = message


class PermissionDenied(AgentdError):
    """Refused by a named policy rule or by the caller's role; retrying will not help."""

    code = "PERMISSION_DENIED"

    def __init__(self, message: str, *, rule: str | None = None) -> None:
        super().__init__(message if rule is None else f"{message} (rule: {rule})")
        self.rule = rule


class NotFound(AgentdError):
    """The named run, agent or checkpoint does not exist (or no longer does)."""

    code = "NOT_FOUND"


class FailedPrecondition(AgentdError):
    """The request is valid but the object is in the wrong state; change the state first."""

    code = "FAILED_PRECONDITION"


class Aborted(AgentdError):
    """Another step is running on the same run (one writer per run); retry after it ends."""

    code = "ABORTED"


class ResourceExhausted(AgentdError):
    """A limit of the host or the daemon is reached; retry later or with less."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(AgentdError):
    """The caller's deadline passed before the work finished."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(AgentdError):
    """The daemon cannot take work now (draining, audit log not writable); retry later."""

    code = "UNAVAILABLE"


class Internal(AgentdError):
    """A bug in agentd. The message carries an incident id that is in the log with the trace."""

    code = "INTERNAL"

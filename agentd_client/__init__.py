"""agentd's client for agent frameworks: grpcio and protobuf, nothing of the daemon.

    from agentd_client import Client, Task

    with Client() as agentd:
        run = agentd.create_run("shell-helper")
        result = agentd.run(run, ["/bin/sh", "-c", "echo hi > note.txt; cat note.txt"])
        result.exit_code, result.stdout, result.step      # 0, b"hi\\n", 1

`AsyncClient` has the same methods, awaited. Errors are the small tree in
`agentd_client.errors`. The version follows the daemon's; the wire API is agentd.v1
(`agentd_client.v1` holds its generated stubs).
"""

from agentd_client.aio import AsyncClient
from agentd_client.errors import (
    Aborted,
    AgentdError,
    ApprovalRequired,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from agentd_client.sync import Client
from agentd_client.types import Output, RunResult, StepResult, Task, TaskResult

__version__ = "0.1.0"
API = "agentd.v1"

__all__ = [
    "API",
    "Aborted",
    "AgentdError",
    "ApprovalRequired",
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Output",
    "PermissionDenied",
    "ResourceExhausted",
    "RunResult",
    "StepResult",
    "Task",
    "TaskResult",
    "Unavailable",
]

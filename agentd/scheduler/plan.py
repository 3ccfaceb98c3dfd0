"""Planning a step: pure. The tasks asked for and the run's effective policy give the tasks to
run (each with its resolved program), or a refusal, or "needs approval".

The model is LangGraph's `pregel/_algo.py` `prepare_next_tasks`: a plain function the step loop
calls before anything runs, so a refusal of one task refuses the whole step with nothing
started, and the same inputs always give the same plan. The policy decisions themselves
(`decide_exec`, `resolve_executable`, `approval_triggers`) live in agentd/policy/.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agentd.errors import AgentdError, InvalidArgument
from agentd.policy import EffectivePolicy, approval_triggers, decide_call

MAX_TASKS = 64
MAX_ARGS = 4096
MAX_ARGV_BYTES = 1 << 20
MAX_STDIN_BYTES = 16 << 20


@dataclass(frozen=True)
class TaskRequest:
    """One task of a step as the caller asked for it: the domain form of the API's TaskSpec
    (an Exec is a step of one task named "exec")."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    cwd: str = ""
    timeout_seconds: float = 0.0
    allow_failure: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "argv": self.argv, "env": self.env,
                "stdin": self.stdin.hex(), "cwd": self.cwd,
                "timeout_seconds": self.timeout_seconds, "allow_failure": self.allow_failure}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskRequest:
        return cls(**{**data, "stdin": bytes.fromhex(data["stdin"])})


@dataclass(frozen=True)
class PlannedTask:
    """A task the policy allows: what it asked for, the program the worker runs (argv[0]
    resolved on the worker's PATH) and its working directory inside the worker."""

    request: TaskRequest
    executable: str
    cwd: str


@dataclass(frozen=True)
class Plan:
    """The tasks of a step, in request order; `triggers` non-empty means a person must
    approve the step before any of them runs."""

    tasks: tuple[PlannedTask, ...]
    triggers: tuple[str, ...] = ()


class TaskRefused(Exception):
    """One task was refused (malformed or not allowed); the whole step is. Carries the task so
    the refusal is recorded as that task's."""

    def __init__(self, task: TaskRequest, error: AgentdError) -> None:
        super().__init__(error.message)
        self.task = task
        self.error = error


def check_shape(requests: Sequence[TaskRequest]) -> None:
    """The step as a whole: one to MAX_TASKS tasks with unique, well-formed names."""
    if not requests:
        raise InvalidArgument("a step needs at least one task")
    if len(requests) > MAX_TASKS:
        raise InvalidArgument(f"a step has at most {MAX_TASKS} tasks; split it")
    names = [t.name for t in requests]
    for name in names:
        if not name or len(name) > 64 or not name.replace("-", "_").isidentifier():
            raise InvalidArgument(f"task name {name!r} must be 1-64 letters, digits, _ or -")
    if len(set(names)) != len(names):
        raise InvalidArgument("task names must be unique within a step")


def check_task(request: TaskRequest) -> None:
    """One task's request, before the policy looks at it; InvalidArgument says what to fix."""
    if not math.isfinite(request.timeout_seconds):
        raise InvalidArgument("timeout_seconds must be a finite number of seconds")
    if not request.argv or not request.argv[0]:
        raise InvalidArgument("argv is empty; give the command to run, e.g. ['/bin/sh', '-c', "
                              "'echo hi']")
    if len(request.argv) > MAX_ARGS or sum(len(a) for a in request.argv) > MAX_ARGV_BYTES:
        raise InvalidArgument(f"argv is too long (at most {MAX_ARGS} arguments, 1 MiB in all)")
    if any("\0" in arg for arg in request.argv):
        raise InvalidArgument("argv contains a NUL character, which no program can receive")
    if len(request.stdin) > MAX_STDIN_BYTES:
        raise InvalidArgument("stdin is larger than 16 MiB; put large inputs in the workspace")


def plan_task(request: TaskRequest, policy: EffectivePolicy) -> PlannedTask:
    """Validates one task and decides it by policy (`decide_call`, which `agentctl policy
    test` replays offline); raises InvalidArgument for a malformed request, PermissionDenied
    naming the rule for a refused one."""
    check_task(request)
    decided = decide_call(policy, request.argv[0], request.env, request.cwd,
                          request.timeout_seconds)
    return PlannedTask(request, decided.executable, decided.cwd)


def plan_step(requests: Sequence[TaskRequest], policy: EffectivePolicy, *,
              request_approval: bool = False) -> Plan:
    """Every task checked before any runs. Raises InvalidArgument for a malformed step,
    TaskRefused for the first refused task (in request order)."""
    check_shape(requests)
    planned = []
    for request in requests:
        try:
            planned.append(plan_task(request, policy))
        except AgentdError as exc:
            raise TaskRefused(request, exc) from None
    triggers = approval_triggers(policy, [t.executable for t in planned])
    if request_approval:
        # Asked for by the caller: the tasks may start a trigger's program indirectly.
        triggers.append("requested by the caller")
    return Plan(tuple(planned), tuple(triggers))

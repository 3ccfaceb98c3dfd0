"""agentd-backed LangChain tools: run a command, run Python, read and write a workspace file.

Each tool is also a recipe for a task of a step (`AgentdTool.call`), so that `AgentdToolNode`
can put all the calls of one model turn into one agentd step. Alone (in LangGraph's prebuilt
`ToolNode`, or called directly) each call is its own step; a file is then read or written
without a worker (`read_file`, `write_file` of the client).

Which run: the graph's `AgentdCheckpointSaver` says (the thread's current run, forked after
time travel), else `configurable["agentd_run_id"]`, else the `run_id` the tools were made
with. A call that needs an approver waits for the decision (at most `approval_timeout`):
a tool has no way to interrupt without being re-run on resume, and re-running would submit
the step twice. `AgentdToolNode` turns approvals into interrupts instead.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from agentd_client.aio import AsyncClient
from agentd_client.langgraph.saver import (
    Position,
    aworkspace_of,
    note_moved,
    workspace_of,
)
from agentd_client.sync import Client
from agentd_client.types import StepResult, Task, TaskResult

Kind = Literal["command", "python", "read", "write"]
#: What of a tool's stdout and of its stderr a model sees, in characters (head and tail).
MAX_OUTPUT = 8000
# What WaitStep gives of each stream of a step run after an approval (the daemon keeps no more).
KEPT_OUTPUT_BYTES = 4096
# Writes a file from stdin, making its directory first; the path is $1, never shell text.
_WRITE = 'case "$1" in */*) mkdir -p -- "${1%/*}";; esac && cat > "$1"'


@dataclass(frozen=True)
class Call:
    """One tool call as a task of a step, and what the model is told about it."""

    kind: Kind
    task: Task
    path: str = ""
    id: str = ""
    """The tool call's id (names the task in a step)."""


class CommandArgs(BaseModel):
    command: str | list[str] = Field(description=(
        "A shell command line (run with /bin/sh -c), or an argv list run without a shell."))
    timeout: float | None = Field(default=None, description="Seconds before it is killed.")


class PythonArgs(BaseModel):
    code: str = Field(description="Python 3 source, run as `python3 -c CODE`.")
    timeout: float | None = Field(default=None, description="Seconds before it is killed.")


class ReadArgs(BaseModel):
    path: str = Field(description="A path relative to the workspace.")


class WriteArgs(BaseModel):
    path: str = Field(description="A path relative to the workspace; directories are made.")
    content: str = Field(description="The whole new content of the file.")


def to_call(kind: Kind, args: dict[str, Any], python: str = "python3") -> Call:
    """The task a tool call is inside a step, its arguments validated as the tool's are."""
    if kind == "command":
        command = CommandArgs.model_validate(args)
        argv = (["/bin/sh", "-c", command.command] if isinstance(command.command, str)
                else list(command.command))
        return Call("command", Task(argv, timeout=command.timeout))
    if kind == "python":
        code = PythonArgs.model_validate(args)
        return Call("python", Task([python, "-c", code.code], timeout=code.timeout))
    if kind == "read":
        read = ReadArgs.model_validate(args)
        return Call("read", Task(["/bin/cat", "--", read.path]), read.path)
    write = WriteArgs.model_validate(args)
    return Call("write", Task(["/bin/sh", "-c", _WRITE, "write_file", write.path],
                              stdin=write.content.encode()), write.path)


class AgentdTool(StructuredTool):
    """A StructuredTool whose calls can also be tasks of a step (`call`)."""

    kind: Kind = "command"
    python: str = "python3"

    def call(self, args: dict[str, Any]) -> Call:
        return to_call(self.kind, args, self.python)


def clip(text: str, limit: int = MAX_OUTPUT) -> str:
    """At most `limit` characters: the head and the tail, which is where errors and results
    usually are, with what was cut said in between."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - limit} characters cut ...]\n{text[-tail:]}"


def describe(call: Call, result: TaskResult) -> str:
    """What a model is told about one call that ran."""
    stdout = result.stdout.decode(errors="replace")
    stderr = result.stderr.decode(errors="replace")
    if result.exit_code == 0 and call.kind == "read":
        return clip(stdout)
    if result.exit_code == 0 and call.kind == "write":
        return f"wrote {len(call.task.stdin)} bytes to {call.path}"
    parts = [f"exit code {result.exit_code}" + (f" ({result.summary})" if result.exit_code
                                                  else "")]
    if result.failure and result.failure != result.summary:
        parts.append(f"failure: {result.failure}")
    if stdout:
        parts.append("stdout:\n" + clip(stdout))
    if stderr:
        parts.append("stderr:\n" + clip(stderr))
    return "\n".join(parts)


def outcome(step: StepResult, calls: Sequence[Call], *, waited: bool = False
            ) -> list[tuple[str, bool]]:
    """Per call, what the model is told and whether it went well, for a step that ended:
    a failed or rejected step is reported on every call, since none of them was applied.

    `waited`: the step came from `wait_step` (it waited for an approver), whose reply has
    each task's exit code and the first 4 KiB of its output."""
    if step.state == "discarded":
        return [(f"not run: an approver rejected agentd step {step.step} ({step.reason}); "
                 "nothing of this turn's tool calls ran or changed", False)] * len(calls)
    told = _after_approval if waited else describe
    described = [told(c, r) for c, r in zip(calls, step.tasks, strict=False)]
    described += ["no result"] * (len(calls) - len(described))
    if step.state == "committed":
        return [(text, True) for text in described]
    note = (f"agentd step {step.step} failed as a whole ({step.reason}): nothing of this "
            f"turn's {len(calls)} tool call(s) was applied, the workspace is as before")
    return [(f"{note}\nthis call: {text}", False) for text in described]


def _after_approval(call: Call, result: TaskResult) -> str:
    """As `describe`; agentd keeps only the first 4 KiB of each stream of a step that waited
    for an approver (WaitStep), which the model is told when it was cut there."""
    told = describe(call, result)
    if max(len(result.stdout), len(result.stderr)) >= KEPT_OUTPUT_BYTES:
        told += (f"\n(output cut at {KEPT_OUTPUT_BYTES} bytes: agentd keeps no more of a step "
                 "that waited for approval; run the command again to see all of it)")
    return told


def ended_at(step: StepResult) -> Position:
    """Where a step left its run: its checkpoint if it committed, else where it started."""
    return Position(step.run_id, step.step if step.committed else step.base_step)


class _Runner:
    """Runs one tool call alone, on the run its config leads to."""

    def __init__(self, client: Client, aclient: AsyncClient | None, run_id: str | None,
                 approval_timeout: float) -> None:
        self.client, self.aclient = client, aclient
        self.run_id, self.approval_timeout = run_id, approval_timeout

    def run(self, call: Call, config: RunnableConfig) -> tuple[str, dict[str, Any]]:
        at, expect = workspace_of(config, self.run_id, "the tools")
        if call.kind == "read":
            return clip(self.client.read_file(at.run_id, call.path).decode(errors="replace")), {
                "run_id": at.run_id}
        if call.kind == "write":
            step_number = self.client.write_file(at.run_id, call.path, call.task.stdin,
                                                 expect_step=expect)
            note_moved(config, Position(at.run_id, step_number))
            return (f"wrote {len(call.task.stdin)} bytes to {call.path}",
                    {"run_id": at.run_id, "step": step_number})
        step = self.client.step(at.run_id, [call.task], expect_step=expect)
        if step.state == "pending_approval":
            step = self.client.wait_step(at.run_id, step.step, attempt=step.attempt,
                                         deadline=self.approval_timeout)
        return self._report(call, step, config)

    async def arun(self, call: Call, config: RunnableConfig) -> tuple[str, dict[str, Any]]:
        if self.aclient is None:
            return await asyncio.to_thread(self.run, call, config)
        at, expect = await aworkspace_of(config, self.run_id, "the tools")
        if call.kind == "read":
            data = await self.aclient.read_file(at.run_id, call.path)
            return clip(data.decode(errors="replace")), {"run_id": at.run_id}
        if call.kind == "write":
            step_number = await self.aclient.write_file(at.run_id, call.path, call.task.stdin,
                                                        expect_step=expect)
            note_moved(config, Position(at.run_id, step_number))
            return (f"wrote {len(call.task.stdin)} bytes to {call.path}",
                    {"run_id": at.run_id, "step": step_number})
        step = await self.aclient.step(at.run_id, [call.task], expect_step=expect)
        if step.state == "pending_approval":
            step = await self.aclient.wait_step(at.run_id, step.step, attempt=step.attempt,
                                                deadline=self.approval_timeout)
        return self._report(call, step, config)

    def _report(self, call: Call, step: StepResult, config: RunnableConfig
                ) -> tuple[str, dict[str, Any]]:
        note_moved(config, ended_at(step))
        [(text, _)] = outcome(step, [call])
        return text, {"run_id": step.run_id, "step": step.step, "state": step.state,
                      "exit_code": step.tasks[0].exit_code if step.tasks else None}


_DESCRIPTIONS: dict[Kind, tuple[str, str, type[BaseModel]]] = {
    "command": ("run_command", "Run a command in the agent's workspace (the current directory)"
                "; returns its exit code, stdout and stderr.", CommandArgs),
    "python": ("run_python", "Run Python 3 code in the agent's workspace; returns its exit "
               "code, stdout and stderr.", PythonArgs),
    "read": ("read_file", "Read a file of the workspace.", ReadArgs),
    "write": ("write_file", "Write (create or replace) a file of the workspace.", WriteArgs),
}


def agentd_tools(client: Client, *, aclient: AsyncClient | None = None,
                 run_id: str | None = None, python: str = "python3",
                 approval_timeout: float = 600.0) -> list[AgentdTool]:
    """run_command, run_python, read_file and write_file on agentd, sync and async.

    `aclient`: what the async calls use (else they run the sync calls in a thread).
    `run_id`: the run for use without an AgentdCheckpointSaver and without
    `configurable["agentd_run_id"]`."""
    runner = _Runner(client, aclient, run_id, approval_timeout)
    made = []
    for kind, (name, description, schema) in _DESCRIPTIONS.items():
        func, coroutine = _bind(runner, kind, python)
        made.append(AgentdTool(name=name, description=description, args_schema=schema,
                               func=func, coroutine=coroutine, kind=kind, python=python,
                               response_format="content_and_artifact"))
    return made


def _bind(runner: _Runner, kind: Kind, python: str
          ) -> tuple[Callable[..., tuple[str, dict[str, Any]]], Callable[..., Any]]:
    def func(config: RunnableConfig, **args: Any) -> tuple[str, dict[str, Any]]:
        return runner.run(to_call(kind, args, python), config)

    async def coroutine(config: RunnableConfig, **args: Any) -> tuple[str, dict[str, Any]]:
        return await runner.arun(to_call(kind, args, python), config)

    return func, coroutine


def shell_line(call: Call) -> str:
    """The call as a person would type it, for an approval's payload."""
    if call.kind in ("read", "write"):
        return f"{call.kind}_file {call.path}"
    return shlex.join(call.task.argv)

"""A tool node that runs all the tool calls of one model turn as ONE agentd step.

Where LangGraph's prebuilt `ToolNode` would call each tool on its own (two calls on one run
then queue as two steps, each on a different state), this node makes one task per call and
sends them as one `Step`: they see the same snapshot, commit together or not at all, and a
failing call fails the whole step, so every ToolMessage of the turn says so and the workspace
is unchanged. It reads and returns what `ToolNode` does (a state with `messages`, or a list of
messages), so `tools_condition` routes to it unchanged.

Approvals. A step that needs an approver comes back `pending_approval`; the node then calls
LangGraph's `interrupt()` with a payload naming the run, the step and the reason. On resume
LangGraph runs the node again from its start, so the submission must not happen twice: it is
a LangGraph `@task` (`agentd_step`), whose result LangGraph stores with the checkpoint and
hands back, without running it again, when the node re-runs. The resumed node then waits
(bounded by `approval_timeout`) for the decision with `wait_step`; the resume value is not
the decision (an approver decides in agentd, on the approver socket) but the signal to go and
look. If the wait times out the node interrupts again. A rejected step becomes ToolMessages
saying that nothing ran.

Alternatives weighed: recording the pending step in graph state and interrupting in a second
node needs a state key and an extra node in every graph; carrying the step in the resume
value makes the resumer responsible for not losing it. The task keeps the node a drop-in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import BaseTool
from langgraph.func import task
from langgraph.types import interrupt

from agentd_client.aio import AsyncClient
from agentd_client.errors import ApprovalRequired, DeadlineExceeded
from agentd_client.langgraph.saver import (
    Position,
    aworkspace_of,
    note_moved,
    workspace_of,
)
from agentd_client.langgraph.tools import (
    AgentdTool,
    Call,
    clip,
    ended_at,
    outcome,
    shell_line,
)
from agentd_client.sync import Client
from agentd_client.types import StepResult, Task, TaskResult

# Set by LangGraph in a task's config; without it there is no graph to interrupt or replay.
_IN_GRAPH = "__pregel_call"
_SCRATCHPAD = "__pregel_scratchpad"
# How long a replayed interrupt's wait looks before going on to the next interrupt: the
# decision it waited for then is known by now, or a later interrupt waits for it.
_REPLAYED_WAIT = 0.5


def _stored_resumes(config: RunnableConfig) -> int:
    """How many resume values LangGraph holds for this node's interrupts (0: unknown). An
    interrupt before the last of them returns at once on a replay: its wait is not the live
    one, and must not hold the resume for a whole approval_timeout."""
    pad = config.get("configurable", {}).get(_SCRATCHPAD)
    return len(getattr(pad, "resume", None) or ())


def _do(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return work()


async def _ado(work: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    return await work()


# `task`'s annotations take any function's parameters as Never, so mypy refuses every one.
_submit: Any = task(name="agentd_step")(_do)  # type: ignore[arg-type]
_asubmit: Any = task(name="agentd_step")(_ado)  # type: ignore[arg-type]


class AgentdToolNode(RunnableLambda[Any, Any]):
    """Runs a model turn's tool calls as one agentd step (see the module docstring).

    `tools` may mix agentd tools (`agentd_tools`) with others; the others run in this process,
    outside the step. `run_id` serves a graph without an AgentdCheckpointSaver and without
    `configurable["agentd_run_id"]`.
    """

    def __init__(self, tools: Sequence[BaseTool], client: Client, *,
                 aclient: AsyncClient | None = None, run_id: str | None = None,
                 messages_key: str = "messages", approval_timeout: float = 600.0,
                 name: str = "tools") -> None:
        super().__init__(self._run, afunc=self._arun, name=name)
        self.tools = {t.name: t for t in tools}
        self.client, self.aclient, self.run_id = client, aclient, run_id
        self.messages_key = messages_key
        self.approval_timeout = approval_timeout

    # -- sync --------------------------------------------------------------------------------

    def _run(self, state: Any, config: RunnableConfig) -> Any:
        calls = self._tool_calls(state)
        planned, refused = self._plan(calls)
        replies = dict(refused)
        failed = False  # the turn's agentd step did not commit: the other tools do not run
        if planned and not refused:
            ours = [c for c in calls if _id(c) in planned]
            step, waited = self._step(config, [planned[_id(c)] for c in ours])
            told = outcome(step, [planned[_id(c)] for c in ours], waited=waited)
            if waited and step.committed:
                # what the call read: the snapshot the step ran on, not its result
                told = [(clip(self.client.read_file(step.run_id, planned[_id(c)].path,
                                                    step=step.base_step).decode(
                                                        errors="replace")),
                         True) if planned[_id(c)].kind == "read" else said
                        for c, said in zip(ours, told, strict=True)]
            replies.update(self._messages(ours, told, step))
            failed = not step.committed
        for call in calls:
            if _id(call) not in replies and not refused and not failed:
                replies[_id(call)] = self.tools[call["name"]].invoke(_invocation(call), config)
        return self._output(state, [replies[_id(c)] if _id(c) in replies
                                    else _not_run(c, failed) for c in calls])

    def _step(self, config: RunnableConfig, calls: list[Call]) -> tuple[StepResult, bool]:
        """The turn's step once it has ended, and whether it waited for an approver."""
        def work() -> dict[str, Any]:
            at, expect = workspace_of(config, self.run_id, "the node")
            try:
                result = self.client.step(at.run_id, _named(calls), expect_step=expect)
            except ApprovalRequired as pending:
                result = _pending(at, pending)
            return _stored(result)

        step = _loaded(_submit(work).result() if _IN_GRAPH in config.get("configurable", {})
                       else work())
        waited = step.state == "pending_approval"
        stored, asked = _stored_resumes(config), 0
        while step.state == "pending_approval":
            interrupt(_payload(step, calls))
            asked += 1
            try:
                step = self.client.wait_step(step.run_id, step.step, attempt=step.attempt,
                                             deadline=self._deadline(asked, stored))
            except DeadlineExceeded:
                continue
        note_moved(config, ended_at(step))
        return step, waited

    def _deadline(self, asked: int, stored: int) -> float:
        return _REPLAYED_WAIT if asked < stored else self.approval_timeout

    # -- async -------------------------------------------------------------------------------

    async def _arun(self, state: Any, config: RunnableConfig) -> Any:
        calls = self._tool_calls(state)
        planned, refused = self._plan(calls)
        replies = dict(refused)
        failed = False  # the turn's agentd step did not commit: the other tools do not run
        if planned and not refused:
            ours = [c for c in calls if _id(c) in planned]
            step, waited = await self._astep(config, [planned[_id(c)] for c in ours])
            told = outcome(step, [planned[_id(c)] for c in ours], waited=waited)
            if waited and step.committed:
                told = [(clip((await self._read(step, planned[_id(c)].path)).decode(
                    errors="replace")), True) if planned[_id(c)].kind == "read" else said
                    for c, said in zip(ours, told, strict=True)]
            replies.update(self._messages(ours, told, step))
            failed = not step.committed
        others = [c for c in calls if _id(c) not in replies and not refused and not failed]
        done = await asyncio.gather(*(self.tools[c["name"]].ainvoke(_invocation(c), config)
                                      for c in others))
        replies.update({_id(c): m for c, m in zip(others, done, strict=True)})
        return self._output(state, [replies[_id(c)] if _id(c) in replies
                                    else _not_run(c, failed) for c in calls])

    async def _astep(self, config: RunnableConfig, calls: list[Call]
                     ) -> tuple[StepResult, bool]:
        async def work() -> dict[str, Any]:
            at, expect = await aworkspace_of(config, self.run_id, "the node")
            try:
                result = await self._client_step(at.run_id, _named(calls), expect)
            except ApprovalRequired as pending:
                result = _pending(at, pending)
            return _stored(result)

        step = _loaded(await _asubmit(work) if _IN_GRAPH in config.get("configurable", {})
                       else await work())
        waited = step.state == "pending_approval"
        stored, asked = _stored_resumes(config), 0
        while step.state == "pending_approval":
            interrupt(_payload(step, calls))
            asked += 1
            try:
                step = await self._wait(step, self._deadline(asked, stored))
            except DeadlineExceeded:
                continue
        note_moved(config, ended_at(step))
        return step, waited

    async def _client_step(self, run_id: str, tasks: list[Task], expect: int | None
                           ) -> StepResult:
        if self.aclient is not None:
            return await self.aclient.step(run_id, tasks, expect_step=expect)
        return await asyncio.to_thread(self.client.step, run_id, tasks, expect_step=expect)

    async def _read(self, step: StepResult, path: str) -> bytes:
        if self.aclient is not None:
            return await self.aclient.read_file(step.run_id, path, step=step.base_step)
        return await asyncio.to_thread(self.client.read_file, step.run_id, path,
                                       step=step.base_step)

    async def _wait(self, step: StepResult, deadline: float) -> StepResult:
        if self.aclient is not None:
            return await self.aclient.wait_step(step.run_id, step.step, attempt=step.attempt,
                                                deadline=deadline)
        return await asyncio.to_thread(self.client.wait_step, step.run_id, step.step,
                                       attempt=step.attempt, deadline=deadline)

    # -- shared ------------------------------------------------------------------------------

    def _tool_calls(self, state: Any) -> list[ToolCall]:
        if isinstance(state, list):
            messages = state
        elif isinstance(state, dict):
            messages = state.get(self.messages_key, [])
        else:
            messages = getattr(state, self.messages_key, [])
        last = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
        if last is None:
            raise ValueError("AgentdToolNode needs an AIMessage with tool calls in its input")
        return list(last.tool_calls)

    def _plan(self, calls: list[ToolCall]) -> tuple[dict[str, Call], dict[str, ToolMessage]]:
        """The agentd tasks of the turn, and the calls refused before anything ran (an unknown
        tool, invalid arguments): one refused call stops the whole turn, as a failed task
        would, so that a turn is applied whole or not at all."""
        planned: dict[str, Call] = {}
        refused: dict[str, ToolMessage] = {}
        for call in calls:
            tool = self.tools.get(call["name"])
            if tool is None:
                refused[_id(call)] = _error(call, f"no tool named {call['name']!r}; "
                                                   f"there are {sorted(self.tools)}")
            elif isinstance(tool, AgentdTool):
                try:
                    planned[_id(call)] = dataclasses.replace(tool.call(call["args"]),
                                                             id=_id(call))
                except ValueError as invalid:
                    refused[_id(call)] = _error(call, f"invalid arguments: {invalid}")
        return planned, refused

    def _messages(self, calls: list[ToolCall], told: list[tuple[str, bool]],
                  step: StepResult) -> dict[str, ToolMessage]:
        return {_id(call): ToolMessage(
            content=text, tool_call_id=_id(call), name=call["name"],
            status="success" if ok else "error",
            artifact={"run_id": step.run_id, "step": step.step, "state": step.state})
            for call, (text, ok) in zip(calls, told, strict=True)}

    def _output(self, state: Any, messages: list[ToolMessage]) -> Any:
        if isinstance(state, list):
            return messages
        return {self.messages_key: messages}


def _payload(step: StepResult, calls: list[Call]) -> dict[str, Any]:
    """What the interrupt shows: enough for a person to find the step and decide on it."""
    return {"kind": "agentd_approval", "run_id": step.run_id, "step": step.step,
            "reason": step.reason, "calls": [shell_line(c) for c in calls],
            "resume": "decide with `agentctl approve`, then resume the graph"}


def _named(calls: list[Call]) -> list[Task]:
    """The tasks, named after their tool calls where the id makes a valid, unique task name,
    so that a failure's reason names the call ("task call_7: exited 1")."""
    names: set[str] = set()
    tasks = []
    for index, call in enumerate(calls):
        name = re.sub(r"[^A-Za-z0-9_-]", "_", call.id)[:64] or f"t{index}"
        name = name if name not in names else f"t{index}"
        names.add(name)
        tasks.append(dataclasses.replace(call.task, name=name))
    return tasks


def _pending(at: Position, pending: ApprovalRequired) -> StepResult:
    return StepResult(at.run_id, pending.step, pending.step - 1, "pending_approval", False,
                      pending.message, (), {}, pending.attempt or 0)


def _stored(step: StepResult) -> dict[str, Any]:
    """The step as plain data, which LangGraph stores with the checkpoint."""
    return dataclasses.asdict(step)


def _loaded(data: dict[str, Any]) -> StepResult:
    tasks = tuple(TaskResult(**{**t, "changed_paths": tuple(t["changed_paths"])})
                  for t in data["tasks"])
    return StepResult(**{**data, "tasks": tasks})


def _id(call: ToolCall) -> str:
    return call["id"] or ""


def _invocation(call: ToolCall) -> dict[str, Any]:
    return {**call, "type": "tool_call"}


def _error(call: ToolCall, text: str) -> ToolMessage:
    return ToolMessage(content=text, tool_call_id=_id(call), name=call["name"],
                       status="error")


def _not_run(call: ToolCall, step_failed: bool = False) -> ToolMessage:
    why = ("the turn's agentd step did not commit" if step_failed
           else "another tool call of this turn was refused before the step")
    return _error(call, f"not run: {why}, and a turn is applied whole or not at all")


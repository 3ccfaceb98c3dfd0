"""Graph mode's loop: a graph file run on a run as supersteps, each one StepRunner step.

    inputs ──▶ [checkpoint: the input channels written] ──▶ plan ──▶ step ──▶ plan ──▶ ...
                                                        (pure: agentd/graph/pregel.py)

1. plan: the nodes whose trigger channels changed between the run's last two checkpoints
   (and are available) — a pure function of versions and the file;
2. run them as ONE step (`StepRunner.step`: one snapshot, in parallel, merged at the barrier in
   task order), with `expect_step` = the head the plan was made on, so a step that slipped in
   between is refused rather than silently planned around;
3. the barrier commits it as the next checkpoint; the loop reads versions back from there;
4. repeat until nothing triggers, or stop on the recursion limit, a failed or refused step, a
   rejected approval or a node that broke its declared writes. A stop is an outcome (the call
   succeeds and says why), recorded as `graph.stopped`; the run stays at its last checkpoint.

Approvals: a superstep that needs one is recorded pending by StepRunner like any step; the loop
then waits for it (`StepRunner.wait`, bounded by the request's approval timeout and the
caller's deadline) and goes on once an approver's decision has run it. A rejection stops the
graph. Rollback and fork need nothing here: the progress is the checkpoints (see pregel.py),
so `graph run --run R` after `rollback R k`, or on a fork of k, plans the superstep after k.

The input checkpoint is written without a worker (`StepRunner.write_channels`, beside
`write_file`): queued for the writer slot, refused while a step waits for approval,
`graph.input` durable before the checkpoint exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog

from agentd.errors import AgentdError, FailedPrecondition, InvalidArgument
from agentd.graph import Graph, load_graph, plan, render
from agentd.graph.pregel import check_writes
from agentd.identity import Caller
from agentd.scheduler import channels
from agentd.scheduler.plan import TaskRequest
from agentd.scheduler.steps import StepRunner
from agentd.store.runs import RunRecord
from agentd.store.steps import StepRecord, StepState

log = structlog.get_logger("agentd.graph")

MAX_GRAPH_BYTES: Final = 1 << 20
MAX_INPUT_BYTES: Final = 1 << 20
DEFAULT_APPROVAL_TIMEOUT: Final = 3600.0
MAX_APPROVAL_TIMEOUT: Final = 7 * 86400.0
INPUT_TASK: Final = "graph.input"  # no node can be named so: node names have no "."


@dataclass
class GraphEvent:
    """What the caller hears as the graph goes: kind is started, input, superstep,
    pending_approval, step or finished."""

    kind: str
    run_id: str
    step: int = 0
    nodes: tuple[str, ...] = ()
    state: str = ""
    read_only: bool = False
    reason: str = ""
    stopped: bool = False
    supersteps: int = 0


@dataclass
class _Superstep:
    """One superstep's step as it ended, from the call's own result or the stored attempt."""

    step: int
    state: str
    reason: str = ""
    read_only: bool = False
    written: dict[str, list[str]] | None = field(default=None)
    failed_nodes: tuple[str, ...] = ()
    attempt: int = 0


@dataclass
class _Progress:
    """How far one call got: supersteps taken, and whether its end is on record."""

    taken: int = 0
    ended: bool = False


class GraphRunner:
    """Runs graph files on the StepRunner's runs (stateless: one per call is fine)."""

    def __init__(self, steps: StepRunner) -> None:
        self.steps = steps
        self.runs = steps.runs
        self.audit = steps.audit

    async def run(self, source: str, text: bytes, run_id: str, inputs: Mapping[str, str],
                  caller: Caller, approval_timeout: float = 0.0
                  ) -> AsyncGenerator[GraphEvent, None]:
        """Validates the file, creates or checks the run, writes the inputs, then runs
        supersteps until the graph ends or stops; yields events as they happen."""
        graph = self._load(source, text)
        timeout = _approval_timeout(approval_timeout)
        unknown = sorted(set(inputs) - set(graph.inputs))
        if unknown:
            raise InvalidArgument(f"{', '.join(unknown)}: not an input of graph {graph.name} "
                                  f"(inputs: {', '.join(graph.inputs)})")
        if sum(len(v) for v in inputs.values()) > MAX_INPUT_BYTES:
            raise InvalidArgument("the inputs are larger than 1 MiB; put large inputs in the "
                                  "workspace (WriteFile) and pass their paths")
        run_id = await self._run_for(graph, run_id, caller)
        digest = "sha256:" + hashlib.sha256(text).hexdigest()
        await self.audit.append("graph.started", actor=caller.actor(), run_id=run_id, details={
            "graph": graph.name, "source": source[:400], "sha256": digest,
            "inputs": sorted(inputs), "recursion_limit": graph.recursion_limit})
        log.info("graph.started", run_id=run_id, graph=graph.name, uid=caller.uid)
        yield GraphEvent("started", run_id, step=self.runs.check_open(run_id).step)
        if inputs:
            number = await self._write_inputs(graph, run_id, dict(inputs), caller)
            yield GraphEvent("input", run_id, step=number, nodes=(INPUT_TASK,),
                             state=str(StepState.COMMITTED))
        progress = _Progress()
        try:
            async for event in self._supersteps(graph, run_id, caller, timeout, progress):
                yield event
        finally:
            if not progress.ended:  # the caller went away, or a bug: on record all the same
                with contextlib.suppress(AgentdError):
                    await asyncio.shield(self._end(
                        graph, run_id, caller, progress.taken,
                        "the caller went away (or the loop failed); the run stays at its "
                        "last checkpoint: `graph run --run` continues from there"))

    async def _supersteps(self, graph: Graph, run_id: str, caller: Caller, timeout: float,
                          progress: _Progress) -> AsyncGenerator[GraphEvent, None]:
        """Plan, run, commit, until nothing triggers or the graph stops (always on record:
        the last event is `_end`'s)."""
        while True:
            taken = progress.taken
            try:
                head = self.runs.check_open(run_id).step
                nodes = self.pending(graph, run_id, head)
            except AgentdError as exc:  # closed or rolled back under it
                yield await self._end(graph, run_id, caller, taken, exc.message, progress)
                return
            if not nodes:
                yield await self._end(graph, run_id, caller, taken, "", progress)
                return
            if taken >= graph.recursion_limit:
                yield await self._end(graph, run_id, caller, taken, (
                    f"recursion limit: {graph.recursion_limit} supersteps taken and nodes "
                    f"{', '.join(nodes)} are still triggered at step {head}; raise "
                    "recursion_limit if the graph needs more, or give its cycle an exit "
                    "(`agentctl graph lint`); `graph run --run` continues from here"), progress)
                return
            yield GraphEvent("superstep", run_id, step=head + 1, nodes=nodes)
            try:
                requests = self._requests(graph, run_id, head, nodes)
                ended = await self._superstep(run_id, head, requests, caller)
                if ended.state == StepState.PENDING_APPROVAL:
                    yield GraphEvent("pending_approval", run_id, step=ended.step, nodes=nodes,
                                     state=ended.state, reason=ended.reason)
                    ended = await self._approved(run_id, ended.step, ended.attempt, timeout)
            except AgentdError as exc:  # refused, aborted, timed out: the graph stops here
                yield await self._end(graph, run_id, caller, taken,
                                      f"superstep {head + 1} ({', '.join(nodes)}): "
                                      f"{exc.message}", progress)
                return
            yield GraphEvent("step", run_id, step=ended.step, nodes=nodes, state=ended.state,
                             read_only=ended.read_only, reason=ended.reason)
            if ended.state != StepState.COMMITTED:
                yield await self._end(graph, run_id, caller, taken,
                                      f"superstep {head + 1} ({', '.join(nodes)}) "
                                      f"{ended.state}: {ended.reason}", progress)
                return
            progress.taken = taken = taken + 1
            if ended.written is not None:
                written = {n: w for n, w in ended.written.items() if n not in ended.failed_nodes}
                broken = check_writes(graph, written)
                if broken:
                    yield await self._end(graph, run_id, caller, taken, "; ".join(
                        str(b) for b in broken) + " (the superstep is committed)", progress)
                    return

    # -- planning ---------------------------------------------------------------------------

    def pending(self, graph: Graph, run_id: str, head: int) -> tuple[str, ...]:
        """The nodes the run's head triggers; none if that very superstep already ran and
        changed nothing (it left no checkpoint, so the head still shows its trigger)."""
        if head == 0:
            return ()
        specs = self.runs.channel_specs(run_id)
        after = self.steps.steps.checkpoint(run_id, head).channels
        before = self.steps.steps.checkpoint(run_id, head - 1).channels
        available = {name for name, spec in specs.items()
                     if channels.is_available(spec, after[name])
                     and not (spec.reducer == "topic" and not after[name].value)}
        nodes = plan(graph, {k: v.version for k, v in before.items()},
                     {k: v.version for k, v in after.items()}, available)
        if nodes and _ran_read_only(self.steps.steps.latest(run_id, head + 1), head, nodes):
            return ()
        return nodes

    def _requests(self, graph: Graph, run_id: str, head: int,
                  nodes: Sequence[str]) -> list[TaskRequest]:
        snapshot = channels.visible(self.runs.channel_specs(run_id),
                                    self.steps.steps.checkpoint(run_id, head).channels)
        requests = []
        for name in nodes:
            node = graph.nodes[name]
            argv, env = render(name, node.argv, node.env, snapshot)
            requests.append(TaskRequest(name=name, argv=argv, env=env,
                                        timeout_seconds=node.timeout or 0.0,
                                        allow_failure=node.allow_failure))
        return requests

    # -- running ----------------------------------------------------------------------------

    async def _superstep(self, run_id: str, head: int, requests: list[TaskRequest],
                         caller: Caller) -> _Superstep:
        result = await self.steps.step(run_id, requests, caller, expect_step=head)
        written = {o.name: [c for c, _ in o.writes] for o in result.tasks}
        failed = tuple(o.name for o in result.tasks
                       if o.result is not None and (not o.result.exited or o.result.exit_code))
        return _Superstep(result.step, str(result.state), result.reason, result.read_only,
                          written if result.state == StepState.COMMITTED else None, failed,
                          result.attempt)

    async def _approved(self, run_id: str, number: int, attempt: int, timeout: float
                        ) -> _Superstep:
        """Waits for the decision and the step it runs. What each node wrote is not kept with
        an attempt, so declared writes are checked only for steps the graph ran itself."""
        try:
            async with asyncio.timeout(timeout):
                record = await self.steps.wait(run_id, number, attempt or None)
        except TimeoutError:
            raise FailedPrecondition(
                f"step {number} still waits for approval after {timeout:g} s; it stays pending: "
                "once an approver decides, `graph run --run` continues") from None
        read_only = bool(record.reply.get("read_only", False))
        step = int(record.reply.get("base_step", number - 1)) if read_only else number
        return _Superstep(step, record.state, record.reason, read_only)

    async def _end(self, graph: Graph, run_id: str, caller: Caller, taken: int,
                   stopped: str, progress: _Progress | None = None) -> GraphEvent:
        """The last event, on record: `graph.finished`, or `graph.stopped` with the reason."""
        event = "graph.stopped" if stopped else "graph.finished"
        await self.audit.append(event, actor=caller.actor(), run_id=run_id, details={
            "graph": graph.name, "supersteps": taken, "reason": stopped[:1000]})
        if progress is not None:
            progress.ended = True
        log.info(event, run_id=run_id, graph=graph.name, supersteps=taken, reason=stopped)
        return GraphEvent("finished", run_id, step=self.runs.get_run(run_id).step,
                          reason=stopped or "nothing triggers: the graph has ended",
                          stopped=bool(stopped), supersteps=taken)

    # -- the run ----------------------------------------------------------------------------

    def _load(self, source: str, text: bytes) -> Graph:
        if not text:
            raise InvalidArgument("graph is empty: send the graph file's text")
        if len(text) > MAX_GRAPH_BYTES:
            raise InvalidArgument("the graph file is larger than 1 MiB; graphs are short files")
        return load_graph(source or "<graph>", raw=text)

    async def _run_for(self, graph: Graph, run_id: str, caller: Caller) -> str:
        """A new run of the graph's agent with its channels, or the given run if it was made
        for this graph (same agent, same channels)."""
        specs = [channels.ChannelSpec(name, channel.reducer, tuple(channel.tasks))
                 for name, channel in graph.channels.items()]
        if not run_id:
            run = await self.runs.create_run(graph.agent, caller, f"graph {graph.name}", specs)
            return run.run_id
        run = self.runs.check_open(run_id)
        if run.agent != graph.agent:
            raise FailedPrecondition(f"run {run_id} is agent {run.agent}'s; graph {graph.name} "
                                     f"runs as {graph.agent}: start it without --run")
        if sorted(run.channels, key=lambda s: s.name) != sorted(specs, key=lambda s: s.name):
            raise FailedPrecondition(
                f"run {run_id} declares other channels than graph {graph.name} (run: "
                + ", ".join(f"{s.name}:{s.reducer}" for s in run.channels) + "); a graph runs "
                "on a run made for it: start it without --run")
        return run_id

    async def _write_inputs(self, graph: Graph, run_id: str, values: dict[str, str],
                            caller: Caller) -> int:
        """The inputs as the next checkpoint, without a worker (StepRunner.write_channels),
        refused while nodes are still triggered (new inputs would replace that superstep)."""
        def check(run: RunRecord) -> None:
            waiting = self.pending(graph, run_id, run.step)
            if waiting:
                raise FailedPrecondition(
                    f"run {run_id} has nodes {', '.join(waiting)} triggered at step "
                    f"{run.step}; continue it without --input first (new inputs would "
                    "replace that superstep)")

        return await self.steps.write_channels(
            run_id, sorted(values.items()), caller, task=INPUT_TASK, event="graph.input",
            details={"graph": graph.name}, check=check)


def _ran_read_only(latest: StepRecord | None, head: int, nodes: Sequence[str]) -> bool:
    """Whether the attempt after `head` was exactly these nodes, committed read-only on it."""
    if latest is None or latest.state != StepState.COMMITTED:
        return False
    if not latest.reply.get("read_only") or latest.reply.get("base_step") != head:
        return False
    return tuple(t.get("name") for t in latest.request.get("tasks", [])) == tuple(nodes)


def _approval_timeout(seconds: float) -> float:
    if seconds == 0:
        return DEFAULT_APPROVAL_TIMEOUT
    if not 0 < seconds <= MAX_APPROVAL_TIMEOUT:
        raise InvalidArgument(f"approval_timeout_seconds must be between 0 and "
                              f"{MAX_APPROVAL_TIMEOUT:g} (0: {DEFAULT_APPROVAL_TIMEOUT:g})")
    return seconds

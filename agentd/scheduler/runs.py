"""Runs: create, look up, fork, close; and the one gate every tool call passes through.

A run is bound to its agent's effective policy at creation and owns a workspace: a stack of
immutable layers (an empty base, then one per committed step) and its declared channels.
Closing a run kills whatever still runs in it and drops its checkpoints (and the layers no
other run shares) unless the caller keeps them. Every transition is audited before it is
acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import Callable, Sequence

import structlog

from agentd import metrics
from agentd.audit import AuditLog
from agentd.errors import (
    AgentdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from agentd.identity import Caller
from agentd.policy import EffectivePolicy
from agentd.sandbox.worker import Worker
from agentd.scheduler import channels
from agentd.scheduler.agents import AgentRegistry
from agentd.scheduler.gate import Phase, RunGate, RunGates
from agentd.store.layers import LayerStore
from agentd.store.refs import LayerRefs
from agentd.store.runs import RunRecord, RunState, RunStore
from agentd.store.steps import CheckpointRecord, StepStore

log = structlog.get_logger("agentd.runs")

# How long CloseRun waits for a step of the run to end once its workers are killed.
CLOSE_WAIT_SECONDS = 30.0


class RunManager:
    """Owns runs and the workers running in them."""

    def __init__(self, *, registry: AgentRegistry, store: RunStore, steps: StepStore,
                 layers: LayerStore, audit: AuditLog, worker_uid: int, worker_gid: int,
                 max_workers: int) -> None:
        self.registry = registry
        self.store = store
        self.steps = steps
        self.layers = layers
        self.audit = audit
        self._uid = worker_uid
        self._gid = worker_gid
        self._max_workers = max_workers
        self._workers: dict[str, dict[str, Worker]] = {}  # run_id -> task_id -> worker
        # Every transition of a run is decided under its gate (agentd/scheduler/gate.py).
        self.gates = RunGates()
        # Layers in use by readers (tasks, exports, forks, squashes): never deleted under them.
        self.refs = LayerRefs(layers, steps.referenced_of)
        self.draining = False
        self._worker_left = asyncio.Event()
        self._workspace_runs: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        # Told (run id, "failure", what) when a run closes on an unresolved failed step.
        self.on_event: Callable[[str, str, str], None] = lambda run_id, kind, what: None
        # Told (run id) once a run is closed (StepRunner.wait ends its waiters).
        self.on_closed: Callable[[str], None] = lambda run_id: None
        metrics.WORKERS_LIMIT.set(max_workers)

    # -- runs ---------------------------------------------------------------------------

    async def create_run(self, agent_name: str, caller: Caller, label: str = "",
                         channel_specs: Sequence[channels.ChannelSpec] = ()) -> RunRecord:
        self.check_accepting()
        if len(label) > 200:
            raise InvalidArgument("label is longer than 200 characters; shorten it")
        agent = self.registry.get(agent_name)
        specs = channels.declare(channel_specs)
        run_id = "r-" + secrets.token_hex(6)
        base = await asyncio.to_thread(self.layers.create_base, self._uid, self._gid)
        declared = [spec.to_json() for spec in specs.values()]
        record = RunRecord(
            run_id=run_id, agent=agent.name, stage=agent.stage, state=RunState.OPEN,
            created_at=time.time(), closed_at=None, policy_hash=agent.policy.content_hash,
            policy_file=agent.policy_file, workspace="", created_by=str(caller),
            label=label, tasks_run=0, channels=tuple(specs.values()))
        try:
            await self.audit.append("run.created", actor=caller.actor(), run_id=run_id,
                                    details={"agent": agent.name, "stage": agent.stage,
                                             "policy_hash": record.policy_hash,
                                             "policy_file": record.policy_file,
                                             "label (caller-supplied)": label,
                                             "channels": declared,
                                             "base_layer": base})
        except BaseException:
            await asyncio.to_thread(self.layers.delete, base)  # no record, no run: no leftover
            raise
        initial = channels.initial_state(specs)
        self.steps.create_run(record, CheckpointRecord(run_id, 0, [base], initial, time.time()))
        log.info("run.created", run_id=run_id, agent=agent.name, stage=agent.stage,
                 caller=str(caller), uid=caller.uid)
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> RunRecord:
        """The run, with `workspace` the top layer of its current checkpoint (read-only).

        A run whose current checkpoint is missing (an inconsistency: it should not happen) is
        returned with `problem` saying so rather than raising, so that one bad run never
        breaks a listing."""
        record = self.store.get(run_id)
        if record.state is RunState.OPEN or record.workspace:
            try:
                checkpoint = self.steps.checkpoint(run_id, record.step)
            except NotFound:
                log.warning("run.checkpoint_missing", run_id=run_id, step=record.step)
                return dataclasses.replace(
                    record, workspace="",
                    problem=f"its checkpoint at step {record.step} is missing; roll it back "
                            "to a checkpoint that exists, or close it")
            record = dataclasses.replace(
                record, workspace=str(self.layers.path(checkpoint.layers[-1])))
        quarantined = self.layers.quarantined_for(run_id)
        if quarantined:
            record = dataclasses.replace(record, problem=(
                (record.problem + "; " if record.problem else "") + "workspace leftovers that "
                "could not be removed are quarantined (an operator may delete them): "
                + ", ".join(quarantined)))
        return record

    def policy_of(self, run: RunRecord) -> EffectivePolicy:
        """The effective policy the run is bound to (its agent's, clamped to its stage)."""
        return self.registry.get(run.agent).policy

    def shadow_of(self, run: RunRecord) -> EffectivePolicy | None:
        """The next stage's policy, in audit mode (see Agent.shadow); never enforced."""
        return self.registry.get(run.agent).shadow

    def count_task(self, run_id: str) -> None:
        """One more task started on the run (`Run.tasks_run`)."""
        self.store.count_task(run_id)

    def channel_specs(self, run_id: str) -> dict[str, channels.ChannelSpec]:
        """The run's declared channels by name (the store decodes them)."""
        return {spec.name: spec for spec in self.store.get(run_id).channels}

    def list_runs(self, agent: str = "", include_closed: bool = False) -> list[RunRecord]:
        return [self.get_run(r.run_id)
                for r in self.store.list(agent=agent, include_closed=include_closed)]

    async def close_run(self, run_id: str, caller: Caller, *, keep_workspace: bool = False
                        ) -> RunRecord:
        gate = self.gate(run_id)
        async with gate.lock:
            self.check_open(run_id)
            gate.phase = Phase.CLOSING  # from here no step, approval or rollback may begin
        try:
            killed = await self.stop_workers(run_id, "cancelled")
            # A step past its workers may be at its barrier: let it end (its commit sees
            # CLOSING under the gate and fails) before the run's checkpoints go. Its layers
            # are held, so even a step that outlives the wait reads nothing deleted.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.idle.wait(), timeout=CLOSE_WAIT_SECONDS)
            async with gate.lock:
                await self.audit.append("run.closed", actor=caller.actor(), run_id=run_id,
                                        details={"kept_workspace": keep_workspace,
                                                 "killed_tasks": killed})
                self.store.close_run(run_id, workspace="kept" if keep_workspace else "")
                dropped = [] if keep_workspace else self.steps.drop_run(run_id)
                gate.phase = Phase.CLOSED
            await self.refs.release(dropped)
            await self.audit.sign_tree_head()
            self.forget_workspace(run_id)
            self.on_closed(run_id)
            if gate.failed_step is not None:
                self.on_event(run_id, "failure", f"run closed after step {gate.failed_step} "
                              "failed, with no later commit or rollback")
            log.info("run.closed", run_id=run_id, kept_workspace=keep_workspace, killed=killed,
                     uid=caller.uid)
            return self.get_run(run_id)
        finally:
            if gate.phase is Phase.CLOSING:
                gate.phase = Phase.OPEN  # the close failed (e.g. audit log down): still open
            else:
                self.gates.forget(run_id)

    async def fork(self, run_id: str, step: int, caller: Caller, label: str = "") -> RunRecord:
        """A new run of the same agent sharing the checkpoint's layers: O(1) in their size.

        The source's checkpoint is read under the source's gate (no rollback or close moves
        it meanwhile), its layers are held while the fork is recorded, and the new run is
        inserted with its checkpoints in one transaction."""
        self.check_accepting()
        gate = self.gate(run_id)
        async with gate.lock:
            source = self.store.get(run_id)
            checkpoint = self.steps.checkpoint(run_id, step)
            async with self.refs.hold(checkpoint.layers):
                new_id = "r-" + secrets.token_hex(6)
                record = dataclasses.replace(
                    source, run_id=new_id, state=RunState.OPEN, created_at=time.time(),
                    closed_at=None, workspace="", created_by=str(caller), label=label, tasks_run=0,
                    step=step, forked_from=run_id, forked_at=step)
                await self.audit.append("run.forked", actor=caller.actor(), run_id=new_id,
                                        details={"from_run": run_id, "at_step": step,
                                                 "layers": checkpoint.layers,
                                                 "label (caller-supplied)": label})
                self.steps.fork(checkpoint, record)
        log.info("run.forked", run_id=new_id, source=run_id, step=step, uid=caller.uid)
        await self.audit.sign_tree_head()
        return self.get_run(new_id)

    def check_open(self, run_id: str) -> RunRecord:
        """The run, if new work may enter it; FAILED_PRECONDITION if closed or closing."""
        record = self.store.get(run_id)
        if record.state is RunState.CLOSED:
            raise FailedPrecondition(f"run {run_id} is closed; create a new run")
        self.gate(run_id).check_open()
        return record

    def gate(self, run_id: str) -> RunGate:
        """The run's gate; NOT_FOUND for an unknown run. Only open runs keep one (so bad or
        late run ids cannot grow the table): a closed run's is a fresh, CLOSED one."""
        if self.store.get(run_id).state is RunState.CLOSED:
            return RunGate(run_id, phase=Phase.CLOSED)
        return self.gates(run_id)

    # -- workers --------------------------------------------------------------------------

    def check_accepting(self) -> None:
        """Refuses new work while draining or while the audit log cannot record it."""
        if self.draining:
            raise Unavailable("agentd is shutting down; retry against the restarted daemon")
        if not self.audit.check_room() or not self.audit.healthy:
            raise Unavailable(f"the audit log is not writable ({self.audit.failure_reason}); "
                              "agentd refuses new work until it can record it again")

    def check_capacity(self, wanted: int) -> None:
        """Refuses a step whose tasks would not all fit under max_concurrent_workers, before
        any of them starts."""
        running = self.running()
        if running + wanted > self._max_workers:
            raise ResourceExhausted(
                f"{running} workers are running and this needs {wanted} more; the daemon's "
                f"limit (max_concurrent_workers) is {self._max_workers}: retry when some have "
                "finished, or split the step")

    def register(self, run_id: str, worker: Worker) -> None:
        """Admits a worker into a run; called with no await since the run was checked open."""
        self.check_open(run_id)
        self.check_capacity(1)
        self._workers.setdefault(run_id, {})[worker.spec.task_id] = worker
        metrics.WORKERS_IN_USE.set(self.running())

    def unregister(self, run_id: str, task_id: str) -> None:
        tasks = self._workers.get(run_id, {})
        tasks.pop(task_id, None)
        if not tasks:
            self._workers.pop(run_id, None)
        metrics.WORKERS_IN_USE.set(self.running())
        self._worker_left.set()

    async def stop_workers(self, run_id: str | None, reason: str) -> int:
        """Kills the workers of one run (or all, for None) and waits until they are gone.
        The steps they served fail, but the agent did not fail them: each run's gate is told
        (`stopped`), so such a step is no unresolved failure (a demotion, a close, a drain)."""
        victims = [w for rid, tasks in self._workers.items() if run_id in (None, rid)
                   for w in tasks.values()]
        for rid in {rid for rid in self._workers if run_id in (None, rid)}:
            gate = self.gates(rid)
            if gate.holder:
                gate.stopped = True
        for worker in victims:
            worker.stop(reason)
        deadline = time.monotonic() + 10
        while True:
            # Cleared before the check, with no await between them: no departure is missed.
            self._worker_left.clear()
            remaining = deadline - time.monotonic()
            if not any(run_id in (None, rid) for rid in self._workers) or remaining <= 0:
                return len(victims)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._worker_left.wait(), remaining)

    def note_workspace(self, run_id: str, stack: list[str]) -> None:
        """After a commit: the run's workspace size, for the metrics, measured off the reply
        path (usage sidecars, one small file per layer)."""
        async def measure() -> None:
            with contextlib.suppress(OSError, AgentdError):
                used = await asyncio.to_thread(self.layers.usage, stack)
                if run_id in self._workspace_runs or len(self._workspace_runs) < 10_000:
                    self._workspace_runs.add(run_id)
                    metrics.WORKSPACE_BYTES.labels(run_id).set(used.bytes)
        task = asyncio.get_running_loop().create_task(measure())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def forget_workspace(self, run_id: str) -> None:
        if run_id in self._workspace_runs:
            self._workspace_runs.discard(run_id)
            metrics.WORKSPACE_BYTES.remove(run_id)

    def running(self) -> int:
        return sum(len(tasks) for tasks in self._workers.values())

"""BSP steps: plan, execute in parallel on one snapshot, merge at the barrier, commit.

The loop follows LangGraph's Pregel loop (`pregel/_algo.py`), applied to side effects on a
host; the loop itself only runs tasks, and each part is its own function:

1. plan (agentd/scheduler/plan.py, pure): the tasks of step S are checked against the policy
   before any runs; a step that needs approval stops here, persisted, until Approve;
2. execute (agentd/scheduler/tasks.py `TaskRunner.run`): every task runs in its own worker on
   the workspace committed by S-1 (the layer stack as overlayfs lowers, a private upper each)
   with a snapshot of the channel values;
3. merge (`_merge`, over agentd/scheduler/barrier.py `apply_writes` and the layer store's
   `conflicts`, both pure): once all have ended, results are taken in task order (never
   completion order): a failed task, a conflicting pair of writes or file changes fails the
   whole step;
4. commit (`_commit`): the uppers, with the changes already computed, become one new
   immutable layer, then the checkpoint (layers, channel values and versions) and the run's
   pointer change in one SQLite transaction, after the step's audit record is durable. Only
   then is the step reported committed.

One writer per run: a step claims its run under the run's gate (agentd/scheduler/gate.py)
between its plan and its commit. Steps on one run queue for it, first come first served
(bounded); each reply names the checkpoint the step ran on (`base_step`), and a step that
names the one it expects (`expect_step`) is refused (ABORTED) if the head has moved. A rollback
on a run whose step is running is refused (ABORTED), never queued.

A step that succeeds and changes nothing (no file, no channel write: `ls`, a read) makes no
checkpoint: it is committed *read-only* (`step.unchanged` on record), the run stays at its
head, and the reply's `step` is that head, so a framework's step numbers move only when state
does.

A step whose tasks may reach the network (its policy grants egress and the daemon runs it) is
marked so in its stored attempt before any task starts. If the daemon dies while it runs,
recovery makes it AMBIGUOUS rather than interrupted: nothing was committed, but a request may
have left the host. Until an approver resolves it (`resolve`: retry, accept, abandon), the run
takes no new step, write, graph input or rollback (docs/architecture.md, "Recovery").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import errno
import functools
import hashlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from agentd import metrics
from agentd.audit import AuditLog, durable
from agentd.errors import (
    Aborted,
    AgentdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from agentd.identity import SYSTEM, Caller
from agentd.policy import EffectivePolicy
from agentd.policy.decide import judge
from agentd.scheduler import barrier, channels, files
from agentd.scheduler.export import Exporter
from agentd.scheduler.gate import Phase, RunGate
from agentd.scheduler.plan import MAX_TASKS, Plan, PlannedTask, TaskRefused, TaskRequest, plan_step
from agentd.scheduler.runs import RunManager
from agentd.scheduler.tasks import StepContext, StepListener, TaskOutcome, TaskRunner, upper_name
from agentd.store.layers import LayerStore
from agentd.store.quota import Quota, QuotaExceeded, StateDiskFull
from agentd.store.refs import Hold
from agentd.store.runs import RunRecord, RunState
from agentd.store.steps import (
    CheckpointRecord,
    StepRecord,
    StepState,
    StepStore,
    already_decided,
)
from agentd.store.values import ChannelValue

log = structlog.get_logger("agentd.steps")

__all__ = ["Resolution", "StepListener", "StepResult", "StepRunner", "TaskOutcome",
           "TaskRequest", "recover_steps"]


# Callers that may wait (WaitStep) on one run's steps at once.
MAX_WAITERS_PER_RUN = 64
# Of an approved step, each task's first bytes of each stream are kept with its attempt: the
# requester was not the one who heard the reply, and WaitStep gives them this much of it.
KEPT_OUTPUT_BYTES = 4096


class Resolution(enum.StrEnum):
    """An approver's answer to an ambiguous step (`StepRunner.resolve`)."""

    RETRY = "retry"
    """Run its stored tasks again, re-checked against the policy, as an approved step."""
    ACCEPT = "accept"
    """Take its external effects as done; nothing is committed, the run stays at its head."""
    ABANDON = "abandon"
    """Discard it: neither run again nor taken as done."""


# Where each resolution leaves the ambiguous attempt (RETRY: running, then as it ends).
_RESOLVED_STATE = {Resolution.RETRY: StepState.RUNNING, Resolution.ACCEPT: StepState.ACCEPTED,
                   Resolution.ABANDON: StepState.DISCARDED}


@dataclass
class StepResult:
    """A step as it ended (or stopped for approval): what the API's StepReply is made of."""

    run_id: str
    step: int
    state: StepState
    reason: str = ""
    conflicts: list[str] = field(default_factory=list)
    tasks: list[TaskOutcome] = field(default_factory=list)
    channels: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    created_at: float = field(default_factory=time.time)
    requested_by: str = ""
    decided_by: str = ""
    base_step: int = -1
    """The checkpoint the step ran on (-1: it never reached one)."""
    read_only: bool = False
    """Committed without a checkpoint: it changed nothing; `step` is the head it ran on."""
    attempt: int = 0
    """The stored attempt (0: none was stored, the step was refused before)."""

    def to_json(self) -> dict[str, Any]:
        tasks = [t.to_json() for t in self.tasks]
        if self.decided_by:  # approved: the requester reads the outcome later (WaitStep)
            for entry, task in zip(tasks, self.tasks, strict=True):
                entry["stdout"] = base64.b64encode(task.stdout[:KEPT_OUTPUT_BYTES]).decode()
                entry["stderr"] = base64.b64encode(task.stderr[:KEPT_OUTPUT_BYTES]).decode()
        return {"state": str(self.state), "reason": self.reason, "conflicts": self.conflicts,
                "tasks": tasks, "wall": self.wall_seconds,
                "versions": self.versions, "base_step": self.base_step,
                "read_only": self.read_only}


class Phases:
    """Where a step's time went: milliseconds between successive marks."""

    def __init__(self) -> None:
        self._marks: list[tuple[str, float]] = [("begin", time.perf_counter())]

    def mark(self, name: str) -> None:
        self._marks.append((name, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        return {f"{name}_ms": round((t - prev) * 1e3, 3)
                for (_, prev), (name, t) in zip(self._marks, self._marks[1:], strict=False)}


@dataclass
class _Merged:
    """What the barrier made of a step's outcomes: the next channel state, or why not."""

    state: dict[str, ChannelValue] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)
    failure: str = ""
    conflicts: list[str] = field(default_factory=list)


class StepRunner:
    """Runs, approves, rolls back and forks steps of the RunManager's runs."""

    def __init__(self, runs: RunManager, tasks: TaskRunner, steps: StepStore,
                 layers: LayerStore, audit: AuditLog, *, squash_depth: int = 100,
                 max_export_bytes: int | None = None,
                 allow_self_approval: bool = False) -> None:
        self.runs = runs
        self.tasks = tasks
        self.steps = steps
        self.layers = layers
        self.audit = audit
        self.allow_self_approval = allow_self_approval
        self.squash_depth = squash_depth
        self.exports = Exporter()
        self.max_export_bytes = max_export_bytes
        self._background: set[asyncio.Task[None]] = set()
        # Callers of `wait`, per run: each one's event is set whenever an attempt of that
        # run may have ended (bounded, so that idle waiters cannot make every step's end
        # wake thousands of queries).
        self._waiters: dict[str, set[asyncio.Event]] = {}
        runs.on_closed = self._wake

    # -- waiting for a step -------------------------------------------------------------------

    async def wait(self, run_id: str, number: int, attempt: int | None = None) -> StepRecord:
        """The latest attempt at step `number` (or exactly `attempt`, which a reply named)
        once it has ended (committed, failed, discarded or accepted): a step pending approval
        is waited for until an approver decides and it has run, an ambiguous one until it is
        resolved (and, retried, has run: the retry keeps the attempt's number). Bounded by the
        caller's deadline (the RPC's cancellation ends the wait); FAILED_PRECONDITION if the
        run closes with the attempt still undecided."""
        self.runs.get_run(run_id)  # NOT_FOUND for an unknown run
        waiting = self._waiters.setdefault(run_id, set())
        if len(waiting) >= MAX_WAITERS_PER_RUN:
            raise ResourceExhausted(f"{len(waiting)} callers already wait on run {run_id}'s "
                                    f"steps (at most {MAX_WAITERS_PER_RUN}); wait on fewer")
        woken = asyncio.Event()
        waiting.add(woken)
        try:
            while True:
                latest = (self.steps.latest(run_id, number) if attempt is None
                          else self._attempt_of(run_id, number, attempt))
                if latest is None:
                    raise NotFound(f"run {run_id} has no step {number}; `agentctl timeline "
                                   "RUN` lists its steps")
                if latest.state not in (StepState.PENDING_APPROVAL, StepState.RUNNING,
                                        StepState.AMBIGUOUS):
                    return latest
                if self.runs.get_run(run_id).state is RunState.CLOSED:
                    raise FailedPrecondition(f"run {run_id} was closed with step {number} "
                                             f"{latest.state.replace('_', ' ')}; it will not run")
                woken.clear()
                await woken.wait()
        finally:
            waiting.discard(woken)
            if not waiting:
                self._waiters.pop(run_id, None)

    def _attempt_of(self, run_id: str, number: int, attempt: int) -> StepRecord | None:
        try:
            record = self.steps.attempt(attempt)
        except NotFound:
            return None
        return record if (record.run_id, record.step) == (run_id, number) else None

    def _wake(self, run_id: str) -> None:
        for woken in self._waiters.get(run_id, ()):
            woken.set()

    # -- planning ---------------------------------------------------------------------------

    async def _plan(self, run_id: str, requests: Sequence[TaskRequest], caller: Caller, *,
                    request_approval: bool = False) -> tuple[EffectivePolicy, Plan]:
        """The pure plan on the run's current policy; a refused task is recorded as that
        task's refusal, and refuses the whole step."""
        run = self.runs.check_open(run_id)
        policy = self.runs.policy_of(run)
        shadow = self.runs.shadow_of(run)
        if shadow is not None:
            await self._audit_next_stage(run_id, requests, policy, shadow, caller)
        try:
            return policy, plan_step(requests, policy, request_approval=request_approval)
        except TaskRefused as refused:
            await self.tasks.refused(run_id, refused.task, caller,
                                     "t-" + secrets.token_hex(8), refused.error, policy)
            raise refused.error from None

    async def _audit_next_stage(self, run_id: str, requests: Sequence[TaskRequest],
                                policy: EffectivePolicy, shadow: EffectivePolicy,
                                caller: Caller) -> None:
        """Audit mode: each task decided again under the next stage's policy, never
        enforced; where the verdicts differ, a `stage.shadow` record (before the step's own
        records, so a refused step has it too)."""
        for request in requests[:MAX_TASKS]:
            if not request.argv or not request.argv[0]:
                continue
            args = (request.argv[0], request.env, request.cwd, request.timeout_seconds)
            now, then = judge(policy, *args), judge(shadow, *args)
            if now.verdict == then.verdict:
                continue
            await self.audit.append("stage.shadow", actor=caller.actor(), run_id=run_id,
                                    details={"task": request.name, "argv": request.argv[:8],
                                             "stage": policy.stage, "next_stage": shadow.stage,
                                             "enforced": now.verdict, "next": then.verdict,
                                             "reason": then.detail[:400], "rule": then.rule})

    async def step(self, run_id: str, requests: Sequence[TaskRequest], caller: Caller,
                   listener: StepListener | None = None, *, request_approval: bool = False,
                   task_events: bool = True, expect_step: int | None = None) -> StepResult:
        """Waits for the run's writer slot (queued behind its running step), plans the step,
        then claims the run under its gate (or records it pending approval there) and runs
        it; the claim and the slot are released whatever happens. With `expect_step`, ABORTED
        unless the run's head is that checkpoint, on arrival and when its turn comes."""
        self.runs.check_accepting()
        try:
            gate = self.runs.gate(run_id)
            gate.check_open()
            self._check_expected(run_id, expect_step)
        except Aborted:
            raise
        except AgentdError as exc:
            await self._record_refusal(run_id, requests, caller, exc)
            raise
        if gate.writer.locked():
            log.debug("step.queued", run_id=run_id, behind=gate.holder, waiting=gate.queued,
                      uid=caller.uid)
        async with gate.turn():
            return await self._step(gate, run_id, requests, caller, listener,
                                    request_approval=request_approval,
                                    task_events=task_events, expect_step=expect_step)

    async def _step(self, gate: RunGate, run_id: str, requests: Sequence[TaskRequest],
                    caller: Caller, listener: StepListener | None, *, request_approval: bool,
                    task_events: bool, expect_step: int | None) -> StepResult:
        try:
            self.runs.check_accepting()  # a drain may have begun while it waited its turn
            gate.check_idle("retry")
            self._no_pending(run_id)
            self._check_expected(run_id, expect_step)
            policy, plan = await self._plan(run_id, requests, caller,
                                            request_approval=request_approval)
        except Aborted:
            raise
        except AgentdError as exc:
            await self._record_refusal(run_id, requests, caller, exc)
            raise
        # The requester's uid (SO_PEERCRED) decides who may approve: another person.
        request = {"tasks": [t.to_json() for t in requests], "requested_uid": caller.uid}
        async with gate.lock:
            # Decided again under the gate: the plan above awaited, the run may have moved.
            gate.check_idle("retry")
            run = self.runs.check_open(run_id)
            self._no_pending(run_id)
            self._check_expected(run_id, expect_step)
            number = run.step + 1
            if plan.triggers:
                metrics.STEPS.labels(str(StepState.PENDING_APPROVAL)).inc()
                return await self._hold_for_approval(run_id, number, plan, policy, request,
                                                     caller)
            gate.claim(f"step {number}")
        try:
            attempt = self.steps.begin(run_id, number, StepState.RUNNING, request, str(caller))
            return await self._execute(run_id, number, attempt, plan.tasks, policy, caller,
                                       listener, requested_by=str(caller),
                                       task_events=task_events)
        finally:
            gate.release()

    def _check_expected(self, run_id: str, expect_step: int | None) -> None:
        """ABORTED if the caller built its step on a checkpoint that is no longer the head."""
        if expect_step is None:
            return
        head = self.runs.check_open(run_id).step
        if head != expect_step:
            raise Aborted(f"run {run_id} is at step {head}, not {expect_step}: the head moved "
                          "since the caller looked; read the new state and decide again")

    async def _record_refusal(self, run_id: str, requests: Sequence[TaskRequest],
                              caller: Caller, exc: AgentdError) -> None:
        await self.audit.append("step.refused", actor=caller.actor(), run_id=run_id,
                                details={"tasks": [t.name for t in requests][:MAX_TASKS],
                                         "error": exc.code, "reason": exc.message,
                                         "rule": getattr(exc, "rule", None)})
        log.info("step.refused", run_id=run_id, reason=exc.message, uid=caller.uid,
                 rule=getattr(exc, "rule", None))
        metrics.REFUSALS.labels(getattr(exc, "rule", None) or exc.code).inc()

    async def _hold_for_approval(self, run_id: str, number: int, plan: Plan,
                                 policy: EffectivePolicy, request: dict[str, Any],
                                 caller: Caller) -> StepResult:
        """Records the step as waiting for a person's decision (under the run's gate)."""
        attempt = self.steps.begin(run_id, number, StepState.PENDING_APPROVAL, request,
                                   str(caller))
        reason = (f"needs approval ({', '.join(plan.triggers)}; rule: "
                  f"{policy.rule('approval.required_for')})")
        await self.audit.append("step.pending_approval", actor=caller.actor(), run_id=run_id,
                                details={"step": number, "triggers": list(plan.triggers),
                                         "tasks": [t.request.name for t in plan.tasks]})
        log.info("step.pending_approval", run_id=run_id, step=number, uid=caller.uid,
                 triggers=list(plan.triggers))
        return StepResult(run_id, number, StepState.PENDING_APPROVAL, reason=reason,
                          requested_by=str(caller), base_step=number - 1, attempt=attempt)

    def _no_pending(self, run_id: str) -> None:
        """FAILED_PRECONDITION while a step of the run waits for a person: an approval, or
        the resolution of an ambiguous step (nothing may be built on a state whose external
        effects nobody has judged)."""
        pending = self.steps.first_pending(run_id)
        if pending is not None:
            raise FailedPrecondition(
                f"step {pending.step} of run {run_id} waits for approval; approve or reject "
                "it first (`agentctl approve`)")
        ambiguous = self.steps.first_ambiguous(run_id)
        if ambiguous is not None:
            raise FailedPrecondition(ambiguous_message(ambiguous))

    def _pending(self, run_id: str, number: int) -> StepRecord:
        """The attempt at step `number` waiting for a decision; NOT_FOUND if there is none,
        FAILED_PRECONDITION naming the decider if it was decided already."""
        latest = self.steps.latest(run_id, number)
        if latest is not None and latest.state == StepState.PENDING_APPROVAL:
            return latest
        if latest is not None and latest.decided_by:
            raise already_decided(latest)
        raise NotFound(f"run {run_id} has no step {number} waiting for approval")

    def _check_approver(self, pending: StepRecord, caller: Caller,
                        verb: str = "approve") -> bool:
        """Approval (and a resolution, `verb` "resolve") means another person; returns whether
        this is a (permitted, development only) self-approval by the requester's own uid."""
        if pending.requested_by == str(caller):
            raise PermissionDenied(f"the requester of a step cannot {verb} it; another approver "
                                   "must decide", rule="approvals: requester != approver")
        self_approved = bool(pending.request.get("requested_uid") == caller.uid)
        if self_approved and not self.allow_self_approval:
            raise PermissionDenied(
                f"uid {caller.uid} requested step {pending.step} of run {pending.run_id} and "
                f"cannot {verb} it: that means another person; ask an approver with "
                "another uid (or set allow_self_approval in the daemon config, for "
                "development only)", rule="approvals: approver uid != requester uid")
        if self_approved:
            log.warning("step.self_approved", run_id=pending.run_id, step=pending.step,
                        uid=caller.uid)
        return self_approved

    async def approve(self, run_id: str, number: int, approve: bool, reason: str,
                      caller: Caller, listener: StepListener | None = None) -> StepResult:
        """Exactly one decision wins: the pending attempt moves to running or discarded
        under the run's gate; a later decision gets FAILED_PRECONDITION naming the winner."""
        pending = self._pending(run_id, number)
        self_approved = self._check_approver(pending, caller)
        requests = [TaskRequest.from_json(t) for t in pending.request["tasks"]]
        if approve:
            # Checked against the policy again (it may have changed since the request).
            policy, plan = await self._plan(run_id, requests, caller)
        gate = self.runs.gate(run_id)
        async with gate.turn():  # behind a step still running on the run, as a step would
            return await self._decide(gate, run_id, number, approve, reason, caller, listener,
                                      self_approved, policy if approve else None,
                                      plan if approve else None)

    async def _decide(self, gate: RunGate, run_id: str, number: int, approve: bool,
                      reason: str, caller: Caller, listener: StepListener | None,
                      self_approved: bool, policy: EffectivePolicy | None,
                      plan: Plan | None) -> StepResult:
        async with gate.lock:
            self.runs.check_accepting()  # a drain began while it waited: left undecided
            pending = self._pending(run_id, number)  # the other decision may have won
            details = {"step": number, "approved": approve, "reason": reason,
                       "self_approved": self_approved}
            log.info("step.approval", run_id=run_id, step=number, approved=approve,
                     uid=caller.uid, self_approved=self_approved)
            if not approve:
                await self.audit.append("step.approval", actor=caller.actor(), run_id=run_id,
                                        details=details)
                self.steps.decide(pending.attempt, StepState.DISCARDED, decided_by=str(caller),
                                  reason=reason or "rejected")
                self._wake(run_id)
                return StepResult(run_id, number, StepState.DISCARDED,
                                  reason=reason or "rejected",
                                  requested_by=pending.requested_by, decided_by=str(caller))
            gate.check_idle("retry the approval")
            run = self.runs.check_open(run_id)
            await self.audit.append("step.approval", actor=caller.actor(), run_id=run_id,
                                    details=details)
            if run.step + 1 != number:
                self.steps.decide(pending.attempt, StepState.DISCARDED, decided_by=str(caller),
                                  reason="the run moved on before approval")
                raise FailedPrecondition(f"run {run_id} is no longer at step {number - 1}; "
                                         "the pending step was discarded, submit it again")
            self.steps.decide(pending.attempt, StepState.RUNNING, decided_by=str(caller))
            gate.claim(f"step {number}")
        assert plan is not None  # an approval was planned above
        assert policy is not None
        return await self._run_decided(gate, run_id, number, pending.attempt,
                                       pending.requested_by, plan, policy, caller, listener)

    async def _run_decided(self, gate: RunGate, run_id: str, number: int, attempt: int,
                           requested_by: str, plan: Plan, policy: EffectivePolicy,
                           caller: Caller, listener: StepListener | None) -> StepResult:
        """A step someone decided to run (an approval, a retried ambiguous step), on the run
        its caller has just claimed; the claim is released whatever happens."""
        try:
            return await self._execute(run_id, number, attempt, plan.tasks, policy, caller,
                                       listener, requested_by=requested_by,
                                       decided_by=str(caller))
        finally:
            gate.release()

    # -- resolving an ambiguous step ------------------------------------------------------------

    def _ambiguous(self, run_id: str, number: int) -> StepRecord:
        """The ambiguous attempt at step `number`; NOT_FOUND if there is none,
        FAILED_PRECONDITION naming the resolver if it was resolved already."""
        self.runs.get_run(run_id)  # NOT_FOUND for an unknown run
        latest = self.steps.latest(run_id, number)
        if latest is not None and latest.state == StepState.AMBIGUOUS:
            return latest
        if latest is not None and "resolution" in latest.request:
            raise already_decided(latest)
        raise NotFound(f"run {run_id} has no ambiguous step {number}; `agentctl steps RUN` "
                       "shows its steps")

    async def resolve(self, run_id: str, number: int, resolution: Resolution, reason: str,
                      caller: Caller, listener: StepListener | None = None) -> StepResult:
        """An approver's resolution of an ambiguous step, by another person than its
        requester (as an approval), on record (`step.resolved`) before it takes effect.
        Exactly one resolution wins (under the run's gate, then compare-and-set in the
        store). RETRY runs the stored tasks as an approved step would (planned again on
        the current policy, on the head the step was planned on: the resolution is the
        approval, so triggers do not ask again) and returns how it ended; ACCEPT and ABANDON
        return at once, and may be given on a closed run (the record is what matters)."""
        record = self._ambiguous(run_id, number)
        self_resolved = self._check_approver(record, caller, "resolve")
        policy: EffectivePolicy | None = None
        plan: Plan | None = None
        if resolution is Resolution.RETRY:
            requests = [TaskRequest.from_json(t) for t in record.request["tasks"]]
            policy, plan = await self._plan(run_id, requests, caller)
        gate = self.runs.gate(run_id)
        if resolution is not Resolution.RETRY:
            async with gate.lock:
                return await self._settle(run_id, number, resolution, reason, caller,
                                          self_resolved, gate)
        async with gate.turn():  # as an approved step: behind anything holding the run
            self.runs.check_accepting()
            async with gate.lock:
                gate.check_idle("retry the resolution")
                run = self.runs.check_open(run_id)
                if run.step + 1 != number:  # no rollback passes an ambiguous step; a backstop
                    raise FailedPrecondition(
                        f"run {run_id} is at step {run.step}, not {number - 1}: step {number} "
                        "cannot be retried where it was planned; accept or abandon it")
                pending = await self._settle(run_id, number, resolution, reason, caller,
                                             self_resolved, gate)
                gate.claim(f"step {number}")
            assert plan is not None  # planned above for a retry
            assert policy is not None
            return await self._run_decided(gate, run_id, number, pending.attempt,
                                           pending.requested_by, plan, policy, caller, listener)

    async def _settle(self, run_id: str, number: int, resolution: Resolution, reason: str,
                      caller: Caller, self_resolved: bool, gate: RunGate) -> StepResult:
        """Under the run's gate: the resolution on record, then the attempt's new state.
        For a retry, the result says RUNNING and the caller runs it."""
        record = self._ambiguous(run_id, number)  # another resolution may have won
        state = _RESOLVED_STATE[resolution]
        stored_reason = {Resolution.ACCEPT: "accepted as done",
                         Resolution.ABANDON: "abandoned",
                         Resolution.RETRY: "retried"}[resolution] + (
                             f": {reason}" if reason else "")
        await self.audit.append("step.resolved", actor=caller.actor(), run_id=run_id,
                                details={"step": number, "attempt": record.attempt,
                                         "resolution": str(resolution), "reason": reason,
                                         "requested_by": record.requested_by,
                                         "self_resolved": self_resolved})
        log.info("step.resolved", run_id=run_id, step=number, resolution=str(resolution),
                 uid=caller.uid, self_resolved=self_resolved)
        self.steps.resolve(record.attempt, state, decided_by=str(caller),
                           reason="" if resolution is Resolution.RETRY else stored_reason,
                           resolution={"resolution": str(resolution), "by": str(caller),
                                       "reason": reason, "at": time.time()})
        if resolution is not Resolution.RETRY:
            gate.failed_step = None
            self._wake(run_id)
        return StepResult(run_id, number, state, reason=stored_reason,
                          requested_by=record.requested_by, decided_by=str(caller),
                          base_step=number - 1, attempt=record.attempt)

    # -- execute, merge, commit --------------------------------------------------------------

    async def _execute(self, run_id: str, number: int, attempt: int,
                       planned: Sequence[PlannedTask], policy: EffectivePolicy,
                       caller: Caller, listener: StepListener | None, *, requested_by: str,
                       decided_by: str = "", task_events: bool = True) -> StepResult:
        """Runs a claimed step (the caller holds the run's gate and releases it after):
        load, execute every task, merge, commit; whatever happens, the finally records a
        failure, removes the uppers and releases the layers it held."""
        gate = self.runs.gate(run_id)  # the claimed gate, even if a close drops it meanwhile
        started = time.monotonic()
        result = StepResult(run_id, number, StepState.FAILED, requested_by=requested_by,
                            decided_by=decided_by, base_step=number - 1, attempt=attempt)
        outcomes: list[TaskOutcome] = []
        hold: Hold | None = None
        layer: str | None = None
        started_record: asyncio.Future[int] | None = None
        phases = Phases()
        try:
            if policy.network == "egress" and self.tasks.egress is not None:
                self.steps.mark_egress(attempt)  # durable before a task can reach out
            base = self.steps.checkpoint(run_id, number - 1)
            hold = self.runs.refs.hold(base.layers)  # mounted as lowers until the end
            specs = self.runs.channel_specs(run_id)
            self.runs.check_capacity(len(planned))
            # Not awaited here: each task awaits it with its own exec.allowed, so all of them
            # share one group commit before the first worker starts.
            started_record = self.audit.submit(
                "step.started", actor=caller.actor(), run_id=run_id, details={
                    "step": number, "tasks": [
                        {"name": t.request.name, "argv": t.request.argv[:64]}
                        for t in planned]})
            log.info("step.started", run_id=run_id, step=number, tasks=len(planned),
                     uid=caller.uid)
            ctx = StepContext(run_id, number, base.layers, policy,
                              channels.visible(specs, base.channels), specs, caller,
                              approved=bool(decided_by), started=started_record,
                              listener=listener, task_events=task_events)
            # The outcomes (and their task ids) exist before any task starts, so whatever
            # happens next, the finally below knows every upper to remove.
            outcomes = [TaskOutcome(t.request.name, task_id="t-" + secrets.token_hex(8))
                        for t in planned]
            phases.mark("recorded")
            await self._run_tasks(ctx, planned, outcomes)
            await durable(started_record)
            phases.mark("tasks")
            merged = self._merge(specs, base, outcomes, policy)
            phases.mark("merged")
            if merged.failure:
                result.reason, result.conflicts = merged.failure, merged.conflicts
                return result
            self.runs.check_open(run_id)
            try:
                layer = await asyncio.to_thread(functools.partial(
                    self.layers.commit,
                    [o.upper.upper for o in outcomes if o.upper is not None],
                    changes=[o.changes for o in outcomes if o.upper is not None],
                    lowers=base.layers, limit=Quota(policy.workspace_bytes, policy.inodes)))
            except (QuotaExceeded, StateDiskFull) as exc:
                result.reason = exc.message  # nothing applied; the finally records it
                return result
            phases.mark("layer")
            if layer is None and not merged.changed:
                await self._commit_unchanged(gate, attempt, base, specs, outcomes, result,
                                             caller, started)
                phases.mark("committed")
                return result
            layers = base.layers + ([layer] if layer else [])
            checkpoint = CheckpointRecord(run_id, number, layers, merged.state, time.time())
            await self._commit(gate, attempt, checkpoint, merged, specs, outcomes, result,
                               caller, started)
            phases.mark("committed")
            layer = None  # a checkpoint records it now
            self.runs.note_workspace(run_id, layers)
            if len(layers) >= self.squash_depth:
                self._start_squash(run_id, layers)
            return result
        finally:
            result.tasks = outcomes
            result.wall_seconds = time.monotonic() - started
            await self._finish(attempt, result, caller, outcomes, hold, layer,
                               started_record)
            phases.mark("finished")
            durations = phases.durations()
            log.debug("step.timing", run_id=run_id, step=number, **durations)
            metrics.observe_phases(metrics.STEP_SECONDS,
                                   {**durations, "total_ms": sum(durations.values())})
            metrics.STEPS.labels(str(result.state)).inc()

    async def _run_tasks(self, ctx: StepContext, planned: Sequence[PlannedTask],
                         outcomes: Sequence[TaskOutcome]) -> None:
        """Every task at once, each in its own worker; returns when all have ended."""
        try:
            async with asyncio.TaskGroup() as group:
                for outcome, task in zip(outcomes, planned, strict=True):
                    group.create_task(self.tasks.run(ctx, task, outcome))
        except BaseExceptionGroup as failed:
            # One task could not be run at all (not a tool failure: those are outcomes);
            # the group has cancelled and awaited the others.
            raise failed.exceptions[0] from None

    def _merge(self, specs: dict[str, channels.ChannelSpec], base: CheckpointRecord,
               outcomes: Sequence[TaskOutcome], policy: EffectivePolicy) -> _Merged:
        """The barrier, pure: channel writes in task order, the state's size against the
        policy, then the file changes' conflicts (one engine: the layer store's)."""
        results = [barrier.TaskResult(index=i, name=o.name, ok=not o.failure,
                                      reason=o.failure or None, writes=o.writes)
                   for i, o in enumerate(outcomes)]
        try:
            new_state, changed = barrier.apply_writes(specs, base.channels, results, base.step + 1)
        except barrier.StepFailed as failed:
            failure = failed.failure
            reason = failure.reason if failure.task is None else \
                f"task {failure.task}: {failure.reason}"
            return _Merged(failure=reason, conflicts=[str(c) for c in failure.conflicts])
        size = channels.encoded_size(new_state)
        if size > policy.channel_state_bytes:
            return _Merged(failure=(
                f"the run's channel state would be {size} bytes, more than the"
                f" {policy.channel_state_bytes} bytes limits.channel_state allows (rule:"
                f" {policy.rule('limits.channel_state')}); write less, keep large results"
                " in files in the workspace, or raise the limit in the policy"))
        path_conflicts = self.layers.conflicts([(o.name, o.changes) for o in outcomes])
        if path_conflicts:
            return _Merged(failure="conflicting file changes",
                           conflicts=[str(c) for c in path_conflicts])
        return _Merged(state=new_state, changed=changed)

    async def _commit(self, gate: RunGate, attempt: int, checkpoint: CheckpointRecord,
                      merged: _Merged, specs: dict[str, channels.ChannelSpec],
                      outcomes: list[TaskOutcome], result: StepResult, caller: Caller,
                      started: float) -> None:
        """The step's record, durable, then the checkpoint and the run's pointer in one
        SQLite transaction, under the run's gate; then a signed tree head covers it."""
        run_id, number = checkpoint.run_id, checkpoint.step
        async with gate.lock:
            # The claim kept rollbacks and other steps out. A close that began after the
            # step's workers had ended waits for this commit (and then drops it, with the
            # run); one that gave up waiting has marked the run CLOSED.
            if gate.phase is Phase.CLOSED:
                raise FailedPrecondition(f"run {run_id} was closed while step {number} "
                                         "ran; nothing of it was applied")
            result.state = StepState.COMMITTED  # as the stored reply says, if it lands
            result.channels = channels.visible(specs, merged.state)
            result.versions = {k: v.version for k, v in merged.state.items()}
            result.tasks = outcomes
            layer = checkpoint.layers[-1] if checkpoint.layers else None
            try:
                # The tasks' exec.exited and this record: one group commit for the outcome.
                await durable(*(o.recorded for o in outcomes), self.audit.submit(
                    "step.committing", actor=caller.actor(), run_id=run_id, details={
                        "step": number, "layer": layer,
                        "changed_channels": sorted(merged.changed),
                        "tasks": [o.to_json() for o in outcomes]}))
                result.wall_seconds = time.monotonic() - started
                self.steps.commit(attempt, checkpoint, result.to_json())
                gate.failed_step = None
            except BaseException:
                result.state = StepState.FAILED  # the finally of _execute records it so
                raise
        log.info("step.committed", run_id=run_id, step=number, uid=caller.uid,
                 wall=round(time.monotonic() - started, 4))
        await self.audit.sign_tree_head()

    async def _commit_unchanged(self, gate: RunGate, attempt: int, base: CheckpointRecord,
                                specs: dict[str, channels.ChannelSpec],
                                outcomes: list[TaskOutcome], result: StepResult,
                                caller: Caller, started: float) -> None:
        """A step that changed nothing: its outcome durable (`step.unchanged`), no checkpoint;
        the run stays at `base`, which the reply names as its step."""
        run_id = base.run_id
        async with gate.lock:
            if gate.phase is Phase.CLOSED:
                raise FailedPrecondition(f"run {run_id} was closed while its step ran")
            result.state, result.read_only = StepState.COMMITTED, True
            result.step = base.step
            result.channels = channels.visible(specs, base.channels)
            result.versions = {k: v.version for k, v in base.channels.items()}
            result.tasks = outcomes
            try:
                await durable(*(o.recorded for o in outcomes), self.audit.submit(
                    "step.unchanged", actor=caller.actor(), run_id=run_id, details={
                        "step": base.step, "tasks": [o.to_json() for o in outcomes]}))
                result.wall_seconds = time.monotonic() - started
                # Not a resolution of an earlier failure: only a change (a commit that moves
                # the head) or a rollback resolves one, or `true` would undo any failure.
                self.steps.finish_unchanged(attempt, result.to_json())
            except BaseException:
                result.state, result.read_only = StepState.FAILED, False
                result.step = base.step + 1
                raise
        log.info("step.unchanged", run_id=run_id, step=base.step, uid=caller.uid,
                 wall=round(time.monotonic() - started, 4))
        await self.audit.sign_tree_head()

    async def _finish(self, attempt: int, result: StepResult, caller: Caller,
                      outcomes: Sequence[TaskOutcome], hold: Hold | None,
                      layer: str | None, started_record: asyncio.Future[int] | None) -> None:
        """Records a step that did not commit (after everything it submitted: durable before
        the reply), then frees what it used, even if the record cannot be written (disk
        full): the run must not stay held, nor the uppers stay."""
        run_id = result.run_id
        submitted = [started_record, *(o.recorded for o in outcomes)]
        try:
            if result.state != StepState.COMMITTED:
                self.steps.finish(attempt, StepState.FAILED, reply=result.to_json(),
                                  reason=result.reason)
                gate = self.runs.gate(run_id)
                if not gate.stopped:  # the agent's own failure, not the daemon's stop
                    gate.failed_step = result.step
                log.info("step.failed", run_id=run_id, step=result.step, uid=caller.uid,
                         reason=result.reason)
                submitted.append(self.audit.submit(
                    "step.failed", actor=caller.actor(), run_id=run_id,
                    details={"step": result.step, "reason": result.reason,
                             "conflicts": result.conflicts}))
            await durable(*submitted)
        finally:
            self._wake(run_id)
            # Off the loop: an agent's tree may be huge or deep.
            await asyncio.to_thread(self._remove_uppers, run_id, outcomes)
            quarantined = self.layers.take_quarantined()
            if quarantined:
                log.error("workspace.quarantined", run_id=run_id, paths=quarantined)
                self.tasks.on_event(run_id, "quarantine", f"{len(quarantined)} path(s)")
                with contextlib.suppress(AgentdError):
                    await self.audit.append("workspace.quarantined", actor=SYSTEM.actor(),
                                            run_id=run_id, details={"paths": quarantined})
            if hold is not None:
                await hold.release()
            if layer is not None:  # committed to disk but recorded by no checkpoint
                await self.runs.refs.release([layer])

    def _remove_uppers(self, run_id: str, outcomes: Sequence[TaskOutcome]) -> None:
        for outcome in outcomes:
            self.layers.remove_upper(upper_name(run_id, outcome.task_id))

    def _start_squash(self, run_id: str, stack: list[str]) -> None:
        hold = self.runs.refs.hold(stack)  # read by the squash: no release deletes them
        squash = asyncio.get_running_loop().create_task(self._squash(run_id, stack, hold))
        self._background.add(squash)
        squash.add_done_callback(self._background.discard)

    async def _squash(self, run_id: str, stack: list[str], hold: Hold) -> None:
        """Merges a deep stack into one layer, in the background; every checkpoint built on
        that stack then starts from the merged layer: same content, fewer lowers to mount
        (overlayfs stacks at most 500). The old layers are released once nobody (a running
        task, an export) holds them."""
        async with hold:
            try:
                merged = await asyncio.to_thread(self.layers.squash, stack)
                rewritten = self.steps.replace_layers(stack, [merged])
                await self.audit.append("workspace.squashed", actor=SYSTEM.actor(),
                                        run_id=run_id, details={
                                            "layers": len(stack), "into": merged,
                                            "checkpoints_rewritten": rewritten})
                log.info("workspace.squashed", run_id=run_id, layers=len(stack), into=merged)
            except (AgentdError, OSError):
                # The stack stays as it was: correct, only deeper. The next commit tries again.
                log.exception("workspace.squash_failed", run_id=run_id)
                return
        await self.runs.refs.release([*stack, merged])  # merged: if no checkpoint took it

    # -- changes the daemon makes itself, without a worker ----------------------------------

    @contextlib.asynccontextmanager
    async def _direct_turn(self, run_id: str, what: str, expect_step: int | None
                           ) -> AsyncIterator[tuple[RunGate, RunRecord]]:
        """The run claimed for a change made without a worker (a file write, a graph's
        inputs): queued for the writer slot like a step, with a step's checks (draining, open,
        no step pending approval, the head expected), released (and waiters woken) after."""
        self.runs.check_accepting()
        gate = self.runs.gate(run_id)
        gate.check_open()
        self._check_expected(run_id, expect_step)
        async with gate.turn():
            self.runs.check_accepting()  # a drain began while it waited
            async with gate.lock:
                gate.check_idle("retry")
                run = self.runs.check_open(run_id)
                self._no_pending(run_id)
                self._check_expected(run_id, expect_step)
                gate.claim(what)
            try:
                yield gate, run
            finally:
                gate.release()
                self._wake(run_id)

    async def write_channels(self, run_id: str, writes: Sequence[tuple[str, Any]],
                             caller: Caller, *, task: str, event: str,
                             details: Mapping[str, Any],
                             check: Callable[[RunRecord], None] | None = None) -> int:
        """Channel values written as the next checkpoint, as one task named `task` would
        write them (the reducers and the policy's channel state limit apply); `event` is
        durable before the checkpoint exists. `check` may refuse, with the run claimed."""
        async with self._direct_turn(run_id, f"{task} of run {run_id}", None) as (gate, run):
            if check is not None:
                check(run)
            number = run.step + 1
            base = self.steps.checkpoint(run_id, run.step)
            try:
                state, changed = barrier.apply_writes(
                    self.runs.channel_specs(run_id), base.channels,
                    [barrier.TaskResult(0, task, True, None, list(writes))], number)
            except barrier.StepFailed as failed:
                raise InvalidArgument(f"the values cannot be written: {failed}") from None
            limit = self.runs.policy_of(run).channel_state_bytes
            if channels.encoded_size(state) > limit:
                raise InvalidArgument(
                    f"with these values the channel state would be "
                    f"{channels.encoded_size(state)} bytes, more than limits.channel_state "
                    f"({limit}); write less, and keep large values in workspace files")
            request = {task: {"channels": sorted(changed)}, "requested_uid": caller.uid}
            reply = {"state": str(StepState.COMMITTED), "reason": "", "conflicts": [],
                     "tasks": [{"name": task, "failure": "", "changed": [],
                                "writes": len(changed), "exec_denied": [], "outcome": None}],
                     "wall": 0.0, "versions": {k: v.version for k, v in state.items()},
                     "base_step": number - 1, "read_only": False}
            async with gate.lock:
                if gate.phase is Phase.CLOSED:
                    raise FailedPrecondition(f"run {run_id} was closed meanwhile")
                attempt = self.steps.begin(run_id, number, StepState.RUNNING, request,
                                           str(caller))
                try:
                    await self.audit.append(event, actor=caller.actor(), run_id=run_id,
                                            details={**details, "step": number,
                                                     "channels": sorted(changed)})
                    self.steps.commit(attempt, CheckpointRecord(
                        run_id, number, base.layers, state, time.time()), reply)
                except BaseException:
                    self.steps.finish(attempt, StepState.FAILED, reply={},
                                      reason="the values were not written")
                    raise
                gate.failed_step = None
        log.info(event, run_id=run_id, step=number, channels=sorted(changed), uid=caller.uid)
        await self.audit.sign_tree_head()
        return number

    async def write_file(self, run_id: str, raw_path: str, data: bytes, mode: int,
                         caller: Caller, expect_step: int | None = None) -> StepResult:
        """One workspace file as the next checkpoint (agentd/scheduler/files.py): queued for
        the run's writer slot like a step, under the policy's workspace mode and quota,
        `workspace.written` durable before the checkpoint is in force."""
        path = files.workspace_path(raw_path)
        async with self._direct_turn(run_id, f"write of {path}", expect_step) as (gate, run):
            policy = self.runs.policy_of(run)
            if policy.workspace != "read_write":
                refused = PermissionDenied(
                    f"the workspace is {policy.workspace.replace('_', '-')} for "
                    f"{run.agent} at {policy.stage}: no file may be written",
                    rule=policy.rule("filesystem.workspace"))
                await self.audit.append("workspace.write_refused", actor=caller.actor(),
                                        run_id=run_id, details={
                                            "path": path, "bytes": len(data),
                                            "reason": refused.message, "rule": refused.rule})
                raise refused
            return await self._write(gate, run_id, run.step + 1, path, data,
                                     mode & 0o777 or 0o644, policy, caller)

    async def _write(self, gate: RunGate, run_id: str, number: int, path: str, data: bytes,
                     mode: int, policy: EffectivePolicy, caller: Caller) -> StepResult:
        started = time.monotonic()
        digest = hashlib.sha256(data).hexdigest()
        request = {"write": {"path": path, "bytes": len(data), "sha256": digest,
                             "mode": f"{mode:o}"}, "requested_uid": caller.uid}
        attempt = self.steps.begin(run_id, number, StepState.RUNNING, request, str(caller))
        result = StepResult(run_id, number, StepState.FAILED, requested_by=str(caller),
                            base_step=number - 1, attempt=attempt)
        base = self.steps.checkpoint(run_id, number - 1)
        hold = self.runs.refs.hold(base.layers)
        task_id = "w-" + secrets.token_hex(8)
        layer: str | None = None
        try:
            upper = await asyncio.to_thread(self.layers.new_upper, upper_name(run_id, task_id),
                                            self.tasks.uid, self.tasks.gid)
            try:
                await asyncio.to_thread(functools.partial(
                    self.layers.stage_file, upper.upper, base.layers, path, data, mode,
                    self.tasks.uid, self.tasks.gid))
                layer = await asyncio.to_thread(functools.partial(
                    self.layers.commit, [upper.upper], lowers=base.layers,
                    limit=Quota(policy.workspace_bytes, policy.inodes)))
            except (QuotaExceeded, StateDiskFull) as exc:
                result.reason = exc.message
                return result
            except AgentdError as exc:
                result.reason = exc.message
                raise
            except OSError as exc:  # the state disk's answer: nothing applied, said plainly
                result.reason = (f"{path} could not be written: {exc.strerror or exc}")
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted(result.reason) from None
                raise FailedPrecondition(result.reason) from None
            layers = base.layers + ([layer] if layer else [])
            checkpoint = CheckpointRecord(run_id, number, layers, base.channels, time.time())
            async with gate.lock:
                if gate.phase is Phase.CLOSED:
                    raise FailedPrecondition(f"run {run_id} was closed during the write")
                await self.audit.append("workspace.written", actor=caller.actor(),
                                        run_id=run_id, details={
                                            "step": number, "path": path, "bytes": len(data),
                                            "sha256": digest, "mode": f"{mode:o}",
                                            "layer": layer})
                result.state = StepState.COMMITTED
                result.channels = channels.visible(self.runs.channel_specs(run_id),
                                                   base.channels)
                result.versions = {k: v.version for k, v in base.channels.items()}
                result.wall_seconds = time.monotonic() - started
                try:
                    self.steps.commit(attempt, checkpoint, result.to_json())
                except BaseException:
                    result.state = StepState.FAILED
                    raise
                layer = None  # the checkpoint records it now
                gate.failed_step = None
            log.info("workspace.written", run_id=run_id, step=number, path=path,
                     bytes=len(data), uid=caller.uid)
            self.runs.note_workspace(run_id, layers)
            if len(layers) >= self.squash_depth:
                self._start_squash(run_id, layers)
            await self.audit.sign_tree_head()
            return result
        finally:
            if result.state != StepState.COMMITTED:
                result.reason = result.reason or "the write did not complete"
                self.steps.finish(attempt, StepState.FAILED, reply=result.to_json(),
                                  reason=result.reason)
                with contextlib.suppress(AgentdError):  # the log is down: nothing applied
                    await self.audit.append("step.failed", actor=caller.actor(),
                                            run_id=run_id, details={
                                                "step": number, "reason": result.reason,
                                                "write": path})
            await asyncio.to_thread(self.layers.remove_upper, upper_name(run_id, task_id))
            await hold.release()
            if layer is not None:
                await self.runs.refs.release([layer])

    # -- checkpoints -------------------------------------------------------------------------

    async def rollback(self, run_id: str, number: int, caller: Caller) -> None:
        """Decided under the run's gate: refused (ABORTED) while a step holds the run, so a
        rollback that is acknowledged holds; the dropped layers go once nobody holds them."""
        gate = self.runs.gate(run_id)
        async with gate.lock:
            gate.check_idle("roll back")
            run = self.runs.check_open(run_id)
            ambiguous = self.steps.first_ambiguous(run_id)
            if ambiguous is not None:  # a rollback must not bury what nobody has judged
                raise FailedPrecondition(ambiguous_message(ambiguous))
            if number > run.step:
                raise FailedPrecondition(f"run {run_id} is at step {run.step}; it cannot roll "
                                         f"forward to {number}")
            self.steps.checkpoint(run_id, number)  # NOT_FOUND if it does not exist
            await self.audit.append("run.rolled_back", actor=caller.actor(),
                                         run_id=run_id,
                                         details={"from_step": run.step, "to_step": number})
            dropped = self.steps.rollback(run_id, number)
            gate.failed_step = None
            self._wake(run_id)  # a pending step it discarded
        log.info("run.rolled_back", run_id=run_id, from_step=run.step, to_step=number,
                 uid=caller.uid)
        await self.audit.sign_tree_head()
        await self.runs.refs.release(dropped)  # those no other checkpoint (a fork's) uses

    async def export(self, run_id: str, number: int, caller: Caller
                     ) -> AsyncGenerator[bytes, None]:
        """The checkpoint as a tarball, chunk by chunk; its layers are held until the tar
        writer's thread has stopped, and a consumer that goes away stops that thread."""
        checkpoint = self.steps.checkpoint(run_id, number)
        hold = self.runs.refs.hold(checkpoint.layers)  # no await since the read
        try:
            await self.audit.append("checkpoint.exported", actor=caller.actor(),
                                         run_id=run_id, details={
                                             "step": number, "layers": len(checkpoint.layers)})
        except BaseException:
            await hold.release()
            raise
        layers = checkpoint.layers
        limit = self.max_export_bytes
        async with contextlib.aclosing(self.exports.stream(
                lambda out: self.layers.export_tar(layers, out, max_bytes=limit),
                hold)) as chunks:
            async for chunk in chunks:
                yield chunk

def ambiguous_message(record: StepRecord) -> str:
    """Why nothing more happens on a run with an ambiguous step, and what to do."""
    return (f"step {record.step} of run {record.run_id} is AMBIGUOUS: the daemon stopped while "
            "it ran with network egress, so its external effects may have happened though "
            "nothing was committed; an approver resolves it first (`agentctl resolve "
            f"{record.run_id} {record.step} retry|accept|abandon --reason TEXT`)")


AMBIGUOUS_REASON = ("the daemon stopped while the step ran with network egress: nothing was "
                    "committed, but its external effects may have happened; an approver "
                    "resolves it (`agentctl resolve RUN STEP retry|accept|abandon`)")


def recover_steps(steps: StepStore, layers: LayerStore,
                  on_ambiguous: Callable[[StepRecord], object] | None = None) -> dict[str, Any]:
    """At start-up, after a crash: steps that were running are marked interrupted (nothing of
    them was applied: their checkpoint was never written), or ambiguous if their attempt says
    their tasks could reach the network (`on_ambiguous` records each first, so the log never
    lacks one the store shows); layers no checkpoint refers to (a commit cut short) and every
    task's upper are removed."""
    interrupted, ambiguous = [], []
    for attempt in steps.in_state(StepState.RUNNING):
        entry = {"run_id": attempt.run_id, "step": attempt.step}
        if attempt.request.get("egress"):
            if on_ambiguous is not None:
                on_ambiguous(attempt)
            steps.finish(attempt.attempt, StepState.AMBIGUOUS, reply={},
                         reason=AMBIGUOUS_REASON)
            ambiguous.append({**entry, "attempt": attempt.attempt})
            continue
        steps.finish(attempt.attempt, StepState.INTERRUPTED, reply={},
                     reason="the daemon stopped while the step ran; submit it again")
        interrupted.append(entry)
    removed = layers.gc(steps.referenced_layers(), keep_uppers=())
    return {"interrupted_steps": interrupted, "ambiguous_steps": ambiguous,
            "removed": len(removed)}

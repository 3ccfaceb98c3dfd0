"""BSP steps: plan, execute in parallel on one snapshot, merge at the barrier, commit.

The loop follows LangGraph's Pregel loop, applied to side effects on a host:

1. plan: the tasks of step S are fixed, checked against the policy and recorded before any
   runs; a step that needs approval stops here, persisted, until Approve;
2. execute: every task runs in its own worker on the workspace committed by S-1 (the layer
   stack as overlayfs lowers, a private upper each) with a snapshot of the channel values;
3. barrier: once all have ended, results are taken in task order (never completion order):
   a failed task, a conflicting pair of writes or file changes fails the whole step;
4. commit: the uppers become one new immutable layer, then the checkpoint (layers, channel
   values and versions) and the run's pointer change in one SQLite transaction, after the
   step's audit record is durable. Only then is the step reported committed.

One writer per run: a step claims its run under the run's gate (agentd/scheduler/gate.py)
between its plan and its commit; a second Step, an approval or a rollback on a run whose step
is still running gets ABORTED at once (rather than queueing behind it), so a client always
knows which state its call acted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from agentd.errors import (
    Aborted,
    AgentdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from agentd.identity import SYSTEM, Caller
from agentd.policy import EffectivePolicy
from agentd.policy.execset import exec_mounts
from agentd.sandbox.worker import Worker, WorkerResult
from agentd.scheduler import barrier, channels
from agentd.scheduler.export import Exporter
from agentd.scheduler.gate import Phase
from agentd.scheduler.output import CappedOutput
from agentd.scheduler.runs import RunManager
from agentd.scheduler.tasks import ExecRequest, TaskRunner
from agentd.scheduler.writes import WritesCollector, channels_snapshot_fd
from agentd.store.layers import Change, LayerStore, Upper
from agentd.store.quota import Quota, QuotaExceeded, StateDiskFull
from agentd.store.refs import Hold
from agentd.store.steps import CheckpointRecord, StepRecord, StepStore, already_decided
from agentd.store.trees import PathTooLong

log = structlog.get_logger("agentd.steps")

MAX_TASKS = 64
WRITES_FD, CHANNELS_FD = 3, 4

# (task name, stream, data) as the output happens; then each task's report when it ends.
StepListener = Callable[[str, Any], Awaitable[None]]


@dataclass(frozen=True)
class TaskRequest:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    cwd: str = ""
    timeout_seconds: float = 0.0
    allow_failure: bool = False

    def exec_request(self, run_id: str) -> ExecRequest:
        """The tool call this task makes, as the policy checks and the worker runs it."""
        return ExecRequest(run_id=run_id, argv=self.argv, env=self.env, stdin=self.stdin,
                           cwd=self.cwd, timeout_seconds=self.timeout_seconds)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "argv": self.argv, "env": self.env,
                "stdin": self.stdin.hex(), "cwd": self.cwd,
                "timeout_seconds": self.timeout_seconds, "allow_failure": self.allow_failure}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskRequest:
        return cls(**{**data, "stdin": bytes.fromhex(data["stdin"])})


@dataclass
class TaskReport:
    """One task of a step as it ended: its outcome, what it changed, why it failed the step."""

    name: str
    result: WorkerResult | None = None
    changed_paths: list[str] = field(default_factory=list)
    writes: list[tuple[str, Any]] = field(default_factory=list)
    failure: str = ""
    task_id: str = ""
    changes: list[Change] = field(default_factory=list)
    upper: Upper | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    exec_denied: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {"name": self.name, "failure": self.failure, "changed": self.changed_paths,
                "writes": len(self.writes), "exec_denied": self.exec_denied,
                "outcome": None if r is None else {
                    "exited": r.exited, "exit_code": r.exit_code, "signal": r.signal,
                    "stop_reason": r.stop_reason, "wall": round(r.wall_seconds, 6),
                    "summary": r.summary}}


@dataclass
class StepResult:
    run_id: str
    step: int
    state: str  # committed | failed | pending_approval | discarded
    reason: str = ""
    conflicts: list[str] = field(default_factory=list)
    tasks: list[TaskReport] = field(default_factory=list)
    channels: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    created_at: float = field(default_factory=time.time)
    requested_by: str = ""
    decided_by: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "conflicts": self.conflicts,
                "tasks": [t.to_json() for t in self.tasks], "wall": self.wall_seconds,
                "versions": self.versions}


def approval_triggers(policy: EffectivePolicy, executables: Sequence[str]) -> list[str]:
    """The policy's approval triggers this step matches (empty: it may run at once).

    Paths are compared as real paths (granted paths are bound at the same place in the
    worker), so /bin/rm cannot slip past exec:/usr/bin/rm on a merged-/usr host. An exec:
    trigger looks at what each task asks to run (argv[0]), not at what that runs in turn:
    a policy that lets a shell run must trigger on the shell.
    """
    real = [os.path.realpath(exe) for exe in executables]
    hits = []
    for trigger in policy.approval_required_for:
        if trigger == "exec" or (trigger == "user_namespace" and policy.user_namespace):
            hits.append(trigger)
        elif trigger.startswith("exec:"):
            target = trigger.removeprefix("exec:")
            if target.endswith("/"):
                tree = os.path.realpath(target) + "/"
                matched = any(exe.startswith(tree) for exe in real)
            else:
                matched = os.path.realpath(target) in real
            if matched:
                hits.append(trigger)
    return hits


def withheld_programs(policy: EffectivePolicy, approved: bool) -> tuple[str, ...]:
    """What a worker of this step must not execute by any route: the programs (and trees) of
    the policy's exec: approval triggers, unless a person approved the step.

    argv[0] alone is not enough (a shell, Python or the loader can start a trigger), so the
    worker is built without them (agentd/policy/execset.py).
    """
    if approved:
        return ()
    return tuple(sorted(t.removeprefix("exec:").rstrip("/") or "/"
                        for t in policy.approval_required_for if t.startswith("exec:")))


class StepRunner:
    """Runs, approves, rolls back and forks steps of the RunManager's runs."""

    def __init__(self, runs: RunManager, tasks: TaskRunner, steps: StepStore,
                 layers: LayerStore, *, squash_depth: int = 100,
                 max_export_bytes: int | None = None,
                 allow_self_approval: bool = False) -> None:
        self.runs = runs
        self.allow_self_approval = allow_self_approval
        self.tasks = tasks
        self.steps = steps
        self.layers = layers
        self.squash_depth = squash_depth
        self.exports = Exporter()
        self.max_export_bytes = max_export_bytes
        self._background: set[asyncio.Task[None]] = set()

    # -- planning ---------------------------------------------------------------------------

    async def _plan(self, run_id: str, requests: Sequence[TaskRequest], caller: Caller
                    ) -> tuple[EffectivePolicy, list[tuple[TaskRequest, str]]]:
        """Checks every task before any runs; a refusal of one refuses the whole step, and is
        recorded as that task's refusal."""
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
        run = self.runs.check_open(run_id)
        policy = self.runs.registry.get(run.agent).policy
        planned = []
        for task in requests:
            request = task.exec_request(run_id)
            try:
                planned.append((task, self.tasks.check(request, policy)))
            except AgentdError as exc:
                await self.tasks.refused(request, caller, "t-" + secrets.token_hex(8), exc,
                                         policy)
                raise
        return policy, planned

    async def step(self, run_id: str, requests: Sequence[TaskRequest], caller: Caller,
                   listener: StepListener | None = None, *,
                   request_approval: bool = False) -> StepResult:
        """Plans the step, then claims the run under its gate (or records it pending
        approval there) and runs it; the claim is released whatever happens."""
        self.runs.check_accepting()
        audit = self.runs.audit
        try:
            gate = self.runs.gate(run_id)
            gate.check_idle("retry")
            self._no_pending(run_id)
            policy, planned = await self._plan(run_id, requests, caller)
        except Aborted:
            raise
        except AgentdError as exc:
            await audit.append("step.refused", actor=caller.actor(), run_id=run_id, details={
                "tasks": [t.name for t in requests][:MAX_TASKS], "error": exc.code,
                "reason": exc.message, "rule": getattr(exc, "rule", None)})
            raise
        # The requester's uid (SO_PEERCRED) decides who may approve: another person.
        request = {"tasks": [t.to_json() for t in requests], "requested_uid": caller.uid}
        triggers = approval_triggers(policy, [exe for _, exe in planned])
        async with gate.lock:
            # Decided again under the gate: the plan above awaited, the run may have moved.
            gate.check_idle("retry")
            run = self.runs.check_open(run_id)
            self._no_pending(run_id)
            number = run.step + 1
            if request_approval:
                # Asked for by the caller: the tasks may start a trigger's program indirectly.
                triggers.append("requested by the caller")
            if triggers:
                self.steps.begin(run_id, number, "pending_approval", request, str(caller))
                reason = (f"needs approval ({', '.join(triggers)}; rule: "
                          f"{policy.rule('approval.required_for')})")
                await audit.append("step.pending_approval", actor=caller.actor(),
                                   run_id=run_id, details={
                                       "step": number, "triggers": triggers,
                                       "tasks": [t.name for t in requests]})
                return StepResult(run_id, number, "pending_approval", reason=reason,
                                  requested_by=str(caller))
            gate.claim(f"step {number}")
        try:
            attempt = self.steps.begin(run_id, number, "running", request, str(caller))
            return await self._execute(run_id, number, attempt, planned, policy, caller,
                                       listener, requested_by=str(caller))
        finally:
            gate.release()

    def _no_pending(self, run_id: str) -> None:
        pending = self.steps.first_pending(run_id)
        if pending is not None:
            raise FailedPrecondition(
                f"step {pending.step} of run {run_id} waits for approval; approve or reject "
                "it first (`agentctl approve`)")

    def _pending(self, run_id: str, number: int) -> StepRecord:
        """The attempt at step `number` waiting for a decision; NOT_FOUND if there is none,
        FAILED_PRECONDITION naming the decider if it was decided already."""
        latest = self.steps.latest(run_id, number)
        if latest is not None and latest.state == "pending_approval":
            return latest
        if latest is not None and latest.decided_by:
            raise already_decided(latest)
        raise NotFound(f"run {run_id} has no step {number} waiting for approval")

    async def approve(self, run_id: str, number: int, approve: bool, reason: str,
                      caller: Caller, listener: StepListener | None = None) -> StepResult:
        """Exactly one decision wins: the pending attempt moves to running or discarded
        under the run's gate; a later decision gets FAILED_PRECONDITION naming the winner."""
        pending = self._pending(run_id, number)
        if pending.requested_by == str(caller):
            raise PermissionDenied("the requester of a step cannot approve it; another approver "
                                   "must decide", rule="approvals: requester != approver")
        self_approved = pending.request.get("requested_uid") == caller.uid
        if self_approved and not self.allow_self_approval:
            raise PermissionDenied(
                f"uid {caller.uid} requested step {number} of run {run_id} and cannot approve "
                "it: approval means another person; ask an approver with another uid (or set "
                "allow_self_approval in the daemon config, for development only)",
                rule="approvals: approver uid != requester uid")
        if self_approved:
            log.warning("step.self_approved", run_id=run_id, step=number, uid=caller.uid)
        requests = [TaskRequest.from_json(t) for t in pending.request["tasks"]]
        planned: list[tuple[TaskRequest, str]] = []
        if approve:
            # Checked against the policy again (it may have changed since the request).
            policy, planned = await self._plan(run_id, requests, caller)
        audit = self.runs.audit
        gate = self.runs.gate(run_id)
        async with gate.lock:
            pending = self._pending(run_id, number)  # the other decision may have won
            if not approve:
                await audit.append("step.approval", actor=caller.actor(), run_id=run_id,
                                   details={"step": number, "approved": False,
                                            "reason": reason, "self_approved": self_approved})
                self.steps.decide(pending.attempt, "discarded", decided_by=str(caller),
                                  reason=reason or "rejected")
                return StepResult(run_id, number, "discarded", reason=reason or "rejected",
                                  requested_by=pending.requested_by, decided_by=str(caller))
            gate.check_idle("retry the approval")
            run = self.runs.check_open(run_id)
            await audit.append("step.approval", actor=caller.actor(), run_id=run_id,
                               details={"step": number, "approved": True, "reason": reason,
                                        "self_approved": self_approved})
            if run.step + 1 != number:
                self.steps.decide(pending.attempt, "discarded", decided_by=str(caller),
                                  reason="the run moved on before approval")
                raise FailedPrecondition(f"run {run_id} is no longer at step {number - 1}; "
                                         "the pending step was discarded, submit it again")
            self.steps.decide(pending.attempt, "running", decided_by=str(caller))
            gate.claim(f"step {number}")
        try:
            return await self._execute(run_id, number, pending.attempt, planned, policy,
                                       caller, listener, requested_by=pending.requested_by,
                                       decided_by=str(caller))
        finally:
            gate.release()

    # -- execution and barrier ---------------------------------------------------------------

    async def _execute(self, run_id: str, number: int, attempt: int,
                       planned: list[tuple[TaskRequest, str]], policy: EffectivePolicy,
                       caller: Caller, listener: StepListener | None, *, requested_by: str,
                       decided_by: str = "") -> StepResult:
        """Runs a claimed step (the caller holds the run's gate and releases it after)."""
        gate = self.runs.gate(run_id)  # the claimed gate, even if a close drops it meanwhile
        started = time.monotonic()
        result = StepResult(run_id, number, "failed", requested_by=requested_by,
                            decided_by=decided_by)
        reports: list[TaskReport] = []
        hold: Hold | None = None
        layer: str | None = None
        try:
            base = self.steps.checkpoint(run_id, number - 1)
            hold = self.runs.refs.hold(base.layers)  # mounted as lowers until the end
            specs = channels.declare([channels.ChannelSpec(**c) for c in
                                      json.loads(self.runs.get_run(run_id).channels)])
            state = base.channels
            snapshot = channels.visible(specs, state)
            await self.runs.audit.append("step.started", actor=caller.actor(), run_id=run_id,
                                         details={"step": number, "tasks": [
                                             {"name": t.name, "argv": t.argv[:64]}
                                             for t, _ in planned]})
            self.runs.check_capacity(len(planned))
            # The reports (and their task ids) exist before any task starts, so whatever
            # happens next, the finally below knows every upper to remove.
            reports = [TaskReport(t.name, task_id="t-" + secrets.token_hex(8))
                       for t, _ in planned]
            try:
                async with asyncio.TaskGroup() as group:
                    for report, (task, exe) in zip(reports, planned, strict=True):
                        group.create_task(self._run_task(
                            run_id, report, task, exe, base.layers, policy, snapshot, specs,
                            caller, listener, approved=bool(decided_by)))
            except BaseExceptionGroup as failed:
                # One task could not be run at all (not a tool failure: those are results);
                # the group has cancelled and awaited the others.
                raise failed.exceptions[0] from None
            results = [barrier.TaskResult(index=i, name=r.name, ok=not r.failure,
                                          reason=r.failure or None, writes=r.writes)
                       for i, r in enumerate(reports)]
            try:
                new_state, changed = barrier.apply_writes(specs, state, results, number)
            except barrier.StepFailed as failed:
                result.reason = failed.failure.reason if failed.failure.task is None else \
                    f"task {failed.failure.task}: {failed.failure.reason}"
                result.conflicts = [str(c) for c in failed.failure.conflicts]
                return result
            size = channels.encoded_size(new_state)
            if size > policy.channel_state_bytes:
                result.reason = (
                    f"the run's channel state would be {size} bytes, more than the"
                    f" {policy.channel_state_bytes} bytes limits.channel_state allows (rule:"
                    f" {policy.rule('limits.channel_state')}); write less, keep large results"
                    " in files in the workspace, or raise the limit in the policy")
                return result
            path_conflicts = self.layers.conflicts([(r.name, r.changes) for r in reports])
            if path_conflicts:
                result.reason = "conflicting file changes"
                result.conflicts = [str(c) for c in path_conflicts]
                return result
            self.runs.check_open(run_id)
            try:
                layer = await asyncio.to_thread(functools.partial(
                    self.layers.commit,
                    [r.upper.upper for r in reports if r.upper is not None],
                    lowers=base.layers, limit=_quota_of(policy)))
            except (QuotaExceeded, StateDiskFull) as exc:
                result.reason = exc.message  # nothing applied; the finally records it
                return result
            layers = base.layers + ([layer] if layer else [])
            checkpoint = CheckpointRecord(run_id, number, layers, new_state, time.time())
            async with gate.lock:
                # The claim kept rollbacks and other steps out. A close that began after the
                # step's workers had ended waits for this commit (and then drops it, with the
                # run); one that gave up waiting has marked the run CLOSED.
                if gate.phase is Phase.CLOSED:
                    raise FailedPrecondition(f"run {run_id} was closed while step {number} "
                                             "ran; nothing of it was applied")
                result.state = "committed"  # as the stored reply says, if the commit lands
                result.channels = channels.visible(specs, new_state)
                result.versions = {k: v.version for k, v in new_state.items()}
                result.tasks = reports
                try:
                    await self.runs.audit.append("step.committing", actor=caller.actor(),
                                                 run_id=run_id, details={
                                                     "step": number, "layer": layer,
                                                     "changed_channels": sorted(changed),
                                                     "tasks": [r.to_json() for r in reports]})
                    result.wall_seconds = time.monotonic() - started
                    self.steps.commit(attempt, checkpoint, result.to_json())
                except BaseException:
                    result.state = "failed"  # the finally below records it so
                    raise
            layer = None  # a checkpoint records it now
            await self.runs.audit.sign_tree_head()
            if len(layers) >= self.squash_depth:
                self._start_squash(run_id, layers)
            return result
        finally:
            result.tasks = reports
            result.wall_seconds = time.monotonic() - started
            try:
                if result.state != "committed":
                    self.steps.finish(attempt, "failed", reply=result.to_json(),
                                      reason=result.reason)
                    await self.runs.audit.append(
                        "step.failed", actor=caller.actor(), run_id=run_id,
                        details={"step": number, "reason": result.reason,
                                 "conflicts": result.conflicts})
            finally:
                # Even if the record cannot be written (disk full): the run must not stay
                # held, nor the uppers stay behind.
                # Off the loop: an agent's tree may be huge or deep. Named by run, so what
                # cannot be removed is quarantined under the run's name (`run show`).
                await asyncio.to_thread(self._remove_uppers, run_id, reports)
                quarantined = self.layers.take_quarantined()
                if quarantined:
                    log.error("workspace.quarantined", run_id=run_id, paths=quarantined)
                    with contextlib.suppress(AgentdError):
                        await self.runs.audit.append(
                            "workspace.quarantined", actor=SYSTEM.actor(), run_id=run_id,
                            details={"paths": quarantined})
                if hold is not None:
                    await hold.release()
                if layer is not None:  # committed to disk but recorded by no checkpoint
                    await self.runs.refs.release([layer])

    def _remove_uppers(self, run_id: str, reports: Sequence[TaskReport]) -> None:
        for report in reports:
            self.layers.remove_upper(f"{run_id}.{report.task_id}")

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
                await self.runs.audit.append("workspace.squashed", actor=SYSTEM.actor(),
                                             run_id=run_id, details={
                                                 "layers": len(stack), "into": merged,
                                                 "checkpoints_rewritten": rewritten})
                log.info("workspace.squashed", run_id=run_id, layers=len(stack), into=merged)
            except (AgentdError, OSError):
                # The stack stays as it was: correct, only deeper. The next commit tries again.
                log.exception("workspace.squash_failed", run_id=run_id)
                return
        await self.runs.refs.release([*stack, merged])  # merged: if no checkpoint took it

    async def _run_task(self, run_id: str, report: TaskReport, task: TaskRequest,
                        executable: str, layers: list[str], policy: EffectivePolicy,
                        snapshot: dict[str, Any], specs: dict[str, channels.ChannelSpec],
                        caller: Caller, listener: StepListener | None, *,
                        approved: bool) -> None:
        """One task in its own worker on the committed layers; fills `report`, never raises
        for the tool."""
        task_id = report.task_id
        limit = _quota_of(policy)
        used = await asyncio.to_thread(self.layers.usage, layers)
        report.upper = await asyncio.to_thread(functools.partial(
            self.layers.new_upper, f"{run_id}.{task_id}", self.tasks.uid, self.tasks.gid,
            remaining=Quota(limit.bytes - used.bytes, limit.inodes - used.inodes)))
        request = task.exec_request(run_id)
        withheld = withheld_programs(policy, approved)
        # Reading ELF headers takes tens of ms once per policy: off the event loop (cached).
        await asyncio.to_thread(exec_mounts, policy, withheld)
        spec = self.tasks.build_spec(task_id, request, executable, policy, withheld=withheld)
        spec = replace(spec, env={**spec.env, "AGENTD_WRITES_FD": str(WRITES_FD),
                                  "AGENTD_CHANNELS_FD": str(CHANNELS_FD)})
        if policy.workspace != "none":
            spec = replace(spec,
                           workspace_layers=tuple(str(self.layers.path(lid)) for lid in layers),
                           workspace_upper=str(report.upper.upper),
                           workspace_work=str(report.upper.work),
                           workspace_quota=os.path.ismount(report.upper.upper.parent))
        spec = replace(spec, extra_fds=2)
        collector = WritesCollector(limit=policy.writes_bytes)
        snapshot_fd = channels_snapshot_fd(snapshot)
        worker = Worker(spec, launcher=self.tasks.launcher, cgroups=self.tasks.cgroups,
                        extra_fds=(collector.write_fd, snapshot_fd))

        kept = {"stdout": CappedOutput(), "stderr": CappedOutput()}

        async def on_output(kind: str, data: bytes) -> None:
            # A capped prefix is kept for the reply; the worker already cut it at the policy's
            # output limit, and the whole of it streams to a listener.
            kept[kind].add(data)
            if listener is not None:
                await listener("output", (task.name, kind, data))

        try:
            collector.start()
            report.result = await self.tasks.run_worker(worker, request, caller, policy,
                                                        on_output)
        finally:
            os.close(snapshot_fd)
            collector.close_write_end()
            report.stdout, report.stderr = kept["stdout"].value(), kept["stderr"].value()
            report.exec_denied = self.tasks.denied_paths.pop(task_id, [])
        raw = await collector.finish()
        report.failure = _task_failure(task, report.result, collector)
        if not report.failure:
            try:
                report.writes = channels.parse_writes(raw, limit=policy.writes_bytes,
                                                      channels=specs)
            except channels.WritesError as exc:
                report.failure = f"bad writes on $AGENTD_WRITES_FD: {exc}"
        try:
            report.changes = await asyncio.to_thread(
                functools.partial(self.layers.changes, report.upper.upper, lowers=layers))
        except PathTooLong as exc:
            report.failure = report.failure or exc.message
        report.changed_paths = sorted({c.path for c in report.changes})
        if listener is not None:
            await listener("task_done", report)

    # -- checkpoints -------------------------------------------------------------------------

    async def rollback(self, run_id: str, number: int, caller: Caller) -> None:
        """Decided under the run's gate: refused (ABORTED) while a step holds the run, so a
        rollback that is acknowledged holds; the dropped layers go once nobody holds them."""
        gate = self.runs.gate(run_id)
        async with gate.lock:
            gate.check_idle("roll back")
            run = self.runs.check_open(run_id)
            if number > run.step:
                raise FailedPrecondition(f"run {run_id} is at step {run.step}; it cannot roll "
                                         f"forward to {number}")
            self.steps.checkpoint(run_id, number)  # NOT_FOUND if it does not exist
            await self.runs.audit.append("run.rolled_back", actor=caller.actor(),
                                         run_id=run_id,
                                         details={"from_step": run.step, "to_step": number})
            dropped = self.steps.rollback(run_id, number)
        await self.runs.audit.sign_tree_head()
        await self.runs.refs.release(dropped)  # those no other checkpoint (a fork's) uses

    async def export(self, run_id: str, number: int, caller: Caller
                     ) -> AsyncGenerator[bytes, None]:
        """The checkpoint as a tarball, chunk by chunk; its layers are held until the tar
        writer's thread has stopped, and a consumer that goes away stops that thread."""
        checkpoint = self.steps.checkpoint(run_id, number)
        hold = self.runs.refs.hold(checkpoint.layers)  # no await since the read
        try:
            await self.runs.audit.append("checkpoint.exported", actor=caller.actor(),
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

def recover_steps(steps: StepStore, layers: LayerStore) -> dict[str, Any]:
    """At start-up, after a crash: steps that were running are marked interrupted (nothing of
    them was applied: their checkpoint was never written), and layers no checkpoint refers to
    (a commit cut short) and every task's upper are removed."""
    interrupted = []
    for attempt in steps.in_state("running"):
        steps.finish(attempt.attempt, "interrupted", reply={},
                     reason="the daemon stopped while the step ran; submit it again")
        interrupted.append({"run_id": attempt.run_id, "step": attempt.step})
    removed = layers.gc(steps.referenced_layers(), keep_uppers=())
    return {"interrupted_steps": interrupted, "removed": len(removed)}


def _quota_of(policy: EffectivePolicy) -> Quota:
    return Quota(policy.workspace_bytes, policy.inodes)


def _task_failure(task: TaskRequest, result: WorkerResult | None,
                  collector: WritesCollector) -> str:
    """Why this task fails the step, or "" if it does not."""
    if result is None:
        return "the task did not run"
    if result.setup_failure is not None:
        return str(result.setup_failure)
    if result.stop_reason is not None:
        return f"stopped for {result.stop_reason} ({result.summary})"
    if collector.overflow:
        return "wrote more than limits.writes to $AGENTD_WRITES_FD"
    if not result.exited or result.exit_code != 0:
        return "" if task.allow_failure else result.summary
    return ""

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

One writer per run: a second Step on a run whose step is still running gets ABORTED at once
(rather than queueing behind it), so a client always knows which state its step ran on.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, cast

import structlog

from agentd.errors import (
    Aborted,
    AgentdError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from agentd.identity import SYSTEM, Caller
from agentd.policy import EffectivePolicy
from agentd.policy.execset import exec_mounts
from agentd.sandbox.worker import Worker, WorkerResult
from agentd.scheduler import barrier, channels
from agentd.scheduler.runs import RunManager
from agentd.scheduler.tasks import ExecRequest, TaskRunner
from agentd.scheduler.writes import WritesCollector, channels_snapshot_fd
from agentd.store.layers import Change, LayerStore, Upper
from agentd.store.steps import CheckpointRecord, StepStore

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
                 layers: LayerStore, *, squash_depth: int = 100) -> None:
        self.runs = runs
        self.tasks = tasks
        self.steps = steps
        self.layers = layers
        self.squash_depth = squash_depth
        self._active = runs.steps_in_flight  # shared: CloseRun waits for these
        # Layers a squash replaced: deleted once no step runs (a running task may have them
        # mounted as lowers).
        self._to_release: set[str] = set()
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
        self.runs.check_accepting()
        if run_id in self._active:
            raise Aborted(f"another step is running on run {run_id}; one writer per run: retry "
                          "when it has ended")
        audit = self.runs.audit
        try:
            self._no_pending(run_id)
            policy, planned = await self._plan(run_id, requests, caller)
        except AgentdError as exc:
            await audit.append("step.refused", actor=caller.actor(), run_id=run_id, details={
                "tasks": [t.name for t in requests][:MAX_TASKS], "error": exc.code,
                "reason": exc.message, "rule": getattr(exc, "rule", None)})
            raise
        run = self.runs.get_run(run_id)
        number = run.step + 1
        request = {"tasks": [t.to_json() for t in requests]}
        triggers = approval_triggers(policy, [exe for _, exe in planned])
        if request_approval:
            # Asked for by the caller: the tasks may start a trigger's program indirectly.
            triggers.append("requested by the caller")
        if triggers:
            self.steps.begin(run_id, number, "pending_approval", request, str(caller))
            reason = (f"needs approval ({', '.join(triggers)}; rule: "
                      f"{policy.rule('approval.required_for')})")
            await audit.append("step.pending_approval", actor=caller.actor(), run_id=run_id,
                               details={"step": number, "triggers": triggers,
                                        "tasks": [t.name for t in requests]})
            return StepResult(run_id, number, "pending_approval", reason=reason,
                              requested_by=str(caller))
        attempt = self.steps.begin(run_id, number, "running", request, str(caller))
        return await self._execute(run_id, number, attempt, planned, policy, caller, listener,
                                   requested_by=str(caller))

    def _no_pending(self, run_id: str) -> None:
        pending = self.steps.first_pending(run_id)
        if pending is not None:
            raise FailedPrecondition(
                f"step {pending.step} of run {run_id} waits for approval; approve or reject "
                "it first (`agentctl approve`)")

    async def approve(self, run_id: str, number: int, approve: bool, reason: str,
                      caller: Caller, listener: StepListener | None = None) -> StepResult:
        pending = self.steps.pending(run_id, number)
        if pending.requested_by == str(caller):
            raise PermissionDenied("the requester of a step cannot approve it; another approver "
                                   "must decide", rule="approvals: requester != approver")
        audit = self.runs.audit
        await audit.append("step.approval", actor=caller.actor(), run_id=run_id, details={
            "step": number, "approved": approve, "reason": reason})
        if not approve:
            self.steps.finish(pending.attempt, "discarded", reply={}, reason=reason or "rejected",
                              decided_by=str(caller))
            return StepResult(run_id, number, "discarded", reason=reason or "rejected",
                              requested_by=pending.requested_by, decided_by=str(caller))
        if run_id in self._active:
            raise Aborted(f"another step is running on run {run_id}; retry the approval later")
        run = self.runs.check_open(run_id)
        if run.step + 1 != number:
            self.steps.finish(pending.attempt, "discarded", reply={},
                              reason="the run moved on before approval", decided_by=str(caller))
            raise FailedPrecondition(f"run {run_id} is no longer at step {number - 1}; the "
                                     "pending step was discarded, submit it again")
        requests = [TaskRequest.from_json(t) for t in pending.request["tasks"]]
        policy, planned = await self._plan(run_id, requests, caller)
        self.steps.set_state(pending.attempt, "running", decided_by=str(caller))
        return await self._execute(run_id, number, pending.attempt, planned, policy, caller,
                                   listener, requested_by=pending.requested_by,
                                   decided_by=str(caller))

    # -- execution and barrier ---------------------------------------------------------------

    async def _execute(self, run_id: str, number: int, attempt: int,
                       planned: list[tuple[TaskRequest, str]], policy: EffectivePolicy,
                       caller: Caller, listener: StepListener | None, *, requested_by: str,
                       decided_by: str = "") -> StepResult:
        self._active.add(run_id)
        started = time.monotonic()
        result = StepResult(run_id, number, "failed", requested_by=requested_by,
                            decided_by=decided_by)
        reports: list[TaskReport] = []
        try:
            base = self.steps.checkpoint(run_id, number - 1)
            specs = channels.declare([channels.ChannelSpec(**c) for c in
                                      json.loads(self.runs.get_run(run_id).channels)])
            state = _load_state(base.channels)
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
            path_conflicts = self.layers.conflicts([(r.name, r.changes) for r in reports])
            if path_conflicts:
                result.reason = "conflicting file changes"
                result.conflicts = [str(c) for c in path_conflicts]
                return result
            self.runs.check_open(run_id)
            layer = await asyncio.to_thread(
                functools.partial(self.layers.commit,
                                  [r.upper.upper for r in reports if r.upper is not None],
                                  lowers=base.layers))
            layers = base.layers + ([layer] if layer else [])
            checkpoint = CheckpointRecord(run_id, number, layers, _dump_state(new_state),
                                          time.time())
            result.state = "committed"
            result.channels = channels.visible(specs, new_state)
            result.versions = {k: v.version for k, v in new_state.items()}
            await self.runs.audit.append("step.committing", actor=caller.actor(),
                                         run_id=run_id, details={
                                             "step": number, "layer": layer,
                                             "changed_channels": sorted(changed),
                                             "tasks": [r.to_json() for r in reports]})
            result.tasks = reports
            result.wall_seconds = time.monotonic() - started
            self.steps.commit(attempt, checkpoint, result.to_json())
            await self.runs.audit.sign_tree_head()
            if len(layers) >= self.squash_depth:
                squash = asyncio.get_running_loop().create_task(self._squash(run_id, layers))
                self._background.add(squash)
                squash.add_done_callback(self._background.discard)
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
                for report in reports:
                    self.layers.remove_upper(report.task_id)
                self._active.discard(run_id)
                self._release_if_idle()

    async def _squash(self, run_id: str, stack: list[str]) -> None:
        """Merges a deep stack into one layer, in the background; every checkpoint built on
        that stack then starts from the merged layer: same content, fewer lowers to mount
        (overlayfs stacks at most 500)."""
        try:
            merged = await asyncio.to_thread(self.layers.squash, stack)
            rewritten = self.steps.replace_layers(stack, [merged])
            await self.runs.audit.append("workspace.squashed", actor=SYSTEM.actor(),
                                         run_id=run_id, details={
                                             "layers": len(stack), "into": merged,
                                             "checkpoints_rewritten": rewritten})
            log.info("workspace.squashed", run_id=run_id, layers=len(stack), into=merged)
            self._to_release.update(stack)
            self._release_if_idle()
        except (AgentdError, OSError):
            # The stack stays as it was: correct, only deeper. The next commit tries again.
            log.exception("workspace.squash_failed", run_id=run_id)

    def _release_if_idle(self) -> None:
        if self._to_release and not self._active:
            released, self._to_release = self._to_release, set()
            self.runs.release_layers(sorted(released))

    async def _run_task(self, run_id: str, report: TaskReport, task: TaskRequest,
                        executable: str, layers: list[str], policy: EffectivePolicy,
                        snapshot: dict[str, Any], specs: dict[str, channels.ChannelSpec],
                        caller: Caller, listener: StepListener | None, *,
                        approved: bool) -> None:
        """One task in its own worker on the committed layers; fills `report`, never raises
        for the tool."""
        task_id = report.task_id
        report.upper = await asyncio.to_thread(self.layers.new_upper, task_id,
                                               self.tasks.uid, self.tasks.gid)
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
                           workspace_work=str(report.upper.work))
        spec = replace(spec, extra_fds=2)
        collector = WritesCollector(limit=policy.writes_bytes)
        snapshot_fd = channels_snapshot_fd(snapshot)
        worker = Worker(spec, launcher=self.tasks.launcher, cgroups=self.tasks.cgroups,
                        extra_fds=(collector.write_fd, snapshot_fd))

        async def on_output(kind: str, data: bytes) -> None:
            # Kept for the reply too; the worker already cut it at the policy's output limit.
            if kind == "stdout":
                report.stdout += data
            else:
                report.stderr += data
            if listener is not None:
                await listener("output", (task.name, kind, data))

        try:
            collector.start()
            report.result = await self.tasks.run_worker(worker, request, caller, policy,
                                                        on_output)
        finally:
            os.close(snapshot_fd)
            collector.close_write_end()
            report.exec_denied = self.tasks.denied_paths.pop(task_id, [])
        raw = await collector.finish()
        report.failure = _task_failure(task, report.result, collector)
        if not report.failure:
            try:
                report.writes = channels.parse_writes(raw, limit=policy.writes_bytes,
                                                      channels=specs)
            except channels.WritesError as exc:
                report.failure = f"bad writes on $AGENTD_WRITES_FD: {exc}"
        report.changes = await asyncio.to_thread(
            functools.partial(self.layers.changes, report.upper.upper, lowers=layers))
        report.changed_paths = sorted({c.path for c in report.changes})
        if listener is not None:
            await listener("task_done", report)

    # -- checkpoints -------------------------------------------------------------------------

    async def rollback(self, run_id: str, number: int, caller: Caller) -> None:
        self.runs.check_open(run_id)
        if run_id in self._active:
            raise Aborted(f"a step is running on run {run_id}; roll back when it has ended")
        run = self.runs.get_run(run_id)
        if number > run.step:
            raise FailedPrecondition(f"run {run_id} is at step {run.step}; it cannot roll "
                                     f"forward to {number}")
        self.steps.checkpoint(run_id, number)  # NOT_FOUND if it does not exist
        await self.runs.audit.append("run.rolled_back", actor=caller.actor(), run_id=run_id,
                                     details={"from_step": run.step, "to_step": number})
        dropped = self.steps.rollback(run_id, number)
        await self.runs.audit.sign_tree_head()
        self._to_release.update(dropped)  # those no other checkpoint (a fork's) still uses
        self._release_if_idle()

    async def export(self, run_id: str, number: int, caller: Caller, sink: Callable[[bytes], None]
                     ) -> None:
        checkpoint = self.steps.checkpoint(run_id, number)
        await self.runs.audit.append("checkpoint.exported", actor=caller.actor(), run_id=run_id,
                                     details={"step": number, "layers": len(checkpoint.layers)})
        await asyncio.to_thread(self.layers.export_tar, checkpoint.layers,
                                cast(BinaryIO, _SinkFile(sink)))

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


class _SinkFile:
    """A write-only file object over a callback, for tarfile's stream mode."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink(bytes(data))
        return len(data)

    def flush(self) -> None:
        return None


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


def _load_state(raw: dict[str, Any]) -> dict[str, channels.ChannelValue]:
    return {name: channels.ChannelValue(v["value"], v["version"], tuple(v.get("seen", ())))
            for name, v in raw.items()}


def _dump_state(state: dict[str, channels.ChannelValue]) -> dict[str, Any]:
    return {name: {"value": v.value, "version": v.version, "seen": list(v.seen)}
            for name, v in state.items()}

"""One task of a step: build its whole worker, record, run it confined, record the outcome.

The order is the promise: a refused task is recorded with the rule that refused it; an allowed
one is recorded (durably) before its worker starts; and its outcome is recorded before the
caller hears of it. `TaskRunner.run` is the `execute` part of a step (agentd/scheduler/steps.py):
it builds the one WorkerSpec (policy, workspace layers and upper, channel fds), runs it, and
reads back what the task changed and wrote, for the barrier.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agentd.audit import AuditLog, durable
from agentd.audit.evidence import LIMIT_STOPS
from agentd.egress import EgressService, TaskEgress, egress_environment
from agentd.egress.secrets import LoadedSecret, SecretUnavailable
from agentd.errors import AgentdError
from agentd.identity import Caller
from agentd.policy import DEFAULT_PATH, EffectivePolicy, withheld_programs
from agentd.policy.egress import parse_rules
from agentd.policy.execset import exec_mounts
from agentd.policy.paths import is_at_or_below
from agentd.sandbox.cgroups import CgroupDriver
from agentd.sandbox.egress import CONNECT_PORT, RESOLVER
from agentd.sandbox.execwatch import ExecAttempt
from agentd.sandbox.launcher_client import LauncherClient
from agentd.sandbox.pool import WarmPool
from agentd.sandbox.spec import Limits, WorkerSpec
from agentd.sandbox.worker import Worker, WorkerResult
from agentd.scheduler import channels
from agentd.scheduler.output import CappedOutput
from agentd.scheduler.plan import PlannedTask, TaskRequest
from agentd.scheduler.runs import RunManager
from agentd.scheduler.writes import WritesCollector, channels_snapshot_fd
from agentd.store.layers import Change, LayerStore, Upper
from agentd.store.quota import Quota
from agentd.store.trees import PathTooLong

log = structlog.get_logger("agentd.tasks")

WRITES_FD, CHANNELS_FD = 3, 4

# ("output", (task name, stream, data)) as the output happens; ("task_done", TaskOutcome).
StepListener = Callable[[str, Any], Awaitable[None]]


@dataclass
class TaskOutcome:
    """One task of a step as it ended: its worker's result, what it changed and wrote, and
    why it fails the step ("" if it does not). The API's TaskReport is made from it."""

    name: str
    task_id: str
    result: WorkerResult | None = None
    changes: list[Change] = field(default_factory=list)
    changed_paths: list[str] = field(default_factory=list)
    writes: list[tuple[str, Any]] = field(default_factory=list)
    failure: str = ""
    upper: Upper | None = None
    # exec.exited, submitted; durable before anyone hears of the outcome (see `durable`)
    recorded: asyncio.Future[int] | None = None
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


@dataclass(frozen=True)
class StepContext:
    """What every task of one step shares: the committed state it runs on, and who asked."""

    run_id: str
    step: int
    layers: list[str]  # the committed stack (lowest first), held for the step
    policy: EffectivePolicy
    snapshot: dict[str, Any]  # the channel values the tasks may read
    specs: dict[str, channels.ChannelSpec]
    caller: Caller
    approved: bool
    # step.started, submitted: durable, with each task's exec.allowed, before any worker runs
    started: asyncio.Future[int] | None = None
    listener: StepListener | None = None
    task_events: bool = True  # the listener wants ("task_done", TaskOutcome) events


class TaskRunner:
    """Builds and runs the workers of the RunManager's runs."""

    def __init__(self, runs: RunManager, audit: AuditLog, layers: LayerStore,
                 launcher: LauncherClient, cgroups: CgroupDriver, pool: WarmPool | None = None,
                 *, worker_uid: int, worker_gid: int,
                 egress: EgressService | None = None) -> None:
        self.runs = runs
        self.egress = egress
        self.pool = pool
        self.audit = audit
        self.layers = layers
        self.launcher = launcher
        self.cgroups = cgroups
        self.uid = worker_uid
        self.gid = worker_gid
        # task id -> (run id, actor) while its worker runs
        self._watched: dict[str, tuple[str, dict[str, Any]]] = {}
        # task id -> the paths it was refused, for its outcome
        self._denied_paths: dict[str, list[str]] = {}
        launcher.on_exec_attempt = self._on_exec_attempt
        # task id -> its egress while its worker runs: refusals inside the worker go there
        self._egress: dict[str, TaskEgress] = {}
        launcher.on_net_attempt = self._on_net_attempt
        # (run id, kind, what) for each violation and quarantine: stage demotion listens
        # (agentd/scheduler/stages.py).
        self.on_event: Callable[[str, str, str], None] = _ignore_event

    def _on_exec_attempt(self, attempt: ExecAttempt) -> None:
        """A worker tried to exec something the kernel refuses (or ran the loader itself): on
        record per task (the launcher passes on the first 64; exec.exited counts them all)."""
        watched = self._watched.get(attempt.key)
        if watched is None:
            return
        run_id, actor = watched
        self._denied_paths.setdefault(attempt.key, []).append(attempt.path[:4096])
        # Submitted now, so it lands before the task's exec.exited (submitted later); that
        # record's durability covers it. A failure shows there too; retrieve it here.
        record = self.audit.submit(
            "exec.denied", actor=actor, run_id=run_id, task_id=attempt.key,
            details={"path": attempt.path[:4096], "reason": attempt.reason,
                     "refused": attempt.refused, "pid": attempt.pid})
        record.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.on_event(run_id, "violation", f"exec of {attempt.path[:200]} refused by the kernel")

    def _on_net_attempt(self, task_id: str, details: dict[str, Any]) -> None:
        """A network call the launcher refused inside an egress worker (its own kernel would
        have, before any packet: agentd/sandbox/netwatch.py): on record with the task's
        other network records."""
        egress = self._egress.get(task_id)
        if egress is not None:
            egress.refused_in_worker(details)

    # -- the worker -------------------------------------------------------------------------

    def build_spec(self, ctx: StepContext, task: PlannedTask, task_id: str,
                   upper: Upper | None, *, egress: TaskEgress | None = None) -> WorkerSpec:
        """The whole worker of one planned task: the policy's grants and limits, the run's
        layer stack under the task's own upper, and the channel fds.

        In a step nobody approved, the programs of the policy's exec: approval triggers are
        withheld: the worker cannot execute them by any route (agentd/policy/execset.py).
        """
        policy, request = ctx.policy, task.request
        withheld = withheld_programs(policy, ctx.approved)
        mounts = exec_mounts(policy, withheld)
        held = [os.path.realpath(p) for p in withheld]
        exec_allow = tuple(e for e in policy.exec_allow
                           if not any(is_at_or_below(os.path.realpath(e), h) for h in held))
        env = {"PATH": DEFAULT_PATH, "HOME": "/workspace", "TMPDIR": "/tmp",
               **(egress_environment(egress) if egress is not None else {}),
               "AGENTD_TASK_ID": task_id, **policy.env_set, **request.env,
               "AGENTD_WRITES_FD": str(WRITES_FD), "AGENTD_CHANNELS_FD": str(CHANNELS_FD)}
        limits = Limits(memory_bytes=policy.memory_bytes, pids=policy.pids, cpu=policy.cpu,
                        wall_seconds=request.timeout_seconds or policy.wall_seconds,
                        output_bytes=policy.output_bytes, tmp_bytes=policy.tmp_bytes,
                        open_files=policy.open_files, file_size_bytes=policy.file_size_bytes)
        workspace = upper is not None and policy.workspace != "none"
        return WorkerSpec(
            task_id=task_id, argv=(task.executable, *request.argv[1:]), env=env, cwd=task.cwd,
            uid=self.uid, gid=self.gid, user_namespace=policy.user_namespace,
            read_only=policy.read_only,
            workspace_writable=policy.workspace == "read_write",
            workspace_layers=(tuple(str(self.layers.path(lid)) for lid in ctx.layers)
                              if workspace else ()),
            workspace_upper=str(upper.upper) if workspace and upper else None,
            workspace_work=str(upper.work) if workspace and upper else None,
            workspace_quota=bool(workspace and upper and os.path.ismount(upper.upper.parent)),
            exec_allow=exec_allow, exec_binds=mounts.executable,
            exec_withheld=mounts.withheld, limits=limits,
            nameserver=RESOLVER if egress else "",
            egress_ports=tuple(sorted({CONNECT_PORT} | {r.port for r in parse_rules(
                policy.egress) if r.port is not None and r.protocol == "tcp"}))
            if egress else (),
            ca_bundle=egress.bundle if egress is not None else "")

    async def run(self, ctx: StepContext, task: PlannedTask, outcome: TaskOutcome) -> None:
        """One task in its own worker on the committed layers; fills `outcome`, never raises
        for the tool (a tool's failure is an outcome)."""
        policy, request = ctx.policy, task.request
        if policy.network == "egress" and self.egress is None:
            outcome.failure = ("the policy grants network egress but egress is not enabled on"
                               " this host; set egress = true in the daemon config (agentd.toml)"
                               " or remove network.egress from the policy")
            return
        secrets: tuple[LoadedSecret, ...] = ()
        if policy.egress_secrets and self.egress is not None:
            try:  # before anything is made for the task: it fails whole, saying why
                secrets = await asyncio.to_thread(self.egress.load_secrets, policy)
            except SecretUnavailable as exc:
                outcome.failure = str(exc)
                return
        limit = Quota(policy.workspace_bytes, policy.inodes)
        used = await asyncio.to_thread(self.layers.usage, ctx.layers)
        outcome.upper = await asyncio.to_thread(functools.partial(
            self.layers.new_upper, upper_name(ctx.run_id, outcome.task_id), self.uid, self.gid,
            remaining=Quota(limit.bytes - used.bytes, limit.inodes - used.inodes)))
        # Reading ELF headers takes tens of ms once per policy: off the event loop (cached).
        await asyncio.to_thread(exec_mounts, policy, withheld_programs(policy, ctx.approved))
        egress = await self._open_egress(ctx, outcome.task_id, secrets)
        spec = self.build_spec(ctx, task, outcome.task_id, outcome.upper, egress=egress)
        collector = WritesCollector(limit=policy.writes_bytes)
        snapshot_fd = channels_snapshot_fd(ctx.snapshot)
        worker = Worker(spec, launcher=self.launcher, cgroups=self.cgroups,
                        extra_fds=(collector.write_fd, snapshot_fd), pool=self.pool,
                        netns_fd=egress.slot.fd if egress is not None else -1)
        kept = {"stdout": CappedOutput(), "stderr": CappedOutput()}

        async def on_output(kind: str, data: bytes) -> None:
            # A capped prefix is kept for the reply; the worker already cut it at the policy's
            # output limit, and the whole of it streams to a listener.
            kept[kind].add(data)
            if ctx.listener is not None:
                await ctx.listener("output", (request.name, kind, data))

        try:
            collector.start()
            outcome.result, outcome.recorded = await self._run_worker(ctx, task, worker,
                                                                      on_output, egress)
        finally:
            if egress is not None and self.egress is not None:
                await self.egress.close(egress)
            os.close(snapshot_fd)
            collector.close_write_end()
            outcome.stdout, outcome.stderr = kept["stdout"].value(), kept["stderr"].value()
            outcome.exec_denied = self._denied_paths.pop(outcome.task_id, [])
        raw = await collector.finish()
        outcome.failure = task_failure(request, outcome.result, collector)
        if not outcome.failure:
            try:
                outcome.writes = channels.parse_writes(raw, limit=policy.writes_bytes,
                                                       channels=ctx.specs)
            except channels.WritesError as exc:
                outcome.failure = f"bad writes on $AGENTD_WRITES_FD: {exc}"
        try:
            outcome.changes = await asyncio.to_thread(functools.partial(
                self.layers.changes, outcome.upper.upper, lowers=ctx.layers))
        except PathTooLong as exc:
            outcome.failure = outcome.failure or exc.message
        outcome.changed_paths = sorted({c.path for c in outcome.changes})
        if ctx.listener is not None and ctx.task_events:
            await durable(outcome.recorded)  # on record before anyone hears of it
            await ctx.listener("task_done", outcome)

    async def _open_egress(self, ctx: StepContext, task_id: str,
                           secrets: tuple[LoadedSecret, ...]) -> TaskEgress | None:
        """The task's egress slot, when its policy has egress, with the secrets read for it;
        its connections, DNS answers and refusals go on record as they happen (submitted, so
        they precede exec.exited)."""
        if ctx.policy.network != "egress" or self.egress is None:
            return None
        actor, run_id = dict(ctx.caller.actor()), ctx.run_id

        def record(event: str, details: dict[str, Any]) -> None:
            submitted = self.audit.submit(event, actor=actor, run_id=run_id, task_id=task_id,
                                          details=details)
            submitted.add_done_callback(lambda f: f.cancelled() or f.exception())

        return await self.egress.open(run_id, task_id, ctx.policy, record, secrets)

    async def _run_worker(self, ctx: StepContext, task: PlannedTask, worker: Worker,
                          on_output: Callable[[str, bytes], Awaitable[None]],
                          egress: TaskEgress | None = None
                          ) -> tuple[WorkerResult, asyncio.Future[int]]:
        """Records the spawn, runs the worker, records the exit: the record comes first.

        exec.allowed and the step's step.started are durable (one group commit) before the
        worker starts; exec.exited is submitted and returned, for the step to await with its
        own record (one group commit for the outcome).
        """
        caller, run_id, task_id = ctx.caller, ctx.run_id, worker.spec.task_id
        self.runs.register(run_id, worker)
        self._watched[task_id] = (run_id, dict(caller.actor()))
        if egress is not None:
            self._egress[task_id] = egress
        try:
            allowed = self.audit.submit("exec.allowed", actor=caller.actor(), run_id=run_id,
                                        task_id=task_id, details={
                                            **request_details(task.request, ctx.policy),
                                            # which task of which step, for readers that
                                            # know a task by its id (agentctl timeline)
                                            "step": ctx.step, "task": task.request.name,
                                            "executable": task.executable,
                                            "stage": ctx.policy.stage,
                                            "policy_hash": ctx.policy.content_hash,
                                            "cgroup": worker.take_prebuilt()})
            await durable(ctx.started, allowed)
            self.runs.count_task(run_id)
            try:
                result = await worker.run(task.request.stdin, on_output)
            except asyncio.CancelledError:
                await self.audit.append("exec.cancelled", actor=caller.actor(), run_id=run_id,
                                        task_id=task_id,
                                        details={"reason": "the caller went away"})
                raise
        finally:
            worker.release_unused()  # the record could not be written: it never ran
            self.runs.unregister(run_id, task_id)
            self._watched.pop(task_id, None)
            self._egress.pop(task_id, None)
        details = _outcome_details(result)
        if egress is not None and self.egress is not None:
            egress.count_in_worker(result.net_refused)
            await self.egress.close(egress)  # its open connections end on record first
            details["egress"] = egress.summary()
        # After the worker's exec.denied and network records (submitted as they happened).
        exited = self.audit.submit("exec.exited", actor=caller.actor(), run_id=run_id,
                                   task_id=task_id, details=details)
        log.info("exec.exited", run_id=run_id, task_id=task_id, summary=result.summary,
                 wall=round(result.wall_seconds, 4), uid=caller.uid)
        if result.stop_reason in LIMIT_STOPS or result.usage.oom_killed:
            self.on_event(run_id, "violation", f"task stopped for {result.stop_reason}")
        return result, exited

    async def refused(self, run_id: str, request: TaskRequest, caller: Caller, task_id: str,
                      error: AgentdError, policy: EffectivePolicy | None) -> None:
        """Every refused task is on record too, whatever refused it."""
        await self.audit.append(
            "exec.refused", actor=caller.actor(), run_id=run_id, task_id=task_id,
            details={**request_details(request, policy), "error": error.code,
                     "reason": error.message, "rule": getattr(error, "rule", None)})
        log.info("exec.refused", run_id=run_id, reason=error.message, uid=caller.uid,
                 rule=getattr(error, "rule", None))
        if error.code == "PERMISSION_DENIED":  # the policy said no; a malformed call is not
            self.on_event(run_id, "violation", f"exec refused: {error.message[:200]}")


def _ignore_event(run_id: str, kind: str, what: str) -> None:
    pass


def upper_name(run_id: str, task_id: str) -> str:
    """A task's upper is named by run and task, so what cannot be removed is quarantined
    under the run's name (`agentctl run show`)."""
    return f"{run_id}.{task_id}"


def task_failure(request: TaskRequest, result: WorkerResult | None,
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
        return "" if request.allow_failure else result.summary
    return ""


def request_details(request: TaskRequest, policy: EffectivePolicy | None) -> dict[str, object]:
    """What the audit log keeps of a task: never an environment value the policy does not
    mark as safe to log."""
    logged = policy.env_log if policy is not None else ()
    timeout = request.timeout_seconds
    return {"argv": request.argv[:64], "env_names": sorted(request.env)[:64],
            "env_logged": {k: v for k, v in request.env.items() if k in logged},
            "cwd": request.cwd,
            "timeout_seconds": timeout if math.isfinite(timeout) else str(timeout)}


def _outcome_details(result: WorkerResult) -> dict[str, object]:
    usage = result.usage
    details: dict[str, object] = {
        "exited": result.exited, "exit_code": result.exit_code, "signal": result.signal,
        "stop_reason": result.stop_reason, "wall_seconds": round(result.wall_seconds, 6),
        "cpu_seconds": round(usage.cpu_seconds, 6), "peak_memory_bytes": usage.peak_memory_bytes,
        "oom_killed": usage.oom_killed, "pids_limit_hit": usage.pids_limit_hit,
        "stdout_bytes": result.stdout_bytes, "stderr_bytes": result.stderr_bytes,
        "exec_denied": result.exec_denied}
    if result.setup_failure is not None:
        details["setup_failure"] = {"action": result.setup_failure.action,
                                    "errno": result.setup_failure.errno,
                                    "message": result.setup_failure.message}
    return details

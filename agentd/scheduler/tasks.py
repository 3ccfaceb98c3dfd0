"""One tool call: validate, decide, record, run in a confined worker, record the outcome.

The order is the promise: a malformed request never reaches a worker; a refused one is
recorded with the rule that refused it; an allowed one is recorded (durably) before the
worker starts; and its outcome is recorded before the caller hears of it.
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass, field
from typing import Any

import structlog

from agentd.errors import AgentdError, InvalidArgument
from agentd.identity import Caller
from agentd.policy import EffectivePolicy, decide_exec
from agentd.policy.execset import exec_mounts
from agentd.policy.paths import is_at_or_below
from agentd.sandbox.cgroups import CgroupDriver
from agentd.sandbox.execwatch import ExecAttempt
from agentd.sandbox.launcher_client import LauncherClient
from agentd.sandbox.spec import Limits, WorkerSpec
from agentd.sandbox.worker import OutputSink, Worker, WorkerResult
from agentd.scheduler.runs import RunManager

log = structlog.get_logger("agentd.tasks")

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
MAX_ARGS = 4096
MAX_ARGV_BYTES = 1 << 20
MAX_STDIN_BYTES = 16 << 20


@dataclass(frozen=True)
class ExecRequest:
    run_id: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    cwd: str = ""
    timeout_seconds: float = 0.0


def _validate(request: ExecRequest) -> None:
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


def _cwd(request: ExecRequest, policy: EffectivePolicy) -> str:
    """The working directory: as asked, else the workspace (or /tmp when there is none)."""
    return request.cwd or ("/workspace" if policy.workspace != "none" else "/tmp")


def resolve_executable(name: str, policy: EffectivePolicy) -> str:
    """argv[0] as the worker will see it: absolute as given, or found on the worker's PATH.

    Granted paths are bound at the same place inside the worker, so looking on the host,
    within the read-only grants, finds what the worker would find.
    """
    if name.startswith("/"):
        return os.path.normpath(name)
    if "/" in name:
        raise InvalidArgument(f"argv[0] {name!r} must be an absolute path or a bare name")
    path = policy.env_set.get("PATH", DEFAULT_PATH)
    for directory in path.split(":"):
        candidate = os.path.join(directory, name)
        granted = any(candidate == root or candidate.startswith(root.rstrip("/") + "/")
                      for root in policy.read_only)
        if granted and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise InvalidArgument(f"{name!r} was not found on the worker's PATH ({path}); give an "
                          "absolute path")


class TaskRunner:
    """Runs tool calls for the RunManager's runs."""

    def __init__(self, runs: RunManager, launcher: LauncherClient, cgroups: CgroupDriver,
                 *, worker_uid: int, worker_gid: int) -> None:
        self.runs = runs
        self.launcher = launcher
        self.cgroups = cgroups
        self.uid = worker_uid
        self.gid = worker_gid
        # task id -> (run id, actor) while its worker runs
        self._watched: dict[str, tuple[str, dict[str, Any]]] = {}
        self._pending_records: set[asyncio.Future[int]] = set()
        # task id -> the paths it was refused, for its step's report (the caller pops them)
        self.denied_paths: dict[str, list[str]] = {}
        launcher.on_exec_attempt = self._on_exec_attempt

    def _on_exec_attempt(self, attempt: ExecAttempt) -> None:
        """A worker tried to exec something the kernel refuses (or ran the loader itself): on
        record per task (the launcher passes on the first 64; exec.exited counts them all)."""
        watched = self._watched.get(attempt.key)
        if watched is None:
            return
        run_id, actor = watched
        self.denied_paths.setdefault(attempt.key, []).append(attempt.path[:4096])
        record = self.runs.audit.append(
            "exec.denied", actor=actor, run_id=run_id, task_id=attempt.key,
            details={"path": attempt.path[:4096], "reason": attempt.reason,
                     "refused": attempt.refused, "pid": attempt.pid})
        task = asyncio.ensure_future(record)
        self._pending_records.add(task)
        task.add_done_callback(self._pending_records.discard)

    def check(self, request: ExecRequest, policy: EffectivePolicy) -> str:
        """Validates a tool call and decides it by policy; returns the resolved executable.

        Raises InvalidArgument for a malformed call, PermissionDenied naming the rule.
        """
        _validate(request)
        executable = resolve_executable(request.argv[0], policy)
        decide_exec(policy, executable, request.env, _cwd(request, policy),
                    request.timeout_seconds)
        return executable

    def build_spec(self, task_id: str, request: ExecRequest, executable: str,
                   policy: EffectivePolicy, *, withheld: tuple[str, ...] = ()) -> WorkerSpec:
        """The worker for one checked call; the caller adds the workspace (its layer stack).

        `withheld` are granted programs (or trees) this worker must not be able to execute by
        any route: the approval triggers of a step nobody approved.
        """
        mounts = exec_mounts(policy, withheld)
        held = [os.path.realpath(p) for p in withheld]
        exec_allow = tuple(e for e in policy.exec_allow
                           if not any(is_at_or_below(os.path.realpath(e), h) for h in held))
        env = {"PATH": DEFAULT_PATH, "HOME": "/workspace", "TMPDIR": "/tmp",
               "AGENTD_TASK_ID": task_id, **policy.env_set, **request.env}
        limits = Limits(memory_bytes=policy.memory_bytes, pids=policy.pids, cpu=policy.cpu,
                        wall_seconds=request.timeout_seconds or policy.wall_seconds,
                        output_bytes=policy.output_bytes, tmp_bytes=policy.tmp_bytes,
                        open_files=policy.open_files, file_size_bytes=policy.file_size_bytes)
        return WorkerSpec(
            task_id=task_id, argv=(executable, *request.argv[1:]), env=env,
            cwd=_cwd(request, policy),
            uid=self.uid, gid=self.gid, user_namespace=policy.user_namespace,
            read_only=policy.read_only,
            workspace_writable=policy.workspace == "read_write",
            exec_allow=exec_allow, exec_binds=mounts.executable,
            exec_withheld=mounts.withheld, limits=limits)

    async def refused(self, request: ExecRequest, caller: Caller, task_id: str,
                      error: AgentdError, policy: EffectivePolicy | None) -> None:
        """Every refused call is on record too, whatever refused it."""
        await self.runs.audit.append(
            "exec.refused", actor=caller.actor(), run_id=request.run_id, task_id=task_id,
            details={**_request_details(request, policy), "error": error.code,
                     "reason": error.message, "rule": getattr(error, "rule", None)})
        log.info("exec.refused", run_id=request.run_id, reason=error.message)

    async def run_worker(self, worker: Worker, request: ExecRequest, caller: Caller,
                         policy: EffectivePolicy, on_output: OutputSink) -> WorkerResult:
        """Records the spawn, runs the worker, records the exit: the record comes first."""
        audit = self.runs.audit
        spec = worker.spec
        run_id, task_id = request.run_id, spec.task_id
        self.runs.register(run_id, worker)
        self._watched[task_id] = (run_id, dict(caller.actor()))
        try:
            await audit.append("exec.allowed", actor=caller.actor(), run_id=run_id,
                               task_id=task_id, details={
                                   **_request_details(request, policy),
                                   "executable": spec.argv[0], "stage": policy.stage,
                                   "policy_hash": policy.content_hash})
            self.runs.store.count_exec(run_id)
            try:
                result = await worker.run(request.stdin, on_output)
            except asyncio.CancelledError:
                await audit.append("exec.cancelled", actor=caller.actor(), run_id=run_id,
                                   task_id=task_id, details={"reason": "the caller went away"})
                raise
        finally:
            self.runs.unregister(run_id, task_id)
            self._watched.pop(task_id, None)
        # The worker's denied execs are on record before its exit is.
        await asyncio.gather(*self._pending_records, return_exceptions=True)
        await audit.append("exec.exited", actor=caller.actor(), run_id=run_id,
                           task_id=task_id, details=_outcome_details(result))
        log.info("exec.exited", run_id=run_id, task_id=task_id, summary=result.summary,
                 wall=round(result.wall_seconds, 4))
        return result


def _request_details(request: ExecRequest, policy: EffectivePolicy | None) -> dict[str, object]:
    """What the audit log keeps of a call: never an environment value the policy does not mark
    as safe to log."""
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
        details["setup_failure"] = {"step": result.setup_failure.step,
                                    "errno": result.setup_failure.errno,
                                    "message": result.setup_failure.message}
    return details

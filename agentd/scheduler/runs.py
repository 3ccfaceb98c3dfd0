"""Runs: create, look up, close; and the one gate every tool call passes through.

A run owns a workspace directory (owned by the worker uid, mode 0700) and is bound to its
agent's effective policy at creation. Closing a run kills whatever still runs in it and
removes the workspace unless the caller keeps it. Every transition is audited before it is
acknowledged.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
from pathlib import Path

import structlog

from agentd.audit import AuditLog
from agentd.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from agentd.identity import Caller
from agentd.sandbox.worker import Worker
from agentd.scheduler.agents import AgentRegistry
from agentd.store.runs import RunRecord, RunStore

log = structlog.get_logger("agentd.runs")


class RunManager:
    """Owns runs and the workers running in them."""

    def __init__(self, *, registry: AgentRegistry, store: RunStore, audit: AuditLog,
                 state_dir: Path, worker_uid: int, worker_gid: int, max_workers: int) -> None:
        self.registry = registry
        self.store = store
        self.audit = audit
        self._runs_dir = state_dir / "runs"
        self._uid = worker_uid
        self._gid = worker_gid
        self._max_workers = max_workers
        self._workers: dict[str, dict[str, Worker]] = {}  # run_id -> task_id -> worker
        # Runs between the start and the end of CloseRun: no new work may enter them.
        self._closing: set[str] = set()
        self.draining = False

    # -- runs ---------------------------------------------------------------------------

    async def create_run(self, agent_name: str, caller: Caller, label: str = "") -> RunRecord:
        self.check_accepting()
        if len(label) > 200:
            raise InvalidArgument("label is longer than 200 characters; shorten it")
        agent = self.registry.get(agent_name)
        run_id = "r-" + secrets.token_hex(6)
        # runs/ and runs/<id>/ can be crossed but not listed (0711): a host process of the
        # worker uid cannot find a workspace without its random run id, while a worker in a
        # user namespace (no privilege over host inodes) can still reach its own to bind it.
        run_dir = self._runs_dir / run_id
        for directory in (self._runs_dir, run_dir):
            directory.mkdir(mode=0o711, exist_ok=True)
            directory.chmod(0o711)
        workspace = run_dir / "workspace"
        workspace.mkdir(mode=0o700)
        os.chown(workspace, self._uid, self._gid)
        record = RunRecord(
            run_id=run_id, agent=agent.name, stage=agent.stage, state="open",
            created_at=time.time(), closed_at=None, policy_hash=agent.policy.content_hash,
            policy_file=agent.policy_file, workspace=str(workspace), created_by=str(caller),
            label=label, execs=0)
        await self.audit.append("run.created", actor=caller.actor(), run_id=run_id, details={
            "agent": agent.name, "stage": agent.stage, "policy_hash": record.policy_hash,
            "policy_file": record.policy_file, "label (caller-supplied)": label})
        self.store.create(record)
        log.info("run.created", run_id=run_id, agent=agent.name, stage=agent.stage,
                 caller=str(caller))
        return record

    def get_run(self, run_id: str) -> RunRecord:
        return self.store.get(run_id)

    def list_runs(self, agent: str = "", include_closed: bool = False) -> list[RunRecord]:
        return self.store.list(agent=agent, include_closed=include_closed)

    async def close_run(self, run_id: str, caller: Caller, *, keep_workspace: bool = False
                        ) -> RunRecord:
        self.check_open(run_id)
        self._closing.add(run_id)
        try:
            killed = await self.stop_workers(run_id, "cancelled")
            workspace = self.store.get(run_id).workspace if keep_workspace else ""
            if not keep_workspace:
                await asyncio.to_thread(shutil.rmtree, self._runs_dir / run_id)
            await self.audit.append("run.closed", actor=caller.actor(), run_id=run_id,
                                    details={"kept_workspace": keep_workspace,
                                             "killed_tasks": killed})
            await self.audit.sign_tree_head()
            log.info("run.closed", run_id=run_id, kept_workspace=keep_workspace, killed=killed)
            return self.store.close_run(run_id, workspace=workspace)
        finally:
            self._closing.discard(run_id)

    def check_open(self, run_id: str) -> RunRecord:
        """The run, if new work may enter it; FAILED_PRECONDITION if closed or closing."""
        record = self.store.get(run_id)
        if record.state == "closed":
            raise FailedPrecondition(f"run {run_id} is closed; create a new run")
        if run_id in self._closing:
            raise FailedPrecondition(f"run {run_id} is being closed; create a new run")
        return record

    # -- workers --------------------------------------------------------------------------

    def check_accepting(self) -> None:
        """Refuses new work while draining or while the audit log cannot record it."""
        if self.draining:
            raise Unavailable("agentd is shutting down; retry against the restarted daemon")
        if not self.audit.healthy:
            raise Unavailable("the audit log is not writable (disk full or I/O error); agentd "
                              "refuses new work until it can record it again")

    def register(self, run_id: str, worker: Worker) -> None:
        """Admits a worker into a run; called with no await since the run was checked open."""
        self.check_open(run_id)
        running = self.running()
        if running >= self._max_workers:
            raise ResourceExhausted(f"{running} workers are running, the daemon's limit "
                                    "(max_concurrent_workers); retry when some have finished")
        self._workers.setdefault(run_id, {})[worker.spec.task_id] = worker

    def unregister(self, run_id: str, task_id: str) -> None:
        tasks = self._workers.get(run_id, {})
        tasks.pop(task_id, None)
        if not tasks:
            self._workers.pop(run_id, None)

    async def stop_workers(self, run_id: str | None, reason: str) -> int:
        """Kills the workers of one run (or all, for None) and waits until they are gone."""
        victims = [w for rid, tasks in self._workers.items() if run_id in (None, rid)
                   for w in tasks.values()]
        for worker in victims:
            worker.stop(reason)
        deadline = time.monotonic() + 10
        while any(run_id in (None, rid) for rid in self._workers) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(victims)

    def running(self) -> int:
        return sum(len(tasks) for tasks in self._workers.values())

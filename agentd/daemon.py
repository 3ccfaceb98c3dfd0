"""agentd, the daemon: start-up order, serving, and draining.

Start-up order matters:
1. config and policies are loaded and checked (a bad file stops the start, with its line);
2. while this process still has a single thread, it moves into its own mount namespace (a
   slave of the host's) and starts the launcher;
3. the cgroup backend is probed and a crashed predecessor's leftovers are killed and removed;
4. the audit log is opened (recovering a torn tail) and the start is recorded;
5. the gRPC servers start, and only then is the daemon ready (systemd READY=1).

SIGTERM or SIGINT drains: health goes NOT_SERVING, new calls get UNAVAILABLE, running workers
are killed (whole cgroups) and report their outcome, the stop is recorded and a final tree
head signed. SIGKILL of the daemon takes the launcher with it (PDEATHSIG) and every worker
with the launcher; their mount namespace, and every mount the daemon made, dies with the last
of them; the next start removes what is left on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import grp
import os
import signal
import sys
import threading
import time

import structlog

from agentd import __version__, activation, logs, metrics, systemd
from agentd.api.server import (
    SOCKET_MODES,
    Servers,
    agentd_registration,
    audit_registration,
)
from agentd.api.service import AgentdServicer
from agentd.audit import AuditLog
from agentd.config import Config, load_config
from agentd.egress import EgressConfig, EgressService
from agentd.egress.secrets import credentials_directory
from agentd.egress.service import upstream_from_resolv_conf
from agentd.errors import AgentdError, FailedPrecondition, PermissionDenied
from agentd.identity import SYSTEM, Caller
from agentd.sandbox import libc
from agentd.sandbox.cgroups import CgroupDriver, probe
from agentd.sandbox.launcher_client import LauncherClient
from agentd.sandbox.pool import WarmPool
from agentd.scheduler.agents import AgentRegistry, Reloaded, check_files
from agentd.scheduler.runs import RunManager
from agentd.scheduler.stages import StageKeeper, open_stages
from agentd.scheduler.steps import StepRunner, recover_steps
from agentd.scheduler.tasks import TaskRunner
from agentd.status import DaemonStatus
from agentd.store.layers import LayerStore
from agentd.store.runs import RunStore
from agentd.store.steps import StepStore

log = structlog.get_logger("agentd")


IO_THREAD = "agentd-io"  # the event loop's worker threads (asyncio.to_thread)


def _name_io_thread() -> None:
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(IO_THREAD)


class Daemon:
    """Everything the daemon owns, in the order it was started."""

    def __init__(self, config: Config, registry: AgentRegistry, launcher: LauncherClient,
                 cgroups: CgroupDriver, audit: AuditLog, store: RunStore, step_store: StepStore,
                 layers: LayerStore, stages: StageKeeper) -> None:
        self.config = config
        self.stages = stages
        self.launcher = launcher
        self.cgroups = cgroups
        self.audit = audit
        self.store = store
        d = config.daemon
        self.runs = RunManager(registry=registry, store=store, steps=step_store, layers=layers,
                               audit=audit, worker_uid=d.worker_uid, worker_gid=d.worker_gid,
                               max_workers=d.max_concurrent_workers)
        self.pool = WarmPool(launcher, cgroups, size=d.warm_pool)
        self.egress = EgressService(EgressConfig(
            upstream=(d.egress_upstream, 53) if d.egress_upstream
            else upstream_from_resolv_conf(),
            uplink=d.egress_uplink_netns or None,
            credentials=credentials_directory(d.egress_credentials_dir),
            runtime=d.runtime_dir, upstream_ca=d.egress_upstream_ca or None)) if d.egress else None
        self.tasks = TaskRunner(self.runs, audit, layers, launcher, cgroups, self.pool,
                                worker_uid=d.worker_uid, worker_gid=d.worker_gid,
                                egress=self.egress)
        stages.attach(lambda run_id: self.runs.get_run(run_id).agent,
                      lambda agent: [r.run_id for r in self.runs.list_runs(agent)],
                      self.runs.stop_workers)
        self.tasks.on_event = stages.on_event
        self.runs.on_event = stages.on_event
        self.steps = StepRunner(self.runs, self.tasks, step_store, layers, audit,
                                allow_self_approval=d.allow_self_approval,
                                squash_depth=d.squash_depth,
                                max_export_bytes=d.max_export_bytes)
        self.started_at = time.monotonic()
        registrations = [agentd_registration(AgentdServicer(self.runs, self.steps,
                                                            self.status,
                                                            self.reload_policies, stages)),
                         audit_registration(audit)]
        # Under systemd the role sockets are its own (passed, listening); otherwise the daemon
        # makes them. Either way grpc serves on private sockets that the forwarder feeds, so
        # every caller's SO_PEERCRED is known in every mode (see agentd.activation).
        groups = {"client": d.socket_group, "approver": d.approver_group}
        self.activation = activation.Activation.from_environment(d.runtime_dir)
        self.activation.bind_own(config.role_sockets(), SOCKET_MODES, groups)
        self.servers = Servers(self.activation.grpc_sockets(config.role_sockets()),
                               groups, registrations, self._record_denial,
                               public=config.role_sockets())
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        # asyncio's own default size, with the threads named in /proc (ps, py-spy, tests).
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix=IO_THREAD,
            initializer=_name_io_thread))
        self.launcher.attach(loop)
        if self.egress is not None:
            await self.egress.start()  # before serving: no egress step runs without it
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        await self.servers.start()
        await self.activation.start()
        metrics_servers = await self._serve_metrics()
        background = [loop.create_task(self._probe_audit()), loop.create_task(self._watchdog())]
        systemd.notify("READY=1\nSTATUS=serving")
        log.info("agentd.ready", sockets={r: str(p) for r, p in self.config.role_sockets().items()},
                 cgroups=self.cgroups.describe(), launcher_pid=self.launcher.pid,
                 agents=self.runs.registry.names())
        await self._stopping.wait()
        systemd.notify("STOPPING=1\nSTATUS=draining")
        await self.drain()
        for task in background:
            task.cancel()
        for server in metrics_servers:
            server.close()

    async def reload_policies(self, caller: Caller) -> list[Reloaded]:
        """Every policy file and the stage ceilings read again and swapped in at once, on
        record first; a file that does not load replaces nothing (FailedPrecondition, and a
        `policy.reload_refused` record). Under the stages' lock: a promotion, demotion or
        acceptance lands wholly before the reload reads the registry, or wholly after it."""
        async with self.stages.lock:
            registry = self.runs.registry
            try:
                prepared, changes = await asyncio.to_thread(registry.prepare_reload)
            except (AgentdError, OSError) as exc:
                reason = exc.message if isinstance(exc, AgentdError) else str(exc)
                log.warning("policy.reload_refused", uid=caller.uid, reason=reason)
                await self.audit.append("policy.reload_refused", actor=caller.actor(),
                                        details={"error": reason[:4000]})
                raise FailedPrecondition(
                    f"policies not reloaded; the ones in force stay: {reason}") from None
            await self.audit.append("policy.reloaded", actor=caller.actor(), details={
                "agents": {c.agent: {"stage": c.stage, "policy_file": c.policy_file,
                                     "old_hash": c.old_hash, "new_hash": c.new_hash,
                                     "clamped": list(c.clamped),
                                     "unreviewed": c.unreviewed} for c in changes}})
            registry.swap(prepared)
            # A pinned (promoted) agent whose file changed keeps its accepted version.
            await self.stages.note_unreviewed(caller)
            for change in changes:
                log.info("policy.reloaded", agent=change.agent, changed=change.changed,
                         old_hash=change.old_hash, new_hash=change.new_hash, uid=caller.uid)
            return changes

    def _reload_on_signal(self) -> None:
        """SIGHUP (systemctl reload): as the admin's ReloadPolicies, by the system."""
        async def reload() -> None:
            with contextlib.suppress(AgentdError):  # refused: logged and recorded above
                await self.reload_policies(SYSTEM)

        task = asyncio.get_running_loop().create_task(reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def status(self) -> DaemonStatus:
        """The daemon's health and load now (cheap: counters, one statvfs, one COUNT)."""
        d = self.config.daemon
        cgroups = self.cgroups.describe()
        head = self.audit.last_head
        disk = os.statvfs(d.state_dir)
        return DaemonStatus(
            version=__version__, uptime_seconds=time.monotonic() - self.started_at,
            cgroup_backend=cgroups.get("backend", self.cgroups.name),
            cgroup_parent=", ".join(f"{k.removeprefix('parent.')}={v}"
                                    for k, v in cgroups.items() if k.startswith("parent")),
            workers_in_use=self.runs.running(), max_workers=d.max_concurrent_workers,
            open_runs=self.store.count_open(), draining=self.runs.draining,
            warm_pool_depth=self.pool.depth, warm_pool_size=self.pool.capacity,
            audit_writable=self.audit.healthy, audit_problem=self.audit.problem,
            audit_records=self.audit.size, audit_queue_depth=self.audit.queue_depth,
            audit_head_size=head.tree_size if head else 0,
            audit_head_time=head.timestamp if head else "",
            state_free_bytes=disk.f_bavail * disk.f_frsize, state_reserve_bytes=d.state_reserve,
            metrics_socket=str(self.config.metrics_socket), metrics_listen=d.metrics_listen)

    def _refresh_metrics(self) -> None:
        """The gauges read at scrape time rather than kept up to date on the hot path."""
        metrics.AUDIT_QUEUE.set(self.audit.queue_depth)
        metrics.AUDIT_WRITABLE.set(1 if self.audit.healthy else 0)
        disk = os.statvfs(self.config.daemon.state_dir)
        metrics.STATE_FREE_BYTES.set(disk.f_bavail * disk.f_frsize)

    async def _serve_metrics(self) -> list[asyncio.AbstractServer]:
        d = self.config.daemon
        gid = grp.getgrnam(d.metrics_group).gr_gid if d.metrics_group else None
        servers: list[asyncio.AbstractServer] = [await metrics.serve_unix(
            str(self.config.metrics_socket), mode=0o660, gid=gid,
            refresh=self._refresh_metrics)]
        if d.metrics_listen:
            host, _, port = d.metrics_listen.rpartition(":")
            try:
                servers.append(await metrics.serve_tcp(host.strip("[]"), int(port),
                                                       refresh=self._refresh_metrics))
            except OSError as exc:
                raise AgentdError(f"metrics_listen {d.metrics_listen}: cannot listen: "
                                  f"{exc.strerror}; choose a free loopback port") from None
        log.info("metrics.serving", socket=str(self.config.metrics_socket),
                 listen=d.metrics_listen or None)
        return servers

    async def _record_denial(self, caller: Caller, method: str, denied: PermissionDenied
                             ) -> None:
        await self.audit.append("api.denied", actor=caller.actor(), details={
            "method": method, "reason": denied.message, "rule": denied.rule})

    async def drain(self) -> None:
        log.info("agentd.draining", running=self.runs.running())
        self.runs.draining = True
        await self.activation.stop_accepting()  # new callers wait in systemd's backlog
        await self.servers.not_serving()
        killed = await self.runs.stop_workers(None, "shutdown")
        await self.pool.close()  # prebuilt workers, killed with their cgroups
        if self.egress is not None:
            await self.egress.stop()
        await self.servers.stop(grace=self.config.daemon.drain_seconds)
        await self.activation.close()
        await self.audit.append("daemon.stopped", actor=SYSTEM.actor(),
                                details={"killed_tasks": killed})
        log.info("agentd.stopped", killed=killed)

    async def _probe_audit(self) -> None:
        """While the audit log cannot be written, tries again every second (fail closed until
        then: new work gets UNAVAILABLE); the log records when and why it resumed."""
        while True:
            await asyncio.sleep(1.0)
            if not self.audit.healthy and await self.audit.probe():
                log.warning("audit.resumed")

    async def _watchdog(self) -> None:
        """Pets systemd's watchdog while the event loop turns. Not tied to the audit log's
        health: a full disk is answered by refusing work, not by a restart loop."""
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval / 3)


def _prepare_dirs(config: Config) -> None:
    d = config.daemon
    for path in (d.state_dir, d.runtime_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o755)


def private_mounts() -> None:
    """Moves the daemon into a mount namespace of its own, a slave of the host's.

    Every mount it makes (the tmpfs uppers, the launcher's worker root) then lives only as long
    as the daemon, its launcher and their workers: a SIGKILL leaves no mount on the host, and the
    host never sees them. It is systemd's PrivateMounts=, done here so every mode has it. Must
    run single-threaded: unshare(CLONE_NEWNS) in a threaded process moves only the caller.
    """
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise AgentdError(f"internal: the daemon has {threads} threads before its mount "
                          "namespace is made; it must be made single-threaded")
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_SLAVE)


def start(config: Config) -> Daemon:
    """Steps 1 to 4 of the start-up order; raises AgentdError with a clear message."""
    # Validated first, before anything is changed; clamped once the log says each stage.
    check_files(config)
    private_mounts()
    _prepare_dirs(config)
    launcher = LauncherClient(str(config.daemon.runtime_dir / "worker-root"),
                              timeout=config.daemon.launcher_timeout_seconds)
    launcher.start()
    d = config.daemon
    cgroups = probe(parent=d.cgroup_parent or None,
                    prefer=None if d.cgroup_backend == "auto" else d.cgroup_backend)
    stale = cgroups.cleanup_stale()
    audit = AuditLog.open(d.state_dir / "audit", head_interval=d.tree_head_interval)
    # Each agent's stage is the log's, not the config's (after its first start).
    registry, stages = open_stages(config, audit, d.state_dir / "audit", SYSTEM.actor())
    store = RunStore(d.state_dir / "state.db")
    step_store = StepStore(store.connection)
    layers = LayerStore(d.state_dir / "workspaces", reserve_bytes=d.state_reserve)
    if not layers.tmpfs_uppers:
        log.warning("workspace.quota_at_commit_only",
                    reason="tmpfs has no user xattrs on this kernel (before 6.6): uppers stay "
                    "on the state disk and limits.workspace holds at commit")
    # Steps that were running when the daemon died applied nothing; mark them, drop leftovers.
    # Those that could reach the network are AMBIGUOUS instead, each on record first.
    recovered = recover_steps(step_store, layers, lambda attempt: audit.append_sync(
        "step.ambiguous", actor=SYSTEM.actor(), run_id=attempt.run_id, details={
            "step": attempt.step, "attempt": attempt.attempt,
            "requested_by": attempt.requested_by,
            "tasks": [t.get("name", "") for t in attempt.request.get("tasks", [])]}))
    # What recovery could not remove was moved aside, not left to stop the start.
    recovered["quarantined"] = layers.take_quarantined()
    if recovered["quarantined"]:
        log.error("agentd.quarantined", paths=recovered["quarantined"])
    audit.append_sync("daemon.started", actor=SYSTEM.actor(), details={
        "pid": os.getpid(), "cgroups": cgroups.describe(), "stale_cgroups_removed": stale,
        "recovered": recovered,
        "agents": {name: {"stage": registry.get(name).stage,
                          "config_stage": config.agents[name].stage,
                          "policy_hash": registry.get(name).policy.content_hash,
                          "clamped": list(registry.get(name).policy.notes)}
                   for name in registry.names()}})
    for name in registry.names():
        for note in registry.get(name).policy.notes:
            log.warning("policy.clamped", agent=name, stage=registry.get(name).stage, note=note)
    if stale:
        log.warning("agentd.recovered", stale_cgroups_removed=stale)
    return Daemon(config, registry, launcher, cgroups, audit, store, step_store, layers, stages)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="agentd", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.environ.get("AGENTD_CONFIG",
                                                           "/etc/agentd/agentd.toml"))
    parser.add_argument("--check", action="store_true",
                        help="validate the config and every agent's policy, then exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        logs.configure(fmt=config.daemon.log_format, level=config.daemon.log_level)
        if args.check:
            registry = AgentRegistry.load(config)
            print(f"{args.config}: ok")
            for name in registry.names():
                agent = registry.get(name)
                for note in agent.policy.notes:
                    print(f"  {name} ({agent.stage}): clamped: {note}")
            return
        if os.geteuid() != 0:
            raise SystemExit("agentd: must run as root (it creates namespaces, cgroups and "
                             "mounts); try `sudo make run`")
        daemon = start(config)
    except AgentdError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        asyncio.run(daemon.serve())
    finally:
        daemon.launcher.stop()
        daemon.audit.close()
        daemon.store.close()


if __name__ == "__main__":
    main()

"""`make soak`: many mixed calls against one real daemon, then a search for leaks from outside.

    python -m tests.soak [--calls 10000] [--clients 4] [--seed N]

A daemon is started the way the tests start one (its own directory and cgroup parent). Client
threads make random but seeded calls on their own runs: Execs that succeed, fail, time out or
are refused, multi-task steps, conflicting steps, streams the client abandons mid-way,
rollbacks, forks, closes and new runs. After a warm-up and at the end, psutil and /proc are read
from outside the daemon:

- the daemon's open fds are back to their warm count;
- its mount namespace has the mounts it had warm, and the host has none under the directory;
- no task cgroup is left under the instance's cgroup parent;
- no network namespace is left beyond the ones that existed before;
- the daemon's only child is its launcher, and nothing is a zombie;
- the daemon's RSS is flat after warm-up (the last quarter's median within RSS_SLACK of the
  first quarter's).

It prints the figures and exits 1 naming every check that failed. tests/test_soak.py runs a
short soak as part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from tests.conftest import DaemonHandle, daemon_base, start_daemon, stop_daemon

RSS_SLACK = 24 << 20  # Python's allocator and grpc's buffers move; a leak grows without end
SETTLE_SECONDS = 10.0
KINDS = {  # kind -> weight
    "exec": 30, "exec_fail": 8, "exec_write": 12, "timeout": 4, "refused": 5, "step": 8,
    "conflict": 3, "abandon": 4, "rollback": 5, "fork": 4, "new_run": 3,
}


@dataclass
class Snapshot:
    fds: int
    mounts: int
    host_mounts: list[str]
    cgroups: list[str]
    prebuilt: set[str]  # the warm pool's cgroups (agentd/sandbox/pool.py), by name
    netns: int
    children: list[str]
    zombies: list[int]
    rss: int


@dataclass
class Report:
    calls: int = 0
    seconds: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    warm: Snapshot | None = None
    end: Snapshot | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _netns(daemon: psutil.Process) -> int:
    """Network namespaces held by the daemon's process tree (the daemon, the launcher, the
    workers, prebuilt ones included): agentd binds none to a file, so one that outlives its
    processes cannot exist, and other processes on the host do not count."""
    found = set()
    for process in [daemon, *daemon.children(recursive=True)]:
        try:
            found.add(os.stat(f"/proc/{process.pid}/ns/net").st_ino)
        except OSError:
            continue
    return len(found)


def snapshot(handle: DaemonHandle) -> Snapshot:
    daemon = psutil.Process(handle.process.pid)
    base = str(handle.base)
    own_mounts = Path(f"/proc/{daemon.pid}/mountinfo").read_text().splitlines()
    host = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(base)]
    instance = (handle.base / "agentd.toml").read_text().split('cgroup_parent = "')[1]
    instance = instance.split('"')[0]
    cgroups = [str(p) for root in Path("/sys/fs/cgroup").iterdir() if root.is_dir()
               for p in root.rglob("t-*") if instance in str(p)]
    prebuilt = {p.name for root in Path("/sys/fs/cgroup").iterdir() if root.is_dir()
                for p in root.rglob("prebuilt-*") if instance in str(p)}
    children = daemon.children(recursive=True)
    return Snapshot(prebuilt=prebuilt,
        fds=daemon.num_fds(), mounts=len(own_mounts), host_mounts=host, cgroups=cgroups,
        netns=_netns(daemon), children=[" ".join(c.cmdline()[:4]) for c in children],
        zombies=[c.pid for c in children if c.status() == psutil.STATUS_ZOMBIE],
        rss=daemon.memory_info().rss)


class Client:
    """One caller: its own channel and runs, random calls from its own seeded generator."""

    def __init__(self, handle: DaemonHandle, seed: int, report: Report,
                 lock: threading.Lock) -> None:
        self.channel = handle.channel()
        self.stub = agentd_pb2_grpc.AgentdStub(self.channel)
        self.random = random.Random(seed)
        self.report = report
        self.lock = lock
        self.run_id = self._new_run()

    def _new_run(self) -> str:
        return str(self.stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id)

    def _exec(self, argv: list[str], timeout: float = 0.0) -> pb.Outcome:
        events = list(self.stub.Exec(pb.ExecRequest(run_id=self.run_id, argv=argv,
                                                    timeout_seconds=timeout), timeout=60))
        return events[-1].outcome

    def _step(self, *scripts: str) -> pb.StepReply:
        tasks = [pb.TaskSpec(name=f"t{i}", argv=["/bin/sh", "-c", s])
                 for i, s in enumerate(scripts)]
        return self.stub.Step(pb.StepRequest(run_id=self.run_id, tasks=tasks), timeout=60)

    def call(self) -> None:
        kind = self.random.choices(list(KINDS), weights=list(KINDS.values()))[0]
        n = self.random.randrange(1000)
        for attempt in range(100):
            try:
                self._call(kind, n)
            except grpc.RpcError as exc:
                # A stream the client abandoned keeps its run until its workers are dead and
                # cleaned up: ABORTED says retry (one writer per run).
                if exc.code() == grpc.StatusCode.ABORTED and attempt < 99:
                    with self.lock:
                        self.report.kinds["retried after ABORTED"] += 1
                    time.sleep(0.02)
                    continue
                if not (kind == "refused" and exc.code() == grpc.StatusCode.PERMISSION_DENIED):
                    with self.lock:
                        self.report.errors.append(f"{kind}: {exc.code().name}: "
                                                  f"{exc.details()}")
            break
        with self.lock:
            self.report.kinds[kind] += 1
            self.report.calls += 1

    def _call(self, kind: str, n: int) -> None:
        if kind == "exec":
            assert self._exec(["/bin/true"]).committed
        elif kind == "exec_fail":
            assert self._exec(["/bin/sh", "-c", "exit 3"]).exit_code == 3
        elif kind == "exec_write":
            self._exec(["/bin/sh", "-c", f"mkdir -p d{n % 7}; echo {n} > d{n % 7}/f{n}"])
        elif kind == "timeout":
            self._exec(["/bin/sleep", "5"], timeout=0.2)
        elif kind == "refused":
            self._exec(["/opt/not-granted"])
        elif kind == "step":
            self._step("echo a > a.$$", "true", f"echo {n} > s{n}")
        elif kind == "conflict":
            reply = self._step("echo 1 > same", "echo 2 > same")
            assert reply.state == pb.STEP_STATE_FAILED
        elif kind == "abandon":
            call = self.stub.Exec(pb.ExecRequest(
                run_id=self.run_id, argv=["/bin/sh", "-c", "echo start; sleep 5"]), timeout=60)
            next(iter(call))  # the first output: the worker runs
            call.cancel()
        elif kind == "rollback":
            run = self.stub.GetRun(pb.GetRunRequest(run_id=self.run_id))
            if run.step:
                self.stub.Rollback(pb.RollbackRequest(run_id=self.run_id,
                                                      step=self.random.randrange(run.step)))
        elif kind == "fork":
            run = self.stub.GetRun(pb.GetRunRequest(run_id=self.run_id))
            fork = self.stub.Fork(pb.ForkRequest(run_id=self.run_id, step=run.step))
            self.stub.CloseRun(pb.CloseRunRequest(run_id=fork.run_id))
        elif kind == "new_run":
            old, self.run_id = self.run_id, self._new_run()
            self.stub.CloseRun(pb.CloseRunRequest(run_id=old))

    def close(self) -> None:
        try:
            self.stub.CloseRun(pb.CloseRunRequest(run_id=self.run_id), timeout=60)
        finally:
            self.channel.close()


def _drive(handle: DaemonHandle, calls: int, clients: int, seed: int, report: Report,
           sample: bool) -> None:
    lock = threading.Lock()
    budget = [calls]
    callers = [Client(handle, seed * 1000 + i, report, lock) for i in range(clients)]

    def loop(client: Client) -> None:
        while True:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            client.call()
            if sample and report.calls % 50 == 0:
                with lock:
                    report.rss.append(psutil.Process(handle.process.pid).memory_info().rss)

    threads = [threading.Thread(target=loop, args=(c,)) for c in callers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in callers:
        c.close()


def _settled(handle: DaemonHandle, warm: Snapshot) -> Snapshot:
    """The end state, once the daemon is idle (reaping and cleanup finish after replies)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        now = snapshot(handle)
        clean = (now.fds <= warm.fds and now.mounts <= warm.mounts and not now.cgroups
                 and len(now.prebuilt) <= len(warm.prebuilt)
                 and now.netns <= warm.netns and not now.zombies
                 and len(now.children) <= len(warm.children))
        if clean or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def soak(calls: int, *, clients: int = 4, seed: int | None = None,
         warmup: int | None = None) -> Report:
    seed = random.randrange(1 << 30) if seed is None else seed
    warmup = max(50, calls // 10) if warmup is None else warmup
    report = Report()
    base = daemon_base()
    handle = start_daemon(base)
    try:
        print(f"soak: seed {seed}, {calls} calls after {warmup} to warm up, {clients} clients",
              flush=True)
        _drive(handle, warmup, clients, seed + 1, Report(), sample=False)
        report.warm = _settled(handle, snapshot(handle))
        start = time.perf_counter()
        _drive(handle, calls, clients, seed, report, sample=True)
        report.seconds = time.perf_counter() - start
        report.end = _settled(handle, report.warm)
        _judge(report)
    finally:
        stop_daemon(handle)
        shutil.rmtree(base, ignore_errors=True)
    return report


def _judge(report: Report) -> None:
    warm, end = report.warm, report.end
    assert warm is not None
    assert end is not None
    if report.errors:
        report.failures.append(f"{len(report.errors)} calls failed unexpectedly, first: "
                               f"{report.errors[0]}")
    if end.fds > warm.fds:
        report.failures.append(f"daemon fds: {warm.fds} warm, {end.fds} at the end")
    if end.mounts > warm.mounts:
        report.failures.append(f"daemon mounts: {warm.mounts} warm, {end.mounts} at the end")
    if end.host_mounts:
        report.failures.append(f"mounts left on the host: {end.host_mounts[:5]}")
    if end.cgroups:
        report.failures.append(f"task cgroups left: {end.cgroups[:5]}")
    if len(end.prebuilt) > len(warm.prebuilt):
        report.failures.append(f"warm pool cgroups grew: {len(warm.prebuilt)} -> "
                               f"{len(end.prebuilt)}")
    if end.netns > warm.netns:
        report.failures.append(f"network namespaces: {warm.netns} warm, {end.netns} at the end")
    if len(end.children) > len(warm.children):
        report.failures.append(f"processes left under the daemon: {end.children}")
    if end.zombies:
        report.failures.append(f"zombies: {end.zombies}")
    quarter = max(1, len(report.rss) // 4)
    if len(report.rss) >= 4:
        first = statistics.median(report.rss[:quarter])
        last = statistics.median(report.rss[-quarter:])
        if last - first > RSS_SLACK:
            report.failures.append(f"daemon RSS grew from {first / 2**20:.1f} MiB to "
                                   f"{last / 2**20:.1f} MiB")


def describe(report: Report) -> str:
    warm, end = report.warm, report.end
    lines = [f"calls: {report.calls} in {report.seconds:.1f} s "
             f"({report.calls / max(report.seconds, 1e-9):.1f}/s); "
             + ", ".join(f"{k} {v}" for k, v in sorted(report.kinds.items()))]
    if warm and end:
        lines.append(f"fds {warm.fds} -> {end.fds}; daemon mounts {warm.mounts} -> "
                     f"{end.mounts}; host mounts {len(end.host_mounts)}; task cgroups "
                     f"{len(end.cgroups)}; netns {warm.netns} -> {end.netns}; children "
                     f"{len(warm.children)} -> {len(end.children)}; zombies {len(end.zombies)}")
    if report.rss:
        series = report.rss[:: max(1, len(report.rss) // 10)]
        lines.append("rss MiB: " + " ".join(f"{r / 2**20:.1f}" for r in series))
    lines += [f"FAILED: {f}" for f in report.failures] or ["no leak found"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    report = soak(args.calls, clients=args.clients, seed=args.seed)
    print(describe(report))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()

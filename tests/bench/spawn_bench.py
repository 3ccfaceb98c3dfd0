"""Spawn latency: a gRPC Exec of /bin/true in a fully confined worker vs bubblewrap.

Both run in the same process, on the same host, interleaved in rounds so that a noisy
neighbour hurts both alike. The reference is `bwrap --unshare-all --die-with-parent
--cap-drop ALL` with read-only binds comparable to the worker's (/usr and merged-/usr
symlinks, /etc/ssl), a fresh /proc, /dev and /tmp.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agentd.api.gen.v1 import agentd_pb2 as pb
from tests.conftest import CONFIG, start_daemon, stop_daemon
from tests.test_egress import Internet
from tests.test_egress import _start as start_egress_daemon

BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--cap-drop", "ALL",
         "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib",
         "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
         "--ro-bind", "/etc/ssl", "/etc/ssl", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", "--new-session", "/bin/true"]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(samples) * 1e3,
            "p95_ms": percentile(samples, 0.95) * 1e3, "n": len(samples)}


def run(report: Callable[[str, dict[str, float]], None], rounds: int = 100) -> None:
    """Four daemons' worth: prebuilt workers (the default, warm_pool = 2), cold (warm_pool =
    0), network egress (a worker in a ready slot namespace), and bubblewrap; each agentd call
    interleaved with a bwrap run."""
    if shutil.which("bwrap") is None:
        raise SystemExit("bwrap is not installed: apt-get install bubblewrap")
    samples: dict[str, list[float]] = {"warm": [], "cold": [], "egress": [], "bwrap": []}
    memory: dict[str, float] = {}
    internet = Internet(f"agentd-bench-inet-{os.getpid()}")
    try:  # the fake internet is a named namespace: removed however the runs end
        for mode, pool in (("warm", 2), ("cold", 0), ("egress", 2)):
            config = CONFIG.replace("[daemon]\n", f"[daemon]\nwarm_pool = {pool}\n", 1)
            with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
                # egress: the `fetcher` agent of tests/test_egress.py (a slot namespace per call,
                # never a prebuilt worker) against its fake internet
                handle = (start_daemon(Path(tmp), config) if mode != "egress"
                          else start_egress_daemon(Path(tmp), internet))
                try:
                    stub = handle.stub()
                    agent = "fetcher" if mode == "egress" else "integration"
                    run_id = stub.CreateRun(pb.CreateRunRequest(agent=agent)).run_id
                    request = pb.ExecRequest(run_id=run_id, argv=["/bin/true"])

                    def agentd_exec(stub: Any = stub, request: pb.ExecRequest = request) -> None:
                        events = list(stub.Exec(request))
                        assert events[-1].outcome.exit_code == 0, events

                    def bwrap() -> None:
                        subprocess.run(BWRAP, check=True)

                    for _ in range(5):  # warm-up: imports, page cache, first cgroups, the pool
                        agentd_exec()
                        bwrap()
                    for _ in range(rounds):
                        for name, call in ((mode, agentd_exec), ("bwrap", bwrap)):
                            start = time.perf_counter()
                            call()
                            samples[name].append(time.perf_counter() - start)
                    if mode == "warm":
                        time.sleep(0.5)  # refilled
                        memory = pool_memory(handle.process.pid)
                finally:
                    stop_daemon(handle)
    finally:
        internet.close()
    ref = summary(samples["bwrap"])
    for mode, label in (("warm", "prebuilt worker (warm_pool = 2)"), ("cold", "cold"),
                        ("egress", "network egress (slot namespace, cold)")):
        ours = summary(samples[mode])
        report(f"spawn: gRPC Exec /bin/true, {label}", ours)
        goal = {"warm": "0.5 from a warm pool", "cold": "1.0 cold",
                "egress": "cold + 5 ms"}[mode]
        report(f"spawn: ratio {mode}/bwrap (goal <= {goal})", {
            "median": ours["median_ms"] / ref["median_ms"],
            "p95": ours["p95_ms"] / ref["p95_ms"]})
    egress, cold = summary(samples["egress"]), summary(samples["cold"])
    report("spawn: egress over cold, ms (goal < 5)", {
        "median": egress["median_ms"] - cold["median_ms"],
        "p95": egress["p95_ms"] - cold["p95_ms"]})
    report("spawn: bwrap --unshare-all /bin/true", ref)
    report("spawn: memory of one prebuilt worker", memory)


def pool_memory(daemon_pid: int) -> dict[str, float]:
    """USS and PSS (MiB) of the prebuilt workers: the launcher's children that are waiting."""
    daemon = psutil.Process(daemon_pid)
    launchers = [c for c in daemon.children() if "agentd.sandbox.launcher" in " ".join(
        c.cmdline())]
    waiting = [c for launcher in launchers for c in launcher.children()]
    if not waiting:
        return {"workers": 0}
    infos = [c.memory_full_info() for c in waiting]
    return {"workers": len(waiting),
            "uss_mib": statistics.mean(i.uss for i in infos) / (1 << 20),
            "pss_mib": statistics.mean(i.pss for i in infos) / (1 << 20)}

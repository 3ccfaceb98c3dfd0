"""Spawn latency: a gRPC Exec of /bin/true in a fully confined worker vs bubblewrap.

Both run in the same process, on the same host, interleaved in rounds so that a noisy
neighbour hurts both alike. The reference is `bwrap --unshare-all --die-with-parent
--cap-drop ALL` with read-only binds comparable to the worker's (/usr and merged-/usr
symlinks, /etc/ssl), a fresh /proc, /dev and /tmp.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agentd.api.gen.v1 import agentd_pb2 as pb
from tests.conftest import start_daemon, stop_daemon

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
    if shutil.which("bwrap") is None:
        raise SystemExit("bwrap is not installed: apt-get install bubblewrap")
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        handle = start_daemon(Path(tmp))
        try:
            stub = handle.stub()
            run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
            request = pb.ExecRequest(run_id=run_id, argv=["/bin/true"])

            def agentd_exec() -> None:
                events = list(stub.Exec(request))
                assert events[-1].outcome.exit_code == 0, events

            def bwrap() -> None:
                subprocess.run(BWRAP, check=True)

            samples: dict[str, list[float]] = {"agentd": [], "bwrap": []}
            for _ in range(5):  # warm-up: imports, page cache, first cgroups
                agentd_exec()
                bwrap()
            for _ in range(rounds):
                for name, call in (("agentd", agentd_exec), ("bwrap", bwrap)):
                    start = time.perf_counter()
                    call()
                    samples[name].append(time.perf_counter() - start)
        finally:
            stop_daemon(handle)
    ours, ref = summary(samples["agentd"]), summary(samples["bwrap"])
    report("spawn: gRPC Exec /bin/true (confined)", ours)
    report("spawn: bwrap --unshare-all /bin/true", ref)
    report("spawn: ratio agentd/bwrap (goal <= 1.0 cold)", {
        "median": ours["median_ms"] / ref["median_ms"], "p95": ours["p95_ms"] / ref["p95_ms"]})

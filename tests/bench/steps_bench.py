"""Steps through the real daemon: a wide step vs bubblewrap, commit, rollback and fork.

- wide step: one gRPC Step of 16 tasks of /bin/true (16 confined workers in parallel, the
  barrier, a checkpoint) vs 16 `bwrap --unshare-all /bin/true` started at once and waited
  for (spawn_bench's command). Interleaved rounds. Goal: ratio <= 1.3.
- commit: a step whose one task rewrites 10 files, in a workspace of 10 files and in one of
  100,000 (made by 4 tasks in one step, as tests/test_steps.py does). What the daemon adds
  beyond the tool is the reply's wall time minus the task's: uppers, audit records, reading
  the changes, the barrier, building and fsyncing the layer, the checkpoint transaction and
  the signed tree head. A step of /bin/true (no change, no layer) is the baseline, so
  `commit_ms` = overhead(10 files changed) - overhead(nothing changed). Goal: <= 20 ms, and
  the same at both sizes. (tests/bench/layers_bench.py times LayerStore.commit alone.)
- rollback and fork: the Rollback and Fork RPCs at both sizes (each rollback undoes a step
  made just before it, untimed; each fork is closed after, untimed). Goal: the same at both
  sizes, <= 10 ms.
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
from agentd.api.gen.v1 import agentd_pb2_grpc
from tests.bench.spawn_bench import BWRAP, percentile
from tests.conftest import CONFIG, start_daemon, stop_daemon

Report = Callable[[str, dict[str, float]], None]
Stub = agentd_pb2_grpc.AgentdStub
WIDTH = 16
WIDE_ROUNDS = 30
SETTLE = 0.3  # seconds of idle before each timed wide step and each 16 bwraps
ROUNDS = 30
SIZES = (10, 100_000)
MAKE_FILES = ("import os, stat, sys\nos.makedirs(sys.argv[1])\n"
              "for i in range(int(sys.argv[2])):\n"
              "    os.mknod(f'{sys.argv[1]}/{i}', 0o644 | stat.S_IFREG)\n")
CHANGE_TEN = "for i in 0 1 2 3 4 5 6 7 8 9; do echo $0 > big/p0/$i; done"


def summary(samples: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(samples) * 1e3,
            "p95_ms": percentile(samples, 0.95) * 1e3, "n": len(samples)}


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def step(stub: Stub, run_id: str, *tasks: pb.TaskSpec) -> pb.StepReply:
    reply = stub.Step(pb.StepRequest(run_id=run_id, tasks=list(tasks)), timeout=300)
    assert reply.state == pb.STEP_STATE_COMMITTED, reply
    return reply


def overhead(reply: pb.StepReply) -> float:
    """What the daemon spent on the step beyond its slowest task's own wall time."""
    return reply.wall_seconds - max(t.outcome.wall_seconds for t in reply.tasks)


def workspace(stub: Stub, size: int) -> str:
    """A run whose workspace has `size` empty files under big/p0..p3 (one step)."""
    parts = 4 if size >= 1000 else 1
    run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
    step(stub, run_id, *(pb.TaskSpec(name=f"p{j}", argv=[
        "/usr/bin/python3", "-c", MAKE_FILES, f"big/p{j}", str(size // parts)])
        for j in range(parts)))
    return run_id


def bench_wide(stub: Stub, report: Report, label: str) -> None:
    run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
    tasks = [pb.TaskSpec(name=f"t{i}", argv=["/bin/true"]) for i in range(WIDTH)]

    def bwraps() -> None:
        processes = [subprocess.Popen(BWRAP) for _ in range(WIDTH)]
        assert all(p.wait() == 0 for p in processes)

    samples: dict[str, list[float]] = {"agentd": [], "bwrap": []}
    for _ in range(3):  # warm-up
        step(stub, run_id, *tasks)
        bwraps()
    for _ in range(WIDE_ROUNDS):
        # A pause before each: the pool refills after a step, and that must not be
        # measured as the bwraps' time (nor a refill still running as the step's).
        time.sleep(SETTLE)
        samples["agentd"].append(timed(lambda: step(stub, run_id, *tasks)))
        time.sleep(SETTLE)
        samples["bwrap"].append(timed(bwraps))
    ours, ref = summary(samples["agentd"]), summary(samples["bwrap"])
    report(f"steps: gRPC Step of {WIDTH} x /bin/true, {label}", ours)
    report(f"steps: {WIDTH} x bwrap --unshare-all /bin/true at once", ref)
    report(f"steps: ratio agentd/bwrap, {label} (goal <= 1.3)", {
        "median": ours["median_ms"] / ref["median_ms"], "p95": ours["p95_ms"] / ref["p95_ms"]})


def bench_size(stub: Stub, size: int, report: Report) -> None:
    run_id = workspace(stub, size)
    change = pb.TaskSpec(name="ten", argv=["/bin/sh", "-c", CHANGE_TEN, "0"])
    nothing = pb.TaskSpec(name="none", argv=["/bin/true"])
    changed: list[float] = []
    unchanged: list[float] = []
    rollback: list[float] = []
    fork: list[float] = []
    for i in range(ROUNDS):
        unchanged.append(overhead(step(stub, run_id, nothing)))
        reply = step(stub, run_id, pb.TaskSpec(name="ten", argv=[*change.argv[:3], str(i)]))
        changed.append(overhead(reply))
        rollback.append(timed(lambda n=reply.step: stub.Rollback(
            pb.RollbackRequest(run_id=run_id, step=n - 1))))
        start = time.perf_counter()
        forked = stub.Fork(pb.ForkRequest(run_id=run_id, step=reply.step - 1))
        fork.append(time.perf_counter() - start)
        stub.CloseRun(pb.CloseRunRequest(run_id=forked.run_id))
    base = statistics.median(unchanged)
    report(f"steps: overhead, nothing changed, {size} files", summary(unchanged))
    report(f"steps: overhead, 10 files changed, {size} files", {
        **summary(changed), "commit_ms": (statistics.median(changed) - base) * 1e3})
    report(f"steps: Rollback RPC, {size} files", summary(rollback))
    report(f"steps: Fork RPC, {size} files", summary(fork))
    stub.CloseRun(pb.CloseRunRequest(run_id=run_id))


def run(report: Report) -> None:
    if shutil.which("bwrap") is None:
        raise SystemExit("bwrap is not installed: apt-get install bubblewrap")
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        Path(tmp).chmod(0o755)
        # The warm pool sized for the step's width (warm_pool = 16), then the default (2).
        wide = start_daemon(Path(tmp) / "wide", CONFIG.replace(
            "[daemon]\n", f"[daemon]\nwarm_pool = {WIDTH}\n", 1))
        try:
            bench_wide(wide.stub(), report, f"warm_pool = {WIDTH}")
        finally:
            stop_daemon(wide)
        handle = start_daemon(Path(tmp))
        try:
            stub = handle.stub()
            bench_wide(stub, report, "warm_pool = 2")
            for size in SIZES:
                bench_size(stub, size, report)
        finally:
            stop_daemon(handle)

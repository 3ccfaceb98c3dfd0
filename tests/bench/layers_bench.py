"""Workspace layers: commit cost, O(1) rollback/fork, squash by hard links vs by copy.

Workspace: a base layer of 100,000 files (100 directories of 1,000 files of ~100 bytes,
owned by the worker), written straight into the layer once as an import would.

- commit: each round mounts the stack under a fresh upper in a private mount namespace, a
  worker (uid 65534) changes 10 files (edits, new files, deletes, a chmod), the mount goes
  away, and then `changes` and `commit` (which re-reads the changes, checks conflicts,
  renames into a new layer, fsyncs and publishes it) are timed. Rounds accumulate, as
  steps do. Goal: commit <= 20 ms.
- rollback and fork are list operations on a checkpoint's stack; what costs anything is
  mounting the resulting stack in the worker. Mount time of a 10-layer stack whose base is
  empty vs the 100,000-file base, interleaved: it must not depend on the workspace size.
  Lookup of a missing name at depth 1, 100 and 500 shows what deep stacks cost tools (what
  the squash threshold weighs).
- squash of the stack (hard links, no mount) vs the alternative: copying the merged view
  out of a read-only overlay mount (`cp -a`, then syncfs).
- export: the whole workspace as a tarball to /dev/null.

Set AGENTD_BENCH_DIR to measure another filesystem (default: the system temp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agentd.store.layers import LayerStore
from tests.test_overlay import WORKER, mounted

Report = Callable[[str, dict[str, float]], None]
FILES, PER_DIR = 100_000, 1_000
COMMIT_ROUNDS = 20
MOUNT_ROUNDS = 40

MOUNT_CHILD = r"""
import json, os, sys, time
from agentd.sandbox import libc, overlay
req = json.loads(sys.argv[1])
libc.unshare(libc.CLONE_NEWNS)
libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
target, upper, work = req["target"], req["upper"], req["work"]
out = {name: {"mount": [], "lookup": []} for name in req["stacks"]}
for i in range(req["rounds"]):
    for name, lowers in req["stacks"].items():
        start = time.perf_counter()
        overlay.mount_workspace(target, lowers, upper, work)
        out[name]["mount"].append(time.perf_counter() - start)
        if i == 0:
            start = time.perf_counter()
            for j in range(req["lookups"]):
                try:
                    os.stat(f"{target}/d{j % 100}/missing-{j}")
                except FileNotFoundError:
                    pass
            out[name]["lookup"].append((time.perf_counter() - start) / req["lookups"])
        libc.umount2(target, 0)
print(json.dumps(out))
"""


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(samples) * 1e3,
            "p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1e3,
            "n": len(samples)}


def populate(layer: Path) -> None:
    """The 100,000-file workspace, written into a fresh base layer (as an import would)."""
    payload = b"x" * 100
    for d in range(FILES // PER_DIR):
        directory = layer / f"d{d}"
        directory.mkdir()
        os.chown(directory, WORKER, WORKER)
        for f in range(PER_DIR):
            path = directory / f"f{f}"
            path.write_bytes(payload)
            os.chown(path, WORKER, WORKER)
    os.sync()


def ten_changes(round_: int) -> str:
    r = round_
    return (f"echo edit{r} >> d1/f{r}; echo edit{r} >> d17/f{r}; echo edit{r} >> d33/f{r}; "
            f"echo new > d50/new{r}; echo new > d51/new{r}; echo new > d52/new{r}; "
            f"rm d60/f{r}; rm d61/f{r}; chmod 600 d70/f{r}; echo new > d99/new{r}")


def bench_commit(store: LayerStore, base: Path, stack: list[str],
                 report: Report) -> list[str]:
    changes_t, commit_t = [], []
    for r in range(COMMIT_ROUNDS):
        upper = store.new_upper(f"bench{r}", WORKER, WORKER)
        with mounted(base, [store.path(x) for x in stack], upper.upper, upper.work) as m:
            m.sh(ten_changes(r))
        start = time.perf_counter()
        changes = store.changes(upper.upper, lowers=stack)
        changes_t.append(time.perf_counter() - start)
        assert len(changes) == 10, changes
        start = time.perf_counter()
        new = store.commit([upper.upper], lowers=stack)
        commit_t.append(time.perf_counter() - start)
        assert new is not None
        stack = [*stack, new]
        store.remove_upper(f"bench{r}")
    report("layers: changes() of 10 files, 100k-file workspace", summary(changes_t))
    report("layers: commit() of 10 files, 100k-file workspace", summary(commit_t))
    return stack


def bench_mount(store: LayerStore, base: Path, big: str, report: Report) -> None:
    empty = [store.create_base(WORKER, WORKER) for _ in range(500)]
    small = empty[1:10]
    start = time.perf_counter()
    for _ in range(1000):
        rollback = [big, *small][:5]  # what rollback/fork do to a checkpoint's stack
        fork = [*rollback]
        paths = [str(store.path(x)) for x in fork]
    list_cost = (time.perf_counter() - start) / 1000
    del paths
    report("layers: rollback/fork stack + resolve paths (5)", {"us": list_cost * 1e6})
    stacks = {"10 layers, empty base": [empty[0], *small],
              "10 layers, 100k-file base": [big, *small],
              "1 layer (100k)": [big], "100 layers (100k base)": [big, *empty[1:100]],
              "500 layers (100k base)": [big, *empty[1:500]]}
    upper = store.new_upper("bench-mount", WORKER, WORKER)
    target = base / "bench-mnt"
    target.mkdir()
    request = {"target": str(target), "upper": str(upper.upper), "work": str(upper.work),
               "rounds": MOUNT_ROUNDS, "lookups": 2000,
               "stacks": {k: [str(store.path(x)) for x in v] for k, v in stacks.items()}}
    done = subprocess.run([sys.executable, "-c", MOUNT_CHILD, json.dumps(request)],
                          capture_output=True, text=True, check=True)
    results = json.loads(done.stdout)
    for name, figures in results.items():
        report(f"layers: mount_workspace, {name}", summary(figures["mount"]))
    for name in ("1 layer (100k)", "100 layers (100k base)", "500 layers (100k base)"):
        report(f"layers: lookup of a missing name, {name}",
               {"us": results[name]["lookup"][0] * 1e6})
    store.remove_upper("bench-mount")
    for layer_id in empty:
        store.delete(layer_id)


def bench_squash(store: LayerStore, base: Path, stack: list[str], report: Report) -> None:
    start = time.perf_counter()
    squashed = store.squash(stack)
    report(f"layers: squash (hard links), 100k files, {len(stack)} layers",
           {"s": time.perf_counter() - start})
    store.delete(squashed)
    dest = base / "copy"
    with mounted(base, [store.path(x) for x in stack]) as m:
        start = time.perf_counter()
        m.sh(f"cp -a . {dest} && sync -f {dest}", uid=0)
        report("layers: squash alternative: cp -a from a read-only mount + syncfs",
               {"s": time.perf_counter() - start})
    shutil.rmtree(dest)
    with open(os.devnull, "wb") as sink:
        start = time.perf_counter()
        store.export_tar(stack, sink)
        report("layers: export_tar, 100k files", {"s": time.perf_counter() - start})


def run(report: Report) -> None:
    parent = os.environ.get("AGENTD_BENCH_DIR") or None
    base = Path(tempfile.mkdtemp(prefix="agentd-layers-bench-", dir=parent))
    base.chmod(0o755)
    try:
        store = LayerStore(base / "store")
        big = store.create_base(WORKER, WORKER)
        populate(store.path(big))
        stack = bench_commit(store, base, [big], report)
        bench_mount(store, base, big, report)
        bench_squash(store, base, stack, report)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    from tests.bench.run import report as print_report

    run(print_report)

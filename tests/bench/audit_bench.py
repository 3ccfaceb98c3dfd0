"""Audit log: durable appends per second vs raw group commit, and verifying a million records.

Appends: N concurrent asyncio tasks (1, 8, 64) append for a fixed time. The reference does
the same with the least a durable group commit can do: a writer thread that writes the
queued lines of the same size and fdatasyncs once per batch, in the same directory. Both run
back to back for each N, so the ratio (audit / raw) is what the log's own work costs:
canonical JSON, the hash chain, the Merkle tree, the futures.

Verify: a log of 1,000,000 records (~350 bytes each, signed heads every 100,000) is written
directly with the segment writer, then timed: `verify` from the files alone (goal < 10 s),
`AuditLog.open` with and without its tree.idx cache, and one inclusion proof.

Set AGENTD_BENCH_DIR to measure another filesystem (default: the system temp dir).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentd.audit import AuditLog, record, verify
from agentd.audit.merkle import Frontier, leaf_hash
from agentd.audit.segments import SegmentWriter
from agentd.audit.signing import HeadFile, Signer
from agentd.audit.tree import INDEX_FILE

Report = Callable[[str, dict[str, float]], None]
ACTOR = {"role": "client", "socket": "/run/agentd/agentd.sock", "peer": "uid=1000"}
DETAILS = {"argv": ["/usr/bin/python3", "-c", "print('hello')"], "cwd": "/workspace",
           "env_names": ["HOME", "LANG", "PATH"], "exit_code": 0, "cpu_seconds": 0.012345,
           "wall_seconds": 0.054321, "peak_memory_bytes": 12345678, "stage": "sandbox"}
SLICES = 4  # raw and audit alternate in slices, so that a noisy neighbour hurts both alike
SLICE_SECONDS = 0.5


class RawGroupCommit:
    """The reference: a writer thread doing write + one fdatasync per batch, and waking the
    event loop once per batch (as AuditLog does); no JSON, hashing or tree."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._cv = threading.Condition()
        self._queue: list[tuple[bytes, asyncio.Future[int]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._count = 0
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    async def append(self, line: bytes) -> int:
        self._loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = self._loop.create_future()
        with self._cv:
            self._queue.append((line, future))
            self._cv.notify()
        return await future

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                batch, self._queue = self._queue, []
                if not batch and self._closing:
                    return
            os.write(self._fd, b"".join(line for line, _ in batch))
            os.fdatasync(self._fd)
            first, self._count = self._count, self._count + len(batch)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_settle, [f for _, f in batch], first)

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()
        os.close(self._fd)


def _settle(futures: list[asyncio.Future[int]], first: int) -> None:
    for i, future in enumerate(futures):
        future.set_result(first + i)


async def _drive(writers: int, append: Callable[[], Any]) -> int:
    stop = time.monotonic() + SLICE_SECONDS
    done = 0

    async def writer() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await append()
            done += 1

    await asyncio.gather(*(writer() for _ in range(writers)))
    return done


def _count_flushes() -> tuple[list[int], Callable[[], None]]:
    """Counts fdatasync calls (both writers use it once per batch); returns an undo."""
    calls = [0]
    real = os.fdatasync

    def counting(fd: Any) -> None:
        calls[0] += 1
        real(fd)

    os.fdatasync = counting
    return calls, lambda: setattr(os, "fdatasync", real)


def bench_appends(base: Path, writers: int, report: Report) -> None:
    line = record.assemble(record.prepare("exec.exited", actor=ACTOR, details=DETAILS,
                                          run_id="r-0123456789abcdef", task_id="t-0123456789"),
                           123456, "0" * 64, record.now()) + b"\n"
    totals = {"raw": [0, 0.0, 0], "audit": [0, 0.0, 0]}  # appends, seconds, flushes
    flushes, restore = _count_flushes()
    raw = RawGroupCommit(base / f"raw-{writers}.jsonl")
    log = AuditLog.open(base / f"audit-{writers}")
    drivers: dict[str, Callable[[], Any]] = {
        "raw": lambda: raw.append(line),
        "audit": lambda: log.append("exec.exited", actor=ACTOR, details=DETAILS,
                                    run_id="r-0123456789abcdef", task_id="t-0123456789")}
    try:
        for _ in range(SLICES):
            for name, append in drivers.items():
                flushes[0] = 0
                start = time.perf_counter()
                done = asyncio.run(_drive(writers, append))
                totals[name][0] += done
                totals[name][1] += time.perf_counter() - start
                totals[name][2] += flushes[0]
    finally:
        restore()
        raw.close()
        log.close()
    rate = {name: n / seconds for name, (n, seconds, _) in totals.items()}
    report(f"audit.append writers={writers}", {
        "audit_per_s": rate["audit"], "raw_per_s": rate["raw"],
        "ratio": rate["audit"] / rate["raw"],
        "audit_per_flush": totals["audit"][0] / max(totals["audit"][2], 1),
        "raw_per_flush": totals["raw"][0] / max(totals["raw"][2], 1), "line_bytes": len(line)})


def write_big_log(directory: Path, records: int, head_every: int = 100_000) -> None:
    """A valid log written directly (no group commit, no futures): for timing the readers."""
    directory.mkdir(mode=0o700)
    signer = Signer.load_or_create(directory)
    heads, _ = HeadFile.open(directory, signer.public)
    writer = SegmentWriter(directory, 64 << 20)
    frontier = Frontier()
    parts = record.prepare("exec.exited", actor=ACTOR, details=DETAILS,
                           run_id="r-0123456789abcdef", task_id="t-0123456789")
    prev, when = record.NO_PREV, record.now()
    batch: list[bytes] = []
    for index in range(records):
        line = record.assemble(parts, index, prev, when)
        leaf = leaf_hash(line)
        prev = leaf.hex()
        frontier.append(leaf)
        batch.append(line)
        if len(batch) == 10_000 or index == records - 1:
            writer.position()
            writer.append(b"\n".join(batch) + b"\n")
            batch = []
        if (index + 1) % head_every == 0 or index == records - 1:
            heads.append(signer.sign(index + 1, frontier.root()))
    writer.close()
    heads.close()


def bench_verify(base: Path, report: Report, records: int = 1_000_000) -> None:
    directory = base / "big"
    start = time.perf_counter()
    write_big_log(directory, records)
    generate_s = time.perf_counter() - start

    start = time.perf_counter()
    result = verify(directory)
    verify_s = time.perf_counter() - start
    if not result.ok:
        raise SystemExit(f"the generated log does not verify: {result.first}")

    start = time.perf_counter()
    log = AuditLog.open(directory)  # no tree.idx yet: rehashes every record
    rebuild_s = time.perf_counter() - start
    log.close()
    start = time.perf_counter()
    log = AuditLog.open(directory)  # tree.idx: only the chunks after the last head
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    log.inclusion_proof(records // 3, log.size)
    proof_ms = (time.perf_counter() - start) * 1e3
    log.close()
    size = sum(p.stat().st_size for p in directory.glob("audit-*.jsonl"))
    report(f"audit.verify records={records}", {
        "verify_s": verify_s, "open_rebuild_s": rebuild_s, "open_s": open_s,
        "proof_ms": proof_ms, "generate_s": generate_s, "log_mib": size / (1 << 20),
        "index_kib": (directory / INDEX_FILE).stat().st_size / 1024})


def run(report: Report) -> None:
    """Everything, in one temporary directory that is removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="agentd-audit-bench-",
                                 dir=os.environ.get("AGENTD_BENCH_DIR")))
    try:
        for writers in (1, 8, 64):
            bench_appends(base, writers, report)
        bench_verify(base, report)
    finally:
        shutil.rmtree(base)


def _print(name: str, figures: dict[str, float]) -> None:
    print(f"{name:<36} " + "  ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()),
        flush=True)


if __name__ == "__main__":
    run(_print)

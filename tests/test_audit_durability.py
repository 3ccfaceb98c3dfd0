"""Durability for real: kill -9 of a writer under load, and a disk that fills up.

The writer is a separate process started from an inline program (trio's way): it appends from
many concurrent tasks and prints each index only after `append` returned, i.e. once the
record was acknowledged. Whatever the parent read from it before the kill must be in the log
after recovery, with the content the writer gave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.audit import AuditLog, TreeHead, record, verify
from agentd.audit.segments import list_segments, read_lines, segment_path
from agentd.audit.signing import HEADS_FILE
from agentd.errors import Unavailable

WRITER = r"""
import asyncio, os, sys
from pathlib import Path
from agentd.audit import AuditLog

async def main() -> None:
    directory, segment_bytes, writers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    log = AuditLog.open(directory, segment_bytes=segment_bytes, head_interval=0.02)
    out = sys.stdout

    async def writer(w: int) -> None:
        i = 0
        while True:
            token = f"{os.getpid()}-{w}-{i}"
            index = await log.append("test.load", actor={"role": "test", "writer": w},
                                     details={"token": token, "pad": "x" * (i * 37 % 700)})
            out.write(f"{index} {token}\n")
            out.flush()
            i += 1

    await asyncio.gather(*(writer(w) for w in range(writers)))

asyncio.run(main())
"""


def kill_writer_under_load(directory: Path, segment_bytes: int, writers: int,
                           rng: random.Random) -> dict[int, str]:
    """Starts the writer, lets it run a random while, SIGKILLs it; returns what it acked."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), str(segment_bytes), str(writers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    acked: dict[int, str] = {}
    started = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            index, token = raw.decode().split()
            acked[int(index)] = token
            started.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        if not started.wait(20):
            proc.kill()
            raise AssertionError(f"the writer never acknowledged: {proc.communicate()[1]!r}")
        time.sleep(rng.uniform(0.05, 0.6))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join()
        assert proc.stderr is not None
        proc.stderr.close()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return acked


def power_cut(directory: Path, keep_index: int, rng: random.Random) -> bool:
    """Cuts the last segment inside a random line after record `keep_index`, as a machine
    crash may lose unflushed pages; False if nothing after it was written."""
    numbers = list_segments(directory)
    last = segment_path(directory, numbers[-1])
    after = [(offset, len(line)) for seg, offset, line in read_lines(directory, numbers[-1], 0)
             if seg == numbers[-1] and (record.line_index(line) or 0) > keep_index]
    if not after:
        return False
    offset, length = rng.choice(after)
    with open(last, "r+b") as f:
        f.truncate(rng.randint(offset + 1, offset + length))  # never at a line boundary
    return True


class TestKillNine:
    def test_nothing_acknowledged_is_lost(self, tmp_path: Path) -> None:
        """Six times or more: kill -9 during concurrent appends (every other time also losing
        part of the unflushed tail, as a power cut would), reopen, which recovers by itself
        and records the cut, and find every acknowledged record with its content; the log
        verifies clean. Rounds go on (at most 12) until a line was torn at least once."""
        rng = random.Random(6962)
        total_acked, torn, recovered = 0, 0, 0
        for round_ in range(12):
            if round_ >= 6 and torn:
                break
            segment_bytes = (16 << 10) if round_ % 2 else (1 << 20)
            acked = kill_writer_under_load(tmp_path, segment_bytes, 32, rng)
            total_acked += len(acked)
            tore = False
            if round_ % 2 or round_ >= 6:
                heads = (tmp_path / HEADS_FILE).read_bytes().splitlines()
                signed = TreeHead.parse(heads[-1]).tree_size if heads else 0
                tore = power_cut(tmp_path, max([signed - 1, *acked]), rng)
                torn += tore
            log = AuditLog.open(tmp_path)
            records = {r["index"]: r for r in log.read()}
            log.close()
            cuts = [r for r in records.values() if r["event"] == "audit.recovered"]
            # Our cut is recovered once; a kill alone may also tear a multi-page write.
            assert len(cuts) - recovered == 1 if tore else len(cuts) - recovered <= 1
            recovered = len(cuts)
            missing = [i for i in acked if i not in records]
            assert not missing, f"round {round_}: acknowledged records lost: {missing[:10]}"
            wrong = [i for i, token in acked.items()
                     if records[i]["details"].get("token") != token]
            assert not wrong, f"round {round_}: records changed: {wrong[:10]}"
            report = verify(tmp_path)
            assert report.ok, f"round {round_}: {report.problems[:3]}"
        assert total_acked > 100
        assert torn >= 1, "nothing unflushed to cut in any round"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of our own, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        # Lazily if a failed test left a file open: the mount must not outlive the test.
        if subprocess.run(["umount", str(mount)], check=False).returncode:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill_disk(path: Path) -> None:
    """Writes to `path` until the filesystem is full."""
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\xff" * 4096)


@pytest.mark.privileged
class TestDiskFull:
    def test_fails_closed_and_resumes(self, small_fs: Path) -> None:
        """On a full disk appends raise Unavailable saying why, `healthy` is False, nothing
        half-written stays; after space is freed the probe resumes and the log verifies."""
        asyncio.run(self._scenario(small_fs))

    async def _scenario(self, mount: Path) -> None:
        directory = mount / "audit"
        log = AuditLog.open(directory, segment_bytes=64 << 10)
        try:
            await self._fill_refuse_resume(log, mount)
        finally:
            await asyncio.to_thread(log.close)
        report = verify(directory)
        assert report.ok, report.problems

    async def _fill_refuse_resume(self, log: AuditLog, mount: Path) -> None:
        directory = log.directory
        for i in range(20):
            await log.append("test.event", actor={"role": "test"}, details={"i": i})
        fill_disk(mount / "filler")
        refused: Unavailable | None = None
        for i in range(2000):  # the last page of the segment may still take a few records
            try:
                await log.append("test.event", actor={"role": "test"},
                                 details={"i": i, "pad": "p" * 500})
            except Unavailable as exc:
                refused = exc
                break
        assert refused is not None, "the disk never filled up"
        assert str(refused) == ("audit log not writable: No space left on device (ENOSPC); "
                                "agentd refuses new work until it can write again")
        assert not log.healthy
        size = log.size
        segments = {p: p.read_bytes() for p in directory.glob("audit-*.jsonl")}
        assert all(data.endswith(b"\n") for data in segments.values() if data)
        with pytest.raises(Unavailable, match="ENOSPC"):
            await log.append("test.event", actor={"role": "test"}, details={"pad": "q" * 500})
        assert not await log.probe()
        assert log.size == size
        assert {p: p.read_bytes() for p in directory.glob("audit-*.jsonl")} == segments

        (mount / "filler").unlink()
        assert await log.probe()
        assert log.healthy
        index = await log.append("test.event", actor={"role": "test"}, details={"after": True})
        assert index == size + 1
        [resumed] = log.read(size, size + 1)
        assert resumed["event"] == "audit.resumed"
        assert resumed["details"]["appends_refused"] == 2  # probes are not appends
        assert "ENOSPC" in resumed["details"]["error"]

    def test_a_full_disk_at_start_is_unavailable(self, small_fs: Path) -> None:
        """Opening a new log on a full disk fails closed with the reason."""
        fill_disk(small_fs / "filler")
        with pytest.raises(Unavailable, match="No space left on device"):
            AuditLog.open(small_fs / "audit")
        (small_fs / "filler").unlink()
        AuditLog.open(small_fs / "audit").close()
        assert verify(small_fs / "audit").ok

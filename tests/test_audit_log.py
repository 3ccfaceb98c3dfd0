"""AuditLog: ordered durable appends with group commit, fail closed, proofs, reads, reopen."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agentd.audit import AuditLog, load_public_key, merkle, verify, verify_head
from agentd.audit.segments import segment_path
from agentd.audit.signing import HEADS_FILE, KEY_FILE, PUB_FILE, TreeHead
from agentd.audit.tree import INDEX_FILE, TreeStore
from agentd.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable

ACTOR = {"role": "test"}


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Runs an async test in a fresh event loop (the project has no async pytest plugin)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    audit = AuditLog.open(tmp_path / "audit")
    yield audit
    audit.close()


def fill(audit: AuditLog, n: int, **kwargs: Any) -> None:
    for i in range(n):
        audit.append_sync("test.event", actor=ACTOR, details={"i": i}, **kwargs)


def leaf_hashes(audit: AuditLog) -> list[bytes]:
    return [merkle.leaf_hash(line) for line in audit.read_lines()]


def fdatasync_failing(error: int) -> Callable[[int], None]:
    def fake(fd: int) -> None:
        raise OSError(error, os.strerror(error))
    return fake


class TestAppend:
    @in_loop
    async def test_indexes_are_consecutive_and_durable(self, tmp_path: Path) -> None:
        """Concurrent appends get distinct consecutive indexes and survive a reopen."""
        audit = AuditLog.open(tmp_path)
        indexes = await asyncio.gather(*(
            audit.append("test.event", actor=ACTOR, details={"i": i}, run_id="r-1", task_id="t")
            for i in range(50)))
        assert sorted(indexes) == list(range(50))
        audit.close()
        reopened = AuditLog.open(tmp_path)
        records = list(reopened.read())
        reopened.close()
        assert [r["index"] for r in records] == list(range(50))
        by_index = {r["index"]: r["details"]["i"] for r in records}
        assert sorted(by_index.values()) == list(range(50))
        assert {r["run_id"] for r in records} == {"r-1"}

    @in_loop
    async def test_concurrent_appends_share_flushes(self, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """64 concurrent appends need far fewer than 64 fdatasyncs (group commit)."""
        audit = AuditLog.open(tmp_path)
        calls = []
        real = os.fdatasync

        def counting(fd: int) -> None:
            calls.append(fd)
            time.sleep(0.002)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", counting)
        await asyncio.gather(*(audit.append("test.event", actor=ACTOR) for _ in range(64)))
        audit.close()
        assert 1 <= len(calls) < 16

    @in_loop
    async def test_the_event_loop_is_not_blocked_by_a_slow_flush(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A 300 ms fdatasync runs in the writer thread; the loop keeps ticking meanwhile."""
        audit = AuditLog.open(tmp_path)
        real = os.fdatasync

        def slow(fd: int) -> None:
            time.sleep(0.3)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", slow)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await audit.append("test.event", actor=ACTOR)
        task.cancel()
        audit.close()
        assert ticks >= 10

    @in_loop
    async def test_a_cancelled_caller_does_not_withdraw_its_record(self, log: AuditLog) -> None:
        """The event happened: cancelling the waiting task still leaves the record written."""
        task = asyncio.create_task(log.append("test.event", actor=ACTOR, details={"x": 1}))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if log.size:
                break
            await asyncio.sleep(0.01)
        [rec] = log.read()
        assert rec["details"] == {"x": 1}

    def test_append_sync_from_threads(self, log: AuditLog) -> None:
        """append_sync works from any thread with the same ordering and durability."""
        threads = [threading.Thread(target=fill, args=(log, 20)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert log.size == 80
        assert [r["index"] for r in log.read()] == list(range(80))

    def test_closed_log_refuses_appends(self, tmp_path: Path) -> None:
        """After close, appends are refused with UNAVAILABLE, and close is idempotent."""
        audit = AuditLog.open(tmp_path)
        audit.close()
        audit.close()
        with pytest.raises(Unavailable, match="shutting down"):
            audit.append_sync("test.event", actor=ACTOR)

    def test_open_fails_closed_on_an_unusable_directory(self, tmp_path: Path) -> None:
        """A directory that cannot be created is UNAVAILABLE with the reason."""
        (tmp_path / "file").write_text("")
        with pytest.raises(Unavailable, match="cannot be opened: Not a directory"):
            AuditLog.open(tmp_path / "file" / "audit")


class TestFailClosed:
    @in_loop
    async def test_write_failure_refuses_then_resumes(self, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """A failed flush raises Unavailable and clears `healthy`; once writes work again the
        probe succeeds, an audit.resumed record says what happened, and the log verifies."""
        audit = AuditLog.open(tmp_path)
        fill(audit, 3)
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", fdatasync_failing(errno.EIO))
        with pytest.raises(Unavailable, match=r"audit log not writable: Input/output error "
                                              r"\(EIO\); agentd refuses new work"):
            await audit.append("test.event", actor=ACTOR)
        assert not audit.healthy
        assert not await audit.probe()
        monkeypatch.setattr(os, "fdatasync", real)
        assert await audit.probe()
        assert audit.healthy
        assert await audit.probe()
        index = await audit.append("test.event", actor=ACTOR)
        records = list(audit.read())
        audit.close()
        assert index == 4
        assert records[3]["event"] == "audit.resumed"
        assert records[3]["details"]["appends_refused"] == 1
        assert "EIO" in records[3]["details"]["error"]
        assert verify(tmp_path).ok

    @in_loop
    async def test_the_first_successful_append_also_resumes(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a probe, the next append that succeeds writes audit.resumed before it."""
        audit = AuditLog.open(tmp_path)
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", fdatasync_failing(errno.EIO))
        with pytest.raises(Unavailable):
            audit.append_sync("test.event", actor=ACTOR)
        monkeypatch.setattr(os, "fdatasync", real)
        assert audit.append_sync("test.event", actor=ACTOR) == 1
        assert [r["event"] for r in audit.read()] == ["audit.resumed", "test.event"]
        audit.close()


    def test_an_unexpected_writer_error_fails_closed_for_good(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bug in the writer must not hang callers nor let work go unrecorded: the batch
        and every later append fail with INTERNAL, and `healthy` stays False."""
        audit = AuditLog.open(tmp_path)
        fill(audit, 2)

        def broken(*args: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(TreeStore, "extend", broken)
        with pytest.raises(Internal, match="RuntimeError: boom"):
            audit.append_sync("test.event", actor=ACTOR)
        monkeypatch.undo()
        with pytest.raises(Internal, match="restart agentd"):
            audit.append_sync("test.event", actor=ACTOR)
        assert not audit.healthy
        audit.close()


class TestTree:
    def test_proofs_match_brute_force_across_chunks(self, log: AuditLog) -> None:
        """Inclusion and consistency proofs from the log verify against roots computed from
        scratch, for sizes around the 256-record chunk boundaries."""
        fill(log, 600)
        hashes = leaf_hashes(log)
        for size in (1, 255, 256, 257, 511, 512, 513, 600):
            root = merkle.root_of(hashes[:size])
            for index in {0, size // 3, size // 2, size - 1}:
                proof = log.inclusion_proof(index, size)
                assert merkle.verify_inclusion(index, size, hashes[index], proof, root)
            for first in (1, 200, 256, size):
                if first <= size:
                    proof = log.consistency_proof(first, size)
                    assert merkle.verify_consistency(
                        first, size, merkle.root_of(hashes[:first]), root, proof)
        assert log.tree_head().root_hash == merkle.root_of(hashes)

    def test_out_of_range_requests_are_invalid_arguments(self, log: AuditLog) -> None:
        """Indexes and sizes beyond the log are the caller's mistake."""
        fill(log, 3)
        with pytest.raises(InvalidArgument, match="log has 3 records"):
            log.inclusion_proof(3, 3)
        with pytest.raises(InvalidArgument):
            log.inclusion_proof(0, 4)
        with pytest.raises(InvalidArgument):
            log.consistency_proof(2, 1)
        with pytest.raises(InvalidArgument):
            log.leaf_hash(3)

    def test_a_record_changed_on_disk_is_caught_not_proved(self, tmp_path: Path) -> None:
        """A proof rereads its chunk and checks it; altered bytes raise FailedPrecondition."""
        audit = AuditLog.open(tmp_path)
        fill(audit, 300)
        seg = segment_path(tmp_path, 1)
        data = bytearray(seg.read_bytes())
        at = data.index(b'"i":5}')
        data[at + 4] = ord("6")
        seg.write_bytes(bytes(data))
        with pytest.raises(FailedPrecondition, match="changed on disk"):
            audit.inclusion_proof(5, 300)
        audit.close()

    @pytest.mark.parametrize("damage", ["none", "missing", "garbage", "truncated"])
    def test_reopen_rebuilds_the_same_tree(self, tmp_path: Path, damage: str) -> None:
        """With tree.idx intact, missing, corrupted or cut short, reopening gives the same
        size and root (a bad cache is detected and rebuilt from the records)."""
        audit = AuditLog.open(tmp_path, segment_bytes=20_000)
        fill(audit, 1100)
        root = audit.tree_head().root_hash
        audit.close()
        index = tmp_path / INDEX_FILE
        assert index.stat().st_size == 44 * 4
        if damage == "missing":
            index.unlink()
        elif damage == "garbage":
            index.write_bytes(os.urandom(44 * 4))
        elif damage == "truncated":
            index.write_bytes(index.read_bytes()[:100])
        reopened = AuditLog.open(tmp_path, segment_bytes=20_000)
        assert reopened.size == 1100
        assert reopened.tree_head().root_hash == root
        assert reopened.inclusion_proof(700, 1100)
        reopened.close()
        assert index.stat().st_size == 44 * 4

    @pytest.mark.parametrize("records", [10, 600])
    def test_removed_records_stop_the_daemon(self, tmp_path: Path, records: int) -> None:
        """Records a signed head covers must be there: if not, open refuses to continue
        (with or without tree.idx chunks to trust)."""
        audit = AuditLog.open(tmp_path)
        fill(audit, records)
        audit.close()
        seg = segment_path(tmp_path, 1)
        seg.write_bytes(b"".join(seg.read_bytes().splitlines(keepends=True)[:records - 4]))
        with pytest.raises(FailedPrecondition, match="records were removed"):
            AuditLog.open(tmp_path)


class TestHeads:
    @in_loop
    async def test_signed_heads_verify_and_are_appended(self, tmp_path: Path) -> None:
        """sign_tree_head writes a head that verifies with audit.pub; an unchanged tree does
        not get a second head."""
        audit = AuditLog.open(tmp_path)
        fill(audit, 5)
        before = (tmp_path / HEADS_FILE).read_bytes().splitlines()
        head = await audit.sign_tree_head()
        again = await audit.sign_tree_head()
        audit.close()
        public = load_public_key(tmp_path / PUB_FILE)
        assert again == head
        assert head.tree_size == 5
        assert verify_head(public, head)
        lines = (tmp_path / HEADS_FILE).read_bytes().splitlines()
        assert lines == before  # the batches were signed already: nothing new to sign
        assert TreeHead.parse(lines[-1]) == head

    def test_tree_head_is_signed_on_demand(self, log: AuditLog, tmp_path: Path) -> None:
        """tree_head() covers the current size even between written heads."""
        fill(log, 2)
        head = log.tree_head()
        assert head.tree_size == 2
        assert verify_head(load_public_key(tmp_path / "audit" / PUB_FILE), head)

    def test_every_batch_is_signed_before_its_append_returns(self, tmp_path: Path) -> None:
        """When an append returns, a durable signed head covers its record: no waiting for a
        timer, nothing acknowledged that an unsigned tail could hide."""
        audit = AuditLog.open(tmp_path, head_interval=3600)
        heads = tmp_path / HEADS_FILE
        public = load_public_key(tmp_path / PUB_FILE)
        for i in range(3):
            audit.append_sync("test.event", actor={"role": "test"}, details={"i": i})
            last = TreeHead.parse(heads.read_bytes().splitlines()[-1])
            assert last.tree_size == i + 1
            assert verify_head(public, last)
        audit.close()

    def test_an_unsigned_tail_is_signed_at_open(self, tmp_path: Path) -> None:
        """A crash between a batch's records and its head leaves records no head covers; the
        next open signs them, so the log verifies strictly."""
        audit = AuditLog.open(tmp_path)
        fill(audit, 4)
        audit.close()
        heads = tmp_path / HEADS_FILE
        heads.write_bytes(b"".join(line + b"\n" for line in heads.read_bytes().splitlines()
                                   if TreeHead.parse(line).tree_size <= 2))
        assert not verify(tmp_path).ok
        AuditLog.open(tmp_path).close()
        assert verify(tmp_path).ok


class TestKey:
    def test_key_files_and_modes(self, tmp_path: Path) -> None:
        """The directory is 0700, the key 0600, audit.pub 0644 and it matches the key."""
        audit = AuditLog.open(tmp_path / "audit")
        fill(audit, 1)
        key_id = audit.key_id
        audit.close()
        directory = tmp_path / "audit"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((directory / KEY_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((directory / PUB_FILE).stat().st_mode) == 0o644
        assert verify(directory).key_id == key_id

    def test_a_readable_key_is_refused(self, tmp_path: Path) -> None:
        """Like ssh: a private key others can read is not used."""
        AuditLog.open(tmp_path).close()
        (tmp_path / KEY_FILE).chmod(0o644)
        with pytest.raises(FailedPrecondition, match="must be 0600"):
            AuditLog.open(tmp_path)

    def test_a_lost_key_is_not_silently_replaced(self, tmp_path: Path) -> None:
        """With signed heads on disk, a missing key is an error, not a new key."""
        audit = AuditLog.open(tmp_path)
        fill(audit, 1)
        audit.close()
        (tmp_path / KEY_FILE).unlink()
        with pytest.raises(FailedPrecondition, match="restore the key"):
            AuditLog.open(tmp_path)

    def test_the_key_survives_restarts(self, tmp_path: Path) -> None:
        """The same key signs across restarts."""
        first = AuditLog.open(tmp_path)
        key_id = first.key_id
        first.close()
        second = AuditLog.open(tmp_path)
        assert second.key_id == key_id
        second.close()


class TestRead:
    def test_query_filters(self, log: AuditLog) -> None:
        """run, event, time range, limit and start combine; results are in index order."""
        fill(log, 5, run_id="r-1")
        log.append_sync("other.event", actor=ACTOR, run_id="r-2")
        log.append_sync("test.event", actor=ACTOR, run_id="r-2", details={"run_id": "r-1"})
        assert [r["index"] for r in log.query(run_id="r-1")] == [0, 1, 2, 3, 4]
        assert [r["index"] for r in log.query(run_id="r-2", event="test.event")] == [6]
        assert [r["index"] for r in log.query(event="test.event", limit=2)] == [0, 1]
        assert [r["index"] for r in log.query(event="test.event", start=4)] == [4, 6]
        now = datetime.now(UTC)
        assert len(log.query(since=now - timedelta(minutes=1))) == 7
        assert log.query(until=now - timedelta(minutes=1)) == []
        assert log.query(since=now + timedelta(minutes=1)) == []

    def test_read_ranges(self, log: AuditLog) -> None:
        """read(start, stop) returns exactly those records, across chunk boundaries."""
        fill(log, 300)
        assert [r["index"] for r in log.read(254, 258)] == [254, 255, 256, 257]
        assert list(log.read(300)) == []
        assert [r["index"] for r in log.read(298, 1000)] == [298, 299]

    @in_loop
    async def test_follow_streams_new_records_and_ends_on_close(self, tmp_path: Path) -> None:
        """follow yields what exists, then each new record once durable, until close."""
        audit = AuditLog.open(tmp_path)
        fill(audit, 2)
        seen: list[int] = []

        async def consume() -> None:
            async for rec in audit.follow(1):
                seen.append(rec["index"])

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        await audit.append("test.event", actor=ACTOR)
        await asyncio.to_thread(fill, audit, 2)
        for _ in range(100):
            if len(seen) == 4:
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(audit.close)
        await asyncio.wait_for(task, 5)
        assert seen == [1, 2, 3, 4]

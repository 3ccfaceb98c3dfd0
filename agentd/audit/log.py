"""`AuditLog`: durable, ordered, signed appends with group commit, and the reads behind the API.

    callers (event loop, any thread)           writer thread ("audit-writer")
    ───────────────────────────────            ───────────────────────────────────────────
    append(): prepare + queue ──notify──▶      take the whole queue as one batch
      await future                             order it: index, prev hash, commit time
                                               write + fdatasync (rolled back on error)
                                               extend the tree, sign one head over it and
                                               append it durably, resolve every future
      ◀── index, once durable and signed ──    (and a head on the timer when idle)

Why one writer thread rather than `asyncio.to_thread` per flush: a batch must be ordered,
written and flushed as a unit while the next batch queues behind it, which is exactly a
thread with a queue; it also serves `append_sync` callers outside the event loop the same
way. The event loop never blocks on fsync.

Failure: a batch that cannot be written is rolled back (segments.AppendOnlyFile), its callers
get `Unavailable`, and `healthy` turns False; the daemon refuses new work while it is False.
Every later append is itself an attempt; `probe()` makes one without a caller's record. The
first batch that succeeds after a failure starts with an `audit.resumed` record saying what
failed, since when, and how many appends were refused.

A record's `time` is its commit time (one per batch), so times follow index order unless
the wall clock steps back.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from agentd.audit import record
from agentd.audit.handoff import Followers, Pending, settle
from agentd.audit.merkle import leaf_hash
from agentd.audit.segments import SegmentWriter, read_lines, recover_tail
from agentd.audit.signing import HeadFile, Signer, TreeHead
from agentd.audit.tree import TreeStore
from agentd.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable

log = structlog.get_logger("agentd.audit")

SYSTEM_ACTOR: Mapping[str, Any] = {"role": "system", "component": "audit"}
_READ_SLICE = 512


# Free space below which the log counts as full even if a small write would still succeed.
RESERVE_BYTES = 256 << 10


@dataclass
class _Failure:
    since: str
    reason: str
    refused: int = 0


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}{f' ({name})' if name else ''}"


class AuditLog:
    """The append-only audit log in one directory. Create with `AuditLog.open`."""

    def __init__(self, directory: Path, *, signer: Signer, heads: HeadFile, store: TreeStore,
                 writer: SegmentWriter, head_interval: float) -> None:
        self.directory = directory
        self._signer = signer
        self._heads = heads
        self._store = store
        self._writer = writer
        self._head_interval = head_interval
        self._next_head_at = time.monotonic() + head_interval
        self._lock = threading.Lock()  # the tree and the last hash
        self._head_lock = threading.Lock()  # one head written at a time
        self._cv = threading.Condition()  # the queue, closing, followers
        self._queue: list[Pending] = []
        self._closing = False
        self._closed = False
        self._failure: _Failure | None = None
        self._broken: str | None = None
        self._last_hash = store.leaf(store.size - 1).hex() if store.size else record.NO_PREV
        self._followers = Followers()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)

    @classmethod
    def open(cls, directory: Path, *, segment_bytes: int = 64 << 20,
             head_interval: float = 60.0) -> AuditLog:
        """Opens (or creates, mode 0700) the log: loads or makes the key, cuts a torn tail and
        records the cut, rebuilds the tree and checks it against the last signed head.

        Raises FailedPrecondition if the log is damaged beyond a torn tail (run `agentctl
        audit verify`), Unavailable if the directory cannot be written.
        """
        heads: HeadFile | None = None
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            signer = Signer.load_or_create(directory)
            heads, heads_cut = HeadFile.open(directory, signer.public)
            last = heads.last
            cut = recover_tail(directory, floor=last.tree_size if last else 0)
            store = TreeStore.load(directory, last.tree_size if last else 0,
                                   last.root_hash if last else None)
            writer = SegmentWriter(directory, segment_bytes)
        except BaseException as exc:
            if heads is not None:
                heads.close()
            if isinstance(exc, OSError):
                raise Unavailable(f"audit log at {directory} cannot be opened: "
                                  f"{_describe(exc)}; agentd cannot run without it") from exc
            raise
        audit = cls(directory, signer=signer, heads=heads, store=store, writer=writer,
                    head_interval=head_interval)
        audit._thread.start()
        signed = last.tree_size if last else 0
        if store.size > signed:
            # A crash between a batch's records and its head: nobody was told those records
            # were recorded, but they are the daemon's own; cover them now.
            audit._sign_head()
            log.warning("audit.unsigned_tail_signed", records=store.size - signed,
                        first=signed)
        if cut is not None or heads_cut is not None:
            details: dict[str, Any] = {}
            if cut is not None:
                details["segment"] = cut.details()
            if heads_cut is not None:
                details["tree_heads"] = heads_cut
            try:
                index = audit.append_sync(record.RECOVERED, actor=SYSTEM_ACTOR, details=details)
            except Unavailable:
                audit.close()
                raise
            log.warning("audit.recovered", index=index, **details)
        return audit

    # -- appending --------------------------------------------------------------------------

    async def append(self, event: str, *, actor: Mapping[str, Any],
                     details: Mapping[str, Any] | None = None, run_id: str | None = None,
                     task_id: str | None = None) -> int:
        """Appends one record; returns its index once it is on disk (fdatasync'ed).

        Raises Unavailable if it could not be written: the caller must not report success
        for the work it was recording. Cancelling the caller does not withdraw the record
        (the event happened), it only stops waiting for it.

        Never blocks the event loop: the write and flush happen in the writer thread.
        """
        return await self.submit(event, actor=actor, details=details, run_id=run_id,
                                 task_id=task_id)

    def submit(self, event: str, *, actor: Mapping[str, Any],
               details: Mapping[str, Any] | None = None, run_id: str | None = None,
               task_id: str | None = None) -> asyncio.Future[int]:
        """`append` without waiting: the record is queued now, after everything submitted
        before it (so its index is later), and the future resolves once it is durable.

        Records submitted together and awaited together share one group commit (one
        fdatasync, one signed head): a step submits what must precede its workers, then
        waits once. Await every future this returns (see `durable`).
        """
        parts = record.prepare(event, actor=actor, details=details, run_id=run_id,
                               task_id=task_id)
        pending = self._submit(parts, asyncio.get_running_loop())
        assert pending.afuture is not None
        return pending.afuture

    def append_sync(self, event: str, *, actor: Mapping[str, Any],
                    details: Mapping[str, Any] | None = None, run_id: str | None = None,
                    task_id: str | None = None) -> int:
        """`append` for threads and start-up/shutdown paths; blocks until durable."""
        parts = record.prepare(event, actor=actor, details=details, run_id=run_id,
                               task_id=task_id)
        pending = self._submit(parts, None)
        assert pending.cfuture is not None
        return pending.cfuture.result()

    @property
    def healthy(self) -> bool:
        """False from a failed write until a write succeeds again; refuse new work while False."""
        return self._failure is None

    @property
    def size(self) -> int:
        """Number of durable records."""
        return self._store.size

    @property
    def problem(self) -> str:
        """Why the log cannot be written now ("" while it can)."""
        failure = self._failure
        return "" if failure is None else f"since {failure.since}: {failure.reason}"

    @property
    def queue_depth(self) -> int:
        """Records submitted and not yet taken by the writer."""
        return len(self._queue)

    @property
    def last_head(self) -> TreeHead | None:
        """The last signed tree head written."""
        return self._heads.last

    def has_room(self) -> bool:
        """Whether the log's filesystem has RESERVE_BYTES free. A write that fits in the slack
        of a file's last page succeeds on a full disk; work that will need records later (an
        outcome after a spawn) must not start on that."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize >= RESERVE_BYTES

    def check_room(self) -> bool:
        """has_room(); when there is none, the log counts as failed (so work is refused, and
        the resumption is recorded as audit.resumed) until probe() finds room and writes."""
        if self.has_room():
            return True
        if self._failure is None:
            self._failure = _Failure(since=record.now(), reason=(
                f"its filesystem has less than {RESERVE_BYTES >> 10} KiB free"))
        return False

    @property
    def failure_reason(self) -> str:
        """Why the log stopped taking records ("" while healthy)."""
        return "" if self._failure is None else self._failure.reason

    async def probe(self) -> bool:
        """Tries to write again after a failure (an audit.resumed record); True if healthy.
        Not before the filesystem has RESERVE_BYTES free again."""
        if self._failure is None:
            return True
        if not self.has_room():
            return False
        pending = self._submit(None, asyncio.get_running_loop())
        assert pending.afuture is not None
        try:
            await pending.afuture
        except Unavailable:
            return False
        return self._failure is None

    def _submit(self, parts: record.Prepared | None,
                loop: asyncio.AbstractEventLoop | None) -> Pending:
        pending = Pending.make(parts, loop)
        with self._cv:
            if self._closing:
                raise Unavailable("the audit log is closed: agentd is shutting down")
            if self._broken is not None:
                raise Internal(f"the audit writer failed ({self._broken}); restart agentd")
            self._queue.append(pending)
            self._cv.notify()
        return pending

    def _run(self) -> None:
        """The writer thread: batches, commits, timed heads; drains the queue on close."""
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    timeout = self._head_due_in()
                    if timeout is not None and timeout <= 0:
                        break
                    self._cv.wait(timeout)
                batch, self._queue = self._queue, []
                stop = self._closing and not batch
            if batch:
                try:
                    self._commit(batch)
                except Exception as exc:  # a bug: fail closed for good rather than hang callers
                    self._break(exc, batch)
            elif stop:
                return
            due = self._head_due_in()
            if due is not None and due <= 0:
                try:
                    self._sign_head()
                except Unavailable as exc:
                    log.warning("audit.tree_head_failed", error=str(exc))

    def _head_due_in(self) -> float | None:
        last = self._heads.last
        if last is not None and last.tree_size == self._store.size:
            return None
        return self._next_head_at - time.monotonic()

    def _commit(self, batch: list[Pending]) -> None:
        failure = self._failure
        items = [p.parts for p in batch if p.parts is not None]
        if failure is not None:
            items.insert(0, record.prepare(record.RESUMED, actor=SYSTEM_ACTOR, details={
                "failed_since": failure.since, "error": failure.reason,
                "appends_refused": failure.refused}))
        first = self._store.size
        prev = self._last_hash
        when = record.now()
        lines: list[bytes] = []
        leaves: list[bytes] = []
        positions: list[tuple[int, int]] = []
        try:
            seg, offset = self._writer.position()
            for i, parts in enumerate(items):
                line = record.assemble(parts, first + i, prev, when)
                leaf = leaf_hash(line)
                prev = leaf.hex()
                lines.append(line)
                leaves.append(leaf)
                positions.append((seg, offset))
                offset += len(line) + 1
            if lines:
                self._writer.append(b"\n".join(lines) + b"\n")
        except OSError as exc:
            self._fail(exc, batch)
            return
        with self._lock:
            self._store.extend(leaves, positions)
            self._last_hash = prev
            self._store.persist()
        if failure is not None:
            self._failure = None
            log.warning("audit.resumed", index=first, after=failure.reason)
        if lines:
            # Nothing is acknowledged before a signed head covers it: one signature and one
            # head write per batch, so a record's caller never hears "done" about a record
            # that someone with the files but not the key could still rewrite.
            try:
                self._sign_head()
            except Unavailable as exc:
                settle(batch, [exc for _ in batch])
                self._followers.wake()
                return
        index = first + (failure is not None)
        outcomes: list[int | BaseException] = []
        for pending in batch:
            if pending.parts is None:
                outcomes.append(first if failure is not None else -1)
            else:
                outcomes.append(index)
                index += 1
        settle(batch, outcomes)
        self._followers.wake()

    def _break(self, exc: Exception, batch: list[Pending]) -> None:
        """After an unexpected error the tree may not match the files: refuse everything."""
        log.exception("audit.writer_bug", directory=str(self.directory))
        self._broken = f"{type(exc).__name__}: {exc}"
        self._failure = self._failure or _Failure(since=record.now(), reason=self._broken)
        settle(batch, [Internal(f"the audit writer failed ({self._broken}); restart agentd")
                       for _ in batch])

    def _fail(self, exc: OSError, batch: list[Pending]) -> None:
        reason = _describe(exc)
        if self._failure is None:
            self._failure = _Failure(since=record.now(), reason=reason)
            log.error("audit.write_failed", error=reason, directory=str(self.directory))
        self._failure.refused += sum(p.parts is not None for p in batch)
        message = (f"audit log not writable: {reason}; agentd refuses new work until it can "
                   "write again")
        settle(batch, [Unavailable(message) for _ in batch])

    # -- tree heads -------------------------------------------------------------------------

    async def sign_tree_head(self) -> TreeHead:
        """Signs and durably appends a head for the current size (or returns the last one if
        nothing was added since). Call when a run's work is acknowledged."""
        return await asyncio.to_thread(self._sign_head)

    def _sign_head(self) -> TreeHead:
        with self._head_lock:
            with self._lock:
                size, root = self._store.size, self._store.root()
            last = self._heads.last
            if last is not None and last.tree_size == size:
                return last
            head = self._signer.sign(size, root)
            try:
                self._heads.append(head)
            except OSError as exc:
                if self._failure is None:
                    self._failure = _Failure(since=record.now(), reason=_describe(exc))
                # The timer retries, but not in a tight loop on a full disk.
                self._next_head_at = time.monotonic() + min(self._head_interval, 5.0)
                raise Unavailable(f"audit log not writable: cannot write a tree head: "
                                  f"{_describe(exc)}; agentd refuses new work until it can "
                                  "write again") from exc
            self._next_head_at = time.monotonic() + self._head_interval
            return head

    def tree_head(self) -> TreeHead:
        """A signed head of the current size: the last written one if it is current, else
        one signed now and not written (a commitment all the same)."""
        with self._lock:
            size, root = self._store.size, self._store.root()
        last = self._heads.last
        if last is not None and last.tree_size == size:
            return last
        return self._signer.sign(size, root)

    @property
    def key_id(self) -> str:
        """SHA-256 of the raw public key (hex), to match against a verifier's copy."""
        return self._signer.key_id

    # -- proofs -----------------------------------------------------------------------------

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """RFC 9162 inclusion path of record `index` in the tree of `tree_size` records."""
        with self._lock:
            if not 0 <= index < tree_size <= self._store.size:
                raise InvalidArgument(f"no inclusion proof of record {index} in a tree of size "
                                      f"{tree_size}: the log has {self._store.size} records")
            return self._store.inclusion_proof(index, tree_size)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof from the tree of `first` records to that of `second`."""
        with self._lock:
            if not 0 <= first <= second <= self._store.size:
                raise InvalidArgument(f"no consistency proof from size {first} to {second}: "
                                      f"the log has {self._store.size} records")
            return self._store.consistency_proof(first, second)

    def leaf_hash(self, index: int) -> bytes:
        with self._lock:
            if not 0 <= index < self._store.size:
                raise InvalidArgument(f"no record {index}: the log has {self._store.size}")
            return self._store.leaf(index)

    # -- reading ----------------------------------------------------------------------------

    def read_lines(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The canonical lines of records [start, stop) (stop capped at the durable size)."""
        with self._lock:
            stop = self._store.size if stop is None else min(stop, self._store.size)
            if start >= stop:
                return
            seg, offset, skip = self._store.position(start)
        expected = start
        for _, _, line in read_lines(self.directory, seg, offset):
            if skip:
                skip -= 1
                continue
            if record.line_index(line) != expected:
                raise FailedPrecondition(f"audit record {expected} is not where the log put it: "
                                         "the files were changed; run `agentctl audit verify`")
            yield line
            expected += 1
            if expected == stop:
                return

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
        """Records [start, stop) as dicts (`record.canonical` gives their exact bytes back)."""
        for line in self.read_lines(start, stop):
            yield json.loads(line)

    def query(self, *, run_id: str | None = None, event: str | None = None,
              since: datetime | str | None = None, until: datetime | str | None = None,
              limit: int = 1000, start: int = 0) -> list[dict[str, Any]]:
        """Records matching every given filter, in index order, at most `limit`; `since` is
        inclusive, `until` exclusive. A linear scan (see record.matcher)."""
        match = record.matcher(run_id=run_id, event=event, since=since, until=until)
        found: list[dict[str, Any]] = []
        for line in self.read_lines(start):
            rec = match(line)
            if rec is not None:
                found.append(rec)
                if len(found) >= limit:
                    break
        return found

    async def follow(self, start: int) -> AsyncIterator[dict[str, Any]]:
        """Records from `start` on, waiting for new ones; ends when the log closes."""
        following = start
        while True:
            stop = min(self.size, following + _READ_SLICE)
            if following < stop:
                batch = await asyncio.to_thread(self._read_list, following, stop)
                for rec in batch:
                    yield rec
                following += len(batch)
                continue
            if self._closing:
                return
            await self._followers.wait(functools.partial(self._grown_past, following))

    def _grown_past(self, index: int) -> bool:
        return self.size > index or self._closing

    def _read_list(self, start: int, stop: int) -> list[dict[str, Any]]:
        return list(self.read(start, stop))

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Writes what is queued, signs a final head and closes the files. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closing = self._closed = True
            self._cv.notify_all()
        self._thread.join()
        try:
            self._sign_head()
        except Unavailable as exc:
            log.error("audit.final_tree_head_failed", error=str(exc))  # noqa: TRY400 - expected
        self._writer.close()
        self._heads.close()
        self._followers.wake()


async def durable(*records: asyncio.Future[int] | None) -> None:
    """Waits until every submitted record is on disk; raises the first failure (Unavailable),
    having retrieved every other one, so none is left unobserved."""
    waiting = [r for r in records if r is not None]
    if not waiting:
        return
    await asyncio.wait(waiting)
    for r in waiting:
        if r.exception() is not None:
            raise r.exception()  # type: ignore[misc]

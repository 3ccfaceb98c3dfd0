"""Segment files: `audit-000001.jsonl`, `audit-000002.jsonl`, ... one record per line.

Durability choices, weighed:

- fsync per record vs group commit. An fdatasync costs ~0.3 ms on the ext4 root and far more
  on a busy disk; one per record caps the daemon at a few thousand events per second however
  many tasks run. Group commit (the writer writes everything queued, then one fdatasync for
  all of it) costs one flush per batch, and a record is still acknowledged only once flushed.
  We group; `AppendOnlyFile.append` is the one write+flush of a batch.
- fdatasync vs fsync: appending changes the size, which fdatasync flushes too; the mtime it
  skips is not needed to read the records back.
- A failed write or flush (ENOSPC, EIO) is rolled back by truncating to the last committed
  size, so a batch is all on disk or not at all; after a failed fsync the page cache cannot be
  trusted to hold the data (the "fsyncgate" lesson), so the batch is rewritten, never retried
  in place. If even the truncate fails the file is marked dirty and truncated before the next
  write.
- One file vs segments: segments bound the file a reader must scan or an operator must copy,
  and let old segments be archived; the tree spans all of them, so a segment boundary is
  invisible to proofs. A batch is never split across segments.

Torn tail: a crash can leave the end of the last segment half-written (a line without its
newline, or pages of zeros). Only records after the last flush can be affected, and none of
them was acknowledged. `recover_tail` finds the first line that does not continue the hash
chain (see `record.py`: every record names its predecessor's leaf hash) and cuts from there,
saving the cut bytes beside the segment as evidence. It refuses to cut below `floor` (what a
signed tree head already covers): damage there is not a torn tail, it is corruption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agentd import durable, metrics
from agentd.audit import record
from agentd.audit.merkle import leaf_hash
from agentd.errors import FailedPrecondition

SEGMENT_RE = re.compile(r"^audit-(\d{6,})\.jsonl$")
_READ_BLOCK = 1 << 20


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"audit-{number:06d}.jsonl"


def list_segments(directory: Path) -> list[int]:
    """Segment numbers present in `directory`, in order."""
    found = (SEGMENT_RE.match(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def fsync_dir(directory: Path) -> None:
    """Makes a create, rename or unlink in `directory` durable."""
    durable.fsync_path(directory, directory=True)


class AppendOnlyFile:
    """A file that grows by whole, flushed batches; a failed batch leaves no trace."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self._fd).st_size
        self._dirty = False

    def append(self, data: bytes) -> None:
        """Writes `data` and fdatasyncs it; on any OSError rolls back to the previous size and
        re-raises. Returns only when the data is durable."""
        if self._dirty:
            os.ftruncate(self._fd, self.size)
            self._dirty = False
        try:
            view = memoryview(data)
            with metrics.AUDIT_FSYNC_SECONDS.time():
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                os.fdatasync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, self.size)
            except OSError:
                self._dirty = True
            raise
        self.size += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SegmentWriter:
    """Appends batches of lines to the last segment, opening a new one past `segment_bytes`."""

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        numbers = list_segments(directory)
        self.number = numbers[-1] if numbers else 1
        self._file = AppendOnlyFile(segment_path(directory, self.number))
        if not numbers:
            fsync_dir(directory)

    def position(self) -> tuple[int, int]:
        """(segment, offset) where the next batch will start, after rotating if needed."""
        if self._file.size >= self.segment_bytes:
            self._rotate()
        return self.number, self._file.size

    def append(self, data: bytes) -> None:
        """Writes one batch of whole lines durably (see AppendOnlyFile.append)."""
        self._file.append(data)

    def _rotate(self) -> None:
        path = segment_path(self.directory, self.number + 1)
        # O_EXCL unless a previous attempt created it and then failed to fsync the directory.
        if path.exists() and path.stat().st_size != 0:
            raise FileExistsError(f"{path} already holds records; refusing to append to it")
        new = AppendOnlyFile(path)
        try:
            fsync_dir(self.directory)
        except OSError:
            new.close()
            raise
        self._file.close()
        self._file, self.number = new, self.number + 1

    def close(self) -> None:
        self._file.close()


def read_lines(directory: Path, number: int, offset: int) -> Iterator[tuple[int, int, bytes]]:
    """(segment, offset, line) from a position to the end of the log, newlines stripped.

    Crosses into later segments. A last line without its newline is not yielded: it is either
    being written or torn, and in both cases not a record yet.
    """
    numbers = [n for n in list_segments(directory) if n >= number]
    for seg in numbers:
        pos = offset if seg == number else 0
        with open(segment_path(directory, seg), "rb") as f:
            f.seek(pos)
            rest = b""
            while block := f.read(_READ_BLOCK):
                lines = (rest + block).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield seg, pos, line
                    pos += len(line) + 1
            if rest and seg != numbers[-1]:
                yield seg, pos, rest


@dataclass(frozen=True)
class Cut:
    """What `recover_tail` removed; recorded in the log as an audit.recovered event."""

    segment: str
    offset: int
    bytes: int
    complete_lines: int
    sha256: str
    saved_as: str
    first_index: int

    def details(self) -> dict[str, object]:
        return {"reason": "torn tail after a crash: bytes never acknowledged were cut",
                **dataclasses.asdict(self)}


def _last_line(path: Path) -> bytes | None:
    """The last complete line of a file, read from its end."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        chunk = 4096
        while True:
            start = max(0, end - chunk)
            f.seek(start)
            data = f.read(end - start)
            stop = data.rfind(b"\n")
            begin = data.rfind(b"\n", 0, max(stop, 0))
            if stop >= 0 and (begin >= 0 or start == 0):
                return data[begin + 1 : stop]
            if start == 0:
                return None
            chunk *= 4


def recover_tail(directory: Path, floor: int) -> Cut | None:
    """Cuts a torn tail off the last segment; None if the log ends cleanly.

    `floor`: records below this index are covered by a signed tree head; finding damage there
    raises FailedPrecondition instead of cutting (a torn tail can only be unflushed records).
    """
    numbers = list_segments(directory)
    if not numbers:
        return None
    path = segment_path(directory, numbers[-1])
    expected, prev = 0, record.NO_PREV
    if len(numbers) > 1:
        last = _last_line(segment_path(directory, numbers[-2]))
        index = None if last is None else record.line_index(last)
        if last is not None and index is not None:
            expected, prev = index + 1, leaf_hash(last).hex()
    data = path.read_bytes()
    good = 0
    lines = data.split(b"\n")
    complete = lines[:-1]
    for i, line in enumerate(complete):
        chained = record.line_index(line) == expected and record.line_prev(line) == prev
        if chained and i == len(complete) - 1:  # nothing vouches for the last line: parse it
            try:
                record.check_record(line)
            except ValueError:
                chained = False
        if not chained:
            break
        good += len(line) + 1
        expected, prev = expected + 1, leaf_hash(line).hex()
    if good == len(data):
        return None
    if expected < floor:
        raise FailedPrecondition(
            f"audit log damaged at index {expected} ({path.name} offset {good}), which a "
            f"signed tree head covers (size {floor}): this is not a torn tail. Run "
            "`agentctl audit verify` on the directory; agentd will not append to a damaged log")
    torn = data[good:]
    saved = directory / f"{path.name}.torn-{good}"
    fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, torn)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, good)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)
    return Cut(segment=path.name, offset=good, bytes=len(torn),
               complete_lines=torn.count(b"\n"), sha256=hashlib.sha256(torn).hexdigest(),
               saved_as=saved.name, first_index=expected)

"""The Merkle tree over all segments: enough hashes in memory to append, sign and prove fast.

Where the tree's state lives, weighed:

- Only a frontier (log2 n hashes), checkpointed with each signed head: tiny, O(log n)
  appends, and a restart replays only the records after the last head. But an inclusion or
  consistency proof needs interior nodes anywhere in the tree, which means rehashing up to
  the whole log per proof.
- Every node in memory: proofs in O(log n), but 64 bytes per record (6 GB at 100M records)
  and a full rehash on every start.
- Chunks (chosen): leaves are grouped in chunks of 256. The store keeps the root of every
  complete chunk and every perfect subtree above chunk level (2 x 32 bytes per 256 records:
  25 MB at 100M records), the leaf hashes of the last, incomplete chunk, and the file
  position of each chunk's first record. Below chunk level a proof rereads that one chunk
  (~100 KB) and checks it against the chunk root it already holds, so a record changed on
  disk after it was written is caught rather than proved. The frontier at any size is
  derived from the same data.

The chunk roots and positions are appended to `tree.idx` (44 bytes per chunk, not fsynced:
it is a cache). On open the store trusts the chunks a signed head covers only after the head's
root is recomputed from them (plus the records after them) and matches; anything else is
rehashed from the segments, which is also the fallback when tree.idx is missing or wrong.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from agentd.audit import merkle, segments
from agentd.errors import FailedPrecondition

INDEX_FILE = "tree.idx"
CHUNK_BITS = 8
CHUNK = 1 << CHUNK_BITS
_ENTRY = struct.Struct("<32sIQ")  # chunk root, segment number, offset of the chunk's first record
_CACHED_CHUNKS = 16
_sha256 = hashlib.sha256


def _levels_of(leaves: list[bytes]) -> list[list[bytes]]:
    """All perfect-subtree levels over `leaves`, leaf level first (odd leftovers dropped)."""
    levels = [leaves]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append([_sha256(b"\x01" + below[i] + below[i + 1]).digest()
                       for i in range(0, len(below) - 1, 2)])
    return levels


class TreeStore:
    """Subtree hashes of the log's tree at chunk granularity; not thread-safe (AuditLog locks)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.size = 0
        self._levels: list[bytearray] = []  # [j]: roots of perfect subtrees of 2**(8+j) leaves
        self._positions: list[tuple[int, int]] = []  # first record of each chunk, tail included
        self._tail: list[bytes] = []  # leaf hashes of the incomplete last chunk
        # _levels_of(_tail), kept up to date as leaves arrive (8 hashes per leaf at most):
        # a root per batch must not rehash the tail chunk for every subtree it reads.
        self._tail_levels: list[list[bytes]] = [self._tail]
        self._cache: OrderedDict[int, list[list[bytes]]] = OrderedDict()
        self._persisted = 0

    # -- building ---------------------------------------------------------------------------

    def extend(self, leaves: Sequence[bytes], positions: Sequence[tuple[int, int]]) -> None:
        """Appends leaf hashes, each with the (segment, offset) of its record."""
        for leaf, pos in zip(leaves, positions, strict=True):
            if not self._tail:
                self._positions.append(pos)
            self._add_to_tail(leaf)
            if len(self._tail) == CHUNK:
                self._push_chunk(self._tail_levels[-1][0])
                self._tail = []
                self._tail_levels = [self._tail]
        self.size += len(leaves)

    def _add_to_tail(self, leaf: bytes) -> None:
        levels = self._tail_levels
        levels[0].append(leaf)
        level = 0
        while len(levels[level]) % 2 == 0:
            row = levels[level]
            node = _sha256(b"\x01" + row[-2] + row[-1]).digest()
            if level + 1 == len(levels):
                levels.append([])
            levels[level + 1].append(node)
            level += 1

    def _push_chunk(self, node: bytes) -> None:
        level = 0
        while True:
            if level == len(self._levels):
                self._levels.append(bytearray())
            row = self._levels[level]
            row += node
            if len(row) % 64:
                return
            node = _sha256(b"\x01" + row[-64:]).digest()
            level += 1

    @property
    def chunks(self) -> int:
        """Number of complete chunks."""
        return len(self._levels[0]) // 32 if self._levels else 0

    # -- reading ----------------------------------------------------------------------------

    def position(self, index: int) -> tuple[int, int, int]:
        """(segment, offset, lines to skip) from which record `index` can be read."""
        chunk = index >> CHUNK_BITS
        seg, offset = self._positions[chunk]
        return seg, offset, index - (chunk << CHUNK_BITS)

    def _chunk_levels(self, chunk: int) -> list[list[bytes]]:
        if chunk == self.chunks:
            return self._tail_levels
        cached = self._cache.get(chunk)
        if cached is not None:
            self._cache.move_to_end(chunk)
            return cached
        seg, offset = self._positions[chunk]
        leaves: list[bytes] = []
        for _, _, line in segments.read_lines(self.directory, seg, offset):
            leaves.append(merkle.leaf_hash(line))
            if len(leaves) == CHUNK:
                break
        levels = _levels_of(leaves)
        if len(leaves) != CHUNK or levels[-1][0] != self.perfect(CHUNK_BITS, chunk):
            first = chunk << CHUNK_BITS
            raise FailedPrecondition(
                f"audit records {first}..{first + CHUNK - 1} changed on disk after they were "
                "written; run `agentctl audit verify` to find which")
        self._cache[chunk] = levels
        if len(self._cache) > _CACHED_CHUNKS:
            self._cache.popitem(last=False)
        return levels

    def perfect(self, level: int, index: int) -> bytes:
        """Root of the perfect subtree of 2**level leaves starting at leaf index << level."""
        if level >= CHUNK_BITS:
            at = index * 32
            return bytes(self._levels[level - CHUNK_BITS][at : at + 32])
        chunk = (index << level) >> CHUNK_BITS
        return self._chunk_levels(chunk)[level][index - (chunk << (CHUNK_BITS - level))]

    def subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) from the largest perfect subtrees that tile it."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            return self.perfect(n.bit_length() - 1, start // n)
        k = merkle.split(n)
        return merkle.node_hash(self.subtree(start, start + k), self.subtree(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        self._check_size(size)
        return self.subtree(0, size) if size else merkle.EMPTY_ROOT

    def leaf(self, index: int) -> bytes:
        return self.perfect(0, index)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self._check_size(size)
        return merkle.inclusion_path(index, size, self.subtree)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        self._check_size(second)
        return merkle.consistency_path(first, second, self.subtree)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is beyond the log's {self.size} records")

    # -- persistence ------------------------------------------------------------------------

    def persist(self) -> bool:
        """Appends the chunks tree.idx lacks; False (and nothing half-written) on failure.

        Not fsynced: a lost or stale entry costs a rehash at the next open, never correctness.
        """
        chunks = self.chunks
        if self._persisted == chunks:
            return True
        data = b"".join(_ENTRY.pack(self.perfect(CHUNK_BITS, c), *self._positions[c])
                        for c in range(self._persisted, chunks))
        path = self.directory / INDEX_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self._persisted * _ENTRY.size)
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, data)
        except OSError:
            try:
                os.ftruncate(fd, self._persisted * _ENTRY.size)
            except OSError:
                self._persisted = 0  # the next open rehashes; the next persist rewrites
            return False
        finally:
            os.close(fd)
        self._persisted = chunks
        return True

    @classmethod
    def load(cls, directory: Path, head_size: int, head_root: bytes | None) -> TreeStore:
        """Rebuilds the store: trusted tree.idx chunks + a rehash of the records after them.

        Raises FailedPrecondition if the records do not match the last signed head.
        """
        path = directory / INDEX_FILE
        raw = path.read_bytes() if path.exists() else b""
        entries = [_ENTRY.unpack_from(raw, i * _ENTRY.size)
                   for i in range(len(raw) // _ENTRY.size)]
        def matches(store: TreeStore | None) -> bool:
            return store is not None and store.size >= head_size and (
                head_root is None or store.root(head_size) == head_root)

        trusted = min(len(entries), head_size >> CHUNK_BITS)
        store = cls._scan(directory, entries[:trusted]) if trusted else None
        if not matches(store):
            store = cls._scan(directory, [])
        if store is None or store.size < head_size:
            have = 0 if store is None else store.size
            raise FailedPrecondition(
                f"the audit log holds {have} records but a signed tree head covers {head_size}: "
                "records were removed. Run `agentctl audit verify` on the directory")
        if not matches(store):
            raise FailedPrecondition(
                f"the audit records do not match the last signed tree head (size {head_size}): "
                "the log was changed. Run `agentctl audit verify` on the directory")
        store.persist()
        return store

    @classmethod
    def _scan(cls, directory: Path, entries: list[tuple[bytes, int, int]]) -> TreeStore | None:
        """A store from trusted `entries` plus the hashes of every record after them.

        The last trusted chunk is reread and must match its entry, which also checks that the
        positions in tree.idx still point at the right records; None if they do not.
        """
        store = cls(directory)
        for node, seg, offset in entries[:-1]:
            store._positions.append((seg, offset))
            store._push_chunk(node)
            store.size += CHUNK
        store._persisted = len(entries) - 1 if entries else 0
        start = entries[-1][1:] if entries else None
        numbers = segments.list_segments(directory)
        if start is None:
            if not numbers:
                return store
            start = (numbers[0], 0)
        if start[0] not in numbers:
            return None
        leaves: list[bytes] = []
        positions: list[tuple[int, int]] = []
        for seg, offset, line in segments.read_lines(directory, *start):
            leaves.append(_sha256(b"\x00" + line).digest())
            positions.append((seg, offset))
            if len(leaves) == 16 * CHUNK:  # in slices: a million records need not be in memory
                store.extend(leaves, positions)
                leaves, positions = [], []
        store.extend(leaves, positions)
        if entries:
            last = len(entries) - 1
            if store.chunks <= last or store.perfect(CHUNK_BITS, last) != entries[-1][0]:
                return None
            store._persisted += 1
        return store

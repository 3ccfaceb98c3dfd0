"""Segment files: durable batches that roll back on failure, rotation, torn-tail recovery."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentd.audit import AuditLog, verify
from agentd.audit.segments import (
    AppendOnlyFile,
    SegmentWriter,
    list_segments,
    read_lines,
    recover_tail,
    segment_path,
)
from agentd.audit.signing import HEADS_FILE, HeadFile, Signer
from agentd.errors import FailedPrecondition

ACTOR = {"role": "test"}


def failing_once(real: Callable[..., Any], error: int) -> Callable[..., Any]:
    calls = {"n": 0}

    def fake(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(error, os.strerror(error))
        return real(*args)
    return fake


def make_log(directory: Path, records: int, **kwargs: Any) -> None:
    log = AuditLog.open(directory, **kwargs)
    for i in range(records):
        log.append_sync("test.event", actor=ACTOR, details={"i": i})
    log.close()


class TestAppendOnlyFile:
    def test_a_failed_flush_leaves_no_trace(self, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """When fdatasync fails the batch is truncated away; the next batch lands cleanly."""
        f = AppendOnlyFile(tmp_path / "f")
        f.append(b"one\n")
        monkeypatch.setattr(os, "fdatasync", failing_once(os.fdatasync, errno.EIO))
        with pytest.raises(OSError, match="Input/output error"):
            f.append(b"two\n")
        assert (tmp_path / "f").read_bytes() == b"one\n"
        f.append(b"three\n")
        f.close()
        assert (tmp_path / "f").read_bytes() == b"one\nthree\n"

    def test_a_short_write_then_enospc_is_rolled_back(self, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """A write that stops half-way (disk full) does not leave half a batch behind."""
        real_write = os.write
        state = {"n": 0}

        def short_write(fd: int, data: Any) -> int:
            state["n"] += 1
            if state["n"] == 1:
                return real_write(fd, bytes(data[:3]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        f = AppendOnlyFile(tmp_path / "f")
        f.append(b"ok\n")
        monkeypatch.setattr(os, "write", short_write)
        with pytest.raises(OSError, match="No space left"):
            f.append(b"half-written\n")
        monkeypatch.setattr(os, "write", real_write)
        f.append(b"after\n")
        f.close()
        assert (tmp_path / "f").read_bytes() == b"ok\nafter\n"

    def test_a_failed_rollback_is_repaired_before_the_next_write(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """If even the truncate fails, the file is truncated before anything else is written."""
        f = AppendOnlyFile(tmp_path / "f")
        monkeypatch.setattr(os, "fdatasync", failing_once(os.fdatasync, errno.EIO))
        monkeypatch.setattr(os, "ftruncate", failing_once(os.ftruncate, errno.EIO))
        with pytest.raises(OSError, match="Input/output error"):
            f.append(b"lost\n")
        assert (tmp_path / "f").read_bytes() == b"lost\n"
        f.append(b"kept\n")
        f.close()
        assert (tmp_path / "f").read_bytes() == b"kept\n"


class TestSegments:
    def test_rotation_and_reading_across_segments(self, tmp_path: Path) -> None:
        """Past segment_bytes a new segment starts; reading crosses them with exact offsets."""
        writer = SegmentWriter(tmp_path, segment_bytes=5)
        expected = []
        for i in range(5):
            seg, offset = writer.position()
            line = f"line-{i}".encode()
            writer.append(line + b"\n")
            expected.append((seg, offset, line))
        writer.close()
        assert list_segments(tmp_path) == [1, 2, 3, 4, 5]
        assert list(read_lines(tmp_path, 1, 0)) == expected
        assert list(read_lines(tmp_path, 3, 0)) == expected[2:]

    def test_a_partial_last_line_is_not_read(self, tmp_path: Path) -> None:
        """A line still being written (no newline yet) is not a record."""
        segment_path(tmp_path, 1).write_bytes(b"a\nb\npart")
        assert [line for _, _, line in read_lines(tmp_path, 1, 0)] == [b"a", b"b"]

    def test_a_new_segment_is_not_opened_over_records(self, tmp_path: Path) -> None:
        """Rotation refuses to append into a later segment that already holds data."""
        writer = SegmentWriter(tmp_path, segment_bytes=1)
        writer.append(b"x\n")
        segment_path(tmp_path, 2).write_bytes(b"stray\n")
        with pytest.raises(FileExistsError):
            writer.position()
        writer.close()


class TestTornTail:
    @pytest.mark.parametrize("torn", [b'{"actor":{"ro', b"\x00" * 700, b"\x00" * 20 + b"\n",
                                      b"garbage\nmore garbage"])
    def test_torn_tail_is_cut_kept_and_recorded(self, tmp_path: Path, torn: bytes) -> None:
        """A torn tail is cut, saved beside the segment, and the cut is itself a record."""
        make_log(tmp_path, 5)
        seg = segment_path(tmp_path, 1)
        good = seg.read_bytes()
        with open(seg, "ab") as f:
            f.write(torn)
        log = AuditLog.open(tmp_path)
        assert log.size == 6
        [rec] = log.read(5)
        log.close()
        assert rec["event"] == "audit.recovered"
        cut = rec["details"]["segment"]
        assert cut["offset"] == len(good)
        assert cut["bytes"] == len(torn)
        assert cut["first_index"] == 5
        assert (tmp_path / cut["saved_as"]).read_bytes() == torn
        assert seg.read_bytes().startswith(good)
        assert verify(tmp_path).ok

    def test_a_complete_line_that_breaks_the_chain_is_cut(self, tmp_path: Path) -> None:
        """A whole line that does not continue the hash chain (a replayed record) is torn."""
        make_log(tmp_path, 3)
        seg = segment_path(tmp_path, 1)
        first = seg.read_bytes().split(b"\n")[0]
        with open(seg, "ab") as f:
            f.write(first.replace(b'"index":0', b'"index":3') + b"\n")
        cut = recover_tail(tmp_path, floor=0)
        assert cut is not None
        assert cut.first_index == 3
        assert cut.complete_lines == 1

    def test_damage_under_a_signed_head_is_not_cut(self, tmp_path: Path) -> None:
        """Below what a signed head covers, damage is corruption: refuse, cut nothing."""
        make_log(tmp_path, 5)
        seg = segment_path(tmp_path, 1)
        lines = seg.read_bytes().split(b"\n")
        lines[2] = lines[2][:10]
        seg.write_bytes(b"\n".join(lines))
        before = seg.read_bytes()
        with pytest.raises(FailedPrecondition, match="not a torn tail"):
            AuditLog.open(tmp_path)
        assert seg.read_bytes() == before

    def test_clean_log_is_left_alone(self, tmp_path: Path) -> None:
        """No cut, no recovered record, when the log ends on a whole record."""
        make_log(tmp_path, 3, segment_bytes=200)
        assert recover_tail(tmp_path, floor=3) is None
        log = AuditLog.open(tmp_path)
        assert log.size == 3
        log.close()

    def test_torn_tree_head_is_cut_and_recorded(self, tmp_path: Path) -> None:
        """A head whose write never returned is cut; the log says so."""
        make_log(tmp_path, 3)
        heads = tmp_path / HEADS_FILE
        with open(heads, "ab") as f:
            f.write(b'{"root_hash":"ab')
        log = AuditLog.open(tmp_path)
        [rec] = log.read(3)
        log.close()
        assert rec["event"] == "audit.recovered"
        assert rec["details"]["tree_heads"]["bytes"] == len(b'{"root_hash":"ab')
        assert verify(tmp_path).ok

    def test_recovery_in_the_last_of_several_segments(self, tmp_path: Path) -> None:
        """The chain check starts from the previous segment's last record."""
        make_log(tmp_path, 12, segment_bytes=300)
        numbers = list_segments(tmp_path)
        assert len(numbers) > 2
        with open(segment_path(tmp_path, numbers[-1]), "ab") as f:
            f.write(b"{torn")
        cut = recover_tail(tmp_path, floor=12)
        assert cut is not None
        assert cut.first_index == 12
        assert verify(tmp_path).ok


class TestHeadFile:
    def test_heads_signed_by_another_key_are_refused(self, tmp_path: Path) -> None:
        """The daemon will not extend heads that its own key did not sign."""
        make_log(tmp_path, 2)
        other = Signer(Ed25519PrivateKey.generate())
        head = other.sign(2, b"\x00" * 32)
        (tmp_path / HEADS_FILE).write_bytes(head.line() + b"\n")
        with pytest.raises(FailedPrecondition, match="does not verify"):
            HeadFile.open(tmp_path, Signer.load_or_create(tmp_path).public)

    def test_head_lines_are_canonical_json(self, tmp_path: Path) -> None:
        """tree-heads.jsonl holds the four documented fields, hex-encoded."""
        make_log(tmp_path, 2)
        line = (tmp_path / HEADS_FILE).read_bytes().splitlines()[-1]
        head = json.loads(line)
        assert sorted(head) == ["root_hash", "signature", "timestamp", "tree_size"]
        assert head["tree_size"] == 2
        assert len(bytes.fromhex(head["signature"])) == 64

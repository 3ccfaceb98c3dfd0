"""`verify` from the files alone, and every tampering case naming the first bad index."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentd.audit import AuditLog, TreeHead, leaf_hash, verify
from agentd.audit.segments import segment_path
from agentd.audit.signing import HEADS_FILE, PUB_FILE, Signer, public_pem
from agentd.cli import audit_cmd
from agentd.cli.output import UsageError

ACTOR = {"role": "test"}
RECORDS = 30


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 records in several segments, heads signed at 10, 20 and 30 (the last one at close)."""
    directory = tmp_path_factory.mktemp("pristine")
    log = AuditLog.open(directory, segment_bytes=2000)
    for i in range(RECORDS):
        log.append_sync("test.event", actor=ACTOR, details={"i": i, "word": "hello"})
    log.close()
    # The daemon signs a head per batch (here: per record); keep the heads at 10, 20 and 30,
    # a log as it was before per-batch signing, so the ranges below stay readable.
    heads = directory / HEADS_FILE
    kept = [line for line in heads.read_bytes().splitlines()
            if TreeHead.parse(line).tree_size in (10, 20, 30)]
    heads.write_bytes(b"".join(line + b"\n" for line in kept))
    return directory


@pytest.fixture
def copy(pristine: Path, tmp_path: Path) -> Path:
    target = tmp_path / "audit"
    shutil.copytree(pristine, target)
    return target


def lines(directory: Path) -> list[tuple[Path, int]]:
    """(segment, line number) of every record, in log order."""
    found = []
    for seg in sorted(directory.glob("audit-*.jsonl")):
        found += [(seg, n) for n in range(len(seg.read_bytes().splitlines()))]
    return found


def edit(directory: Path, index: int, change: Callable[[bytes], bytes]) -> None:
    seg, n = lines(directory)[index]
    content = seg.read_bytes().split(b"\n")
    content[n] = change(content[n])
    seg.write_bytes(b"\n".join(content))


def delete(directory: Path, index: int) -> None:
    seg, n = lines(directory)[index]
    content = seg.read_bytes().split(b"\n")
    del content[n]
    seg.write_bytes(b"\n".join(content))


def line_at(directory: Path, index: int) -> bytes:
    seg, n = lines(directory)[index]
    return seg.read_bytes().split(b"\n")[n]


def rechain(directory: Path, start: int) -> None:
    """Recomputes the prev links from `start` on, as a forger who knows the format would."""
    for index in range(start, len(lines(directory))):
        prev = leaf_hash(line_at(directory, index - 1)).hex().encode()

        def relink(line: bytes, prev: bytes = prev) -> bytes:
            at = line.index(b'"prev":"') + 8
            return line[:at] + prev + line[at + 64:]
        edit(directory, index, relink)


def first(directory: Path, **kwargs: object) -> tuple[int | None, str]:
    report = verify(directory, **kwargs)  # type: ignore[arg-type]
    assert not report.ok
    assert report.first is not None
    return report.first.index, report.first.what


class TestClean:
    def test_a_clean_log_verifies(self, pristine: Path) -> None:
        """Every record, link, root and signature checks; the counts are reported."""
        report = verify(pristine)
        assert report.ok, report.problems
        assert (report.records, report.heads) == (30, 3)
        assert report.segments > 2
        assert report.last_head is not None
        assert report.last_head.tree_size == RECORDS

    def test_deep_mode_also_passes(self, pristine: Path) -> None:
        """Parsing every record finds them canonical and well formed."""
        assert verify(pristine, deep=True).ok

    def test_an_empty_log_verifies(self, tmp_path: Path) -> None:
        """A log that was opened and closed with nothing in it is fine."""
        AuditLog.open(tmp_path).close()
        assert verify(tmp_path).ok


class TestTampering:
    def test_one_byte_changed_in_a_record(self, copy: Path) -> None:
        """A changed letter inside record 14 is named exactly, via the hash chain."""
        edit(copy, 14, lambda line: line.replace(b"hello", b"hellp"))
        index, what = first(copy)
        assert index == 14
        assert "record 14 was altered" in what

    def test_one_byte_changed_breaking_the_json(self, copy: Path) -> None:
        """A byte that breaks the record's form is named at that record."""
        edit(copy, 7, lambda line: line.replace(b'"index":7', b'"index"!7'))
        assert first(copy)[0] == 7

    def test_one_byte_changed_in_a_prev_link(self, copy: Path) -> None:
        """Altering record 15's own prev field names 15, not its predecessor."""
        def flip(line: bytes) -> bytes:
            at = line.index(b'"prev":"') + 8
            return line[:at] + (b"1" if line[at:at + 1] != b"1" else b"2") + line[at + 1:]
        edit(copy, 15, flip)
        index, what = first(copy)
        assert index == 15
        assert "does not chain to the record before it" in what

    def test_one_byte_changed_in_the_last_record(self, copy: Path) -> None:
        """Nothing chains to the last record: the head's root catches it, and the range
        starts at the last head that still matches."""
        edit(copy, 29, lambda line: line.replace(b"hello", b"jello"))
        index, what = first(copy)
        assert index == 20
        assert "tree head 3 (size 30) does not match" in what

    def test_a_line_removed(self, copy: Path) -> None:
        """A removed record is a gap at its index."""
        delete(copy, 12)
        index, what = first(copy)
        assert index == 12
        assert "record 12 is missing" in what

    def test_two_lines_swapped(self, copy: Path) -> None:
        """Two swapped records are out of order at the first of them."""
        seg, n = lines(copy)[12]
        assert lines(copy)[13][0] == seg
        content = seg.read_bytes().split(b"\n")
        content[n], content[n + 1] = content[n + 1], content[n]
        seg.write_bytes(b"\n".join(content))
        index, what = first(copy)
        assert index == 12
        assert "out of order" in what

    def test_the_tail_truncated_at_a_line(self, copy: Path) -> None:
        """Records removed from the end are missing below the last head's size."""
        for _ in range(5):
            delete(copy, len(lines(copy)) - 1)
        index, what = first(copy)
        assert index == 25
        assert "records 25..29 are missing" in what

    def test_the_tail_truncated_mid_record(self, copy: Path) -> None:
        """A cut in the middle of the last record is a torn line at its index."""
        seg = sorted(copy.glob("audit-*.jsonl"))[-1]
        seg.write_bytes(seg.read_bytes()[:-40])
        index, what = first(copy)
        assert index == 29
        assert "ends in the middle of a record" in what

    def test_the_whole_log_resigned_with_another_key(self, copy: Path) -> None:
        """Heads re-signed by someone else's key fail against audit.pub."""
        attacker = Signer(Ed25519PrivateKey.generate())
        heads = [TreeHead.parse(line) for line in (copy / HEADS_FILE).read_bytes().splitlines()]
        forged = [attacker.sign(h.tree_size, h.root_hash, h.timestamp) for h in heads]
        (copy / HEADS_FILE).write_bytes(b"".join(h.line() + b"\n" for h in forged))
        report = verify(copy)
        assert not report.ok
        assert report.first is not None
        assert report.first.index is None
        assert report.first.where == f"{HEADS_FILE}:1"
        assert "does not verify" in report.first.what
        # Three heads that do not verify, and so 30 records no valid head covers.
        assert len(report.problems) == 4
        assert "30 record(s), 0..29, are after the last signed head" in report.problems[-1].what

    def test_resigned_with_audit_pub_replaced_needs_the_verifiers_own_key(
            self, copy: Path, tmp_path: Path) -> None:
        """If audit.pub is swapped too, only a key held by the verifier catches it."""
        trusted = tmp_path / "trusted.pub"
        shutil.copy(copy / PUB_FILE, trusted)
        attacker = Signer(Ed25519PrivateKey.generate())
        heads = [TreeHead.parse(line) for line in (copy / HEADS_FILE).read_bytes().splitlines()]
        (copy / HEADS_FILE).write_bytes(b"".join(
            attacker.sign(h.tree_size, h.root_hash, h.timestamp).line() + b"\n" for h in heads))
        (copy / PUB_FILE).write_bytes(public_pem(attacker.public))
        assert verify(copy).key_id == attacker.key_id  # self-consistent forgery...
        index, what = first(copy, public_key=trusted)  # ...caught with the real key
        assert index is None
        assert "signed with another key" in what

    def test_a_rewritten_tail_with_a_consistent_chain(self, copy: Path) -> None:
        """Rewriting records 25..29 and re-linking their chain still fails the signed root."""
        for i in range(25, RECORDS):
            edit(copy, i, lambda line: line.replace(b"hello", b"HELLO"))
        rechain(copy, 25)
        index, what = first(copy)
        assert index == 20
        assert "were rewritten" in what

    def test_heads_reordered(self, copy: Path) -> None:
        """Heads that go back in size are reported."""
        heads = (copy / HEADS_FILE).read_bytes().splitlines()
        (copy / HEADS_FILE).write_bytes(b"\n".join([heads[1], heads[0], heads[2]]) + b"\n")
        report = verify(copy)
        assert not report.ok
        assert any("heads were reordered" in p.what for p in report.problems)

    def test_an_unsigned_record_appended_by_hand(self, copy: Path) -> None:
        """A forged record after the last head must still chain; a bad one is caught."""
        seg = sorted(copy.glob("audit-*.jsonl"))[-1]
        last = seg.read_bytes().splitlines()[-1]
        forged = last.replace(b'"index":29', b'"index":30')
        with open(seg, "ab") as f:
            f.write(forged + b"\n")
        index, what = first(copy)
        assert index == 29
        assert "nothing after it tells which" in what


class TestCli:
    def run(self, argv: list[str]) -> int:
        parser = argparse.ArgumentParser()
        audit_cmd.register(parser.add_subparsers())
        args = parser.parse_args(argv)
        return int(args.func(args))

    def test_exit_status_and_first_bad_index(self, copy: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
        """`audit verify DIR` exits 0 when clean, 1 naming the first bad index."""
        assert self.run(["audit", "verify", str(copy)]) == 0
        assert ": OK" in capsys.readouterr().out
        edit(copy, 14, lambda line: line.replace(b"hello", b"hellp"))
        assert self.run(["audit", "verify", str(copy)]) == 1
        out = capsys.readouterr().out
        assert "FAILED at index 14" in out
        assert self.run(["audit", "verify", "--json", str(copy)]) == 1
        report = json.loads(capsys.readouterr().out)
        assert report["first_bad_index"] == 14
        assert report["ok"] is False

    def test_a_missing_directory_is_a_usage_error(self, tmp_path: Path) -> None:
        """A DIR that does not exist is the caller's mistake."""
        with pytest.raises(UsageError, match="not a directory"):
            self.run(["audit", "verify", str(tmp_path / "nope")])

    def test_the_segment_files_are_left_alone(self, copy: Path) -> None:
        """Verifying never writes: the files are byte for byte the same afterwards."""
        before = {p.name: p.read_bytes() for p in copy.iterdir()}
        verify(copy, deep=True)
        assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
        assert segment_path(copy, 1).exists()


class TestUnsignedTail:
    def test_records_after_the_last_head_fail_unless_accepted(self, copy: Path) -> None:
        """Records no signed head covers fail verify, counted, unless the caller accepts an
        unsigned tail; then they are only a note."""
        heads = copy / HEADS_FILE
        heads.write_bytes(b"".join(line + b"\n" for line in heads.read_bytes().splitlines()
                                   if TreeHead.parse(line).tree_size <= 20))
        index, what = first(copy)
        assert index == 20
        assert "10 record(s), 20..29, are after the last signed head" in what
        report = verify(copy, allow_unsigned_tail=True)
        assert report.ok, report.problems
        assert any("10 record(s)" in note for note in report.notes)

    def test_a_rewritten_unsigned_tail_is_caught(self, copy: Path) -> None:
        """The attack of the issue: rewrite and re-chain the records after the last head;
        strict verify refuses the log."""
        heads = copy / HEADS_FILE
        heads.write_bytes(b"".join(line + b"\n" for line in heads.read_bytes().splitlines()
                                   if TreeHead.parse(line).tree_size <= 20))
        for i in range(25, RECORDS):
            edit(copy, i, lambda line: line.replace(b"hello", b"HELLO"))
        rechain(copy, 25)
        assert not verify(copy).ok

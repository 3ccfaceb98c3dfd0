"""Verifies an audit directory from its files alone: no daemon, no tree.idx, no trust.

What is checked, in one pass over the segments:

- every line is a whole record whose index is the next one (no gap, no reordering, no
  duplicate) and whose `prev` is the leaf hash of the line before it;
- every leaf goes into a frontier (merkle.Frontier); whenever the count reaches a tree head's
  size the recomputed root must equal the head's;
- every tree head is well formed, its Ed25519 signature verifies with the public key (audit.pub
  or one the verifier brings), and sizes never go backwards (times that do are noted only:
  a wall clock may step back).

Consistency between successive heads is checked by construction rather than by proof: both
roots are recomputed from one sequence of leaves, so a match of each proves that the smaller
tree is a prefix of the larger one, which is all an RFC 9162 consistency proof would show.

The first bad index: a gap, a reordering or a torn line is located by the index sequence. A
changed record is located by the hash chain: record i's bytes are vouched for by record i+1's
`prev`, so one altered record breaks exactly the link after it (and, if its own `prev` was
altered, the link before it too). A head whose root differs without any broken link means the
tail from the last matching head on was rewritten; that range is reported.

Speed: lines are checked at the byte level (record.line_index/line_prev), not parsed as JSON,
about 4 us per record; `deep=True` also parses each record and checks its canonical form and
schema (3x slower). Neither changes what tampering is detected: every byte is hashed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agentd.audit import record, segments
from agentd.audit.merkle import Frontier
from agentd.audit.signing import (
    HEADS_FILE,
    PUB_FILE,
    TreeHead,
    key_id,
    load_public_key,
    verify_head,
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong; `index` is the first record concerned (None for a head's own fault)."""

    what: str
    index: int | None = None
    where: str = ""

    def __str__(self) -> str:
        at = f"index {self.index}" if self.index is not None else "tree heads"
        return f"{at}{f' ({self.where})' if self.where else ''}: {self.what}"


@dataclass
class Report:
    """The outcome of `verify`: ok, or the problems with the first one first."""

    directory: Path
    records: int = 0
    segments: int = 0
    heads: int = 0
    key_id: str = ""
    last_head: TreeHead | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None


@dataclass
class _Link:
    """A broken hash link: line `at` (0-based position in the log) does not chain to at-1."""

    at: int
    index: int
    where: str
    prev_index: int
    prev_where: str


def _load_heads(path: Path, public: Ed25519PublicKey, report: Report) -> list[tuple[int, TreeHead]]:
    """The heads whose signature verifies, as (head number, head); problems for the others."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1]:
        report.problems.append(Problem(
            f"the last line of {HEADS_FILE} is torn ({len(lines[-1])} bytes without a newline)",
            where=f"{HEADS_FILE}:{len(lines)}"))
    good: list[tuple[int, TreeHead]] = []
    last: TreeHead | None = None
    for n, line in enumerate(lines[:-1], start=1):
        where = f"{HEADS_FILE}:{n}"
        try:
            head = TreeHead.parse(line)
        except ValueError as exc:
            report.problems.append(Problem(str(exc), where=where))
            continue
        report.heads += 1
        if not verify_head(public, head):
            report.problems.append(Problem(
                f"tree head {n} (size {head.tree_size}) has a signature that does not verify "
                f"with key {key_id(public)[:16]}: it was signed with another key, or altered",
                where=where))
            continue
        if last is not None and head.tree_size < last.tree_size:
            report.problems.append(Problem(
                f"tree head {n} (size {head.tree_size}) is smaller than the head before it "
                f"(size {last.tree_size}): heads were reordered", where=where))
        elif last is not None and head.timestamp < last.timestamp:
            report.notes.append(f"tree head {n} is timed before the head before it (the clock "
                                "stepped back?); its size and root are what count")
        good.append((n, head))
        last = head
    report.last_head = last
    return sorted(good, key=lambda item: item[1].tree_size)


def verify(directory: Path, *, public_key: Path | None = None, deep: bool = False,
           allow_unsigned_tail: bool = False) -> Report:
    """Checks everything in `directory`; see the module docstring for what and how."""
    report = Report(directory)
    key_path = public_key or directory / PUB_FILE
    try:
        public = load_public_key(key_path)
    except (OSError, ValueError) as exc:
        report.problems.append(Problem(f"cannot load the public key {key_path}: {exc}"))
        return report
    report.key_id = key_id(public)
    heads = _load_heads(directory / HEADS_FILE, public, report)
    numbers = segments.list_segments(directory) if directory.is_dir() else []
    report.segments = len(numbers)
    if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        report.notes.append(f"segment numbers are not contiguous: {numbers}")

    order: list[Problem] = []
    links: list[_Link] = []
    mismatches: list[tuple[int, TreeHead, bytes, int]] = []
    frontier = Frontier()
    sha256 = hashlib.sha256
    line_index, line_prev = record.line_index, record.line_prev
    expected, count, prev_hex, prev_where = 0, 0, record.NO_PREV, ""
    good_size = 0
    h = 0
    while h < len(heads) and heads[h][1].tree_size == 0:
        good_size = _check_root(heads[h], frontier, good_size, mismatches)
        h += 1
    next_check = heads[h][1].tree_size if h < len(heads) else -1

    for seg in numbers:
        name = segments.segment_path(directory, seg).name
        lines = segments.segment_path(directory, seg).read_bytes().split(b"\n")
        torn = lines.pop()
        for j, line in enumerate(lines):
            idx, prev = line_index(line), line_prev(line)
            malformed = idx is None or prev is None
            if deep and not malformed:
                try:
                    record.check_record(line)
                except ValueError as exc:
                    order.append(Problem(f"not a valid record: {exc}", expected, f"{name}:{j + 1}"))
            if malformed:
                order.append(Problem("not an audit record (no index or prev field where a "
                                     "canonical record has them)", expected, f"{name}:{j + 1}"))
            if idx is None:
                idx = expected
            elif idx != expected:
                nxt = line_index(lines[j + 1]) if j + 1 < len(lines) else None
                order.append(_order_problem(expected, idx, nxt, f"{name}:{j + 1}"))
            if prev != prev_hex:
                links.append(_Link(count, idx, f"{name}:{j + 1}", expected - 1, prev_where))
            leaf = sha256(b"\x00" + line).digest()
            frontier.append(leaf)
            prev_hex, prev_where = leaf.hex(), f"{name}:{j + 1}"
            expected = idx + 1
            count += 1
            while count == next_check:
                good_size = _check_root(heads[h], frontier, good_size, mismatches)
                h += 1
                next_check = heads[h][1].tree_size if h < len(heads) else -1
        if torn:
            order.append(Problem(
                f"{name} ends in the middle of a record ({len(torn)} bytes without a newline): "
                "a torn write agentd cuts when it starts, or a truncated file",
                expected, f"{name}:{len(lines) + 1}"))

    report.records = count
    for n, head in heads[h:]:
        if expected >= head.tree_size:
            continue  # the count is short because of a gap reported above, not at the tail
        missing = (f"record {expected} is" if head.tree_size == expected + 1 else
                   f"records {expected}..{head.tree_size - 1} are")
        order.append(Problem(
            f"tree head {n} covers {head.tree_size} records but the log ends at index "
            f"{expected - 1}: {missing} missing (the tail was truncated or removed)",
            expected, f"{HEADS_FILE}:{n}"))
    order.extend(_link_problems(links, count, order))
    for n, head, computed, good in mismatches:
        if any(p.index is not None and good <= p.index <= head.tree_size for p in order):
            continue  # explained by a precise problem in its range
        order.append(Problem(
            f"tree head {n} (size {head.tree_size}) does not match the records: signed root "
            f"{head.root_hash.hex()[:16]}, computed {computed.hex()[:16]}; records from index "
            f"{good} on (the last size whose head matches) were rewritten",
            good, f"{HEADS_FILE}:{n}"))
    order.sort(key=lambda p: p.index if p.index is not None else -1)
    heads_problems = list(report.problems)
    report.problems = [p for p in order if p.index is not None] + heads_problems + [
        p for p in order if p.index is None]
    signed = heads[-1][1].tree_size if heads else 0
    if count > signed:
        uncovered = (f"{count - signed} record(s), {signed}..{count - 1}, are after the last "
                     "signed head: no signature covers them, so whoever can write the files "
                     "could have rewritten, reordered or removed them")
        if allow_unsigned_tail:
            report.notes.append(uncovered + " (accepted: --allow-unsigned-tail)")
        else:
            report.problems.append(Problem(
                uncovered + "; agentd signs every batch before acknowledging it, so this is a"
                " crash before a head was written (the next start signs it) or tampering;"
                " pass --allow-unsigned-tail to accept them", signed, HEADS_FILE))
    torn_files = sorted(p.name for p in directory.glob("*.torn-*")) if directory.is_dir() else []
    if torn_files:
        report.notes.append(f"torn tails cut at recovery are kept as evidence: {torn_files}")
    return report


def _check_root(item: tuple[int, TreeHead], frontier: Frontier, good_size: int,
                mismatches: list[tuple[int, TreeHead, bytes, int]]) -> int:
    """Compares a head with the recomputed root; returns the last size known to match."""
    n, head = item
    computed = frontier.root()
    if computed == head.root_hash:
        return head.tree_size
    mismatches.append((n, head, computed, good_size))
    return good_size


def _order_problem(expected: int, found: int, following: int | None, where: str) -> Problem:
    if following == expected:
        return Problem(f"records out of order: index {found} comes before {expected} "
                       "(lines swapped or moved)", expected, where)
    if found > expected:
        missing = f"{expected}" if found == expected + 1 else f"{expected}..{found - 1}"
        return Problem(f"record {missing} is missing: the next line holds index {found} "
                       "(a line was removed)", expected, where)
    return Problem(f"index {found} appears again where {expected} was expected (a line was "
                   "duplicated or moved back)", expected, where)


def _link_problems(links: list[_Link], count: int, order: list[Problem]) -> list[Problem]:
    """Names the altered record from the broken hash links (see the module docstring)."""
    explained = {p.index for p in order}
    at = {link.at for link in links}
    found: list[Problem] = []
    consumed: set[int] = set()
    for link in links:
        if link.at in consumed or link.index in explained or link.prev_index + 1 in explained:
            continue
        if link.at == 0 or link.at + 1 in at:
            consumed.add(link.at + 1)
            found.append(Problem(
                f"record {link.index} was altered: it does not chain to the record before it"
                + (", and the record after it does not chain to it" if link.at else
                   " (the first record's prev must be zeros)"), link.index, link.where))
        elif link.at == count - 1:
            found.append(Problem(
                f"record {link.prev_index} or {link.index} was altered: record {link.index} "
                f"does not chain to {link.prev_index} and nothing after it tells which",
                link.prev_index, link.prev_where))
        else:
            found.append(Problem(
                f"record {link.prev_index} was altered after it was written: its hash is not the "
                f"one record {link.index} carries as prev", link.prev_index, link.prev_where))
    return found

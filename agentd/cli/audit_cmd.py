"""`agentctl audit verify|witness|tail|show|query`: check the audit log, and read it.

`verify [DIR]` works from the files alone (no daemon): exit 0 if everything checks, 1 with the
first bad index and what is wrong. The others ask the daemon (AuditService) through the
client (`args.client().audit`). For people, one line per event:

      42  2024-05-01 10:00:00.123Z  exec.allowed  run=r-1 task=t-9  by client  argv=[...] ...

`--json` prints the records exactly as logged, one per line (JSON Lines), so that a script
can hash them (leaf hash = SHA-256(0x00 || line)) and check them against proofs.

Anything printed for people is made safe for a terminal: characters that are not printable
(escape sequences a tool's argv could carry) are shown as \\uXXXX escapes.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from google.protobuf.timestamp_pb2 import Timestamp

from agentd.audit import load_public_key, verify, verify_head, verify_inclusion
from agentd.audit.merkle import verify_consistency
from agentd.audit.signing import TreeHead
from agentd.cli.output import UsageError
from agentd.client import AuditClient, AuditRecord, SignedTreeHead

DEV_AUDIT_DIR = Path("var/state/audit")
SYSTEM_AUDIT_DIR = Path("/var/lib/agentd/audit")
_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds `audit` and its subcommands."""
    audit = subparsers.add_parser("audit", help="verify and read the audit log")
    sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    check = sub.add_parser("verify", help="check the log's files: every record, hash, "
                           "signature and tree head (no daemon needed)")
    check.add_argument("dir", nargs="?", metavar="DIR", help="the audit directory (default: "
                       f"./{DEV_AUDIT_DIR} if it exists, else {SYSTEM_AUDIT_DIR})")
    check.add_argument("--key", metavar="PUB", type=Path, help="the public key to trust "
                       "(PEM); default DIR/audit.pub. Use your own copy: a log re-signed with "
                       "another key, audit.pub included, is only caught against it")
    check.add_argument("--deep", action="store_true",
                       help="also parse every record and check its schema and canonical form")
    check.add_argument("--allow-unsigned-tail", action="store_true",
                       help="accept records after the last signed head (a crash before the "
                       "head was written) instead of failing; they are counted")
    _json_flag(check)
    check.set_defaults(func=cmd_verify)

    witness = sub.add_parser(
        "witness", help="check the daemon's log only grew since the head FILE remembers "
        "(consistency proof), then remember the new head; run it from another host")
    witness.add_argument("--state", required=True, metavar="FILE", type=Path,
                         help="the witness's memory: the last head it accepted (JSON); "
                         "created on first use (trust on first use, said so)")
    witness.add_argument("--key", metavar="PUB", type=Path,
                         help="the daemon's public key (PEM); default: the one FILE recorded "
                         "on first use, which must then be given once")
    _json_flag(witness)
    witness.set_defaults(func=cmd_witness)

    tail = sub.add_parser("tail", help="the latest events; -f keeps printing new ones")
    tail.add_argument("-f", "--follow", action="store_true", help="wait for new events")
    tail.add_argument("-n", "--lines", type=int, default=20, metavar="N",
                      help="how many past events to show first (default 20)")
    _filters(tail)
    _json_flag(tail)
    tail.set_defaults(func=cmd_tail)

    show = sub.add_parser("show", help="one record, with its inclusion proof checked")
    show.add_argument("index", type=int, metavar="INDEX", help="the record's index")
    show.add_argument("--key", metavar="PUB", type=Path,
                      help="also check the tree head's signature with this public key")
    _json_flag(show)
    show.set_defaults(func=cmd_show)

    query = sub.add_parser("query", help="events of a run, of a kind, or in a time range")
    _filters(query)
    query.add_argument("--since", metavar="TIME", help="RFC 3339 time, or an age: 30s 15m 2h 7d")
    query.add_argument("--until", metavar="TIME", help="same forms as --since (exclusive)")
    query.add_argument("--limit", type=int, default=1000, metavar="N",
                       help="at most N events (default 1000, at most 10000)")
    _json_flag(query)
    query.set_defaults(func=cmd_query)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="", metavar="RUN", help="only events of this run")
    parser.add_argument("--event", default="", metavar="EVENT",
                        help="only events of this type, e.g. exec.refused")


# -- verify --------------------------------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    """`audit verify [DIR]`: 0 if the log checks, 1 naming the first bad index."""
    directory = Path(args.dir) if args.dir else (
        DEV_AUDIT_DIR if DEV_AUDIT_DIR.is_dir() else SYSTEM_AUDIT_DIR)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; give the audit directory as DIR")
    report = verify(directory, public_key=args.key, deep=args.deep,
                    allow_unsigned_tail=args.allow_unsigned_tail)
    first = report.first
    if args.json:
        print(json.dumps({
            "directory": str(directory), "ok": report.ok, "records": report.records,
            "segments": report.segments, "tree_heads": report.heads, "key_id": report.key_id,
            "last_head": report.last_head.to_json() if report.last_head else None,
            "first_bad_index": first.index if first else None,
            "problems": [{"index": p.index, "where": p.where, "what": p.what}
                         for p in report.problems],
            "notes": report.notes}, indent=2))
        return 0 if report.ok else 1
    if first is None:
        print(f"audit log {directory}: OK")
    else:
        print(f"audit log {directory}: FAILED at {first}")
    print(f"  records: {report.records} in {report.segments} segment(s); tree heads: "
          f"{report.heads}")
    if report.last_head is not None:
        head = report.last_head
        print(f"  last signed head: size {head.tree_size}, root {head.root_hash.hex()[:16]}…, "
              f"{head.timestamp}")
    if report.key_id:
        print(f"  signing key id: {report.key_id} (compare it with your own copy)")
    if len(report.problems) > 1:
        print(f"  {len(report.problems)} problems in all:")
        for problem in report.problems[:20]:
            print(f"    {_safe(str(problem))}")
    for note in report.notes:
        print(f"  note: {_safe(note)}")
    return 0 if report.ok else 1


# -- reading through the daemon ------------------------------------------------------------

def _audit(args: argparse.Namespace) -> AuditClient:
    return args.client().audit  # type: ignore[no-any-return]


def cmd_tail(args: argparse.Namespace) -> int:
    """`audit tail`: the last N events (matching the filters), then new ones with -f."""
    audit = _audit(args)
    if args.lines < 0:
        raise UsageError("--lines must be 0 or more")
    size = audit.tree_head().tree_size
    if not (args.run or args.event):
        start = max(0, size - args.lines)
        _emit(audit.tail(start, follow=args.follow), args.json, flush=args.follow)
        return 0
    matching = audit.tail(0, run_id=args.run, event=args.event)
    recent = collections.deque(matching, maxlen=args.lines) if args.lines else ()
    last = _emit(recent, args.json, flush=args.follow)
    if args.follow:
        more = audit.tail(max(size, last + 1), run_id=args.run, event=args.event, follow=True)
        _emit(more, args.json, flush=True)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """`audit show INDEX`: the record, its leaf hash and its inclusion proof, checked."""
    audit = _audit(args)
    head = audit.tree_head()
    proof = audit.inclusion_proof(args.index, head.tree_size)
    included = verify_inclusion(args.index, head.tree_size, proof.leaf_hash,
                                list(proof.inclusion_path), head.root_hash)
    leaf_ok = hashlib.sha256(b"\x00" + proof.record.record).digest() == proof.leaf_hash
    signature: bool | None = None
    if args.key is not None:
        signature = verify_head(load_public_key(args.key), TreeHead(
            head.tree_size, head.root_hash, _head_time(head), head.signature))
    if args.json:
        print(json.dumps({
            "record": json.loads(proof.record.record), "leaf_hash": proof.leaf_hash.hex(),
            "inclusion_path": [p.hex() for p in proof.inclusion_path],
            "tree_head": {"tree_size": head.tree_size, "root_hash": head.root_hash.hex(),
                          "signature": head.signature.hex(), "key_id": head.key_id,
                          "signed_data": head.signed_data.decode()},
            "leaf_hash_matches": leaf_ok, "inclusion_verified": included,
            "signature_verified": signature}, indent=2, ensure_ascii=False))
    else:
        print(_safe(json.dumps(json.loads(proof.record.record), indent=2, ensure_ascii=False)))
        print(f"leaf hash: {proof.leaf_hash.hex()}{'' if leaf_ok else ' (DOES NOT MATCH)'}")
        verdict = "verified" if included else "DOES NOT VERIFY"
        print(f"inclusion in tree head of size {head.tree_size} (root "
              f"{head.root_hash.hex()[:16]}…, key id {head.key_id[:16]}…): {verdict}")
        if signature is not None:
            print(f"tree head signature: {'valid' if signature else 'INVALID'} with {args.key}")
    return 0 if included and leaf_ok and signature is not False else 1


def cmd_query(args: argparse.Namespace) -> int:
    """`audit query`: matching events in index order."""
    when = {name: _parse_when(getattr(args, name), f"--{name}")
            for name in ("since", "until") if getattr(args, name)}
    reply = _audit(args).query(run_id=args.run, event=args.event, limit=args.limit, **when)
    _emit(reply.records, args.json, flush=False)
    if reply.more and not args.json:
        print(f"(stopped at --limit {args.limit}; more events match)", file=sys.stderr)
    return 0


# -- formatting ----------------------------------------------------------------------------

def _emit(records: Iterable[AuditRecord], as_json: bool, *, flush: bool) -> int:
    """Prints records; returns the last index printed (-1 if none)."""
    last = -1
    for rec in records:
        if as_json:
            sys.stdout.write(rec.record.decode() + "\n")
        else:
            sys.stdout.write(format_line(json.loads(rec.record)) + "\n")
        if flush:
            sys.stdout.flush()
        last = rec.index
    return last


def format_line(rec: dict[str, Any]) -> str:
    """One record as one readable, terminal-safe line."""
    when = rec["time"].replace("T", " ")
    when = when[:23] + "Z" if len(when) > 23 else when
    ids = [f"{k}={_value(v)}" for k, v in (("run", rec["run_id"]), ("task", rec["task_id"])) if v]
    details = [f"{_value(k)}={_value(v)}" for k, v in rec["details"].items()]
    parts = [f"{rec['index']:>7}", when, rec["event"], " ".join(ids), f"by {_actor(rec['actor'])}",
             " ".join(details)]
    return _safe("  ".join(p for p in parts if p))


def _actor(actor: dict[str, Any]) -> str:
    if "role" in actor:
        extra = [f"{_value(k)}={_value(v)}" for k, v in actor.items() if k != "role"]
        return " ".join([_value(actor["role"]), *extra])
    return " ".join(f"{_value(k)}={_value(v)}" for k, v in actor.items())


_BARE = re.compile(r"^[^\s\"=]+$")


def _value(value: Any, limit: int = 120) -> str:
    if isinstance(value, str) and value.isprintable() and _BARE.match(value):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _safe(text: str) -> str:
    """Escapes what a terminal would interpret (control characters, C1 codes, bidi marks)."""
    return "".join(c if c.isprintable() or c == "\n" else f"\\u{ord(c):04x}" for c in text)


def _parse_when(text: str, flag: str) -> Timestamp:
    match = _RELATIVE.match(text.strip())
    try:
        if match:
            moment = datetime.now(UTC) - timedelta(**{_UNITS[match[2]]: int(match[1])})
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.astimezone()  # a time without offset is the local time
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give an RFC 3339 time (2024-05-01T10:00:00Z) or an "
                         "age (30s, 15m, 2h, 7d)") from None
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def _head_time(head: SignedTreeHead) -> str:
    return str(json.loads(head.signed_data)["timestamp"]) if head.signed_data else ""



# -- witness -------------------------------------------------------------------------------

def cmd_witness(args: argparse.Namespace) -> int:
    """`audit witness --state FILE`: 0 if the log is the one FILE saw, grown or not (FILE then
    holds the new head); 1 if it is older, forked or rewritten (FILE is left as it was)."""
    state: dict[str, Any] | None = None
    if args.state.exists():
        try:
            state = json.loads(args.state.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{args.state}: not a witness state file ({exc})") from None
    key_pem = args.key.read_bytes() if args.key else (
        state.get("public_key", "").encode() if state else b"")
    if not key_pem:
        raise UsageError("the first run needs --key PUB: the daemon's public key (audit.pub), "
                         "taken from the daemon host by a channel you trust")
    public = load_pem_public_key(key_pem)
    if not isinstance(public, Ed25519PublicKey):
        raise UsageError("--key is not an Ed25519 public key")
    audit = _audit(args)
    reply = audit.tree_head()
    head = TreeHead(reply.tree_size, reply.root_hash, _head_time(reply), reply.signature)
    verdict = _witness_verdict(audit, public, head, state)
    if verdict:
        _say(args, ok=False, message=verdict, head=head)
        return 1
    first_use = state is None
    new_state = {"tree_size": head.tree_size, "root_hash": head.root_hash.hex(),
                 "timestamp": head.timestamp, "signature": head.signature.hex(),
                 "public_key": key_pem.decode()}
    tmp = args.state.with_name(args.state.name + ".tmp")
    tmp.write_text(json.dumps(new_state, indent=2) + "\n")
    os.replace(tmp, args.state)
    grown = 0 if state is None else head.tree_size - int(state["tree_size"])
    message = (f"first use: trusting the log at size {head.tree_size} (nothing earlier can be "
               "checked)" if first_use else
               f"consistent: the log grew by {grown} record(s) to {head.tree_size}")
    _say(args, ok=True, message=message, head=head)
    return 0


def _witness_verdict(audit: AuditClient, public: Ed25519PublicKey, head: TreeHead,
                     state: dict[str, Any] | None) -> str:
    """Why the daemon's head must be refused, or "" if it is acceptable."""
    if not verify_head(public, head):
        return (f"the daemon's tree head (size {head.tree_size}) is not signed by the "
                "witness's key: another key, or a forged head")
    if state is None:
        return ""
    old_size, old_root = int(state["tree_size"]), bytes.fromhex(state["root_hash"])
    if head.tree_size < old_size:
        return (f"the log is older than the witness saw: size {head.tree_size} < "
                f"{old_size} (truncated, or an earlier copy restored)")
    if head.tree_size == old_size:
        if head.root_hash != old_root:
            return f"the log was rewritten: same size {old_size}, another root"
        return ""
    proof = audit.consistency_proof(old_size, head.tree_size)
    if not verify_consistency(old_size, head.tree_size, old_root, head.root_hash,
                              list(proof.consistency_path)):
        return (f"the log of size {head.tree_size} does not extend the one of size "
                f"{old_size} the witness saw: records before {old_size} were rewritten, "
                "reordered or removed (a fork)")
    return ""


def _say(args: argparse.Namespace, *, ok: bool, message: str, head: TreeHead) -> None:
    if args.json:
        print(json.dumps({"ok": ok, "message": message, "tree_size": head.tree_size,
                          "root_hash": head.root_hash.hex(), "state": str(args.state)}))
    else:
        print(f"audit witness: {'OK' if ok else 'REFUSED'}: {message}",
              file=sys.stdout if ok else sys.stderr)

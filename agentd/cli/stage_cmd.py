"""`agentctl stage evidence`: what an agent did at each stage, from the audit log alone.

Offline, like `audit verify`: it reads a log directory (the daemon's, or a copy) and trusts
nothing in it until `verify` has checked every record against the signed tree heads with the
given public key; then it counts only the records a signed head covers. The figures are those
a stage gate is decided on (agentd/audit/evidence.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agentd.cli.audit_cmd import DEV_AUDIT_DIR, SYSTEM_AUDIT_DIR


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds `stage` and its subcommands."""
    stage = subparsers.add_parser("stage", help="an agent's stages and the evidence for them")
    sub = stage.add_subparsers(dest="stage_command", metavar="ACTION", required=True)
    evidence = sub.add_parser(
        "evidence", help="runs, steps, failure rate, violations, rollback drills and policy "
        "versions of an agent per stage, each with its record indexes, from a verified log")
    evidence.add_argument("agent", metavar="AGENT")
    evidence.add_argument("--audit", metavar="DIR", type=Path, help="the audit directory "
                          f"(default: ./{DEV_AUDIT_DIR} if it exists, else {SYSTEM_AUDIT_DIR})")
    evidence.add_argument("--key", metavar="PUB", type=Path, help="the public key to trust "
                          "(default: DIR/audit.pub; use your own copy)")
    evidence.add_argument("--stage", help="one stage only")
    evidence.set_defaults(func=cmd_evidence)


def cmd_evidence(args: argparse.Namespace) -> int:
    from agentd.audit import verify
    from agentd.audit.evidence import collect, read_records

    directory = args.audit or (DEV_AUDIT_DIR if DEV_AUDIT_DIR.is_dir() else SYSTEM_AUDIT_DIR)
    report = verify(directory, public_key=args.key, allow_unsigned_tail=True)
    if not report.ok:
        first = report.first
        print(f"agentctl: {directory} does not verify, so no evidence is computed from it: "
              f"{first}", file=sys.stderr)
        return 2
    head = report.last_head
    size = head.tree_size if head is not None else 0
    found = collect(read_records(directory, limit=size), args.agent)
    print(f"{directory}: verified; evidence over records 0..{size - 1}, the signed head at "
          f"size {size}" + (f" ({head.timestamp})" if head is not None else ""))
    stages = [args.stage] if args.stage else list(found)
    if not stages:
        print(f"no run of agent {args.agent!r} in these records")
    for stage in stages:
        evidence = found.get(stage)
        if evidence is None:
            print(f"{args.agent} at {stage}: no run")
            continue
        print("\n".join(evidence.lines()))
    return 0

"""`agentctl stage status|promote|approve|history|evidence`: an agent's stage and its gates.

status, promote, approve and history go to the daemon (through the client): promote on the
admin socket, approve on the approver socket. `status` also shows the policy version in force,
an unreviewed one waiting for `agentctl policy accept`, and the audit-mode counts.

`evidence` is offline, like `audit verify`: it
reads a log directory (the daemon's, or a copy) and trusts nothing in it until `verify` has
checked every record against the signed tree heads with the given public key; then it counts
only the records a signed head covers. The figures are those a gate is decided on
(agentd/audit/evidence.py).
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

    status = sub.add_parser("status", help="the agent's stage, each criterion of the next "
                            "gate (met or not, its figure and records), a pending promotion")
    status.add_argument("agent", metavar="AGENT")
    status.set_defaults(func=cmd_status)
    history = sub.add_parser("history", help="every stage change of the agent, from the log")
    history.add_argument("agent", metavar="AGENT")
    history.set_defaults(func=cmd_history)
    promote = sub.add_parser("promote", help="request a promotion (admin socket); refused "
                             "with every unmet criterion, else pending approval")
    promote.add_argument("agent", metavar="AGENT")
    promote.add_argument("--to", required=True, metavar="STAGE")
    promote.add_argument("--owner", required=True, metavar="NAME",
                         help="who answers for the agent at the new stage (a user name)")
    promote.add_argument("--reason", required=True, metavar="TEXT")
    promote.set_defaults(func=cmd_promote)
    approve = sub.add_parser("approve", help="approve (or --refuse) a pending promotion "
                             "(approver socket; not the requester, not the owner)")
    approve.add_argument("agent", metavar="AGENT")
    approve.add_argument("--refuse", action="store_true")
    approve.add_argument("--reason", default="", metavar="TEXT")
    approve.set_defaults(func=cmd_approve)


def _print_status(status: Any) -> None:
    mismatch = (f" (the config says {status.config_stage}: ignored, stages change only "
                "through gates)" if status.config_ignored else "")
    print(f"{status.agent}: {status.stage} since record {status.since_index}{mismatch}")
    if status.owner:
        print(f"  owner: {status.owner}")
    if status.policy_source:
        print(f"  policy in force: {status.policy_source}")
    if status.unreviewed_source:
        print(f"  UNREVIEWED policy change: {status.unreviewed_source} (record "
              f"{status.unreviewed_index}, with its diff); not in force until an approver "
              f"runs: agentctl policy accept {status.agent} {status.unreviewed_source}")
    if status.next_stage_refuses or status.next_stage_allows:
        def at(indexes: tuple[int, ...]) -> str:
            return (" (records " + ", ".join(map(str, indexes[:8]))
                    + (" ..." if len(indexes) > 8 else "") + ")") if indexes else ""
        print(f"  audit mode: {status.next_stage or 'the next stage'} would refuse "
              f"{len(status.next_stage_refuses)} call(s){at(status.next_stage_refuses)} and "
              f"newly allow {len(status.next_stage_allows)}{at(status.next_stage_allows)}")
    if not status.next_stage:
        print("  at the top stage")
        return
    print(f"  gate into {status.next_stage} (evidence: records 0..{status.evidence_tree_size - 1}"
          " under a signed head):")
    for c in status.criteria:
        records = (" (records " + ", ".join(map(str, c.records[:8]))
                   + (" ..." if len(c.records) > 8 else "") + ")") if c.records else ""
        print(f"    [{'met' if c.met else 'UNMET'}] {c.name}: {c.figure}{records}")
    print(f"    approvals: {status.approvals} of {status.approvals_needed} distinct approvers")
    if status.pending_to:
        print(f"  pending: promotion to {status.pending_to}, owner {status.pending_owner}")


def cmd_status(args: argparse.Namespace) -> int:
    _print_status(args.client().stage(args.agent))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    for change in args.client().stage_history(args.agent):
        who = change.actor.get("uid", change.actor.get("role", "?"))
        moved = f"{change.previous} -> {change.stage}" if change.previous else change.stage
        when = f"{change.time[:19].replace('T', ' ')}Z" if len(change.time) >= 19 else "-"
        print(f"record {change.index}  {when}  {change.event}  {moved}  by {who}: "
              f"{change.reason}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    _print_status(args.client().promote(args.agent, args.to, args.owner, args.reason))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    _print_status(args.client().approve_stage(args.agent, not args.refuse, args.reason))
    return 0


def cmd_evidence(args: argparse.Namespace) -> int:
    from agentd.audit.evidence import Unverified, from_verified_log

    directory = args.audit or (DEV_AUDIT_DIR if DEV_AUDIT_DIR.is_dir() else SYSTEM_AUDIT_DIR)
    try:
        verified = from_verified_log(directory, args.agent, args.key)
    except Unverified as exc:
        print(f"agentctl: {directory} does not verify, so no evidence is computed from it: "
              f"{exc}", file=sys.stderr)
        return 2
    head, found = verified.head, verified.stages
    print(f"{directory}: verified; evidence over records 0..{verified.size - 1}, the signed "
          f"head at size {verified.size}" + (f" ({head.timestamp})" if head is not None else ""))
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

"""`agentctl status`: the daemon's health and load, for an operator.

Human output is one fact per line; `--json` prints the API's fields. Exit status 1 when the
daemon fails closed (its audit log cannot be written) or drains, so a script can alert on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from agentd.cli.output import human_bytes


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    status = subparsers.add_parser("status", help="the daemon's health and load")
    status.add_argument("--json", action="store_true", help="print the fields as JSON")
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    s = args.client().status()
    if args.json:
        print(json.dumps(dataclasses.asdict(s), indent=2, sort_keys=True))
    else:
        audit = "writable" if s.audit_writable else f"NOT WRITABLE ({s.audit_problem})"
        head = (f"last signed head at size {s.audit_head_size} ({s.audit_head_time})"
                if s.audit_head_size else "no signed head yet")
        spare = s.state_free_bytes - s.state_reserve_bytes
        pool = (f"{s.warm_pool_depth} of {s.warm_pool_size} ready" if s.warm_pool_size
                else "empty (filled per policy at its first call; warm_pool = 0 turns it off)")
        lines = [
            f"agentd {s.version}, up {_duration(s.uptime_seconds)}"
            + (", DRAINING" if s.draining else ""),
            f"cgroups:   {s.cgroup_backend} ({s.cgroup_parent})",
            f"workers:   {s.workers_in_use} of {s.max_workers} in use; {s.open_runs} open runs",
            f"warm pool: {pool}",
            f"audit:     {audit}; {s.audit_records} records, {s.audit_queue_depth} queued; "
            + head,
            f"state disk: {human_bytes(s.state_free_bytes)} free, "
            f"{human_bytes(s.state_reserve_bytes)} reserved"
            + ("" if spare > 0 else " (BELOW THE RESERVE: commits are refused)"),
            f"metrics:   {s.metrics_socket}"
            + (f" and http://{s.metrics_listen}/metrics" if s.metrics_listen else ""),
        ]
        print("\n".join(lines))
    return 0 if s.audit_writable and not s.draining else 1


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"

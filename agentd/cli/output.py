"""How agentctl shows things: tables and key/value blocks for people, JSON for programs.

The JSON shapes are an interface (scripts parse them): a run is an object with the field
names of the API's `Run` message, enums as lower-case words and times as RFC 3339 strings
(null when unset); `run list --json` is `{"runs": [...]}` so that it can grow fields.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from agentd.client import Outcome, Run, StopReason


class UsageError(Exception):
    """Bad input caught by agentctl before any call; shown as `agentctl: <message>`, exit 2.

    Raise it from a handler with a message that says what to type instead.
    """


_STOPPED_BY = {
    StopReason.TIMEOUT: "wall time limit",
    StopReason.MEMORY: "memory limit",
    StopReason.PIDS: "pids limit",
    StopReason.OUTPUT: "output limit",
    StopReason.CANCELLED: "cancelled",
    StopReason.SHUTDOWN: "daemon shutdown",
}


def run_to_json(run: Run) -> dict[str, Any]:
    """The JSON object of one run."""
    return {
        "run_id": run.run_id,
        "agent": run.agent,
        "stage": run.stage,
        "state": str(run.state),
        "created_at": _iso(run.created_at),
        "closed_at": _iso(run.closed_at),
        "policy_hash": run.policy_hash,
        "policy_file": run.policy_file,
        "workspace": run.workspace,
        "created_by": run.created_by,
        "execs": run.execs,
    }


def print_json(value: object, out: TextIO | None = None) -> None:
    """Writes `value` as indented JSON and a newline."""
    out = out or sys.stdout
    out.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def runs_table(runs: Sequence[Run]) -> str:
    """A table of runs, one per line, with a header; columns padded to the widest value."""
    header = ("RUN", "AGENT", "STAGE", "STATE", "CREATED", "EXECS")
    rows = [
        (r.run_id, r.agent, r.stage, str(r.state), _when(r.created_at), str(r.execs)) for r in runs
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def run_details(run: Run) -> str:
    """A key/value block describing one run."""
    fields = [
        ("run", run.run_id),
        ("agent", run.agent),
        ("stage", run.stage),
        ("state", str(run.state)),
        ("created", _when(run.created_at)),
        ("created by", run.created_by or "-"),
        ("closed", _when(run.closed_at)),
        ("policy", f"{run.policy_file or '-'} (sha256 {run.policy_hash or '-'})"),
        ("workspace", run.workspace or "(removed)"),
        ("execs", str(run.execs)),
    ]
    width = max(len(key) for key, _ in fields) + 1
    return "".join(f"{(key + ':').ljust(width)} {value}\n" for key, value in fields)


def outcome_line(outcome: Outcome) -> str:
    """One line saying how the tool ended and what it used, e.g.
    "killed: memory limit (signal 9; wall 1.20s, cpu 0.80s, peak memory 64.0 MiB)"."""
    what = outcome.summary or _describe(outcome)
    usage = (
        f"wall {outcome.wall_seconds:.2f}s, cpu {outcome.cpu_seconds:.2f}s, "
        f"peak memory {human_bytes(outcome.peak_memory_bytes)}"
    )
    notes = []
    if outcome.stop_reason is not StopReason.NONE and not outcome.summary:
        notes.append(f"stopped by agentd: {_STOPPED_BY[outcome.stop_reason]}")
    if outcome.pids_limit_hit and outcome.stop_reason is not StopReason.PIDS:
        notes.append("the pids limit was reached (a fork failed)")
    tail = "; ".join([*notes, usage])
    return f"{what} ({tail})"


def _describe(outcome: Outcome) -> str:
    if outcome.exited:
        return f"exited {outcome.exit_code}"
    if outcome.signal:
        return f"killed by signal {outcome.signal}"
    return "did not run to completion"


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB"; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _iso(when: datetime | None) -> str | None:
    return when.isoformat().replace("+00:00", "Z") if when else None


def _when(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%SZ") if when else "-"

"""How agentctl shows things: tables and key/value blocks for people, JSON for programs.

The JSON shapes are an interface (scripts parse them): a run, a step (`StepReply`) and a
checkpoint are objects with the field names of the API's messages, enums as lower-case words
and times as RFC 3339 strings (null when unset); lists are wrapped (`{"runs": [...]}`,
`{"steps": [...]}`, `{"checkpoints": [...]}`) so that they can grow fields.

Text for people that the daemon got from a tool or an agent (task names, reasons, changed
paths) goes through `printable`: a confined agent chooses its file names, and must not be able
to send escape sequences to the operator's terminal. Task output itself is passed through
as it is, like `exec` does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from agentd.client import Checkpoint, Outcome, Run, StepReply, StepState, StopReason, TaskReport

#: How many changed paths the timeline shows per task before "and N more".
CHANGED_PATHS_SHOWN = 3
#: How many network records the timeline shows per task before "and N more".
NETWORK_SHOWN = 20


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
    StopReason.QUOTA: "workspace quota",
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
        "tasks_run": run.tasks_run,
        "step": run.step,
        "forked_from": run.forked_from,
        "forked_at_step": run.forked_at_step,
        "problem": run.problem,
        "channels": [
            {"name": c.name, "reducer": c.reducer, "barrier_tasks": list(c.barrier_tasks)}
            for c in run.channels
        ],
    }


def print_json(value: object, out: TextIO | None = None) -> None:
    """Writes `value` as indented JSON and a newline."""
    out = out or sys.stdout
    out.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def runs_table(runs: Sequence[Run]) -> str:
    """A table of runs, one per line, with a header; columns padded to the widest value."""
    header = ("RUN", "AGENT", "STAGE", "STATE", "CREATED", "TASKS")
    rows = [
        (r.run_id, r.agent, r.stage, str(r.state), _when(r.created_at), str(r.tasks_run))
        for r in runs
    ]
    return _table([header, *rows])


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
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
        ("tasks run", str(run.tasks_run)),
        ("step", str(run.step) if run.step else "0 (nothing committed yet)"),
    ]
    if run.forked_from:
        fields.append(("forked from", f"{run.forked_from} at step {run.forked_at_step}"))
    fields.extend(
        ("channel", channel_text(c.name, c.reducer, c.barrier_tasks)) for c in run.channels
    )
    if run.problem:
        fields.append(("problem", run.problem))
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


def printable(text: str) -> str:
    """`text` with every character that is not printable shown as a \\uXXXX escape."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def channel_text(name: str, reducer: str, barrier_tasks: Sequence[str]) -> str:
    """A channel as `run create --channel` takes it: NAME:REDUCER[:TASK,TASK...]."""
    tasks = f":{','.join(barrier_tasks)}" if barrier_tasks else ""
    return printable(f"{name}:{reducer}{tasks}")


def seconds(value: float) -> str:
    """0.2134 -> "0.21 s"."""
    return f"{value:.2f} s"


# --- steps -------------------------------------------------------------------------------------


def outcome_to_json(outcome: Outcome) -> dict[str, Any]:
    """The JSON object of a tool's outcome."""
    return {
        "task_id": outcome.task_id,
        "exited": outcome.exited,
        "exit_code": outcome.exit_code,
        "signal": outcome.signal,
        "stop_reason": str(outcome.stop_reason),
        "wall_seconds": outcome.wall_seconds,
        "cpu_seconds": outcome.cpu_seconds,
        "peak_memory_bytes": outcome.peak_memory_bytes,
        "stdout_bytes": outcome.stdout_bytes,
        "stderr_bytes": outcome.stderr_bytes,
        "summary": outcome.summary,
        "pids_limit_hit": outcome.pids_limit_hit,
    }


def task_to_json(task: TaskReport) -> dict[str, Any]:
    """The JSON object of one task of a step; its output as text (invalid UTF-8 replaced)."""
    return {
        "name": task.name,
        "outcome": outcome_to_json(task.outcome) if task.outcome else None,
        "changed_paths": list(task.changed_paths),
        "writes": task.writes,
        "failure": task.failure,
        "stdout": task.stdout.decode("utf-8", "replace"),
        "stderr": task.stderr.decode("utf-8", "replace"),
        "exec_denied": list(task.exec_denied),
    }


def step_to_json(step: StepReply, network: Mapping[str, Sequence[NetRecord]] | None = None
                 ) -> dict[str, Any]:
    """The JSON object of one attempt at a step; with `network` (the timeline's, by task
    name), each task carries its network records whole: {"event": ..., **details}."""
    tasks = [task_to_json(t) for t in step.tasks]
    if network is not None:
        for task, shown in zip(step.tasks, tasks, strict=True):
            shown["network"] = [{"event": r.event, **r.details}
                                for r in network.get(task.name, ())]
    return {
        "run_id": step.run_id,
        "step": step.step,
        "state": str(step.state),
        "reason": step.reason,
        "conflicts": list(step.conflicts),
        "tasks": tasks,
        "channels": dict(step.channels),
        "channels_omitted": dict(step.channels_omitted),
        "versions": dict(step.versions),
        "wall_seconds": step.wall_seconds,
        "created_at": _iso(step.created_at),
        "requested_by": step.requested_by,
        "decided_by": step.decided_by,
        "base_step": step.base_step,
        "read_only": step.read_only,
    }


def step_summary(step: StepReply) -> str:
    """What became of a step, for people: one line, then one line per conflict, e.g.
    "step 3 committed (2 tasks, 0.21 s)" or "step 3 failed: task t2: exited 1"."""
    what = f"step {step.step}"
    reason = printable(step.reason)
    if step.state is StepState.COMMITTED:
        count = len(step.tasks)
        line = f"{what} committed ({count} task{'s' if count != 1 else ''}, "
        line += f"{seconds(step.wall_seconds)})"
        if step.read_only:
            line += "; it changed nothing, so no new checkpoint"
    elif step.state is StepState.FAILED:
        line = f"{what} failed: {reason or 'no reason given'}"
    elif step.state is StepState.PENDING_APPROVAL:
        line = f"{what} pending approval: {reason or 'an approver must decide'}"
    elif step.state is StepState.DISCARDED:
        line = f"{what} discarded: {reason or 'rejected'}"
    else:
        line = f"{what} {_state_words(step.state)}" + (f": {reason}" if reason else "")
    conflicts = "".join(f"  conflict: {printable(c)}\n" for c in step.conflicts)
    omitted = "".join(
        f"  channel {printable(name)}: {size} bytes, left out of the reply (over the message"
        " limit); the next step's tasks see it\n" for name, size in step.channels_omitted.items())
    return line + "\n" + conflicts + omitted


def checkpoint_to_json(checkpoint: Checkpoint) -> dict[str, Any]:
    """The JSON object of one checkpoint."""
    return {
        "step": checkpoint.step,
        "committed_at": _iso(checkpoint.committed_at),
        "layers": checkpoint.layers,
        "versions": dict(checkpoint.versions),
    }


def checkpoints_table(checkpoints: Sequence[Checkpoint]) -> str:
    """A table of checkpoints: STEP, COMMITTED, LAYERS, VERSIONS (`channel=version ...`)."""
    header = ("STEP", "COMMITTED", "LAYERS", "VERSIONS")
    rows = [
        (
            str(c.step),
            _when(c.committed_at),
            str(c.layers),
            printable(" ".join(f"{name}={v}" for name, v in c.versions.items())) or "-",
        )
        for c in checkpoints
    ]
    return _table([header, *rows])


def timeline(steps: Sequence[StepReply], network: TaskRecords | None = None) -> str:
    """Every attempt at a step, oldest first: a heading line (step, state, when, how long, by
    whom), the reason and conflicts, then one line per task (name, outcome, wall time, what
    it changed), why it failed the step, if it did, and its network records (`network`, from
    the audit log; see `TaskRecords`)::

        step 2  failed     2024-05-01 10:00:00Z  1.02 s  requested by uid:1000
          reason: task t2: exited 1
          t1  exited 0  0.10 s  changed a.txt, b.txt, c.txt and 2 more
          t2  exited 1  1.00 s  no changes
              failed: exited 1
              net allowed  api.test 198.18.0.10:443  out 120 B, in 4.0 KiB  0.20 s  closed
              net refused  198.18.0.11:443 tcp  no egress entry allows this destination
              net dropped  udp 2 (packets refused by the kernel, counted)
    """
    headings = [
        (
            f"step {s.step}",
            _state_words(s.state) + (" read-only" if s.read_only else ""),
            _when(s.created_at),
            seconds(s.wall_seconds) if s.wall_seconds else "-",
            _by_whom(s),
        )
        for s in steps
    ]
    heading_lines = _table(headings).splitlines() if steps else []
    out: list[str] = []
    for step, heading in zip(steps, heading_lines, strict=True):
        out.append(heading)
        if step.reason:
            out.append(f"  reason: {printable(step.reason)}")
        out.extend(f"  conflict: {printable(c)}" for c in step.conflicts)
        found = network.of_step(step) if network is not None else {}
        out.extend(_task_lines(step.tasks, found))
    return "".join(line + "\n" for line in out)


def _task_lines(tasks: Sequence[TaskReport],
                network: Mapping[str, Sequence[NetRecord]] | None = None) -> list[str]:
    if not tasks:
        return []
    rows = [
        (
            printable(t.name),
            _task_outcome(t.outcome),
            seconds(t.outcome.wall_seconds) if t.outcome else "-",
            _changes(t),
        )
        for t in tasks
    ]
    lines = []
    indent = " " * (2 + max(len(row[0]) for row in rows) + 2)
    for task, line in zip(tasks, _table(rows).splitlines(), strict=True):
        lines.append(f"  {line}")
        if task.failure:
            lines.append(f"{indent}failed: {printable(task.failure)}")
        if task.exec_denied:
            shown = ", ".join(printable(p) for p in task.exec_denied[:5])
            more = len(task.exec_denied) - 5
            lines.append(f"{indent}exec denied: {shown}" + (f" and {more} more" if more > 0
                                                             else ""))
        records = (network or {}).get(task.name, ())
        lines.extend(f"{indent}{network_line(r)}" for r in records[:NETWORK_SHOWN])
        if len(records) > NETWORK_SHOWN:
            lines.append(f"{indent}and {len(records) - NETWORK_SHOWN} more network records")
    return lines


def _task_outcome(outcome: Outcome | None) -> str:
    if outcome is None:
        return "not run"
    if outcome.summary:
        return printable(outcome.summary)
    if outcome.exited or outcome.signal:
        return _describe(outcome)
    return "-"


def _changes(task: TaskReport) -> str:
    if task.outcome is None:
        return ""
    paths = [printable(p) for p in task.changed_paths]
    if not paths:
        text = "no changes"
    else:
        text = "changed " + ", ".join(paths[:CHANGED_PATHS_SHOWN])
        if len(paths) > CHANGED_PATHS_SHOWN:
            text += f" and {len(paths) - CHANGED_PATHS_SHOWN} more"
    if task.writes:
        text += f"; {task.writes} channel write{'s' if task.writes != 1 else ''}"
    return text


def _by_whom(step: StepReply) -> str:
    parts = []
    if step.requested_by:
        parts.append(f"requested by {printable(step.requested_by)}")
    if step.decided_by:
        parts.append(f"decided by {printable(step.decided_by)}")
    return ", ".join(parts)


def _state_words(state: StepState) -> str:
    if state is StepState.AMBIGUOUS:  # loud: nothing more runs on the run until resolved
        return "AMBIGUOUS"
    return str(state).replace("_", " ")


# --- network records in the timeline ----------------------------------------------------------

#: The audit events the timeline shows under a task (dns.answer is left out: the connection
#: that follows names the name).
NETWORK_EVENTS = ("net.connection", "net.refused", "net.dropped", "dns.refused",
                  "dns.rebinding_refused", "dns.failed")


@dataclass(frozen=True)
class NetRecord:
    """One network record of a task, as the audit log has it."""

    event: str
    details: Mapping[str, Any]


class TaskRecords:
    """A run's network records by the step attempt and task they belong to.

    The audit log knows a task by its id; the timeline by its step and name. A task's
    `exec.allowed` names its step and task; each `step.started` opens an attempt at that step,
    matched to the timeline's attempt with the same step number whose start is the first one
    at or after the attempt was created (an attempt that waited for approval starts after it
    was created; a later attempt is created after the earlier one started). Built from the
    run's records in log order by `add`.
    """

    def __init__(self) -> None:
        # (step number, when its step.started was recorded) -> task name -> records
        self.started: dict[tuple[int, datetime], dict[str, list[NetRecord]]] = {}
        self._tasks: dict[str, tuple[tuple[int, datetime], str]] = {}  # id -> (attempt, name)
        self._last: dict[int, datetime] = {}  # step number -> its latest step.started

    def add(self, event: str, task_id: str, when: datetime, details: Mapping[str, Any]
            ) -> None:
        """Takes the next record of the run (in log order)."""
        step = details.get("step")
        if event == "step.started" and isinstance(step, int):
            self._last[step] = when
            self.started[(step, when)] = {}
        elif event == "exec.allowed" and isinstance(step, int) and step in self._last:
            self._tasks[task_id] = ((step, self._last[step]), str(details.get("task", "")))
        elif event in NETWORK_EVENTS and task_id in self._tasks:
            attempt, name = self._tasks[task_id]
            self.started[attempt].setdefault(name, []).append(NetRecord(event, details))

    def of_step(self, step: StepReply) -> Mapping[str, Sequence[NetRecord]]:
        """Task name -> records, for one attempt of the timeline."""
        number = step.step + 1 if step.read_only else step.step  # read-only: the head it ran on
        starts = sorted(t for n, t in self.started if n == number
                        and (step.created_at is None or t >= step.created_at))
        return self.started[(number, starts[0])] if starts else {}


def network_line(record: NetRecord) -> str:
    """One network record as a line of the timeline (printable: the agent chose the names)."""
    d = record.details
    destination = str(d.get("destination", "?"))
    if ":" in destination:  # IPv6: its port after brackets
        destination = f"[{destination}]"
    where = (f"{destination}:{d['port']}" if "port" in d else destination)
    if d.get("call") == "socket":  # refused in the worker before it had a destination
        where = "socket()"
    name = f"{d['name']} " if d.get("name") else ""
    if record.event == "net.connection":
        where += " udp" if d.get("protocol") == "udp" else ""  # TCP unless said
        text = (f"net allowed  {name}{where}  out {human_bytes(int(d.get('bytes_out', 0)))},"
                f" in {human_bytes(int(d.get('bytes_in', 0)))}"
                f"  {seconds(float(d.get('seconds', 0)))}  {d.get('result', '')}")
    elif record.event == "net.dropped":
        counts = ", ".join(f"{p} {n}" for p, n in sorted(dict(d.get("packets", {})).items()))
        text = f"net dropped  {counts} (packets refused by the kernel, counted)"
    elif record.event == "net.refused":
        query = f" query {d['query']}" if d.get("query") else ""
        text = f"net refused  {name}{where} {d.get('protocol', '')}{query}  {d.get('reason', '')}"
    elif record.event == "dns.rebinding_refused":
        text = (f"dns refused  {d.get('name', '')} -> {', '.join(d.get('addresses', []))}"
                f"  {d.get('reason', '')}")
    else:  # dns.refused, dns.failed
        text = f"dns {record.event[4:]}  {d.get('name', '')}  {d.get('reason', '')}"
    return printable(text.rstrip())

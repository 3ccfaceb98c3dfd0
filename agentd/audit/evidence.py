"""Evidence for a stage gate, computed from the audit log alone.

A gate's criteria (runs and steps completed at a stage, the failure rate, zero violations, a
rollback drill, the policy unchanged) are facts about what an agent did, and every one of them
is in the log: anyone holding the log directory and its public key recomputes the same figures
(`agentctl stage evidence AGENT --audit DIR`), after `verify` has checked every record against
the signed tree heads. Only records covered by the last signed head count, so the figures are
those of a signed state of the log; each figure carries the record indexes behind it.

Which run belongs to which agent and stage comes from its `run.created` record (a fork inherits
its source's); a step counts by its `step.committing`, `step.unchanged` (committed, changing
nothing) or `step.failed`; a violation is an exec
the policy refused (`exec.refused`, PERMISSION_DENIED: a malformed call is not one), an exec the
kernel refused (`exec.denied`) or a task stopped for a limit (`exec.exited` with a memory, pids,
timeout, output or quota stop, or an OOM kill). The daemon demotes on the same events
(agentd/scheduler/stages.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentd.audit import segments
from agentd.audit.signing import TreeHead
from agentd.audit.verify import verify

# Stops that mean a task hit one of its policy's limits: a violation, here and for demotion
# (agentd/scheduler/tasks.py).
LIMIT_STOPS = ("memory", "pids", "timeout", "output", "quota")


@dataclass
class Evidence:
    """What one agent did at one stage, each figure with the indexes of its records."""

    agent: str
    stage: str
    runs: list[int] = field(default_factory=list)
    runs_closed: list[int] = field(default_factory=list)
    steps_committed: list[int] = field(default_factory=list)
    steps_failed: list[int] = field(default_factory=list)
    violations: list[tuple[int, str, str]] = field(default_factory=list)
    rollbacks: list[int] = field(default_factory=list)
    policy_hashes: dict[str, int] = field(default_factory=dict)  # hash -> first index
    executables: dict[str, int] = field(default_factory=dict)  # program run -> tasks
    # Audit mode (stage.shadow): calls the next stage would refuse, and would newly allow.
    next_refuses: list[int] = field(default_factory=list)
    next_allows: list[int] = field(default_factory=list)
    first_time: str = ""
    last_time: str = ""

    @property
    def steps(self) -> int:
        return len(self.steps_committed) + len(self.steps_failed)

    @property
    def failure_rate(self) -> float:
        return len(self.steps_failed) / self.steps if self.steps else 0.0

    def lines(self) -> list[str]:
        def at(indexes: list[int]) -> str:
            shown = ", ".join(map(str, indexes[:8])) + (" ..." if len(indexes) > 8 else "")
            return f" (records {shown})" if indexes else ""

        out = [f"{self.agent} at {self.stage}: {self.first_time or '-'} .. "
               f"{self.last_time or '-'}",
               f"  runs: {len(self.runs)} created{at(self.runs)}, {len(self.runs_closed)} "
               f"closed{at(self.runs_closed)}",
               f"  steps: {len(self.steps_committed)} committed{at(self.steps_committed)}, "
               f"{len(self.steps_failed)} failed{at(self.steps_failed)}; failure rate "
               f"{self.failure_rate:.1%}",
               f"  violations: {len(self.violations)}"]
        out += [f"    record {i}: {event}: {what}" for i, event, what in self.violations[:20]]
        out.append(f"  rollback drills: {len(self.rollbacks)}{at(self.rollbacks)}")
        if self.next_refuses or self.next_allows:
            out.append(f"  audit mode, the next stage would refuse {len(self.next_refuses)} "
                       f"call(s){at(self.next_refuses)} and newly allow "
                       f"{len(self.next_allows)}{at(self.next_allows)}")
        out.append("  policy versions: " + (", ".join(
            f"{h[:19]} (from record {i})" for h, i in self.policy_hashes.items()) or "none"))
        return out


def read_records(directory: Path, limit: int | None = None, *,
                 containing: bytes | tuple[bytes, ...] = b"") -> Iterator[dict[str, Any]]:
    """The log's records in order, among the first `limit` (all if None); with `containing`,
    only lines with those bytes (any of them) are parsed (a cheap pre-filter; check the
    parsed record)."""
    wanted = containing if isinstance(containing, tuple) else (containing,)
    count = 0
    for number in segments.list_segments(directory):
        with open(segments.segment_path(directory, number), "rb") as f:
            for line in f:
                if limit is not None and count >= limit:
                    return
                if line.endswith(b"\n"):
                    count += 1
                    if any(w in line for w in wanted):
                        yield json.loads(line)


class Unverified(Exception):
    """The log does not verify: no evidence is computed from it."""


@dataclass(frozen=True)
class VerifiedEvidence:
    head: TreeHead | None
    """The last signed head; only the records it covers were counted."""
    stages: dict[str, Evidence]

    @property
    def size(self) -> int:
        return self.head.tree_size if self.head is not None else 0


def from_verified_log(directory: Path, agent: str, public_key: Path | None = None
                      ) -> VerifiedEvidence:
    """`agent`'s evidence per stage from a log directory, after `verify` has checked it with
    `public_key` (default: the directory's own); Unverified, naming the first problem, if not."""
    report = verify(directory, public_key=public_key, allow_unsigned_tail=True)
    if not report.ok:
        raise Unverified(str(report.first))
    head = report.last_head
    size = head.tree_size if head is not None else 0
    return VerifiedEvidence(head, collect(read_records(directory, limit=size), agent))


def collect(records: Iterable[Mapping[str, Any]], agent: str) -> dict[str, Evidence]:
    """`agent`'s evidence per stage, from `records` in log order."""
    runs: dict[str, str] = {}  # run id -> stage, for this agent's runs
    found: dict[str, Evidence] = {}

    def of(stage: str) -> Evidence:
        return found.setdefault(stage, Evidence(agent, stage))

    for rec in records:
        event, run_id, index = rec["event"], str(rec.get("run_id") or ""), int(rec["index"])
        details = rec.get("details") or {}
        if event == "run.created" and details.get("agent") == agent:
            runs[run_id] = stage = str(details.get("stage"))
            evidence = of(stage)
            evidence.runs.append(index)
            policy_hash = str(details.get("policy_hash", ""))
            evidence.policy_hashes.setdefault(policy_hash, index)
        elif event == "run.forked" and details.get("from_run") in runs:
            runs[run_id] = stage = runs[details["from_run"]]
            of(stage).runs.append(index)
        if run_id not in runs:
            continue
        evidence = of(runs[run_id])
        evidence.first_time = evidence.first_time or str(rec.get("time", ""))
        evidence.last_time = str(rec.get("time", ""))
        if event == "run.closed":
            evidence.runs_closed.append(index)
        elif event in ("step.committing", "step.unchanged"):
            evidence.steps_committed.append(index)
        elif event == "step.failed":
            evidence.steps_failed.append(index)
        elif event == "run.rolled_back":
            evidence.rollbacks.append(index)
        elif event == "exec.allowed":
            exe = str(details.get("executable", ""))
            evidence.executables[exe] = evidence.executables.get(exe, 0) + 1
        elif event == "stage.shadow":
            if details.get("next") in ("refuse", "approval", "invalid"):
                evidence.next_refuses.append(index)
            elif details.get("next") == "allow":
                evidence.next_allows.append(index)
        elif event == "exec.refused" and details.get("error") == "PERMISSION_DENIED":
            evidence.violations.append((index, event, str(details.get("reason", ""))[:160]))
        elif event == "exec.denied":
            evidence.violations.append((index, event, str(details.get("path", ""))[:160]))
        elif event == "exec.exited" and (details.get("stop_reason") in LIMIT_STOPS
                                         or details.get("oom_killed")):
            evidence.violations.append(
                (index, event, f"stopped for {details.get('stop_reason') or 'memory'}"))
    return found

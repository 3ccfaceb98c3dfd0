"""Every criterion of a stage gate, met and unmet, on evidence as the audit log gives it.

The daemon tests (test_stages.py) judge the count criteria on a real log; the time at the
stage and the policy-unchanged window need hours or a second policy version, so they are
judged here on the same `criteria` function with evidence built as `collect` builds it.
"""

from __future__ import annotations

import pytest

from agentd.audit import record
from agentd.audit.evidence import Evidence, collect
from agentd.policy.model import Gate
from agentd.scheduler.stages import criteria

ENTERED = "2026-12-01T00:00:00.000000Z"
START = record.parse_time(ENTERED).timestamp()


def evidence(**figures: object) -> Evidence:
    found = Evidence("a", "pilot")
    for name, value in figures.items():
        setattr(found, name, value)
    return found


def judged(gate: Gate, found: Evidence, *, hours: float = 0.0,
           policy_hash: str = "h1") -> dict[str, bool]:
    return {c.name: c.met for c in criteria(gate, found, entered_time=ENTERED,
                                             now=START + hours * 3600, policy_hash=policy_hash)}


GATE = Gate(min_runs=2, min_steps=4, min_time=7200.0, max_failure_rate=0.25,
            max_violations=0, rollback_drills=1, policy_unchanged=True)
MEETS: dict[str, object] = {
    "runs": [1, 2], "steps_committed": [3, 4, 5, 6], "steps_failed": [], "violations": [],
    "rollbacks": [7], "policy_hashes": {"h1": 1}}


def test_all_met() -> None:
    assert set(judged(GATE, evidence(**MEETS), hours=3).values()) == {True}


@pytest.mark.parametrize(("unmet", "change", "hours", "policy_hash"), [
    ("runs", {"runs": [1]}, 3, "h1"),
    ("steps", {"steps_committed": [3, 4, 5]}, 3, "h1"),
    ("failure rate", {"steps_committed": [3, 4], "steps_failed": [5, 6]}, 3, "h1"),
    ("violations", {"violations": [(8, "exec.refused", "curl")]}, 3, "h1"),
    ("rollback drills", {"rollbacks": []}, 3, "h1"),
    ("time at the stage", {}, 1.5, "h1"),
    # A second version inside the window (a run created under another policy) ...
    ("policy unchanged", {"policy_hashes": {"h1": 1, "h2": 9}}, 3, "h1"),
    # ... or the policy in force now differs from the one the window ran under.
    ("policy unchanged", {}, 3, "h2"),
])
def test_each_unmet_alone(unmet: str, change: dict[str, object], hours: float,
                          policy_hash: str) -> None:
    verdict = judged(GATE, evidence(**{**MEETS, **change}), hours=hours,
                     policy_hash=policy_hash)
    assert {name for name, met in verdict.items() if not met} == {unmet}


def test_time_is_counted_from_entering_the_stage() -> None:
    [held] = [c for c in criteria(GATE, evidence(**MEETS), entered_time=ENTERED,
                                  now=START + 7200, policy_hash="h1")
              if c.name == "time at the stage"]
    assert held.met
    assert held.figure == "2.00 h of at least 2.00 h"


def test_policy_versions_come_from_the_runs_records() -> None:
    """The window's versions are the policy hashes its runs were created under."""
    records = [
        {"index": 1, "event": "run.created", "run_id": "r1",
         "details": {"agent": "a", "stage": "pilot", "policy_hash": "h1"}},
        {"index": 2, "event": "run.created", "run_id": "r2",
         "details": {"agent": "a", "stage": "pilot", "policy_hash": "h2"}},
    ]
    found = collect(records, "a")["pilot"]
    assert found.policy_hashes == {"h1": 1, "h2": 2}
    assert not judged(Gate(policy_unchanged=True, min_runs=0, min_steps=0), found,
                      policy_hash="h2")["policy unchanged"]
    assert judged(Gate(policy_unchanged=True, min_runs=0, min_steps=0),
                  collect(records[1:], "a")["pilot"], policy_hash="h2")["policy unchanged"]


def test_criteria_a_gate_does_not_ask_for_are_not_listed() -> None:
    names = set(judged(Gate(), evidence()))
    assert "time at the stage" not in names
    assert "policy unchanged" not in names

"""A pytest plugin for the VM: one line per test outcome, in a file the console can carry.

The host reads the guest only through its serial console, so the suite's verdict has to be
plain lines between markers (see run-suite.sh). pytest's own terminal output is too loose to
parse reliably (wrapped lines, kernel messages interleaved on the same console), and junit
XML would need a parser on the host for little gain.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

_outcomes: dict[str, str] = {}
_failures: list[str] = []


def _record(nodeid: str, outcome: str, text: str = "") -> None:
    # The first failure of a test wins (a failing teardown after a failing call is one failure).
    if _outcomes.get(nodeid) in ("FAILED", "ERROR"):
        return
    _outcomes[nodeid] = outcome
    if text:
        _failures.append(f"_____ {nodeid} ({outcome}) _____\n{text}\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    nodeid = report.nodeid.replace(" ", "_")
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            _record(nodeid, "XFAIL" if report.skipped else "FAILED", report.longreprtext)
        elif report.passed:
            _record(nodeid, "PASSED")
        elif report.skipped:
            _record(nodeid, "SKIPPED")
        else:
            _record(nodeid, "FAILED", report.longreprtext)
    elif report.failed:
        _record(nodeid, "ERROR", report.longreprtext)
    elif report.skipped and report.when == "setup":
        _record(nodeid, "SKIPPED")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _record(report.nodeid.replace(" ", "_") or "collection", "ERROR", report.longreprtext)


def pytest_sessionfinish(session: Any) -> None:
    with open(os.environ.get("AGENTD_VM_RESULTS", "results"), "w") as f:
        for nodeid, outcome in _outcomes.items():
            f.write(f"RESULT {outcome} {nodeid}\n")
    with open(os.environ.get("AGENTD_VM_FAILURES", "failures"), "w") as f:
        f.writelines(_failures)

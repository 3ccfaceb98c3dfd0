"""`agentctl policy test`: unit tests for a policy, as YAML cases (in the spirit of `opa test`).

A case is a tool call and the decision the reviewer expects: `allow`, `approval` (allowed, but
a person must approve the step), `refuse` (the policy says no) or `invalid` (malformed,
whatever the policy). Each is decided by `decide_call`, the function the scheduler plans a
task with, against the effective policy at the case's stage (after the stage ceiling), so a
case passes here exactly when the daemon would decide the same:

    apiVersion: agentd/v1
    kind: PolicyTest
    policy: ../shell-helper.yaml      # relative to this file
    stage: prototype                  # the default for the cases below
    cases:
      - name: a shell may list the workspace
        request: {argv: [/bin/sh, -c, ls]}
        expect: allow
      - name: no network tools
        request: {argv: [/usr/bin/curl, https://example.org]}
        expect: refuse
        rule: exec.allow              # optional: the field whose rule must decide it

The report says which rules the cases exercised (exec.allow entries, approval triggers, the
fields that refused), so a reviewer sees what no case covers. The file is validated like a
policy: an unknown field or a bad value names the file, line and field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agentd.policy.decide import VerdictKind, judge
from agentd.policy.effective import EffectivePolicy
from agentd.policy.model import Document
from agentd.policy.paths import matching_exec_entry

Stage = Literal["prototype", "sandbox", "pilot", "production"]
Expect = VerdictKind


class CaseRequest(BaseModel):
    """The tool call, as a client sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    argv: list[str] = Field(min_length=1)
    """The command; argv[0] an absolute path or a name found on the worker's PATH."""
    env: dict[str, str] = Field(default_factory=dict)
    """Variables the call asks for (env.allow decides)."""
    cwd: str = ""
    """The working directory in the worker; "" is the workspace (or /tmp without one)."""
    timeout: float = Field(default=0.0, ge=0)
    """Seconds; 0 is the policy's limits.wall_time."""


class Case(BaseModel):
    """One call and the decision expected of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    """What the case is about, as the report shows it."""
    stage: Stage | None = None
    """Overrides the file's stage."""
    request: CaseRequest
    expect: Expect
    """allow, approval, refuse or invalid."""
    rule: str | None = None
    """The policy field whose rule must decide a refusal (e.g. exec.allow, env.allow)."""


class PolicyTests(Document):
    """A file of cases for one policy."""

    api_version: Literal["agentd/v1"] = Field(alias="apiVersion")
    kind: Literal["PolicyTest"]
    policy: str = Field(min_length=1)
    """The policy file, relative to this file."""
    stages: str = "stages.yaml"
    """The stage ceilings, relative to the policy file."""
    stage: Stage = "prototype"
    """The stage of every case that names none."""
    cases: list[Case] = Field(min_length=1, max_length=10_000)


@dataclass
class Outcome:
    case: Case
    stage: str
    got: Expect
    detail: str
    rule: str = ""

    @property
    def passed(self) -> bool:
        return self.got == self.case.expect and (
            self.case.rule is None or self.case.rule in self.rule)


@dataclass
class Coverage:
    """What the cases of one stage exercised."""

    exec_entries: set[str] = field(default_factory=set)
    triggers: set[str] = field(default_factory=set)
    refused_by: set[str] = field(default_factory=set)


def run_case(eff: EffectivePolicy, case: Case, coverage: Coverage) -> Outcome:
    """Decides `case` as the scheduler would, and notes what it exercised."""
    request = case.request
    verdict = judge(eff, request.argv[0], request.env, request.cwd, request.timeout)
    if verdict.verdict == "refuse":
        coverage.refused_by.add(_field_of(verdict.rule))
    if verdict.executable:
        entry = matching_exec_entry(eff.exec_allow, verdict.executable)
        if entry is not None:
            coverage.exec_entries.add(entry)
    coverage.triggers.update(verdict.triggers)
    return Outcome(case, eff.stage, verdict.verdict, verdict.detail, verdict.rule)


def _field_of(rule: str) -> str:
    """"file:12 stages.pilot.exec.allow" -> "exec.allow" (the ceiling's rules alike)."""
    for token in rule.split():
        if token.startswith("stages.") and token.count(".") >= 2:
            return token.split(".", 2)[2]
    return rule


def policy_path(tests: PolicyTests) -> Path:
    return Path(os.path.normpath(Path(tests.source).parent / tests.policy))


def coverage_lines(eff: EffectivePolicy, coverage: Coverage) -> list[str]:
    """What a stage's cases left unexercised, for the report."""
    untested = [e for e in eff.exec_allow if e not in coverage.exec_entries]
    lines = [f"  {eff.stage}: exec.allow: {len(eff.exec_allow) - len(untested)} of "
             f"{len(eff.exec_allow)} entries exercised"
             + (f"; none for: {', '.join(untested[:12])}" + (" ..." if len(untested) > 12
                                                              else "") if untested else "")]
    if eff.approval_required_for:
        missed = [t for t in eff.approval_required_for if t not in coverage.triggers]
        lines.append(f"  {eff.stage}: approval.required_for: "
                     f"{len(eff.approval_required_for) - len(missed)} of "
                     f"{len(eff.approval_required_for)} triggers exercised"
                     + (f"; none for: {', '.join(missed)}" if missed else ""))
    if coverage.refused_by:
        lines.append(f"  {eff.stage}: refusals exercised by: "
                     + ", ".join(sorted(coverage.refused_by)))
    return lines

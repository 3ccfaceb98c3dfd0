"""`agentctl policy lint`: risky grants, each with its line and a one-line reason.

Validation (`policy check`) says whether a file means something; lint says whether what it
means is wise. It reads the effective policy of every stage the file reaches (after
inheritance and the stage ceiling, so a grant the ceiling removes is not reported) and points
at the line that wrote each risky grant. Findings, by rule:

    interpreter-unapproved  a shell or interpreter at pilot or production with no approval
                            trigger covering it: it runs whatever code it is handed
    tree-grant              a whole directory in exec.allow: every program in it, today's and
                            tomorrow's
    runs-what-it-writes     exec.allow under /workspace or /tmp: the agent can write a program
                            and run it
    trigger-bypassable      an exec: approval trigger while an interpreter is allowed: the
                            interpreter can do what the program does without running it
    user-namespace          a user namespace without an approval trigger: more kernel surface
    missing-limit           a limit the file never writes: the default applies silently
    egress-wildcard         a *.domain egress entry: every name under it, today's and
                            tomorrow's, including ones someone else can create
    egress-wide-cidr        an egress network wider than /24: hundreds of hosts
    unused-grant            (with the usage of an audit log) an exec.allow entry no task of
                            the agent ran at that stage in the log's window: drop it

A finding is waived, deliberately and visibly, by a comment on its line naming the rule and
why: `- /usr/bin/python3  # lint: allow interpreter-unapproved (the agent's job is Python)`.
Waived findings are still printed, marked as such, and do not fail the lint.

Not a rule: a writable host path, because a policy cannot grant one (the host is bound
read-only; only the run's workspace and a private /tmp are writable, see `runs-what-it-writes`).
A grant unused in an evidence window needs the audit log: `usage` (per stage, the programs the
agent's tasks ran, from agentd/audit/evidence.py) turns that rule on.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from agentd.policy.approvals import approval_triggers
from agentd.policy.effective import RULE_FIELDS, EffectivePolicy, attribute_of
from agentd.policy.egress import WIDE_PREFIX, parse_rule
from agentd.policy.explain import is_interpreter
from agentd.policy.model import STAGES, Policy, StageCeilings
from agentd.policy.paths import matching_exec_entry
from agentd.policy.sizes import format_duration, format_size
from agentd.policy.stages import effective_policy

_PRODUCTION_LIKE = ("pilot", "production")
_WAIVER = re.compile(r"#\s*lint:\s*allow\s+([a-z, -]+?)\s*(?:\((.*)\))?\s*$")
_WRITABLE = ("/workspace", "/tmp")


@dataclass(frozen=True)
class Finding:
    source: str
    line: int | None
    stages: tuple[str, ...]
    rule: str
    field: str
    message: str
    waived: str = ""  # the waiver comment, if the line carries one for this rule

    def __str__(self) -> str:
        at = f"{self.source}:{self.line}" if self.line else self.source
        text = f"{at}: {', '.join(self.stages)}: {self.field}: {self.message} [{self.rule}]"
        return f"{text} (waived: {self.waived})" if self.waived else text


def lint(policy: Policy, ceilings: StageCeilings,
         usage: Mapping[str, Mapping[str, int]] | None = None) -> list[Finding]:
    """Every finding of `policy`, once per line and rule with the stages it holds at, in file
    order; waived ones marked. `usage`: stage -> programs the agent ran there (and how often),
    for `unused-grant`; a stage without usage is not judged on it."""
    found: dict[tuple[str, str, int | None, str], list[Finding]] = {}
    reported_limits: set[str] = set()
    for stage in STAGES:
        resolved = policy.resolve(stage)
        if resolved is None:
            continue
        eff = effective_policy(policy, stage, ceilings)
        used = usage.get(stage) if usage is not None else None
        for finding in _stage_findings(policy, eff, resolved.origin, reported_limits, used):
            key = (finding.rule, finding.message, finding.line, finding.field)
            found.setdefault(key, []).append(finding)
    lines = _source_lines(policy.source)
    merged = []
    for group in found.values():
        first = group[0]
        merged.append(dataclasses.replace(
            first, stages=tuple(s for f in group for s in f.stages),
            waived=_waiver(lines, first.line, first.rule)))
    return sorted(merged, key=lambda f: (f.line or 0, f.rule))


def _source_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _waiver(lines: list[str], line: int | None, rule: str) -> str:
    """The reason of a `# lint: allow RULE (reason)` comment on `line`, or ""."""
    if line is None or not 0 < line <= len(lines):
        return ""
    match = _WAIVER.search(lines[line - 1])
    if match is None or rule not in match.group(1).replace(",", " ").split():
        return ""
    return match.group(2).strip() or "no reason given"


def _stage_findings(policy: Policy, eff: EffectivePolicy, origin: Mapping[str, str],
                    reported_limits: set[str], used: Mapping[str, int] | None
                    ) -> list[Finding]:
    stage, out = eff.stage, []

    def at(field: str, value: str | None = None) -> int | None:
        """The line that wrote `field` (the item holding `value`, for a list) at this stage."""
        section = origin.get(field)
        if section is None:
            return policy.line(f"stages.{stage}") or policy.line("stages")
        if value is not None:
            rules = getattr(policy.stages, section)
            items = _list_of(rules, field)
            if value in items:
                return policy.line(f"stages.{section}.{field}[{items.index(value)}]")
        return policy.line(f"stages.{section}.{field}")

    def add(rule: str, field: str, line: int | None, message: str) -> None:
        out.append(Finding(policy.source, line, (stage,), rule, field, message))

    interpreters = [e for e in eff.exec_allow if is_interpreter(e)]
    for entry in eff.exec_allow:
        line = at("exec.allow", entry)
        if entry.endswith("/"):
            add("tree-grant", "exec.allow", line,
                f"{entry} grants every program under it, present and future; list programs")
        if any(entry == w or entry.startswith(w + "/") for w in _WRITABLE):
            add("runs-what-it-writes", "exec.allow", line,
                f"{entry} is writable by the agent: it can write a program there and run it")
        if (stage in _PRODUCTION_LIKE and is_interpreter(entry)
                and not approval_triggers(eff, [_sample(entry)])):
            add("interpreter-unapproved", "exec.allow", line,
                f"{entry} runs any code it is handed, with no approval trigger at this stage;"
                f" add approval.required_for: [exec:{entry}], drop it, or waive it with a "
                "reason")
    if used is not None:
        tasks = sum(used.values())
        for entry in eff.exec_allow:
            if not any(matching_exec_entry([entry], exe) for exe in used):
                add("unused-grant", "exec.allow", at("exec.allow", entry),
                    f"{entry}: no task ran it at this stage in the log's window ({tasks} "
                    "tasks); a grant nobody uses is reach for nothing: drop it")
    for trigger in eff.approval_required_for:
        target = trigger.removeprefix("exec:")
        if trigger.startswith("exec:") and interpreters:
            others = [i for i in interpreters if os.path.realpath(i.rstrip("/"))
                      != os.path.realpath(target.rstrip("/"))]
            if others:
                add("trigger-bypassable", "approval.required_for",
                    at("approval.required_for", trigger),
                    f"{trigger}: an allowed interpreter ({others[0]}) can do what {target} "
                    "does without running it; the approval guards the program, not the effect")
    for entry in eff.egress:
        rule = parse_rule(entry)
        network = rule.network
        if rule.kind == "wildcard":
            add("egress-wildcard", "network.egress", at("network.egress", entry),
                f"{entry} allows every name under {rule.target[2:]}, including names created"
                " later; list the hosts the agent needs")
        elif network is not None and network.prefixlen < WIDE_PREFIX:
            add("egress-wide-cidr", "network.egress", at("network.egress", entry),
                f"{entry} allows {network.num_addresses} addresses; narrow it to the hosts"
                " the agent needs")
    if eff.user_namespace and "user_namespace" not in eff.approval_required_for:
        add("user-namespace", "user_namespace", at("user_namespace"),
            "a user namespace exposes more of the kernel to the agent; require approval "
            "(approval.required_for: [user_namespace]) or leave it off")
    for field in RULE_FIELDS:
        if field.startswith("limits.") and field not in origin and field not in reported_limits:
            reported_limits.add(field)
            add("missing-limit", field, at(field),
                f"not set in the file: the default ({_value(eff, field)}) applies; write it "
                "down so a reviewer sees it")
    return out


def _list_of(rules: object, field: str) -> list[str]:
    value: object = rules
    for part in field.split("."):
        value = getattr(value, part, None)
    return list(value) if isinstance(value, (list, tuple)) else []


def _sample(entry: str) -> str:
    """A program the entry grants, for the approval check (a tree: something inside it)."""
    return entry + "sh" if entry.endswith("/") else entry


def _value(eff: EffectivePolicy, field: str) -> str:
    attribute = attribute_of(field)
    value = getattr(eff, attribute, "?")
    if attribute.endswith("_bytes"):
        return format_size(int(value))
    if attribute == "wall_seconds":
        return format_duration(float(value))
    return f"{value:g}" if isinstance(value, float) else str(value)

"""The two documents in `policies/`: an agent's Policy and the host's StageCeilings.

A Policy declares a section for some of the four stages. A stage's rules are its own section
laid over the nearest lower declared one (prototype < sandbox < pilot < production):
mappings merge key by key, lists and scalars replace. The alternatives were no inheritance
(every stage spelled out: long files whose differences a reviewer must diff by eye) and
inheriting from every lower stage in turn; since each declared section already carries what
it inherited, the two are the same, and "nearest lower" is the simpler thing to explain. A
stage with no declared section at or below it is not available at all: deny by default.

Each document remembers the file it came from and the line of every key (`line()`), so a
refusal can name the line of the rule that decided it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from agentd.policy.rules import CeilingRules, StageRules
from agentd.policy.sizes import Duration

STAGES: Final[tuple[str, ...]] = ("prototype", "sandbox", "pilot", "production")
API_VERSION: Final = "agentd/v1"
NAME_PATTERN: Final = r"^[a-z][a-z0-9-]{0,62}$"
_NAME = re.compile(NAME_PATTERN)


class ConflictingRulesError(ValueError):
    """Problems found across fields or stages; each names its own field below `stages`.

    Raised inside validation so that pydantic reports it, and the loader turns each
    (field, message) pair into its own located error.
    """

    def __init__(self, issues: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in issues))
        self.issues = tuple(issues)


def _check_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid policy name; use 1-63 lower-case letters, digits and"
            " '-', starting with a letter (e.g. cve-triage)"
        )
    return value


def _section_not_null(value: Any) -> Any:
    if value is None:
        raise ValueError(
            "the stage section is empty; write {} to declare the stage with the safe"
            " defaults, or remove the stage"
        )
    return value


class Document(BaseModel):
    """A validated file; knows its source path and the line of each key."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    _source: str = PrivateAttr(default="<memory>")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> str:
        """The path the document was loaded from, as given to the loader."""
        return self._source

    def line(self, field: str) -> int | None:
        """The 1-based line of dotted `field` ("stages.pilot.limits"), if it was written."""
        return self._lines.get(field)

    def where(self, field: str, *, fallback: str | None = None) -> str:
        """`"<file>:<line> <field>"`: where `field` is written, for notes and refusals.

        When `field` is not in the file (a default applies), point at `fallback` instead and
        say so.
        """
        line = self.line(field)
        if line is not None:
            return f"{self._source}:{line} {field}"
        anchor = self.line(fallback) if fallback else None
        at = self._source if anchor is None else f"{self._source}:{anchor}"
        return f"{at} {field} (default)"

    def attach(self, source: str, lines: Mapping[str, int]) -> None:
        """Record where the document came from; called once, by the loader."""
        if self._lines:
            raise RuntimeError(f"{type(self).__name__} from {self._source} is already attached")
        self._source = source
        self._lines = dict(lines)


@dataclass(frozen=True)
class ResolvedStage:
    """A stage's rules after inheritance, and which declared section wrote each field."""

    stage: str
    base: str
    """The nearest declared stage at or below `stage` (the section that is in force)."""
    rules: StageRules
    origin: Mapping[str, str]
    """Dotted field within the stage ("limits.memory", "env.set.LANG") -> declaring stage."""


def _merge(
    into: dict[str, Any], written: Mapping[str, Any], stage: str, origin: dict[str, str], at: str
) -> None:
    """Lay `written` over `into`: mappings merge key by key, lists and scalars replace."""
    for key, value in written.items():
        path = f"{at}{key}"
        origin[path] = stage
        current = into.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            _merge(current, value, stage, origin, path + ".")
        elif isinstance(value, Mapping):
            into[key] = {}
            _merge(into[key], value, stage, origin, path + ".")
        else:
            into[key] = value


class PolicyStages(BaseModel):
    """The stages an agent is declared for; at least one."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    prototype: StageRules | None = None
    """The first stage: no network, read-only system directories, tight limits."""
    sandbox: StageRules | None = None
    """Inherits from prototype when that is declared."""
    pilot: StageRules | None = None
    """Inherits from the nearest lower declared stage."""
    production: StageRules | None = None
    """Inherits from the nearest lower declared stage."""

    _not_null = field_validator(*STAGES, mode="before")(_section_not_null)

    def declared(self) -> tuple[str, ...]:
        """The stages that have their own section, lowest first."""
        return tuple(stage for stage in STAGES if getattr(self, stage) is not None)

    def resolve(self, stage: str) -> ResolvedStage | None:
        """The rules in force at `stage`, or None when no section is declared at or below it."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        merged: dict[str, Any] = {}
        origin: dict[str, str] = {}
        base = None
        for candidate in STAGES[: STAGES.index(stage) + 1]:
            section: StageRules | None = getattr(self, candidate)
            if section is not None:
                _merge(merged, section.model_dump(exclude_unset=True), candidate, origin, "")
                base = candidate
        if base is None:
            return None
        rules = StageRules.model_validate(merged)
        return ResolvedStage(stage=stage, base=base, rules=rules, origin=origin)

    @model_validator(mode="after")
    def _check(self) -> PolicyStages:
        if not self.declared():
            raise ValueError(
                "no stage is declared; add at least one of " + ", ".join(STAGES) + " (e.g."
                " prototype: {exec: {allow: [/bin/sh]}})"
            )
        # (field, name) -> message; an inherited env.log is reported once, at its first stage.
        issues: dict[tuple[str, str], str] = {}
        for stage in self.declared():
            resolved = self.resolve(stage)
            assert resolved is not None  # declared, so it resolves
            env = resolved.rules.env
            field = f"{resolved.origin.get('env.log', stage)}.env.log"
            for name in env.log:
                if name not in env.set and name not in env.allow:
                    issues.setdefault(
                        (field, name),
                        f"{name} is in env.log but neither in env.set nor env.allow at stage"
                        f" {stage}; env.log may only name variables the worker can have",
                    )
        if issues:
            raise ConflictingRulesError([(field, msg) for (field, _), msg in issues.items()])
        return self


class Policy(Document):
    """An agent's capabilities, per stage. Load with `agentd.policy.load_policy`."""

    api_version: Literal["agentd/v1"] = Field(alias="apiVersion")
    """Always agentd/v1."""
    kind: Literal["Policy"]
    """Always Policy."""
    name: Annotated[str, BeforeValidator(_check_name)] = Field(
        json_schema_extra={"pattern": NAME_PATTERN}
    )
    """The policy's name: 1-63 lower-case letters, digits and '-', starting with a letter."""
    description: str = Field(default="", max_length=4096)
    """Free text for reviewers."""
    stages: PolicyStages
    """What the agent may do at each stage; each is clamped by the host's ceiling."""

    def declared_stages(self) -> tuple[str, ...]:
        """The stages with their own section, lowest first."""
        return self.stages.declared()

    def resolve(self, stage: str) -> ResolvedStage | None:
        """The rules at `stage` after inheritance (before the ceiling), or None if absent."""
        return self.stages.resolve(stage)


class CeilingStages(BaseModel):
    """A ceiling for each of the four stages; none may be left out."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    prototype: CeilingRules
    """The tightest stage."""
    sandbox: CeilingRules
    """Wider than prototype."""
    pilot: CeilingRules
    """Wider than sandbox."""
    production: CeilingRules
    """The most generous stage."""


DemotionEvent = Literal["violation", "quarantine", "failure"]


class Gate(BaseModel):
    """The conditions to enter a stage, judged on the evidence of the stage below since the
    agent entered it (agentd/audit/evidence.py), and what drops an agent out of it again."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    min_runs: int = Field(default=1, ge=0, le=1_000_000, strict=True)
    """Runs created at the stage below."""
    min_steps: int = Field(default=5, ge=0, le=100_000_000, strict=True)
    """Steps ended (committed or failed) at the stage below."""
    min_time: Duration | None = None
    """Time at the stage below, from entering it to the request (none: no minimum)."""
    max_failure_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    """Failed steps over all steps at the stage below."""
    max_violations: int = Field(default=0, ge=0, strict=True)
    """Refused execs, execs the kernel refused and limit kills at the stage below."""
    rollback_drills: int = Field(default=0, ge=0, strict=True)
    """Rollbacks performed at the stage below."""
    approvals: int = Field(default=1, ge=1, le=16, strict=True)
    """Distinct approver uids, none of them the requester's nor the owner's."""
    policy_unchanged: bool = Field(default=False, strict=True)
    """The policy's content the same over the whole evidence window."""
    demote_on: list[DemotionEvent] = Field(default_factory=list)
    """Events at this stage that drop the agent one stage at once: violation (an exec refused
    by the policy or the kernel, a limit kill), quarantine (a workspace path agentd could not
    remove), failure (a run closed on a failed step that no later commit or rollback
    resolved)."""


class Gates(BaseModel):
    """A gate per stage above prototype; sensible defaults, each field overridable."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    sandbox: Gate = Gate(min_runs=1, min_steps=5, max_failure_rate=0.5)
    """Into sandbox, from prototype."""
    pilot: Gate = Gate(min_runs=3, min_steps=20, min_time=3600.0, max_failure_rate=0.2,
                       rollback_drills=1, demote_on=["violation", "quarantine"])
    """Into pilot, from sandbox."""
    production: Gate = Gate(min_runs=10, min_steps=100, min_time=86400.0,
                            max_failure_rate=0.05, rollback_drills=1, approvals=2,
                            policy_unchanged=True,
                            demote_on=["violation", "quarantine", "failure"])
    """Into production, from pilot."""

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        """A field a stage's gate leaves out keeps *that stage's* default: writing
        `pilot: {demote_on: []}` must not drop pilot's hour at sandbox to no time at all."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            given = merged.get(name)
            if isinstance(given, dict) and isinstance(field.default, Gate):
                merged[name] = {**field.default.model_dump(), **given}
        return merged


class StageCeilings(Document):
    """The host-wide ceiling of each stage. Load with `agentd.policy.load_stage_ceilings`."""

    api_version: Literal["agentd/v1"] = Field(alias="apiVersion")
    """Always agentd/v1."""
    kind: Literal["StageCeilings"]
    """Always StageCeilings."""
    description: str = Field(default="", max_length=4096)
    """Free text for reviewers."""
    stages: CeilingStages
    """The most any agent may have at each stage."""
    gates: Gates = Field(default_factory=Gates)
    """What an agent must show to enter each stage above prototype (and what demotes it)."""

    def ceiling(self, stage: str) -> CeilingRules:
        """The ceiling of `stage` (one of STAGES)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        rules: CeilingRules = getattr(self.stages, stage)
        return rules

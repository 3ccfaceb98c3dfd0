"""Capability policies: validate, clamp to a stage, allow or refuse with the rule.

    load_policy(path)            -> Policy          an agent's policy file
    load_stage_ceilings(path)    -> StageCeilings   the host's policies/stages.yaml
    check_policy_file(path)      -> Policy | StageCeilings, chosen by `kind:`
    effective_policy(policy, stage, ceilings) -> EffectivePolicy
    decide_exec(eff, executable, env, cwd, timeout_seconds) -> None, or raises
    resolve_executable(argv0, eff) -> the program the worker would run
    decide_call(eff, argv0, env, cwd, timeout) -> CallDecision (all of the above, in order)
    approval_triggers(eff, executables), withheld_programs(eff, approved)
    policy_json_schema()         -> the JSON Schema of policy files

Pure data and decisions: no kernel, no gRPC, no I/O beyond reading the files. File problems
raise `PolicyFileError` (a `PolicyError`) listing every problem with file, line and field;
malformed requests raise `InvalidArgument`; refusals raise `PermissionDenied(rule=...)`.

Modules: `sizes` and `paths` (value types), `rules` (the sections of a stage), `model` (the
two documents, stage inheritance), `issues` (error messages), `loader` (YAML), `stages`
(clamping), `effective` (the result), `decide` (allow or refuse), `approvals` (which steps
need a person, what an unapproved worker must not run), `execset` (what a worker may
execute, as mounts), `schema` (JSON Schema).
"""

from __future__ import annotations

from typing import Any

from agentd.policy.approvals import approval_triggers, withheld_programs
from agentd.policy.decide import (
    DEFAULT_PATH,
    CallDecision,
    decide_call,
    decide_exec,
    resolve_executable,
)
from agentd.policy.effective import RULE_FIELDS, EffectivePolicy
from agentd.policy.issues import Issue, PolicyFileError
from agentd.policy.loader import check_policy_file, load_policy, load_stage_ceilings
from agentd.policy.model import STAGES, Policy, ResolvedStage, StageCeilings
from agentd.policy.rules import CeilingRules, StageRules
from agentd.policy.sizes import format_duration, format_size, parse_duration, parse_size
from agentd.policy.stages import effective_policy


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of policy files (see `agentd.policy.schema`)."""
    # Imported here so that `python -m agentd.policy.schema` does not find the module
    # already imported by this package (runpy warns about that).
    from agentd.policy.schema import policy_json_schema as build

    return build()


__all__ = [
    "DEFAULT_PATH",
    "RULE_FIELDS",
    "STAGES",
    "CallDecision",
    "CeilingRules",
    "EffectivePolicy",
    "Issue",
    "Policy",
    "PolicyFileError",
    "ResolvedStage",
    "StageCeilings",
    "StageRules",
    "approval_triggers",
    "check_policy_file",
    "decide_call",
    "decide_exec",
    "effective_policy",
    "format_duration",
    "format_size",
    "load_policy",
    "load_stage_ceilings",
    "parse_duration",
    "parse_size",
    "policy_json_schema",
    "resolve_executable",
    "withheld_programs",
]

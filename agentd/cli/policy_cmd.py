"""`agentctl policy check|effective|schema`: policy files, read locally without the daemon.

This is the one place agentctl uses `agentd.policy` directly (see DESIGN.md, Layering); it is
imported inside the handlers so that the rest of agentctl never pays for it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agentd.cli import output
from agentd.errors import AgentdError


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds `policy` and its subcommands."""
    policy = subparsers.add_parser("policy", help="check policy files")
    sub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    check = sub.add_parser(
        "check", help="validate policy files; prints `FILE: ok` or each error with its line, "
        "and what the stage ceilings clamp")
    check.add_argument("files", nargs="+", metavar="FILE", help="policy file (YAML)")
    check.add_argument(
        "--reach", action="store_true",
        help="also list, per declared stage, the ELF programs a worker could run beyond its "
        "grants (those inside the library directories it gets executable)")
    check.add_argument(
        "--stages", metavar="FILE",
        help="stage ceilings to clamp with (default: stages.yaml beside each policy file)")
    check.set_defaults(func=cmd_check)

    effective = sub.add_parser(
        "effective", help="print an agent's effective policy, and where each value came from")
    effective.add_argument("agent", metavar="AGENT", help="an agent of the daemon config")
    effective.add_argument("--stage", help="the stage to show (default: the agent's stage)")
    effective.add_argument(
        "--config", help="the daemon config (default: $AGENTD_CONFIG, ./agentd.dev.toml in a "
        "checkout, else /etc/agentd/agentd.toml)")
    effective.set_defaults(func=cmd_effective)

    schema = sub.add_parser("schema", help="print the JSON Schema of policy files")
    schema.set_defaults(func=cmd_schema)


def cmd_check(args: argparse.Namespace) -> int:
    """`policy check`: checks every file, reports each, fails if any is wrong."""
    from agentd.policy import check_policy_file  # lazily: see the module docstring

    failed = False
    for path in args.files:
        try:
            checked = check_policy_file(path)
            if args.reach:
                reach_lines = _reach(checked, path, args.stages)
        except AgentdError as exc:  # PolicyError: "file:line: field: message" per line
            failed = True
            sys.stderr.write(_with_file(str(exc), path))
        except OSError as exc:
            failed = True
            print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        else:
            print(f"{path}: ok", flush=True)
            print("".join(_clamp_notes(checked, path, args.stages)), end="", flush=True)
            if args.reach:
                print("".join(reach_lines), end="", flush=True)
    return 1 if failed else 0


def _stages_file(path: str, stages: str | None) -> str:
    import os

    return stages or os.path.join(os.path.dirname(path) or ".", "stages.yaml")


def _clamp_notes(checked: object, path: str, stages: str | None) -> list[str]:
    """What the ceilings change of a Policy at each declared stage, one line per clamp with
    the ceiling line that caused it; a note when no stages file is at hand."""
    import os

    from agentd.policy import Policy, effective_policy, load_stage_ceilings

    if not isinstance(checked, Policy):
        return []
    source = _stages_file(path, stages)
    if stages is None and not os.path.exists(source):
        return []  # no ceilings at hand: validation only
    ceilings = load_stage_ceilings(source)
    lines: list[str] = []
    for stage in checked.stages.declared():
        lines += [f"  {stage}: clamped: {note}\n"
                  for note in effective_policy(checked, stage, ceilings).notes]
    return lines


def _reach(checked: object, path: str, stages: str | None) -> list[str]:
    """The residual reach of a Policy at each declared stage, as lines; none for a ceilings
    file."""

    from agentd.policy import Policy, effective_policy, load_stage_ceilings
    from agentd.policy.execset import reach

    if not isinstance(checked, Policy):
        return []
    ceilings = load_stage_ceilings(_stages_file(path, stages))
    lines: list[str] = []
    for stage in checked.stages.declared():
        found = reach(effective_policy(checked, stage, ceilings))
        for directory, programs in found.items():
            lines.append(f"  {stage}: {directory}: {len(programs)} ELF programs reachable "
                         "beyond the grants\n")
            lines += [f"    {program}\n" for program in programs]
    return lines


def _with_file(message: str, path: str) -> str:
    """Each error line, prefixed with the file's name unless the line already starts with it."""
    lines = message.splitlines() or ["invalid"]
    return "".join((line if line.startswith(path) else f"{path}: {line}") + "\n" for line in lines)


def cmd_schema(args: argparse.Namespace) -> int:
    """`policy schema`: the JSON Schema editors use for policy files."""
    from agentd.policy import policy_json_schema  # lazily: see the module docstring

    output.print_json(policy_json_schema())
    return 0


def cmd_effective(args: argparse.Namespace) -> int:
    """`policy effective AGENT`: every field of the effective policy, with its origin: the
    policy's line (and the stage section it is inherited from), a default, or the ceiling
    line that clamped it."""
    import os

    from agentd.config import load_config
    from agentd.policy import RULE_FIELDS, effective_policy, load_policy, load_stage_ceilings

    config_path = args.config or os.environ.get("AGENTD_CONFIG") or (
        "agentd.dev.toml" if os.path.exists("agentd.dev.toml") else "/etc/agentd/agentd.toml")
    config = load_config(config_path)
    agent = config.agents.get(args.agent)
    if agent is None:
        known = ", ".join(sorted(config.agents)) or "none"
        print(f"agentctl: agent {args.agent!r} is not in {config_path} (agents: {known})",
              file=sys.stderr)
        return 2
    policy_dir = config.daemon.policy_dir
    stage = args.stage or agent.stage
    eff = effective_policy(load_policy(policy_dir / agent.policy),
                           stage, load_stage_ceilings(policy_dir / config.daemon.stages_file))
    print(f"agent {args.agent}: policy {eff.agent_policy} at stage {stage} ({eff.source})")
    print(f"content hash {eff.content_hash}")
    values = eff.to_json()
    for field in RULE_FIELDS:
        print(f"{field}: {_show(_value_of(field, values))}")
        print(f"    from {eff.rule(field)}")
    for note in eff.notes:
        print(f"clamped: {note}")
    return 0


# RULE_FIELDS name -> EffectivePolicy attribute, where the names differ.
_ATTRIBUTES = {"filesystem.read_only": "read_only", "filesystem.workspace": "workspace",
               "limits.memory": "memory_bytes", "limits.wall_time": "wall_seconds",
               "limits.output": "output_bytes", "limits.tmp": "tmp_bytes",
               "limits.file_size": "file_size_bytes", "limits.writes": "writes_bytes",
               "limits.channel_state": "channel_state_bytes",
               "limits.workspace": "workspace_bytes"}


def _value_of(field: str, values: dict[str, Any]) -> Any:
    attribute = _ATTRIBUTES.get(field) or field.replace("limits.", "").replace(".", "_")
    return values.get(attribute, "?")


def _show(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)

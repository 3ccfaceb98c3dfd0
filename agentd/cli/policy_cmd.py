"""`agentctl policy check|schema`: policy files, validated locally without the daemon.

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
        "check", help="validate policy files; prints `FILE: ok` or each error with its line"
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="policy file (YAML)")
    check.add_argument(
        "--reach", action="store_true",
        help="also list, per declared stage, the ELF programs a worker could run beyond its "
        "grants (those inside the library directories it gets executable)")
    check.add_argument(
        "--stages", metavar="FILE",
        help="stage ceilings for --reach (default: stages.yaml beside each policy file)")
    check.set_defaults(func=cmd_check)

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
            if args.reach:
                print("".join(reach_lines), end="", flush=True)
    return 1 if failed else 0


def _reach(checked: object, path: str, stages: str | None) -> list[str]:
    """The residual reach of a Policy at each declared stage, as lines; none for a ceilings
    file."""
    import os

    from agentd.policy import Policy, effective_policy, load_stage_ceilings
    from agentd.policy.execset import reach

    if not isinstance(checked, Policy):
        return []
    ceilings = load_stage_ceilings(stages or os.path.join(os.path.dirname(path) or ".",
                                                          "stages.yaml"))
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

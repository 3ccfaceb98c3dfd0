"""`agentctl policy check|effective|explain|diff|lint|schema`: policy files, read locally
without the daemon: the security reviewer's tools.

This is the one place agentctl uses `agentd.policy` directly (see DESIGN.md, Layering); it is
imported inside the handlers so that the rest of agentctl never pays for it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agentd.cli import output
from agentd.errors import AgentdError

T = TypeVar("T")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds `policy` and its subcommands."""
    policy = subparsers.add_parser(
        "policy", help="check, explain, compare, lint, test and format policy files; reload them")
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

    explain = sub.add_parser(
        "explain", help="say in plain words what an agent may do at a stage, after clamping: "
        "programs, files, network, environment, limits, approvals, residual reach")
    explain.add_argument("target", metavar="FILE|AGENT",
                         help="a policy file, or an agent of the daemon config")
    explain.add_argument("--stage", help="the stage (default: the agent's; for a file, every "
                         "stage it reaches)")
    explain.add_argument("--stages", metavar="FILE", help="stage ceilings (default: "
                         "stages.yaml beside the policy file)")
    explain.add_argument("--config", help="the daemon config, for an AGENT")
    explain.add_argument("--no-reach", action="store_true",
                         help="skip the residual reach (it reads ELF headers of the grants)")
    explain.set_defaults(func=cmd_explain)

    diff = sub.add_parser(
        "diff", help="what changes between two versions of a policy, per stage, in "
        "capabilities (+ looser, - stricter); exit 0 if nothing changes, 1 if something does")
    diff.add_argument("old", metavar="OLD", help="the policy file as it was")
    diff.add_argument("new", metavar="NEW", help="the policy file as it is proposed")
    diff.add_argument("--stage", help="one stage only")
    diff.add_argument("--stages", metavar="FILE", help="stage ceilings (default: stages.yaml "
                      "beside NEW)")
    diff.set_defaults(func=cmd_diff)

    lint = sub.add_parser(
        "lint", help="flag risky grants, each with its line and a reason; exit 0 if none, 1 "
        "if any, 2 if a file is invalid")
    lint.add_argument("files", nargs="+", metavar="FILE", help="policy file (YAML)")
    lint.add_argument("--stages", metavar="FILE", help="stage ceilings (default: stages.yaml "
                      "beside each file)")
    lint.add_argument("--usage", metavar="AUDIT_DIR", type=Path,
                      help="also flag exec.allow entries AGENT never ran (unused-grant), from "
                      "this audit log, verified first")
    lint.add_argument("--agent", help="the agent whose runs --usage looks at")
    lint.add_argument("--key", metavar="PUB", type=Path,
                      help="the public key to verify --usage with (default: DIR/audit.pub)")
    lint.set_defaults(func=cmd_lint)

    test = sub.add_parser(
        "test", help="run a policy's YAML test cases (a call and the decision expected) and "
        "report the rules they exercise; exit 0 if all pass, 1 if any fails, 2 if a file is "
        "invalid")
    test.add_argument("files", nargs="+", metavar="FILE", help="test cases (kind: PolicyTest)")
    test.set_defaults(func=cmd_test)

    fmt = sub.add_parser(
        "fmt", help="rewrite policy files in the canonical layout (comments and key order "
        "kept); --check only says which would change (exit 1)")
    fmt.add_argument("files", nargs="+", metavar="FILE", help="policy or stages file (YAML)")
    fmt.add_argument("--check", action="store_true",
                     help="change nothing; exit 1 if a file is not in the canonical layout")
    fmt.set_defaults(func=cmd_fmt)

    reload = sub.add_parser(
        "reload", help="make the daemon read every policy file again and swap them in at "
        "once (admin socket: --socket .../agentd-admin.sock); a file that fails validation "
        "replaces nothing")
    reload.set_defaults(func=cmd_reload)

    accept = sub.add_parser(
        "accept", help="accept a promoted agent's unreviewed policy change (approver socket; "
        "not whoever reloaded it); `agentctl stage status AGENT` shows its hash and diff "
        "record")
    accept.add_argument("agent", metavar="AGENT")
    accept.add_argument("source", metavar="HASH", help="the unreviewed version's whole "
                        "source hash (sha256: and 64 hex digits, as `stage status` prints it); "
                        "a prefix could name another file made to share it")
    accept.add_argument("--reason", default="", metavar="TEXT")
    accept.set_defaults(func=cmd_accept)

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


def cmd_explain(args: argparse.Namespace) -> int:
    """`policy explain FILE|AGENT`: the effective policy in sentences, per stage."""
    import os

    from agentd.policy import effective_policy, load_policy, load_stage_ceilings
    from agentd.policy.execset import reach
    from agentd.policy.explain import explain
    from agentd.policy.model import STAGES

    if os.path.exists(args.target):
        policy = load_policy(args.target)
        ceilings = load_stage_ceilings(_stages_file(args.target, args.stages))
        stages = [args.stage] if args.stage else [s for s in STAGES if policy.resolve(s)]
    else:
        config, config_path = _config(args.config)
        agent = config.agents.get(args.target)
        if agent is None:
            known = ", ".join(sorted(config.agents)) or "none"
            print(f"agentctl: {args.target!r} is neither a file nor an agent of {config_path} "
                  f"(agents: {known})", file=sys.stderr)
            return 2
        policy_dir = config.daemon.policy_dir
        policy = load_policy(policy_dir / agent.policy)
        ceilings = load_stage_ceilings(args.stages or policy_dir / config.daemon.stages_file)
        stages = [args.stage or agent.stage]
    for n, stage in enumerate(stages):
        if policy.resolve(stage) is None:
            print(f"agentctl: {policy.source} declares no stage at or below {stage}",
                  file=sys.stderr)
            return 2
        eff = effective_policy(policy, stage, ceilings)
        print(("\n" if n else "") + "\n".join(
            explain(eff, reach=None if args.no_reach else reach(eff))))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """`policy diff OLD NEW`: capabilities that move, per stage; 1 if any does."""
    from agentd.policy import effective_policy, load_policy, load_stage_ceilings
    from agentd.policy.diff import diff, render
    from agentd.policy.model import STAGES

    old, new = load_policy(args.old), load_policy(args.new)
    ceilings = load_stage_ceilings(_stages_file(args.new, args.stages))
    changed = False
    for stage in [args.stage] if args.stage else STAGES:
        before = effective_policy(old, stage, ceilings) if old.resolve(stage) else None
        after = effective_policy(new, stage, ceilings) if new.resolve(stage) else None
        if before is None and after is None:
            continue
        changes = diff(before, after) if before and after else []
        changed = changed or bool(changes) or (before is None) != (after is None)
        print("\n".join(render(stage, before, after, changes)))
    return 1 if changed else 0


def cmd_lint(args: argparse.Namespace) -> int:
    """`policy lint FILE...`: risky grants; 1 if any, 2 if a file cannot be read."""
    from agentd.policy import load_policy, load_stage_ceilings
    from agentd.policy.lint import lint

    usage = None
    if args.usage is not None:
        if not args.agent:
            print("agentctl: --usage needs --agent: whose runs to look at", file=sys.stderr)
            return 2
        usage = _usage(args.usage, args.key, args.agent)
        if usage is None:
            return 2
    def findings_of(path: str) -> list[Any]:
        ceilings = load_stage_ceilings(_stages_file(path, args.stages))
        return lint(load_policy(path), ceilings, usage)

    status = 0
    for path in args.files:
        findings = _load_or_report(path, functools.partial(findings_of, path))
        if findings is None:
            status = 2
            continue
        for finding in findings:
            print(finding)
        live = [f for f in findings if not f.waived]
        waived = len(findings) - len(live)
        print(f"{path}: {len(live)} finding(s)" + (f", {waived} waived" if waived else "")
              if live else f"{path}: ok" + (f" ({waived} waived)" if waived else ""))
        if live and status == 0:
            status = 1
    return status


def _usage(directory: Path, key: Path | None, agent: str) -> dict[str, dict[str, int]] | None:
    """Per stage, the programs `agent`'s tasks ran, from a verified log (None: it does not
    verify, said on stderr)."""
    from agentd.audit.evidence import Unverified, from_verified_log

    try:
        verified = from_verified_log(directory, agent, key)
    except Unverified as exc:
        print(f"agentctl: {directory} does not verify, so it is not used: {exc}",
              file=sys.stderr)
        return None
    return {stage: evidence.executables for stage, evidence in verified.stages.items()}


def cmd_test(args: argparse.Namespace) -> int:
    """`policy test FILE...`: every case decided as the scheduler would; coverage after."""
    from agentd.policy import effective_policy, load_policy, load_stage_ceilings
    from agentd.policy.cases import Coverage, coverage_lines, policy_path, run_case
    from agentd.policy.loader import load_policy_tests

    def load(path: str) -> tuple[Any, Path, Any, Any]:
        tests = load_policy_tests(path)
        target = policy_path(tests)
        return tests, target, load_policy(target), load_stage_ceilings(
            target.parent / tests.stages)

    status = 0
    for path in args.files:
        loaded = _load_or_report(path, functools.partial(load, path))
        if loaded is None:
            status = 2
            continue
        tests, target, policy, ceilings = loaded
        stages: dict[str, tuple[Any, Coverage]] = {}
        failed = 0
        for case in tests.cases:
            stage = case.stage or tests.stage
            if stage not in stages:
                if policy.resolve(stage) is None:
                    print(f"{path}: case {case.name!r}: {target} declares no stage at or "
                          f"below {stage}", file=sys.stderr)
                    status = 2
                    continue
                stages[stage] = (effective_policy(policy, stage, ceilings), Coverage())
            eff, coverage = stages[stage]
            outcome = run_case(eff, case, coverage)
            if not outcome.passed:
                failed += 1
                want = case.expect + (f" by {case.rule}" if case.rule else "")
                print(f"FAIL {path}: {case.name} ({stage}): expected {want}, got "
                      f"{outcome.got}: {outcome.detail}")
        print(f"{path}: {len(tests.cases) - failed} of {len(tests.cases)} cases pass "
              f"({target})")
        for eff, coverage in stages.values():
            print("\n".join(coverage_lines(eff, coverage)))
        if failed and status == 0:
            status = 1
    return status


def cmd_fmt(args: argparse.Namespace) -> int:
    """`policy fmt FILE...`: the canonical layout, written in place (atomically) or checked."""
    import os
    import tempfile

    from agentd.policy import check_policy_file
    from agentd.policy.fmt import format_text

    def read_valid(path: str) -> str:
        check_policy_file(path)  # never reformat what does not mean anything yet
        with open(path, encoding="utf-8") as f:
            return f.read()

    status = 0
    for path in args.files:
        text = _load_or_report(path, functools.partial(read_valid, path))
        if text is None:
            status = 2
            continue
        formatted = format_text(text)
        if formatted == text:
            print(f"{path}: unchanged")
            continue
        if args.check:
            print(f"{path}: not in the canonical layout; run agentctl policy fmt {path}")
            status = max(status, 1)
            continue
        directory = os.path.dirname(path) or "."
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fmt-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(formatted)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        print(f"{path}: reformatted")
    return status


def cmd_reload(args: argparse.Namespace) -> int:
    """`policy reload`: through the daemon (the client), like every other daemon call."""
    changes = args.client().reload_policies()
    for change in changes:
        what = (f"{change.old_hash[:19]} -> {change.new_hash[:19]}" if change.changed
                else "unchanged")
        print(f"{change.agent} ({change.stage}, {change.policy_file}): {what}")
        if change.unreviewed:
            print(f"  unreviewed: the file's version {change.unreviewed} waits for an "
                  f"approver (agentctl policy accept {change.agent} HASH); the accepted "
                  "version stays in force")
        for note in change.clamped:
            print(f"  clamped: {note}")
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    """`policy accept`: an approver pins the agent's unreviewed version (through the daemon)."""
    status = args.client().accept_policy(args.agent, args.source, args.reason)
    print(f"{status.agent}: policy {status.policy_source} accepted, in force for new "
          "steps")
    return 0


def _load_or_report(path: str, load: Callable[[], T]) -> T | None:
    """`load()`, or None after saying on stderr why `path` cannot be used (each error with
    its file and line)."""
    try:
        return load()
    except AgentdError as exc:
        sys.stderr.write(_with_file(str(exc), path))
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
    return None


def _config(path: str | None) -> tuple[Any, str]:
    """The daemon config agentctl reads for AGENT arguments, and its path."""
    import os

    from agentd.config import load_config

    config_path = path or os.environ.get("AGENTD_CONFIG") or (
        "agentd.dev.toml" if os.path.exists("agentd.dev.toml") else "/etc/agentd/agentd.toml")
    return load_config(config_path), config_path


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


def _value_of(field: str, values: dict[str, Any]) -> Any:
    from agentd.policy.effective import attribute_of

    return values.get(attribute_of(field), "?")


def _show(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)

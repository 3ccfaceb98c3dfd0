"""`agentctl policy explain`: what an agent may do at one stage, in plain words.

A security reviewer reads this instead of the YAML: the effective policy after the stage's
ceiling, each fact with the line that decides it, what the ceiling clamped, and the residual
reach (programs a worker could still run through the loader inside its library directories).
Pure: an `EffectivePolicy` (and, optionally, its reach) in, lines of text out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agentd.policy.effective import EffectivePolicy
from agentd.policy.egress import parse_rules, secret_from_text
from agentd.policy.sizes import format_duration, format_size

# Basenames of programs that run arbitrary code they are handed (shells and language
# interpreters): granting one grants everything it can do without another exec. Launchers
# (env, xargs, find -exec, make) are not here: what they start must itself be granted.
INTERPRETERS = ("sh", "bash", "dash", "zsh", "ksh", "csh", "tcsh", "fish", "busybox",
                "python", "python3", "perl", "ruby", "node", "nodejs", "php", "lua", "tclsh",
                "awk", "gawk", "mawk")


def is_interpreter(path: str) -> bool:
    """Whether `path` (or, for a tree, anything under it) can run code it is given."""
    if path.endswith("/"):
        return True  # a whole directory: it holds shells on every distribution
    name = path.rsplit("/", 1)[-1]
    base = name.split(".")[0] if name.startswith("python") else name
    return (name in INTERPRETERS or base in INTERPRETERS
            or any(name.startswith(p) and name[len(p):].replace(".", "").isdigit()
                   for p in ("python", "perl", "ruby", "php", "lua", "tclsh")))


def explain(policy: EffectivePolicy, *, reach: Mapping[str, Sequence[str]] | None = None
            ) -> list[str]:
    """The effective policy as sentences, one fact per line, each with its rule."""
    p = policy
    out = [f"{p.agent_policy} at stage {p.stage} ({p.source}), content {p.content_hash}", ""]

    out.append("Programs it may run:")
    if not p.exec_allow:
        out.append("  none: every exec is refused")
    for entry in p.exec_allow:
        what = "every program under " + entry if entry.endswith("/") else entry
        flag = "  (runs code it is given)" if is_interpreter(entry) else ""
        out.append(f"  {what}{flag}")
    out.append(f"    decided by {p.rule('exec.allow')}")
    for entry, rule in sorted(p.exec_dropped.items()):
        out.append(f"  not {entry}: the policy grants it, the stage ceiling does not ({rule})")
    if p.exec_libraries:
        out.append("  code loaded at run time from: " + ", ".join(p.exec_libraries)
                   + f"  ({p.rule('exec.libraries')})")
    if reach is not None:
        total = sum(len(v) for v in reach.values())
        if total:
            out.append(f"  and, through the loader, {total} ELF programs inside the library "
                       "directories it gets executable (agentctl policy check --reach):")
            out += [f"    {directory}: {len(programs)}" for directory, programs in reach.items()]
        else:
            out.append("  nothing else: no ELF program is reachable through the loader")

    out += ["", "Needs a person's approval (another uid, on the approver socket):"]
    if not p.approval_required_for:
        out.append("  nothing: every step it may run, runs at once")
    for trigger in p.approval_required_for:
        out.append("  " + _trigger_words(trigger))
    if p.approval_required_for:
        out.append(f"    decided by {p.rule('approval.required_for')}")

    out += ["", "Files:"]
    out.append("  reads (read-only, not executable unless granted above): "
               + (", ".join(p.read_only) or "nothing of the host")
               + f"  ({p.rule('filesystem.read_only')})")
    workspace = {"read_write": "reads and writes", "read_only": "only reads",
                 "none": "has no"}.get(p.workspace, p.workspace)
    out.append(f"  {workspace} its run's workspace at /workspace, at most "
               f"{format_size(p.workspace_bytes)} and {p.inodes} files in all  "
               f"({p.rule('filesystem.workspace')}, {p.rule('limits.workspace')})")
    out.append(f"  writes a private /tmp of at most {format_size(p.tmp_bytes)}, gone after each "
               f"task  ({p.rule('limits.tmp')})")
    out.append("  writes nothing else: the root is read-only, the host's files are not there")

    out += ["", "Network:"]
    if p.network == "none":
        out.append("  none: a network namespace with loopback only")
    else:
        out.append("  only to these, each TCP connection through the daemon's egress proxy and"
                   " each UDP flow through its relay, and on record:")
        out += [f"    {rule.in_words()}" for rule in parse_rules(p.egress)]
        out.append("  names resolve only through the daemon's resolver, and only those above;"
                   " an answer pointing to a private, loopback or link-local address is refused"
                   " unless an address entry names it")
        out.append(f"  at most {format_size(p.egress_bytes)} sent and received per task, and"
                   f" {p.egress_connections_per_second:g} new connections per second")
        out.append("  everything else is refused: other addresses, ports and protocols, ICMP,"
                   " IPv6, DNS to any other server")
        out += [f"  sends {secret_from_text(t).in_words()}" for t in p.egress_secrets]
    out.append(f"    decided by {p.rule('network')}")
    out.append("  user namespace: " + ("yes (it may create one)" if p.user_namespace
                                       else "no") + f"  ({p.rule('user_namespace')})")

    out += ["", "Environment:"]
    if p.env_set:
        out.append("  always set: " + ", ".join(f"{k}={v}" for k, v in sorted(p.env_set.items()))
                   + f"  ({p.rule('env.set')})")
    out.append("  passed from the caller: " + (", ".join(p.env_allow) or "nothing")
               + f"  ({p.rule('env.allow')})")
    out.append("  values kept in the audit log: " + (", ".join(p.env_log) or "none (names only)")
               + f"  ({p.rule('env.log')})")

    out += ["", "Limits, per task:"]
    for text, field in (
            (f"memory {format_size(p.memory_bytes)}", "limits.memory"),
            (f"{p.pids} processes", "limits.pids"),
            (f"{p.cpu:g} CPU", "limits.cpu"),
            (f"wall time {format_duration(p.wall_seconds)}", "limits.wall_time"),
            (f"output {format_size(p.output_bytes)} (stdout and stderr)", "limits.output"),
            (f"{p.open_files} open files", "limits.open_files"),
            (f"files up to {format_size(p.file_size_bytes)} each", "limits.file_size"),
            (f"channel writes {format_size(p.writes_bytes)}", "limits.writes"),
            (f"channel state {format_size(p.channel_state_bytes)} per run",
             "limits.channel_state")):
        out.append(f"  {text}  ({p.rule(field)})")

    out += ["", "Clamped by the stage ceiling:"]
    out += [f"  {note}" for note in p.notes] or ["  nothing"]
    return out


def _trigger_words(trigger: str) -> str:
    if trigger == "exec":
        return "every step (trigger: exec)"
    if trigger == "user_namespace":
        return "any step of a worker with a user namespace (trigger: user_namespace)"
    if trigger.startswith("exec:"):
        target = trigger.removeprefix("exec:")
        what = f"anything under {target}" if target.endswith("/") else target
        return (f"a step that runs {what}; in a step nobody approved it cannot be executed "
                f"by any route (trigger: {trigger})")
    return trigger

"""Channel values in a node's call: substituted as whole arguments, never as code.

A node's argv is a YAML list, one item per argument; agentd never splits an item and never
hands one to a shell. An item (or an env value) that is exactly `{channel}` is replaced by that
channel's value as the superstep sees it: a string as it is, anything else as its canonical
JSON. So a value reaches the tool as one argument, whatever quotes, spaces, `;` or `$(...)` it
holds; a shell script gets it as `$1`, never inside the script's text.

Alternatives weighed:

- substituting into any text (`echo {topic}`), as a template engine would: a value then
  becomes part of a shell script and runs as code (`topic = "x; rm -rf ."`). Refused at load
  time, with the `$1` form as the fix (agentd/graph/model.py).
- quoting values for the shell (`shlex.quote`): correct only for the shell it was written
  for, and silently wrong for `python -c`, `awk`, `sed` scripts; a whole argument is correct
  for every program.
- no substitution, only the channel snapshot on `$AGENTD_CHANNELS_FD`: always available, and
  the right tool for structured values; substitution is the short form for a value a command
  takes as an argument.

Where a placeholder may stand in argv is a short allow-list, not a list of dangerous options
(a deny-list misses `sh -uc`, `perl -ne`, `sed SCRIPT`, `tar --checkpoint-action=...`):

- a shell's positional parameter: `[/bin/sh, -c, SCRIPT, NAME, '{x}', ...]` with `-c` alone and
  SCRIPT and NAME literal; POSIX shells parse no option after NAME, so the value is `$1`;
- an operand after a literal `--` (the end of options) of a program that is not itself a runner
  of code or programs (`RUNNERS`: shells, interpreters, `sed`, `awk`, `env`, `xargs`, ...,
  whose operands are a script or a command).

An env value may be a placeholder too: a variable is data until a script the reviewer can read
evaluates it. argv[0] never is. `{{name}}` is the literal text `{name}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from agentd.errors import FailedPrecondition

# POSIX shells: `-c SCRIPT NAME ARG...` makes every ARG a positional parameter.
SHELLS: Final = frozenset({"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh"})
# Programs whose operands (even after `--`) are code or a command to run: a channel value is
# never one of their arguments, except a shell's positional parameters (above).
RUNNERS: Final = SHELLS | frozenset({
    "busybox", "fish", "csh", "tcsh", "python", "python2", "python3", "pypy", "pypy3", "perl",
    "ruby", "node", "nodejs", "deno", "bun", "php", "lua", "luajit", "tclsh", "wish", "Rscript",
    "R",
    "awk", "gawk", "mawk", "nawk", "sed", "jq", "yq", "gdb", "env", "xargs", "find", "parallel",
    "timeout", "nice", "ionice", "nohup", "setsid", "stdbuf", "chroot", "unshare", "nsenter",
    "sudo", "su", "doas", "runuser", "setpriv", "watch", "time", "strace", "ltrace", "exec",
    "eval", "command", "make", "git", "ssh", "script", "expect", "flock", "chrt", "taskset",
    "pip", "npm", "npx", "cargo", "go", "java", "dotnet", "sqlite3", "psql", "mysql",
    "systemd-run", "dbus-run-session", "vim", "vi", "nvim", "emacs", "ed", "ex"})

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_ESCAPED = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_.-]*)\}\}")


@dataclass(frozen=True)
class Piece:
    """One argument of a template: a channel's value (`channel`) or literal text."""

    channel: str | None = None
    literal: str | None = None


def parse(text: str) -> Piece:
    """`{name}` is the channel `name`; `{{name}}` the literal `{name}`; anything else literal."""
    if (match := _ESCAPED.fullmatch(text)) is not None:
        return Piece(literal="{" + match.group(1) + "}")
    if (match := _PLACEHOLDER.fullmatch(text)) is not None:
        return Piece(channel=match.group(1))
    return Piece(literal=text)


def as_argument(value: Any) -> str:
    """A channel value as one argument: strings as they are, the rest as canonical JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def render(node_name: str, argv: Sequence[str], env: Mapping[str, str],
           snapshot: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The node's argv and env for one superstep, from the channel values its tasks will see.

    FAILED_PRECONDITION if a placeholder's channel is not visible (a barrier not yet complete):
    the graph stops rather than run the tool with an empty argument.
    """
    def value(text: str) -> str:
        piece = parse(text)
        if piece.channel is None:
            return piece.literal or ""
        if piece.channel not in snapshot:
            raise FailedPrecondition(
                f"node {node_name} takes {{{piece.channel}}}, which is not available at this "
                "superstep (a barrier some node has not written yet); trigger the node on the "
                "channel, or read it from $AGENTD_CHANNELS_FD")
        return as_argument(snapshot[piece.channel])

    return [value(arg) for arg in argv], {key: value(text) for key, text in env.items()}

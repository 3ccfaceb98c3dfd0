"""`agentctl exec RUN [options] -- CMD [ARG...]`: one confined tool call, streamed live.

The tool's stdout and stderr go to agentctl's own, chunk by chunk as the daemon sends them
(flushed each time, so a pipe sees them live). agentctl then exits as the tool did: its exit
code, or 128+N when signal N killed it, as a shell reports it. When the daemon stopped the
tool (wall time, memory, pids, output limit), or with --verbose, one summary line follows on
stderr. Bad options are refused before any call is made.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

from agentd.cli import output
from agentd.client import Outcome, Output, StopReason, Stream

EXIT_NO_STATUS = 1  # the tool neither exited nor was killed by a signal (never started)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds `exec`."""
    parser = subparsers.add_parser(
        "exec",
        help="run a command in a run's confined worker",
        usage="%(prog)s RUN [--env NAME=VALUE]... [--cwd DIR] [--timeout SECONDS] "
        "[--stdin FILE|-] [--verbose] -- CMD [ARG...]",
        description="Runs CMD in a confined worker of RUN, streaming its output, and exits "
        "with its exit code (128+N if signal N killed it).",
    )
    parser.add_argument("run", metavar="RUN", help="run id")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an environment variable (repeatable; the policy decides which are allowed)",
    )
    parser.add_argument(
        "--cwd", default="", metavar="DIR", help="working directory (default /workspace)"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wall time limit (default and maximum: the policy's)",
    )
    parser.add_argument(
        "--stdin", metavar="FILE|-", help="feed FILE (or agentctl's stdin, `-`) to the tool"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="always print the summary line"
    )
    parser.add_argument("command", nargs="*", metavar="CMD", help="command and arguments")
    parser.set_defaults(func=cmd_exec)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def parse_env(items: list[str]) -> dict[str, str]:
    """Turns `NAME=VALUE` items into a dict; UsageError on a malformed or repeated name."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise output.UsageError(f"--env expects NAME=VALUE, got {item!r}")
        if not _ENV_NAME.match(name):
            raise output.UsageError(
                f"--env {item!r}: {name!r} is not a valid variable name "
                "(letters, digits and _, not starting with a digit)"
            )
        if name in env:
            raise output.UsageError(f"--env {name} is given more than once")
        env[name] = value
    return env


def _read_stdin(source: str | None) -> bytes:
    if source is None:
        return b""
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise output.UsageError(f"--stdin {source}: {exc.strerror or exc}") from None


def exit_status(outcome: Outcome) -> int:
    """The status agentctl exits with: the tool's exit code, 128+signal, or 1."""
    if outcome.exited and 0 <= outcome.exit_code <= 255:
        return outcome.exit_code
    if outcome.signal > 0:
        return 128 + outcome.signal
    return EXIT_NO_STATUS


def cmd_exec(args: argparse.Namespace) -> int:
    """`exec`: streams the tool's output and returns its exit status."""
    if not args.command:
        raise output.UsageError(
            "exec: no command given; put it after `--`, e.g. agentctl exec RUN -- ls -l"
        )
    env = parse_env(args.env)
    stdin = _read_stdin(args.stdin)
    events = args.client().exec(
        args.run, args.command, env=env, stdin=stdin, cwd=args.cwd, timeout=args.timeout
    )
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for event in events:
        if isinstance(event, Output):
            sink = err if event.stream is Stream.STDERR else out
            sink.write(event.data)
            sink.flush()
            continue
        if (
            args.verbose
            or event.stop_reason is not StopReason.NONE
            or event.pids_limit_hit
            or not (event.exited or event.signal)
        ):
            print(f"agentctl: {output.outcome_line(event)}", file=sys.stderr, flush=True)
        return exit_status(event)
    # client.exec always ends with an Outcome or raises; this is only reached by a bug.
    raise AssertionError("exec stream ended without an outcome")

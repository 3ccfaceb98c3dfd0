"""agentctl: the command line of agentd.

    agentctl [--socket PATH] run create|list|show|close ...
    agentctl [--socket PATH] exec RUN [options] -- CMD [ARG...]
    agentctl [--socket PATH] step RUN --task [NAME=]CMD... | approve RUN STEP | timeline RUN
    agentctl [--socket PATH] checkpoints RUN | rollback|fork|export RUN STEP ...
    agentctl policy check|lint|fmt FILE... | explain FILE|AGENT | diff OLD NEW | test CASES...
    agentctl [--socket ADMIN-SOCKET] policy reload | stage promote AGENT ...
    agentctl [--socket APPROVER-SOCKET] policy accept AGENT HASH | stage approve AGENT
    agentctl stage status|history AGENT | stage evidence AGENT [--audit DIR]
    agentctl graph lint|show FILE | graph run FILE [--run RUN] [--input NAME=VALUE ...]
    agentctl status
    agentctl [--socket PATH] audit ...            (when agentd.cli.audit_cmd is installed)

Every subcommand module exposes `register(subparsers)`, which adds its parsers and sets
`func(args) -> int | None` as the handler. Handlers reach the daemon only through
`args.client()` (an `AgentdClient`; its `.audit` for the audit service), which connects on
first use, so commands that work locally (`policy check`) never touch the socket.

Exit status: the handler's (for `exec`, the tool's; for `step`, 3 when pending approval); 2
for a usage error or bad input (INVALID_ARGUMENT); 1 for any other error, shown as one line,
`agentctl: <what went wrong>`, never as a traceback (set AGENTCTL_DEBUG=1 to get one for an
unexpected error).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc

from agentd.cli import (
    exec_cmd,
    graph_cmd,
    policy_cmd,
    runs_cmd,
    stage_cmd,
    status_cmd,
    steps_cmd,
)
from agentd.cli.output import UsageError
from agentd.client import AgentdClient, ClientError, error_from_rpc, resolve_socket

PROG = "agentctl"
EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE

# Options of the top-level parser that take a value; needed to find the subcommand before
# argparse runs (see _split_command).
_GLOBAL_OPTIONS_WITH_VALUE = ("--socket",)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors read `agentctl: <message>` after the usage line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{PROG}: {message}\n")


class _Session:
    """The connection of one invocation, opened on first use and closed at exit."""

    def __init__(self, socket_flag: str | None) -> None:
        self.socket_flag = socket_flag
        self._client: AgentdClient | None = None

    @property
    def socket(self) -> str:
        return self._client.socket if self._client else resolve_socket(self.socket_flag)

    def client(self) -> AgentdClient:
        if self._client is None:
            self._client = AgentdClient(self.socket_flag)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def build_parser() -> Parser:
    """The whole argparse tree of agentctl."""
    parser = Parser(
        prog=PROG,
        description="Control agentd: runs, confined tool calls, policies and the audit log.",
        epilog="The socket is --socket, else $AGENTD_SOCKET, else ./var/run/agentd.sock if it "
        "exists (development mode, `make run`), else /run/agentd/agentd.sock.",
    )
    parser.add_argument("--socket", metavar="PATH", help="agentd's unix socket")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    subparsers = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    runs_cmd.register(subparsers)
    exec_cmd.register(subparsers)
    steps_cmd.register(subparsers)
    policy_cmd.register(subparsers)
    status_cmd.register(subparsers)
    stage_cmd.register(subparsers)
    graph_cmd.register(subparsers)
    _register_optional(subparsers, "agentd.cli.audit_cmd", "audit", "the audit log")
    return parser


def _register_optional(
    subparsers: argparse._SubParsersAction[Any], module: str, name: str, what: str
) -> None:
    """Registers a subcommand module that may be absent from this build.

    Absent: the subcommand does not exist. Present but failing to import (a missing
    dependency): the subcommand exists and says why it cannot run, so that one broken module
    never takes the whole of agentctl down.
    """
    try:
        register: Callable[[argparse._SubParsersAction[Any]], None] = importlib.import_module(
            module
        ).register
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return
        register = _unavailable(name, what, exc)
    except (ImportError, AttributeError) as exc:
        register = _unavailable(name, what, exc)
    register(subparsers)


def _unavailable(
    name: str, what: str, exc: BaseException
) -> Callable[[argparse._SubParsersAction[Any]], None]:
    def handler(_args: argparse.Namespace) -> int:
        print(f"{PROG}: {name}: not available in this installation: {exc}", file=sys.stderr)
        return EXIT_ERROR

    def register(subparsers: argparse._SubParsersAction[Any]) -> None:
        sub = subparsers.add_parser(name, help=f"{what} (unavailable: {exc})")
        sub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        sub.set_defaults(func=handler)

    return register


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Splits `exec RUN ... -- CMD ARGS` at its first `--`: argparse would mangle a CMD that
    has its own `--` (`git log -- file`). Other subcommands are left to argparse."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL_OPTIONS_WITH_VALUE:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        if arg == "exec" and "--" in argv[i:]:
            cut = argv.index("--", i)
            return argv[:cut], argv[cut + 1 :]
        break
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs agentctl with `argv` (default: sys.argv[1:]); returns the exit status."""
    head, tail = _split_command(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(head)
    if tail is not None:
        args.command.extend(tail)
    session = _Session(args.socket)
    args.client = session.client
    try:
        status = args.func(args)
        _flush_stdout()
        return int(status or 0)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ClientError as exc:
        return _fail_client(exc)
    except grpc.RpcError as exc:  # from the client's calls that return streams
        return _fail_client(error_from_rpc(exc, session.socket))
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # Whoever read our output went away (`agentctl ... | head`). Point stdout at
        # /dev/null so that the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        if os.environ.get("AGENTCTL_DEBUG"):
            traceback.print_exc()
        return _fail(
            f"unexpected error: {type(exc).__name__}: {exc} "
            "(a bug in agentctl; set AGENTCTL_DEBUG=1 for the traceback)",
            EXIT_ERROR,
        )
    finally:
        session.close()


def _fail_client(exc: ClientError) -> int:
    return _fail(exc.message, EXIT_USAGE if exc.code == "INVALID_ARGUMENT" else EXIT_ERROR)


def _fail(message: str, status: int) -> int:
    with contextlib.suppress(BrokenPipeError):
        _flush_stdout()
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return status


def _flush_stdout() -> None:
    sys.stdout.flush()


def _version() -> str:
    try:
        return importlib.metadata.version("agentd")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


if __name__ == "__main__":
    sys.exit(main())

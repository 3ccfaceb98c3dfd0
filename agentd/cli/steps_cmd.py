"""`agentctl step|approve|resolve|timeline|checkpoints|rollback|fork|export`: steps and
checkpoints.

    agentctl step RUN --task [NAME=]CMD [--task ...] [--allow-failure NAME]... [--timeout S]
    agentctl approve RUN STEP [--reject] [--reason TEXT]      (on the approver socket)
    agentctl resolve RUN STEP retry|accept|abandon --reason TEXT   (on the approver socket)
    agentctl timeline RUN
    agentctl checkpoints RUN
    agentctl rollback RUN STEP
    agentctl fork RUN STEP [--label TEXT]                      (prints the new run's id)
    agentctl export RUN STEP -o FILE|-

A step runs its tasks in parallel on the run's last checkpoint and commits all of their changes
at the barrier, or none. Each `--task` is one shell command, run as `/bin/sh -c CMD`; tasks are
named t1, t2, ... by position unless named with `NAME=CMD` (see `parse_tasks`). `step` streams
each task's output as it comes, every line prefixed `[NAME] ` (stdout to stdout, stderr to
stderr), then a summary on stderr: `step 3 committed (2 tasks, 0.21 s)`.

Exit status of `step` and `approve`: 0 committed (for `approve --reject`: discarded), 1 failed
or discarded, 3 pending approval; as everywhere, 2 for bad input and 1 for any other error.

Exit status of `resolve`: 0 when the resolution took effect (accepted, abandoned, or retried
and committed), 1 when the retried step failed, 3 when it waits for approval.

Approve and resolve are the approver role's; Step, Rollback, Fork and Export are the client
role's. The role is the socket's (see agentd.identity), so a refusal for the role gets a hint
naming the socket to use, next to the one in use.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import IO, Any, BinaryIO

import grpc

from agentd.cli import output
from agentd.cli.exec_cmd import _seconds
from agentd.client import (
    AgentdClient,
    ClientError,
    StepEvent,
    StepReply,
    StepState,
    Stream,
    TaskOutput,
    TaskReport,
    TaskSpec,
)

EXIT_COMMITTED = 0
EXIT_FAILED = 1
EXIT_PENDING_APPROVAL = 3

SHELL = "/bin/sh"
CLIENT_SOCKET = "agentd.sock"
APPROVER_SOCKET = "agentd-approver.sock"

# A task name given on the command line: lower case, so that `--task 'CC=gcc make'` (a shell
# variable assignment) is never silently taken for a task named CC (see parse_tasks).
_TASK_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,63}\Z")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DIGITS = re.compile(r"[0-9]{1,10}\Z")
MAX_STEP = 2**32 - 1  # a uint32 in the API
# How the daemon words a refusal for the caller's role (agentd.api.interceptor).
_ROLE_REFUSAL = re.compile(r"\brole\b")

Handler = Callable[[argparse.Namespace], int]

_TASK_HELP = """\
Each --task is one shell command, run in the run's confined worker as `/bin/sh -c CMD` (the
policy must allow /bin/sh). Tasks are named t1, t2, ... by position; `--task NAME=CMD` names
one (NAME: lower-case letters, digits, _ and -, e.g. --task build='make -j4'). A command
that starts with a variable assignment must be named: --task build='CC=gcc make'.

Exit status: 0 committed, 1 failed (nothing was applied), 3 pending approval (an approver
decides with `agentctl approve`); 2 for bad input."""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds `step`, `approve`, `resolve`, `timeline`, `checkpoints`, `rollback`, `fork` and
    `export`."""
    step = subparsers.add_parser(
        "step",
        help="run shell commands as one step: in parallel, committed together or not at all",
        usage="%(prog)s RUN --task [NAME=]CMD [--task [NAME=]CMD]... [--allow-failure NAME]... "
        "[--timeout SECONDS] [--no-name-prefix] [--request-approval] [--json]",
        description="Runs one step of RUN: every task in parallel on the last checkpoint, then\n"
        "all of their changes at once, or none. Streams each task's output, its lines\n"
        "prefixed [NAME], then a summary on stderr.",
        epilog=_TASK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    step.add_argument("run", metavar="RUN", help="run id")
    step.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="[NAME=]CMD",
        help="a task: shell command run as /bin/sh -c CMD (repeatable; see below)",
    )
    step.add_argument(
        "--allow-failure",
        action="append",
        default=[],
        metavar="NAME",
        help="a non-zero exit of this task does not fail the step (repeatable)",
    )
    step.add_argument(
        "--timeout",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="each task's wall time limit (default and maximum: the policy's)",
    )
    step.add_argument(
        "--name-prefix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefix each output line with [NAME] (default: on)",
    )
    step.add_argument(
        "--request-approval",
        action="store_true",
        help="wait for an approver first, e.g. when a task's script runs a program the policy "
        "gates (sh -c 'rm x'): only an approved step can run it",
    )
    _json_flag(step, "print the step as JSON at the end (task output included) instead")
    step.set_defaults(func=cmd_step)

    approve = subparsers.add_parser(
        "approve",
        help="approve or reject a step that waits for approval (approver socket)",
        description="Approves STEP of RUN, which then runs (exit 0 committed, 1 failed), or "
        "rejects it (exit 0 once discarded). Only on the approver socket: "
        f"agentctl --socket .../{APPROVER_SOCKET} approve ...",
    )
    approve.add_argument("run", metavar="RUN", help="run id")
    approve.add_argument("step", type=_step_number, metavar="STEP", help="the pending step")
    approve.add_argument("--reject", action="store_true", help="reject it instead")
    approve.add_argument("--reason", default="", metavar="TEXT", help="why, for the record")
    _json_flag(approve)
    approve.set_defaults(func=cmd_approve)

    resolve = subparsers.add_parser(
        "resolve",
        help="resolve an AMBIGUOUS step (approver socket): retry, accept or abandon",
        description="A step the daemon was running with network egress when it stopped is "
        "AMBIGUOUS: nothing was committed, but its external effects may have happened, and "
        "nothing else runs on the run until it is resolved. retry runs its tasks again (the "
        "reply says how it ended); accept takes its effects as done (nothing is committed); "
        "abandon discards it. Only on the approver socket, and not by whoever requested it.",
    )
    resolve.add_argument("run", metavar="RUN", help="run id")
    resolve.add_argument("step", type=_step_number, metavar="STEP", help="the ambiguous step")
    resolve.add_argument("resolution", choices=("retry", "accept", "abandon"),
                         help="what to do with it")
    resolve.add_argument("--reason", required=True, metavar="TEXT",
                         help="why, for the record (required: a judgement about effects)")
    _json_flag(resolve)
    resolve.set_defaults(func=cmd_resolve)

    timeline = subparsers.add_parser(
        "timeline", help="what ran in a run, step by step: outcome, time, changes"
    )
    timeline.add_argument("run", metavar="RUN", help="run id")
    _json_flag(timeline)
    timeline.set_defaults(func=cmd_timeline)

    checkpoints = subparsers.add_parser("checkpoints", help="list a run's checkpoints")
    checkpoints.add_argument("run", metavar="RUN", help="run id")
    _json_flag(checkpoints)
    checkpoints.set_defaults(func=cmd_checkpoints)

    rollback = subparsers.add_parser(
        "rollback", help="make a checkpoint the run's state; later ones are dropped"
    )
    rollback.add_argument("run", metavar="RUN", help="run id")
    rollback.add_argument("step", type=_step_number, metavar="STEP", help="the checkpoint")
    _json_flag(rollback)
    rollback.set_defaults(func=cmd_rollback)

    fork = subparsers.add_parser(
        "fork", help="start a new run from a checkpoint; prints the new run's id"
    )
    fork.add_argument("run", metavar="RUN", help="run id")
    fork.add_argument("step", type=_step_number, metavar="STEP", help="the checkpoint")
    fork.add_argument(
        "--label", default="", metavar="TEXT", help="free text recorded with the new run"
    )
    _json_flag(fork)
    fork.set_defaults(func=cmd_fork)

    export = subparsers.add_parser(
        "export", help="write a tarball of the workspace at a checkpoint"
    )
    export.add_argument("run", metavar="RUN", help="run id")
    export.add_argument("step", type=_step_number, metavar="STEP", help="the checkpoint")
    export.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="where to write it (`-` for stdout); a file appears only once complete",
    )
    export.set_defaults(func=cmd_export)


def _json_flag(parser: argparse.ArgumentParser, text: str = "print JSON instead of text") -> None:
    parser.add_argument("--json", action="store_true", help=text)


def _step_number(text: str) -> int:
    if not _DIGITS.match(text) or int(text) > MAX_STEP:
        raise argparse.ArgumentTypeError(f"expected a step number (0, 1, 2, ...), got {text!r}")
    return int(text)


def _socket_hint(role_socket: str, what: str) -> Callable[[Handler], Handler]:
    """Wraps a handler so that a refusal for the caller's role says which socket to use."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapper(args: argparse.Namespace) -> int:
            try:
                return handler(args)
            except ClientError as exc:
                if exc.code != "PERMISSION_DENIED" or not _ROLE_REFUSAL.search(exc.message):
                    raise
                here = os.path.dirname(os.path.abspath(args.client().socket))
                hint = f"{what}: use agentctl --socket {os.path.join(here, role_socket)} ..."
                raise ClientError(exc.code, f"{exc.message} ({hint})") from None

        return wrapper

    return decorate


_on_client_socket = _socket_hint(CLIENT_SOCKET, "this is done on the client socket")
_on_approver_socket = _socket_hint(APPROVER_SOCKET, "approvals are made on the approver socket")


# --- step ----------------------------------------------------------------------------------


def parse_tasks(items: list[str], allow_failure: list[str], timeout: float = 0.0) -> list[TaskSpec]:
    """Turns `--task [NAME=]CMD` items into tasks run as `/bin/sh -c CMD`; UsageError when a
    command is empty, a name is malformed or used twice, or --allow-failure names no task.

    `NAME=CMD` names a task when NAME is lower case (letters, digits, _, -); an upper-case
    `VAR=...` is refused rather than guessed, since it reads as a variable assignment.
    Anything else is a command, named tN by its position N.
    """
    if not items:
        raise output.UsageError(
            "step: no task given; add one --task CMD per task, e.g. --task 'make test'"
        )
    tasks: list[TaskSpec] = []
    for position, item in enumerate(items, 1):
        head, has_name, command = item.partition("=")
        if has_name and _TASK_NAME.match(head):
            name = head
        elif has_name and not head:
            raise output.UsageError(f"--task {item!r}: no task name before `=`")
        elif has_name and _VARIABLE.match(head):
            raise output.UsageError(
                f"--task {item!r}: {head!r} is not a task name (those are lower case); to "
                f"run a command that sets {head}, name the task: "
                f"--task NAME={shlex.quote(item)}"
            )
        else:
            name, command = f"t{position}", item
        if not command.strip():
            raise output.UsageError(f"--task {item!r}: no command to run")
        if any(t.name == name for t in tasks):
            raise output.UsageError(
                f"--task: task name {name} is used twice (unnamed tasks are named t1, t2, "
                "... by position)"
            )
        tasks.append(TaskSpec(name=name, argv=(SHELL, "-c", command), timeout=timeout))
    names = [t.name for t in tasks]
    for name in allow_failure:
        if name not in names:
            raise output.UsageError(
                f"--allow-failure {name}: no task of that name (the tasks: {', '.join(names)})"
            )
    return [replace(t, allow_failure=t.name in allow_failure) for t in tasks]


class LinePrefixer:
    """Writes each task's output line by line, each line prefixed `[NAME] `.

    Chunks of different tasks interleave; a line is written once complete (or when its task
    ends), so lines of two tasks never mix. Each line is flushed at once, for a live view.
    """

    def __init__(self, out: IO[bytes], err: IO[bytes]) -> None:
        self._sinks = {Stream.STDOUT: out, Stream.STDERR: err}
        self._partial: dict[tuple[str, Stream], bytes] = {}

    def write(self, chunk: TaskOutput) -> None:
        """Writes the chunk's complete lines; keeps the rest until the line is done."""
        key = (chunk.task, chunk.stream)
        data = self._partial.pop(key, b"") + chunk.data
        lines, newline, rest = data.rpartition(b"\n")
        if rest:
            self._partial[key] = rest
        if newline:
            self._emit(chunk.task, chunk.stream, lines.split(b"\n"))

    def finish(self, task: str | None = None) -> None:
        """Writes what is left of `task`'s last line (of every task's if None)."""
        for key in [k for k in self._partial if task is None or k[0] == task]:
            self._emit(key[0], key[1], [self._partial.pop(key)])

    def _emit(self, task: str, stream: Stream, lines: list[bytes]) -> None:
        prefix = f"[{output.printable(task)}] ".encode()
        sink = self._sinks[stream]
        sink.write(b"".join(prefix + line + b"\n" for line in lines))
        sink.flush()


def step_status(reply: StepReply) -> int:
    """0 committed, 3 pending approval, 1 anything else."""
    if reply.state is StepState.COMMITTED:
        return EXIT_COMMITTED
    if reply.state is StepState.PENDING_APPROVAL:
        return EXIT_PENDING_APPROVAL
    return EXIT_FAILED


@_on_client_socket
def cmd_step(args: argparse.Namespace) -> int:
    """`step`: streams the tasks' output, then says what became of the step."""
    tasks = parse_tasks(args.task, args.allow_failure, args.timeout)
    events = args.client().stream_step(args.run, tasks,
                                       request_approval=args.request_approval)
    prefixer = None
    if args.name_prefix and not args.json:
        prefixer = LinePrefixer(sys.stdout.buffer, sys.stderr.buffer)
    collected: dict[tuple[str, Stream], list[bytes]] = {}
    try:
        return _show_step(args, events, prefixer, collected)
    finally:
        if prefixer is not None:
            prefixer.finish()  # what a task wrote before the stream broke is not lost


def _show_step(
    args: argparse.Namespace,
    events: Iterator[StepEvent],
    prefixer: LinePrefixer | None,
    collected: dict[tuple[str, Stream], list[bytes]],
) -> int:
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for event in events:
        if isinstance(event, TaskOutput):
            if args.json:
                collected.setdefault((event.task, event.stream), []).append(event.data)
            elif prefixer is not None:
                prefixer.write(event)
            else:
                sink = err if event.stream is Stream.STDERR else out
                sink.write(event.data)
                sink.flush()
        elif isinstance(event, TaskReport):
            if prefixer is not None:
                prefixer.finish(event.name)
        else:
            if prefixer is not None:
                prefixer.finish()
            if args.json:
                output.print_json(output.step_to_json(_with_output(event, collected)))
            else:
                sys.stdout.flush()
                sys.stderr.write(output.step_summary(event))
                if event.state is StepState.PENDING_APPROVAL:
                    sys.stderr.write(_approve_hint(args, event))
            return step_status(event)
    # stream_step always ends with a StepReply or raises; this is only reached by a bug.
    raise AssertionError("step stream ended without a reply")


def _with_output(reply: StepReply, collected: dict[tuple[str, Stream], list[bytes]]) -> StepReply:
    def task(report: TaskReport) -> TaskReport:
        return replace(
            report,
            stdout=report.stdout or b"".join(collected.get((report.name, Stream.STDOUT), [])),
            stderr=report.stderr or b"".join(collected.get((report.name, Stream.STDERR), [])),
        )

    return replace(reply, tasks=tuple(task(t) for t in reply.tasks))


def _approve_hint(args: argparse.Namespace, reply: StepReply) -> str:
    here = os.path.dirname(os.path.abspath(args.client().socket))
    socket = os.path.join(here, APPROVER_SOCKET)
    return (
        f"  an approver decides: agentctl --socket {socket} approve {args.run} {reply.step} "
        "[--reject]\n"
    )


# --- approve -------------------------------------------------------------------------------


@_on_approver_socket
def cmd_approve(args: argparse.Namespace) -> int:
    """`approve`: 0 when the decision took effect (committed, or discarded as asked)."""
    reply = args.client().approve(args.run, args.step, not args.reject, args.reason)
    if args.json:
        output.print_json(output.step_to_json(reply))
    else:
        sys.stdout.write(output.step_summary(reply))
    if args.reject and reply.state is StepState.DISCARDED:
        return EXIT_COMMITTED
    return step_status(reply)


@_on_approver_socket
def cmd_resolve(args: argparse.Namespace) -> int:
    """`resolve`: 0 when the resolution took effect (for retry: the step committed)."""
    reply = args.client().resolve(args.run, args.step, args.resolution, args.reason)
    if args.json:
        output.print_json(output.step_to_json(reply))
    else:
        sys.stdout.write(output.step_summary(reply))
    if reply.state in (StepState.ACCEPTED, StepState.DISCARDED):
        return EXIT_COMMITTED
    return step_status(reply)


# --- timeline and checkpoints --------------------------------------------------------------


def cmd_timeline(args: argparse.Namespace) -> int:
    """`timeline`: every attempt at a step, oldest first; a note on stderr when none."""
    steps = args.client().list_steps(args.run)
    if args.json:
        network = _network_records(args.client(), args.run)
        output.print_json({"run_id": args.run, "steps": [
            output.step_to_json(s, network.of_step(s)) for s in steps]})
    elif steps:
        sys.stdout.write(output.timeline(steps, _network_records(args.client(), args.run)))
    else:
        print(f"run {args.run} has no steps yet", file=sys.stderr)
    return 0


def _network_records(client: AgentdClient, run_id: str) -> output.TaskRecords:
    """The run's network records from the audit service, by step attempt and task (the
    audit log is the record of them; the step API does not carry them)."""
    found = output.TaskRecords()
    try:
        return _add_records(client, run_id, found)
    except grpc.RpcError as exc:  # without them the timeline is still the steps'
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # an audit service is expected
            print(f"agentctl: network records not shown: {client.error(exc)}",
                  file=sys.stderr)
        return found


def _add_records(client: AgentdClient, run_id: str, found: output.TaskRecords
                 ) -> output.TaskRecords:
    since, seen = None, -1
    while True:  # pages of the run's records, oldest first (since is inclusive)
        reply = client.audit.query(run_id=run_id, limit=10000, since=since)
        for record in reply.records:
            if record.index > seen:
                found.add(record.event, record.task_id, record.time.ToDatetime(tzinfo=UTC),
                          json.loads(record.details_json or "{}"))
                seen = record.index
        if not reply.more or not reply.records:
            return found
        since = reply.records[-1].time


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """`checkpoints`: a table of the run's checkpoints; a note on stderr when none."""
    checkpoints = args.client().list_checkpoints(args.run)
    if args.json:
        output.print_json({"checkpoints": [output.checkpoint_to_json(c) for c in checkpoints]})
    elif checkpoints:
        sys.stdout.write(output.checkpoints_table(checkpoints))
    else:
        print(f"run {args.run} has no checkpoints", file=sys.stderr)
    return 0


# --- rollback, fork, export ----------------------------------------------------------------


@_on_client_socket
def cmd_rollback(args: argparse.Namespace) -> int:
    """`rollback`: says which step the run is now at."""
    run = args.client().rollback(args.run, args.step)
    if args.json:
        output.print_json(output.run_to_json(run))
    else:
        print(f"{run.run_id} rolled back to step {run.step}")
    return 0


@_on_client_socket
def cmd_fork(args: argparse.Namespace) -> int:
    """`fork`: prints only the new run's id, for `NEW=$(agentctl fork RUN 2)`."""
    run = args.client().fork(args.run, args.step, label=args.label)
    if args.json:
        output.print_json(output.run_to_json(run))
    else:
        print(run.run_id)
    return 0


@_on_client_socket
def cmd_export(args: argparse.Namespace) -> int:
    """`export`: streams the tarball to FILE (complete or not at all) or to stdout."""
    if args.output == "-":
        if sys.stdout.isatty():
            raise output.UsageError(
                "export: refusing to write a tarball to a terminal; use -o FILE or a pipe"
            )
        sink = sys.stdout.buffer
        for chunk in args.client().export_checkpoint(args.run, args.step):
            sink.write(chunk)
        sink.flush()
        return 0
    path = Path(args.output)
    size = 0
    with atomic_file(path) as sink:
        for chunk in args.client().export_checkpoint(args.run, args.step):
            sink.write(chunk)
            size += len(chunk)
    print(f"exported step {args.step} of {args.run} to {path} ({output.human_bytes(size)})")
    return 0


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Yields a temporary file next to `path` that replaces `path` (by rename) only when the
    block ends without an exception; otherwise it is removed and `path` is left as it was.

    UsageError, before anything is written, when `path` cannot be created.
    """
    if path.is_dir():
        raise output.UsageError(f"-o {path}: is a directory")
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".part")
    except OSError as exc:
        raise output.UsageError(f"-o {path}: cannot write there: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename is durable once the directory is synced
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

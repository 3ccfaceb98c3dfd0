"""`agentctl run create|list|show|close`: the lifecycle of runs.

Human output goes to stdout in the forms of `agentd.cli.output`; `run create` prints only the
run id so that `RUN=$(agentctl run create --agent x)` works. `--json` prints the API's view.

`run create --channel NAME:REDUCER[:TASK,TASK...]` declares a channel of the run (state its
steps' tasks write and the barrier merges); the task list is for, and only for, `barrier`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agentd.cli import output
from agentd.client import REDUCERS, ChannelDecl


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds `run` and its subcommands."""
    run = subparsers.add_parser("run", help="create, list, show and close runs")
    sub = run.add_subparsers(dest="run_command", metavar="ACTION", required=True)

    create = sub.add_parser("create", help="create a run of a registered agent; prints its id")
    create.add_argument("--agent", required=True, metavar="NAME", help="the registered agent")
    create.add_argument(
        "--label", default="", metavar="TEXT", help="free text recorded with the run"
    )
    create.add_argument(
        "--channel",
        dest="channels",  # not `channel`: args.channel() is the session's grpc channel
        action="append",
        default=[],
        metavar="NAME:REDUCER[:TASK,...]",
        help=f"declare a channel (repeatable); REDUCER is one of {', '.join(REDUCERS)}; "
        "a barrier lists the tasks it waits for, e.g. votes:barrier:t1,t2",
    )
    _json_flag(create)
    create.set_defaults(func=cmd_create)

    list_ = sub.add_parser("list", help="list open runs")
    list_.add_argument("--agent", default="", metavar="NAME", help="only runs of this agent")
    list_.add_argument("--all", action="store_true", help="include closed runs")
    _json_flag(list_)
    list_.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="show one run")
    show.add_argument("run", metavar="RUN", help="run id")
    _json_flag(show)
    show.set_defaults(func=cmd_show)

    close = sub.add_parser("close", help="kill what still runs in a run and remove its workspace")
    close.add_argument("run", metavar="RUN", help="run id")
    close.add_argument(
        "--keep-workspace", action="store_true", help="leave the workspace directory in place"
    )
    _json_flag(close)
    close.set_defaults(func=cmd_close)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def parse_channels(items: list[str]) -> list[ChannelDecl]:
    """Turns `NAME:REDUCER[:TASK,...]` items into declarations; UsageError when one is
    malformed, names an unknown reducer, lists tasks for anything but a barrier (or none for
    a barrier), or repeats a name. The daemon checks the names themselves."""
    decls: list[ChannelDecl] = []
    for item in items:
        name, _, rest = item.partition(":")
        reducer, has_tasks, task_list = rest.partition(":")
        if not name or not reducer:
            raise output.UsageError(
                f"--channel expects NAME:REDUCER[:TASK,...], got {item!r} "
                "(e.g. plan:last_value or votes:barrier:t1,t2)"
            )
        if reducer not in REDUCERS:
            raise output.UsageError(
                f"--channel {item!r}: unknown reducer {reducer!r}; use one of {', '.join(REDUCERS)}"
            )
        tasks = tuple(task_list.split(",")) if has_tasks else ()
        if reducer == "barrier" and (not tasks or "" in tasks):
            raise output.UsageError(
                f"--channel {item!r}: a barrier channel lists the tasks it waits for, "
                f"e.g. {name}:barrier:t1,t2"
            )
        if reducer != "barrier" and has_tasks:
            raise output.UsageError(
                f"--channel {item!r}: only a barrier channel takes a list of tasks"
            )
        if any(d.name == name for d in decls):
            raise output.UsageError(f"--channel {name} is declared more than once")
        decls.append(ChannelDecl(name=name, reducer=reducer, barrier_tasks=tasks))
    return decls


def cmd_create(args: argparse.Namespace) -> int:
    """`run create`: prints the new run's id (or the whole run with --json)."""
    channels = parse_channels(args.channels)
    run = args.client().create_run(args.agent, label=args.label, channels=channels)
    if args.json:
        output.print_json(output.run_to_json(run))
    else:
        print(run.run_id)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """`run list`: a table of runs; a note on stderr when there are none."""
    runs = args.client().list_runs(agent=args.agent, include_closed=args.all)
    if args.json:
        output.print_json({"runs": [output.run_to_json(r) for r in runs]})
    elif runs:
        sys.stdout.write(output.runs_table(runs))
    else:
        of = f" of agent {args.agent}" if args.agent else ""
        hint = "" if args.all else " (--all includes closed ones)"
        print(f"no {'' if args.all else 'open '}runs{of}{hint}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """`run show`: the details of one run."""
    run = args.client().get_run(args.run)
    if args.json:
        output.print_json(output.run_to_json(run))
    else:
        sys.stdout.write(output.run_details(run))
    return 0


def cmd_close(args: argparse.Namespace) -> int:
    """`run close`: closes the run and says where its workspace went."""
    run = args.client().close_run(args.run, keep_workspace=args.keep_workspace)
    if args.json:
        output.print_json(output.run_to_json(run))
    elif run.workspace:
        print(f"closed {run.run_id}; workspace kept at {run.workspace}")
    else:
        print(f"closed {run.run_id}; workspace removed")
    return 0

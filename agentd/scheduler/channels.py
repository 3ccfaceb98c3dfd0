"""Channels: named pieces of run state, declared at CreateRun, merged at the barrier by a reducer.

Glossary (the words the scheduler uses):

    spec      a channel's declaration (`ChannelSpec`): its name and reducer; fixed for the run
    state     the committed values: channel name -> `ChannelValue` (value, version, `seen`)
    snapshot  what the tasks of step S see: `visible(specs, state after S-1)`
    write     one (channel, value) pair a task published on `$AGENTD_WRITES_FD`

Reducers (how `barrier.apply_writes` merges one step's writes, in task order):

    last_value  the value written; two tasks writing it in one step is a conflict
    append      the list so far + every value written this step, one element per write
    topic       the list of values written this step; visible to the next step only
    barrier     {task: value} of the tasks named in the spec; visible once all of them wrote

This module is pure: declaring, snapshotting and parsing touch no file and no clock. Values are
JSON values (what `json.loads` returns) and are shared, never copied: treat a snapshot and a
state as read-only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from agentd.errors import InvalidArgument
from agentd.store.values import (
    MAX_BARRIER_TASKS,
    MAX_CHANNELS,
    MAX_TASK_NAME,
    NAME_PATTERN,
    REDUCERS,
    ChannelSpec,
    ChannelValue,
    Reducer,
    encoded_size,
)

__all__ = ["MAX_BARRIER_TASKS", "MAX_CHANNELS", "MAX_TASK_NAME", "NAME_PATTERN", "REDUCERS",
           "ChannelSpec", "ChannelValue", "Reducer", "WritesError", "declare", "encoded_size",
           "initial_state", "is_available", "parse_writes", "visible"]

# Nesting depth of a written value. Deeper values would hit Python's recursion limit in the
# audit encoder and in checkpoint code long after the task that wrote them is gone.
MAX_VALUE_DEPTH: Final = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


class WritesError(Exception):
    """A task's writes are malformed; the message names the line and what is wrong.

    Not an AgentdError: a task that writes garbage is an outcome, like a non-zero exit. The
    caller marks the task failed with `str(error)` as the reason, which fails the step.
    """

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line
        self.detail = message


def declare(specs: Sequence[ChannelSpec]) -> dict[str, ChannelSpec]:
    """The run's channels by name, in declaration order; raises InvalidArgument if malformed."""
    if len(specs) > MAX_CHANNELS:
        raise InvalidArgument(
            f"{len(specs)} channels declared; a run has at most {MAX_CHANNELS}")
    declared: dict[str, ChannelSpec] = {}
    for spec in specs:
        spec.validate()
        if spec.name in declared:
            raise InvalidArgument(
                f"channel {spec.name!r} is declared twice; declare each channel once")
        declared[spec.name] = spec
    return declared


_EMPTY: Final[dict[str, Any]] = {
    "last_value": lambda: None, "append": list, "topic": list, "barrier": lambda: None}


def initial_state(specs: Mapping[str, ChannelSpec]) -> dict[str, ChannelValue]:
    """The state before step 1: every channel empty at version 0."""
    return {name: ChannelValue(_EMPTY[spec.reducer](), 0) for name, spec in specs.items()}


def is_available(spec: ChannelSpec, current: ChannelValue) -> bool:
    """Whether tasks see the channel: always, except a barrier that some task has not written."""
    if spec.reducer != "barrier":
        return True
    return len(current.seen) == len(spec.barrier_tasks) and set(current.seen) == set(
        spec.barrier_tasks)


def visible(specs: Mapping[str, ChannelSpec], state: Mapping[str, ChannelValue]) -> dict[str, Any]:
    """The snapshot the tasks of the next step see: channel name -> value.

    A topic shows the values written in the step that produced `state`; a barrier is absent
    until available, then shows {task: value}.
    """
    return {name: state[name].value for name, spec in specs.items()
            if is_available(spec, state[name])}


# ---- the writes a task publishes ------------------------------------------------------------


def parse_writes(data: bytes, *, limit: int,
                 channels: Mapping[str, ChannelSpec]) -> list[tuple[str, Any]]:
    """The (channel, value) pairs in `data`, in order; raises WritesError naming the line.

    `data` is JSON lines, each {"channel": <declared name>, "value": <any JSON>}; blank lines
    are skipped. Refused: more than `limit` bytes in all, bytes that are not UTF-8, invalid
    JSON (NaN and Infinity included), a repeated key, any other key, values nested deeper than
    MAX_VALUE_DEPTH or holding unpaired surrogates (`\\ud800`), which no UTF-8 file can store.
    """
    if limit < 0:
        raise ValueError(f"limit must be a number of bytes, not {limit}")
    if len(data) > limit:
        line = data.count(b"\n", 0, limit) + 1
        raise WritesError(
            f"the writes are {len(data)} bytes, more than the {limit} bytes the policy allows"
            " a task; write less, or keep large results in files in the workspace", line=line)
    writes: list[tuple[str, Any]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        writes.append(_parse_line(raw, number, channels))
    return writes


def _parse_line(raw: bytes, number: int,
                channels: Mapping[str, ChannelSpec]) -> tuple[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WritesError(
            f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
            line=number) from None
    try:
        item = json.loads(text, object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_no_constants)
    except _DuplicateKey as exc:
        raise WritesError(f"key {exc.key!r} appears twice in one object", line=number) from None
    except json.JSONDecodeError as exc:
        raise WritesError(f"not valid JSON: {exc.msg} (column {exc.colno})",
                          line=number) from None
    except RecursionError:
        raise WritesError(f"value is nested more than {MAX_VALUE_DEPTH} levels deep",
                          line=number) from None
    except ValueError as exc:  # NaN/Infinity, or an integer longer than Python converts
        raise WritesError(f"not valid JSON: {exc}", line=number) from None
    if not isinstance(item, dict):
        raise WritesError(
            f'a write is an object {{"channel": ..., "value": ...}}, not {_json_type(item)}',
            line=number)
    if extra := sorted(set(item) - {"channel", "value"}):
        raise WritesError(
            f"unexpected key(s) {', '.join(map(repr, extra))}; a write has only"
            ' "channel" and "value"', line=number)
    if missing := [key for key in ("channel", "value") if key not in item]:
        raise WritesError(f"missing {' and '.join(map(repr, missing))}", line=number)
    channel, value = item["channel"], item["value"]
    if not isinstance(channel, str):
        raise WritesError(f'"channel" must be a string, not {_json_type(channel)}', line=number)
    if channel not in channels:
        declared = ", ".join(sorted(channels)) or "none"
        raise WritesError(
            f"unknown channel {channel!r}; this run declares: {declared}", line=number)
    if problem := _check_value(value):
        raise WritesError(problem, line=number)
    return channel, value


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_value(value: Any) -> str | None:
    """Why `value` cannot be kept (too deep, unpaired surrogate), or None; iterative."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return f"string {item[:40]!r} holds an unpaired surrogate, which is not UTF-8"
        elif isinstance(item, list | dict):
            if depth > MAX_VALUE_DEPTH:
                return f"value is nested more than {MAX_VALUE_DEPTH} levels deep"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)

"""Channel declarations, the snapshot tasks see, and parsing the writes tasks publish."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agentd.errors import InvalidArgument
from agentd.scheduler.channels import (
    MAX_CHANNELS,
    MAX_VALUE_DEPTH,
    ChannelSpec,
    ChannelValue,
    WritesError,
    declare,
    initial_state,
    is_available,
    parse_writes,
    visible,
)

CHANNELS = declare([
    ChannelSpec("plan", "last_value"),
    ChannelSpec("log", "append"),
    ChannelSpec("news", "topic"),
    ChannelSpec("done", "barrier", ("a", "b")),
])
TOO_DEEP = f"value is nested more than {MAX_VALUE_DEPTH} levels deep"


def line(channel: str, value: Any) -> bytes:
    return json.dumps({"channel": channel, "value": value}).encode() + b"\n"


class TestChannelSpec:
    @pytest.mark.parametrize("name", ["plan", "_x", "review.notes", "a-b_c.9", "A" * 64])
    def test_valid_names(self, name: str) -> None:
        """Names of 1-64 letters, digits, '_', '.', '-' starting with a letter or '_' pass."""
        ChannelSpec(name, "last_value").validate()

    @pytest.mark.parametrize("name", ["", "9lives", "-x", ".x", "a b", "a/b", "A" * 65, "é"])
    def test_invalid_names(self, name: str) -> None:
        """Any other name is refused with the rule and an example."""
        with pytest.raises(InvalidArgument, match=r"e\.g\. plan"):
            ChannelSpec(name, "last_value").validate()

    def test_unknown_reducer(self) -> None:
        """An unknown reducer is refused and the known ones are listed."""
        with pytest.raises(InvalidArgument, match="last_value, append, topic, barrier"):
            ChannelSpec("x", "sum").validate()  # type: ignore[arg-type]

    def test_barrier_needs_tasks(self) -> None:
        """A barrier without tasks to wait for is refused."""
        with pytest.raises(InvalidArgument, match="needs the names of the tasks"):
            ChannelSpec("x", "barrier").validate()

    @pytest.mark.parametrize("reducer", ["last_value", "append", "topic"])
    def test_tasks_only_for_barrier(self, reducer: Any) -> None:
        """barrier_tasks on a reducer other than barrier is refused."""
        with pytest.raises(InvalidArgument, match="only for the barrier reducer"):
            ChannelSpec("x", reducer, ("a",)).validate()

    def test_barrier_tasks_listed_twice(self) -> None:
        """A barrier listing a task twice is refused, naming the task."""
        with pytest.raises(InvalidArgument, match="'a' listed more than once"):
            ChannelSpec("x", "barrier", ("a", "b", "a")).validate()

    @pytest.mark.parametrize("task", ["", "a b", "t\n", "x" * 129])
    def test_barrier_task_names(self, task: str) -> None:
        """Empty, spaced, control-character or overlong barrier task names are refused."""
        with pytest.raises(InvalidArgument, match="is not a task name"):
            ChannelSpec("x", "barrier", ("a", task)).validate()

    def test_barrier_tasks_list_becomes_tuple(self) -> None:
        """barrier_tasks given as a list (a proto repeated field) is kept as a tuple."""
        spec = ChannelSpec("x", "barrier", ["a", "b"])  # type: ignore[arg-type]
        assert spec.barrier_tasks == ("a", "b")
        assert hash(spec) == hash(ChannelSpec("x", "barrier", ("a", "b")))


class TestDeclare:
    def test_keeps_order(self) -> None:
        """Channels are returned by name in declaration order."""
        assert list(CHANNELS) == ["plan", "log", "news", "done"]
        assert CHANNELS["done"].barrier_tasks == ("a", "b")

    def test_duplicate(self) -> None:
        """A channel declared twice is refused, saying to declare it once."""
        with pytest.raises(InvalidArgument, match="'plan' is declared twice; declare each"):
            declare([ChannelSpec("plan", "last_value"), ChannelSpec("plan", "append")])

    def test_invalid_spec(self) -> None:
        """A malformed declaration anywhere in the list is refused."""
        with pytest.raises(InvalidArgument, match="needs the names"):
            declare([ChannelSpec("ok", "append"), ChannelSpec("x", "barrier")])

    def test_too_many(self) -> None:
        """More than MAX_CHANNELS channels are refused."""
        specs = [ChannelSpec(f"c{i}", "append") for i in range(MAX_CHANNELS + 1)]
        with pytest.raises(InvalidArgument, match=f"at most {MAX_CHANNELS}"):
            declare(specs)

    def test_none(self) -> None:
        """A run may declare no channels at all."""
        assert declare([]) == {}


class TestInitialState:
    def test_empty_values_at_version_zero(self) -> None:
        """last_value and barrier start as None, append and topic as [], all at version 0."""
        assert initial_state(CHANNELS) == {
            "plan": ChannelValue(None, 0), "log": ChannelValue([], 0),
            "news": ChannelValue([], 0), "done": ChannelValue(None, 0)}

    def test_lists_not_shared(self) -> None:
        """Each channel gets its own empty list."""
        state = initial_state(CHANNELS)
        assert state["log"].value is not state["news"].value


class TestVisible:
    def test_initial_snapshot(self) -> None:
        """Before step 1 every channel but the barrier is visible, empty."""
        assert visible(CHANNELS, initial_state(CHANNELS)) == {
            "plan": None, "log": [], "news": []}

    def test_partial_barrier_hidden(self) -> None:
        """A barrier that only some of its tasks wrote is absent from the snapshot."""
        state = initial_state(CHANNELS) | {"done": ChannelValue({"a": 1}, 1, ("a",))}
        assert not is_available(CHANNELS["done"], state["done"])
        assert "done" not in visible(CHANNELS, state)

    def test_complete_barrier_shown(self) -> None:
        """A barrier that all of its tasks wrote shows {task: value}."""
        state = initial_state(CHANNELS) | {
            "done": ChannelValue({"a": 1, "b": 2}, 2, ("a", "b"))}
        assert is_available(CHANNELS["done"], state["done"])
        assert visible(CHANNELS, state)["done"] == {"a": 1, "b": 2}

    def test_values_as_committed(self) -> None:
        """Other channels show their committed values (a topic: the previous step's values)."""
        state = {"plan": ChannelValue("p", 3), "log": ChannelValue([1, 2], 2),
                 "news": ChannelValue(["n"], 1), "done": ChannelValue(None, 0)}
        assert visible(CHANNELS, state) == {"plan": "p", "log": [1, 2], "news": ["n"]}


class TestParseWrites:
    def test_lines_in_order(self) -> None:
        """Each line gives one (channel, value) pair, in the order written."""
        data = line("plan", "p") + line("log", 1) + line("log", [2, 3])
        assert parse_writes(data, limit=1000, channels=CHANNELS) == [
            ("plan", "p"), ("log", 1), ("log", [2, 3])]

    def test_blank_lines_and_last_newline(self) -> None:
        """Empty and blank lines are skipped and the last line needs no newline."""
        data = b"\n" + line("plan", 1) + b"   \n\r\n" + line("log", 2).rstrip(b"\n")
        assert parse_writes(data, limit=1000, channels=CHANNELS) == [("plan", 1), ("log", 2)]

    def test_crlf(self) -> None:
        """A line ending in CRLF parses like one ending in LF."""
        assert parse_writes(line("plan", 1).replace(b"\n", b"\r\n"), limit=100,
                            channels=CHANNELS) == [("plan", 1)]

    def test_nothing(self) -> None:
        """No bytes means no writes."""
        assert parse_writes(b"", limit=0, channels=CHANNELS) == []

    @pytest.mark.parametrize("value", [
        None, True, 0, -1.5, 10**30, "text ünïcode", [], {}, {"a": [1, {"b": None}]}])
    def test_any_json_value(self, value: Any) -> None:
        """Values may be any JSON value."""
        assert parse_writes(line("plan", value), limit=1000, channels=CHANNELS) == [
            ("plan", value)]

    def test_nested_to_the_limit(self) -> None:
        """A value nested exactly MAX_VALUE_DEPTH levels deep is accepted."""
        value: Any = 0
        for _ in range(MAX_VALUE_DEPTH):
            value = [value]
        assert parse_writes(line("plan", value), limit=10_000, channels=CHANNELS)[0][1] == value

    @pytest.mark.parametrize(("bad", "message"), [
        (b'{"channel": "plan", "value": }', "not valid JSON: Expecting value (column 30)"),
        (b'{"channel": "plan", "value": 1} x', "not valid JSON: Extra data"),
        (b'{"channel": "plan", "value": NaN}', "not valid JSON: NaN is not a JSON number"),
        (b'{"channel": "plan", "value": -Infinity}',
         "not valid JSON: -Infinity is not a JSON number"),
        (b'{"channel": "plan", "value": ' + b"1" * 5000 + b"}", "not valid JSON"),
        (b'{"channel": "plan", "value": "\xff"}', "not UTF-8 (byte 0xff at column 31)"),
        (b'\xef\xbb\xbf{"channel": "plan", "value": 1}', "not valid JSON: Unexpected UTF-8 BOM"),
        (b'{"channel": "plan", "value": 1, "x": 2}',
         "unexpected key(s) 'x'; a write has only \"channel\" and \"value\""),
        (b'{"channel": "plan"}', "missing 'value'"),
        (b"{}", "missing 'channel' and 'value'"),
        (b"[1]", "a write is an object {\"channel\": ..., \"value\": ...}, not an array"),
        (b'"plan"', "a write is an object {\"channel\": ..., \"value\": ...}, not a string"),
        (b'{"channel": 3, "value": 1}', '"channel" must be a string, not a number'),
        (b'{"channel": "nope", "value": 1}',
         "unknown channel 'nope'; this run declares: done, log, news, plan"),
        (b'{"channel": "plan", "channel": "log", "value": 1}', "key 'channel' appears twice"),
        (b'{"channel": "plan", "value": {"k": 1, "k": 2}}', "key 'k' appears twice"),
        (b'{"channel": "plan", "value": "\\ud800"}',
         "string '\\ud800' holds an unpaired surrogate"),
        (b'{"channel": "plan", "value": {"\\udfff": 1}}', "string '\\udfff' holds an unpaired"),
        (b'{"channel": "plan", "value": ' + b"[" * (MAX_VALUE_DEPTH + 1)
         + b"]" * (MAX_VALUE_DEPTH + 1) + b"}", TOO_DEEP),
        (b'{"channel": "plan", "value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", TOO_DEEP),
    ])
    def test_errors_name_the_line(self, bad: bytes, message: str) -> None:
        """Each malformed line is refused with its line number and what is wrong."""
        data = line("plan", 1) + b"\n" + bad + b"\n" + line("log", 2)
        with pytest.raises(WritesError) as caught:
            parse_writes(data, limit=1 << 20, channels=CHANNELS)
        assert str(caught.value).startswith(f"line 3: {message}")
        assert caught.value.line == 3

    def test_size_cap_exact(self) -> None:
        """Writes of exactly `limit` bytes are accepted."""
        data = line("plan", "x") * 3
        assert len(parse_writes(data, limit=len(data), channels=CHANNELS)) == 3

    def test_size_cap_exceeded(self) -> None:
        """One byte over `limit` is refused, naming the line that crosses it and the limit."""
        data = line("plan", "x") * 3
        limit = len(line("plan", "x")) * 2 + 5  # inside the third line
        with pytest.raises(WritesError, match=f"^line 3: the writes are {len(data)} bytes,"
                           f" more than the {limit} bytes the policy allows"):
            parse_writes(data, limit=limit, channels=CHANNELS)

    def test_size_cap_before_parsing(self) -> None:
        """Oversized writes are refused without being parsed, even if malformed."""
        with pytest.raises(WritesError, match=r"^line 1: the writes are 11 bytes"):
            parse_writes(b"\xff" * 11, limit=10, channels=CHANNELS)

    def test_negative_limit(self) -> None:
        """A negative limit is a caller's bug."""
        with pytest.raises(ValueError, match="limit"):
            parse_writes(b"", limit=-1, channels=CHANNELS)

"""Audit records: canonical bytes, the fast assembly path, and keeping secrets out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from agentd.audit import record
from agentd.audit.record import (
    REDACTED,
    RedactedEnv,
    assemble,
    canonical,
    check_record,
    line_index,
    line_prev,
    prepare,
    redact_env,
)

TIME = "2024-05-01T10:00:00.123456Z"


def make_line(index: int = 7, **kwargs: object) -> bytes:
    fields: dict[str, object] = {"actor": {"role": "client", "socket": "/run/a.sock"},
                                 "details": {"argv": ["/bin/sh", "-c", "echo é"]}}
    fields.update(kwargs)
    parts = prepare("exec.allowed", **fields)  # type: ignore[arg-type]
    return assemble(parts, index, "ab" * 32, TIME)


class TestCanonical:
    def test_sorted_compact_utf8(self) -> None:
        """Keys sorted, no whitespace, UTF-8 rather than \\u escapes."""
        assert canonical({"b": 1, "a": [1, {"d": "é", "c": None}]}) == (
            '{"a":[1,{"c":null,"d":"é"}],"b":1}'.encode())

    def test_no_nan_and_no_lone_surrogates(self) -> None:
        """Values with no canonical JSON are refused rather than written ambiguously."""
        with pytest.raises(ValueError, match="Out of range float"):
            canonical({"x": float("nan")})
        with pytest.raises(ValueError, match="not valid UTF-8"):
            canonical({"x": "\ud800"})

    def test_control_characters_stay_on_one_line(self) -> None:
        """Newlines in values are escaped, so one record is always one line."""
        assert b"\n" not in canonical({"x": "a\nb\r\x00"})

    def test_assembled_line_is_canonical(self) -> None:
        """The writer's concatenation equals canonical(dict) and round-trips through JSON."""
        line = make_line(run_id="r-1", task_id=None, details={"n": 1.5, "s": 'q"uote,"index":9'})
        rec = json.loads(line)
        assert sorted(rec) == list(record.FIELDS)
        assert canonical(rec) == line
        assert check_record(line) == rec

    def test_time_format_is_fixed_width_utc(self) -> None:
        """RFC 3339 in UTC with microseconds, whatever the input's offset."""
        moment = datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
        assert record.format_time(moment) == "2024-05-01T10:00:00.000005Z"
        assert record.parse_time("2024-05-01T10:00:00.000005Z") == moment
        with pytest.raises(ValueError, match="naive"):
            record.format_time(datetime(2024, 1, 1))
        assert len(record.now()) == len(TIME)
        assert record.parse_time(record.now()).tzinfo is not None
        assert datetime.now(UTC) - record.parse_time(record.now()) < timedelta(seconds=5)


class TestFastAccessors:
    def test_index_and_prev_from_bytes(self) -> None:
        """The top-level index and prev are found even when details contain look-alikes."""
        line = make_line(41, details={"index": 3, "nested": {"index": 5, "prev": "x"},
                                      "text": ',"index":9,"prev":"'})
        assert line_index(line) == 41
        assert line_prev(line) == "ab" * 32

    @pytest.mark.parametrize("bad", [b"", b"garbage", b'{"index":1}', b'{"a":1,"index":01,"b"',
                                     b'{"a":1,"index":x,"prev":"'])
    def test_malformed_lines(self, bad: bytes) -> None:
        """Lines without a well-formed index or prev give None, not an exception."""
        assert line_index(bad) is None or line_prev(bad) is None

    def test_check_record_names_the_problem(self) -> None:
        """A record with a wrong field, or not canonical, is refused with the reason."""
        rec = json.loads(make_line())
        with pytest.raises(ValueError, match="not in canonical form"):
            check_record(json.dumps(rec).encode())
        with pytest.raises(ValueError, match="'index'"):
            check_record(canonical({**rec, "index": -1}))
        with pytest.raises(ValueError, match="fields are"):
            check_record(canonical({**rec, "extra": 1}))
        with pytest.raises(ValueError, match="not JSON"):
            check_record(b"{")


class TestPrepare:
    @pytest.mark.parametrize("event", ["", "Run.Created", "run created", "run.", ".run", "run..x"])
    def test_event_names_are_dotted_lower_case(self, event: str) -> None:
        """Event types are dotted lower-case words; anything else is a bug of the caller."""
        with pytest.raises(ValueError, match="dotted lower-case"):
            prepare(event, actor={"role": "system"})

    def test_actor_is_required(self) -> None:
        """Every record says who acted."""
        with pytest.raises(ValueError, match="actor"):
            prepare("run.created", actor={})

    def test_ids_must_be_strings(self) -> None:
        """run_id and task_id are strings or None."""
        with pytest.raises(TypeError, match="run_id"):
            prepare("run.created", actor={"role": "x"}, run_id=5)  # type: ignore[arg-type]

    def test_unserialisable_details_are_refused(self) -> None:
        """Bytes and other non-JSON values fail in the caller, before anything is queued."""
        with pytest.raises(TypeError):
            prepare("run.created", actor={"role": "x"}, details={"b": b"\x00"})


class TestSecrets:
    def test_redact_env_keeps_names_and_safe_values_only(self) -> None:
        """Only the policy's env.log names keep their values."""
        env = {"API_TOKEN": "s3cr3t", "LANG": "C.UTF-8", "HOME": "/w"}
        redacted = redact_env(env, safe={"LANG"})
        assert redacted == {"API_TOKEN": REDACTED, "HOME": REDACTED, "LANG": "C.UTF-8"}
        assert isinstance(redacted, RedactedEnv)
        parts = prepare("exec.allowed", actor={"role": "c"}, details={"env": redacted})
        assert b"s3cr3t" not in parts.details

    @pytest.mark.parametrize("details", [
        {"env": {"API_TOKEN": "s3cr3t"}},
        {"spec": {"env": {"API_TOKEN": "s3cr3t"}}},
        {"tasks": [{"env": {"API_TOKEN": "s3cr3t"}}]},
    ])
    def test_a_raw_environment_is_refused_anywhere(self, details: dict[str, object]) -> None:
        """A plain mapping under an "env" key, at any depth, never reaches the log."""
        with pytest.raises(ValueError, match="redact_env"):
            prepare("exec.allowed", actor={"role": "c"}, details=details)

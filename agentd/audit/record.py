"""Audit records: their schema, their one canonical byte form, and keeping secrets out.

A record is one JSON object on one line:

    {"actor":{...},"details":{...},"event":"exec.allowed","index":41,"prev":"<64 hex>",
     "run_id":"r-1"|null,"task_id":"t-2"|null,"time":"2024-05-01T10:00:00.123456Z"}

Canonical form: keys sorted by code point, no insignificant whitespace, UTF-8 (not \\u
escapes), no NaN or Infinity. The bytes are what the Merkle tree hashes, so the same record
must always give the same bytes; `canonical(json.loads(line)) == line` holds for every line the
log writes (tested), which lets readers hand out records as dicts and still prove them.

`prev` is the leaf hash of the previous record (64 zeros for index 0). It is not needed for
integrity (the signed Merkle roots cover every byte) but it lets `verify` name the exact record
that was changed: record i's bytes are vouched for by record i+1, so a single altered record
breaks exactly one link. Without it a changed record could only be narrowed down to the
records between two tree heads.

Fast path: the writer assembles the line from pre-encoded parts (`prepare` in the caller's
thread, `assemble` in the writer) instead of re-serialising a dict per record, because the
index, time and prev are only known in the writer, in commit order.

Secrets: the environment of a tool call may hold tokens. `redact_env` keeps every name and only
the values the policy declares safe to log; `prepare` refuses a plain mapping under any key
named "env" anywhere in `details`, so a raw environment cannot be logged by accident.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

FIELDS = ("actor", "details", "event", "index", "prev", "run_id", "task_id", "time")
NO_PREV = "0" * 64
REDACTED = "<redacted>"
EVENT_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")

# Events the audit layer writes itself; the daemon's own events ("daemon.started",
# "run.created", "exec.allowed", ...) are named by their writers.
RECOVERED = "audit.recovered"
RESUMED = "audit.resumed"

_encode_str = json.encoder.encode_basestring  # what JSONEncoder uses when ensure_ascii=False
_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)
# The C encoder JSONEncoder.encode builds on every call, built once (it is stateless without
# the circular-reference markers; a cycle ends in RecursionError instead). Halves an append.
_make_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_c_encoder: Any = _make_c_encoder and _make_c_encoder(
    None, _encoder.default, _encode_str, None, ":", ",", True, False, False)


def canonical(value: Any) -> bytes:
    """The canonical JSON bytes of `value`; raises ValueError/TypeError if it has none."""
    try:
        if _c_encoder is not None and isinstance(value, dict):
            return "".join(_c_encoder(value, 0)).encode("utf-8")
        return _encoder.encode(value).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: not representable in UTF-8
        raise ValueError(f"not valid UTF-8 text: {exc}") from None


def format_time(moment: datetime) -> str:
    """RFC 3339, UTC, microseconds, 'Z': fixed width, so string order is time order."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: audit times are UTC; pass an aware datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now() -> str:
    """The current time in record form."""
    return format_time(datetime.now(UTC))


def parse_time(text: str) -> datetime:
    """Parses a record time (or any RFC 3339 time with an offset) into an aware datetime."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; audit times are RFC 3339 with 'Z'")
    return moment


class RedactedEnv(dict[str, str]):
    """An environment whose unsafe values are already replaced; made only by `redact_env`."""


def redact_env(env: Mapping[str, str], safe: Collection[str]) -> RedactedEnv:
    """Keeps every variable's name and only the values of `safe` names (the policy's env.log).

    Why names are kept: an auditor needs to see that API_TOKEN was set, not its value.
    """
    return RedactedEnv({k: (v if k in safe else REDACTED) for k, v in sorted(env.items())})


_CONTAINERS = (dict, list, tuple)


def _check_no_raw_env(value: dict[str, Any] | list[Any] | tuple[Any, ...], path: str) -> None:
    """Concrete types only: the JSON encoder accepts no other containers, and ABC checks
    (isinstance of Mapping) would cost more than the rest of an append."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, _CONTAINERS):
                if key == "env" and isinstance(item, dict) and not isinstance(item, RedactedEnv):
                    raise ValueError(
                        f"audit details {path}.{key} is a raw environment; pass it through "
                        "agentd.audit.redact_env(env, safe=policy's env.log) so that secrets "
                        "never enter the log")
                _check_no_raw_env(item, f"{path}.{key}")
    else:
        for i, item in enumerate(value):
            if isinstance(item, _CONTAINERS):
                _check_no_raw_env(item, f"{path}[{i}]")


@dataclass(frozen=True, slots=True)
class Prepared:
    """The parts of a record known before it is ordered, already in canonical JSON."""

    actor: bytes
    details: bytes
    event: bytes
    run_id: bytes
    task_id: bytes


def prepare(
    event: str,
    *,
    actor: Mapping[str, Any],
    details: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    task_id: str | None = None,
) -> Prepared:
    """Validates and encodes what the caller supplies; raises ValueError/TypeError on a bug.

    These are programming errors of the daemon, not of its clients, so they are not
    `InvalidArgument`: they surface as INTERNAL with an incident id.
    """
    if not EVENT_PATTERN.match(event):
        raise ValueError(f"audit event {event!r} must be dotted lower-case words, e.g. run.created")
    if not isinstance(actor, Mapping) or not actor:
        raise ValueError("audit actor must be a non-empty mapping (who did it, as established)")
    details = {} if details is None else dict(details)
    _check_no_raw_env(details, "details")
    return Prepared(
        actor=canonical(dict(actor)),
        details=canonical(details),
        event=_string(event, "event"),
        run_id=_string(run_id, "run_id"),
        task_id=_string(task_id, "task_id"),
    )


def _string(value: str | None, name: str) -> bytes:
    """canonical() of a str or None without going through the general encoder."""
    if value is None:
        return b"null"
    if not isinstance(value, str):
        raise TypeError(f"audit {name} must be a str or None, not {type(value).__name__}")
    try:
        return _encode_str(value).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid UTF-8 text: {exc}") from None


def assemble(parts: Prepared, index: int, prev: str, time: str) -> bytes:
    """The canonical line (without newline) of a prepared record once it is ordered.

    Equal to `canonical(record_dict)`: the keys are concatenated in sorted order (FIELDS).
    """
    return b"".join((
        b'{"actor":', parts.actor, b',"details":', parts.details, b',"event":', parts.event,
        b',"index":', str(index).encode(), b',"prev":"', prev.encode(), b'","run_id":',
        parts.run_id, b',"task_id":', parts.task_id, b',"time":"', time.encode(), b'"}',
    ))


def line_index(line: bytes) -> int | None:
    """The top-level index of a record line without parsing all of it; None if malformed.

    Why this is sound: in canonical form `index` is followed only by prev, run_id, task_id
    and time, whose values are strings or null, and a JSON string cannot contain `,"` (its
    quotes are escaped). So the last `,"index":` in the line is the top-level one.
    """
    at = line.rfind(b',"index":')
    if at < 0:
        return None
    end = line.find(b",", at + 9)
    digits = line[at + 9 : end]
    if end < 0 or not digits.isdigit() or (digits[:1] == b"0" and len(digits) > 1):
        return None
    return int(digits)


def line_prev(line: bytes) -> str | None:
    """The `prev` hash of a record line (hex), found like `line_index`; None if malformed."""
    at = line.rfind(b',"prev":"')
    if at < 0 or line[at + 73 : at + 74] != b'"':
        return None
    return line[at + 9 : at + 73].decode("ascii", "replace")


def matcher(*, run_id: str | None = None, event: str | None = None,
            since: datetime | str | None = None, until: datetime | str | None = None
            ) -> Callable[[bytes], dict[str, Any] | None]:
    """A filter over record lines: the parsed record if it matches every given criterion.

    Substring tests on the raw line reject most records before any JSON is parsed; the
    parsed record is then checked for real (a detail may contain the same substring).
    """
    low = format_time(since) if isinstance(since, datetime) else since
    high = format_time(until) if isinstance(until, datetime) else until
    needles = [b'"run_id":' + _string(run_id, "run_id")] if run_id is not None else []
    if event is not None:
        needles.append(b'"event":' + _string(event, "event"))

    def match(line: bytes) -> dict[str, Any] | None:
        if not all(n in line for n in needles):
            return None
        rec: dict[str, Any] = json.loads(line)
        if ((run_id is not None and rec["run_id"] != run_id)
                or (event is not None and rec["event"] != event)
                or (low is not None and rec["time"] < low)
                or (high is not None and rec["time"] >= high)):
            return None
        return rec

    return match


def check_record(line: bytes) -> dict[str, Any]:
    """Parses a line and checks it is a canonical record; raises ValueError saying what not."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - bad data, not a bad call
    if tuple(sorted(record)) != FIELDS:
        raise ValueError(f"fields are {sorted(record)}, expected {list(FIELDS)}")
    checks = (
        ("actor", isinstance(record["actor"], dict)),
        ("details", isinstance(record["details"], dict)),
        ("event", isinstance(record["event"], str) and EVENT_PATTERN.match(record["event"])),
        ("index", type(record["index"]) is int and record["index"] >= 0),
        ("prev", isinstance(record["prev"], str) and re.fullmatch("[0-9a-f]{64}", record["prev"])),
        ("run_id", record["run_id"] is None or isinstance(record["run_id"], str)),
        ("task_id", record["task_id"] is None or isinstance(record["task_id"], str)),
        ("time", isinstance(record["time"], str) and _is_record_time(record["time"])),
    )
    for name, ok in checks:
        if not ok:
            raise ValueError(f"field {name!r} has a wrong type or form: {record[name]!r:.80}")
    if canonical(record) != line:
        raise ValueError("not in canonical form (key order, whitespace or escaping differ)")
    return record


def _is_record_time(text: str) -> bool:
    return bool(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text))

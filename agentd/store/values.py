"""Channel values on disk, content-addressed: a value is stored once, however many
checkpoints (of one run, of its forks) hold it.

Alternatives weighed for a checkpoint's channel state:

- the whole state as one JSON document per checkpoint (what agentd did first): simple, but a
  run appending 1 MB per step stores 1 + 2 + ... + n MB: quadratic (81 MB after 12 steps);
- a delta per checkpoint (only the writes of the step): linear, but reading step k replays
  k deltas, and rollback or fork must keep the chain intact;
- content-addressed values (chosen): `channel_values` keyed by the sha256 of the value's
  canonical JSON, and per checkpoint one row per channel pointing at the hash with its
  version. An unchanged value costs a row of metadata, never its bytes again; reading any
  checkpoint is one join; a value is deleted when no checkpoint row refers to it any more.

A list (what `append` and `topic` channels hold) is stored as a list node: the hashes of its
elements, each element stored once as a value of its own. An `append` channel growing by one
1 MB element per step then stores each element once (12 steps: 12 MB, not 1 + 2 + ... + 12 =
78 MB); what still grows with the square of the steps is the node, 64 bytes per element per
checkpoint. A node's blob starts with "L", which no canonical JSON does, so a value can never
be mistaken for a node. `value_refs` records which elements a node holds, for deletion.

Decoding happens here, once: callers get `ChannelValue`s, never JSON text. The same holds for a
run's channel declarations (`ChannelSpec`, stored by the runs table as a JSON list): the store
encodes and decodes them, everything above it sees typed values.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from agentd.errors import InvalidArgument

SCHEMA = """
CREATE TABLE IF NOT EXISTS channel_values (
    hash   TEXT PRIMARY KEY,         -- sha256 hex of `value`
    value  BLOB NOT NULL             -- canonical JSON (sorted keys, no spaces, UTF-8)
);
CREATE TABLE IF NOT EXISTS checkpoint_channels (
    run_id   TEXT NOT NULL,
    step     INTEGER NOT NULL,
    name     TEXT NOT NULL,
    hash     TEXT NOT NULL,
    version  INTEGER NOT NULL,
    seen     TEXT NOT NULL DEFAULT '[]',   -- JSON list of barrier tasks that wrote
    PRIMARY KEY (run_id, step, name)
);
CREATE INDEX IF NOT EXISTS checkpoint_channels_hash ON checkpoint_channels(hash);
CREATE TABLE IF NOT EXISTS value_refs (
    parent  TEXT NOT NULL,           -- a list node's hash
    child   TEXT NOT NULL,           -- the hash of one of its elements
    PRIMARY KEY (parent, child)
);
CREATE INDEX IF NOT EXISTS value_refs_child ON value_refs(child);
"""
Reducer = Literal["last_value", "append", "topic", "barrier"]
REDUCERS: Final[tuple[str, ...]] = get_args(Reducer)

NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
# A run's declarations come from a request; bound them so a request cannot make every
# barrier walk millions of entries.
MAX_CHANNELS: Final = 256
MAX_BARRIER_TASKS: Final = 256
MAX_TASK_NAME: Final = 128


@dataclass(frozen=True)
class ChannelSpec:
    """One channel's declaration; `barrier_tasks` names the tasks a barrier waits for."""

    name: str
    reducer: Reducer
    barrier_tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A repeated proto field (or a stored JSON list) arrives as a list; keep the spec
        # hashable and immutable.
        if not isinstance(self.barrier_tasks, tuple):
            object.__setattr__(self, "barrier_tasks", tuple(self.barrier_tasks))

    def validate(self) -> None:
        """Raises InvalidArgument saying what to change if the declaration is malformed."""
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidArgument(
                f"channel name {self.name!r} is not valid; use 1-64 letters, digits, '_', '.'"
                " or '-', starting with a letter or '_' (e.g. plan, review.notes)")
        where = f"channel {self.name!r}"
        if self.reducer not in REDUCERS:
            raise InvalidArgument(
                f"{where}: reducer {self.reducer!r} is unknown; use one of {', '.join(REDUCERS)}")
        if self.reducer != "barrier":
            if self.barrier_tasks:
                raise InvalidArgument(
                    f"{where}: barrier_tasks is only for the barrier reducer; remove it or"
                    " declare the channel as a barrier")
            return
        if not self.barrier_tasks:
            raise InvalidArgument(
                f"{where}: a barrier needs the names of the tasks it waits for in barrier_tasks")
        if len(self.barrier_tasks) > MAX_BARRIER_TASKS:
            raise InvalidArgument(
                f"{where}: a barrier waits for at most {MAX_BARRIER_TASKS} tasks")
        for task in self.barrier_tasks:
            if (not isinstance(task, str) or not task or len(task) > MAX_TASK_NAME
                    or not task.isprintable() or any(c.isspace() for c in task)):
                raise InvalidArgument(
                    f"{where}: barrier task {task!r} is not a task name; use the name given"
                    f" to the task in the step request (1-{MAX_TASK_NAME} printable characters,"
                    " no spaces)")
        if len(set(self.barrier_tasks)) != len(self.barrier_tasks):
            twice = sorted({t for t in self.barrier_tasks if self.barrier_tasks.count(t) > 1})
            raise InvalidArgument(
                f"{where}: barrier task(s) {', '.join(map(repr, twice))} listed more than once;"
                " list each task once")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "reducer": self.reducer,
                "barrier_tasks": list(self.barrier_tasks)}


def encode_specs(specs: tuple[ChannelSpec, ...]) -> str:
    """A run's channel declarations as stored (a JSON list), decoded by `decode_specs`."""
    return json.dumps([spec.to_json() for spec in specs])


def decode_specs(text: str) -> tuple[ChannelSpec, ...]:
    return tuple(ChannelSpec(name=c["name"], reducer=c["reducer"],
                             barrier_tasks=tuple(c.get("barrier_tasks", ())))
                 for c in json.loads(text))


_NODE: Final = b"L"
_CHUNK: Final = 500  # hashes per IN (...) query, well under SQLite's variable limit


@dataclass(frozen=True)
class ChannelValue:
    """A channel's committed value and version; `seen` lists the barrier tasks that wrote.

    For a barrier, `value` holds what the tasks in `seen` wrote so far ({task: value}, in the
    spec's order; None before any wrote) and is visible only once `seen` covers every task.
    """

    value: Any
    version: int
    seen: tuple[str, ...] = ()


def encode(value: Any) -> bytes:
    """The canonical JSON of a value: the bytes that are hashed, stored and counted."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def encoded_size(state: Mapping[str, ChannelValue]) -> int:
    """What `limits.channel_state` counts: the sum of the encoded sizes of the values."""
    return sum(len(encode(v.value)) for v in state.values())


def save(db: sqlite3.Connection, run_id: str, step: int,
         state: Mapping[str, ChannelValue]) -> None:
    """Stores a checkpoint's channels; a value already stored costs only its row here.
    Call inside the caller's transaction."""
    for name, current in state.items():
        digest = _store(db, current.value)
        db.execute("INSERT INTO checkpoint_channels VALUES (?, ?, ?, ?, ?, ?)",
                   (run_id, step, name, digest, current.version, json.dumps(list(current.seen))))


def _put(db: sqlite3.Connection, blob: bytes) -> tuple[str, bool]:
    """Stores a blob once; its hash, and whether it was new."""
    digest = hashlib.sha256(blob).hexdigest()
    cursor = db.execute("INSERT OR IGNORE INTO channel_values VALUES (?, ?)", (digest, blob))
    return digest, cursor.rowcount == 1


def _store(db: sqlite3.Connection, value: Any) -> str:
    if not isinstance(value, list) or not value:
        return _put(db, encode(value))[0]
    elements = [_put(db, encode(item))[0] for item in value]
    digest, new = _put(db, _NODE + json.dumps(elements, separators=(",", ":")).encode())
    if new:
        db.executemany("INSERT OR IGNORE INTO value_refs VALUES (?, ?)",
                       [(digest, child) for child in set(elements)])
    return digest


def _decode(db: sqlite3.Connection, blob: bytes) -> Any:
    if not blob.startswith(_NODE):
        return json.loads(blob)
    hashes: list[str] = json.loads(blob[len(_NODE):])
    found: dict[str, Any] = {}
    unique = sorted(set(hashes))
    for start in range(0, len(unique), _CHUNK):
        part = unique[start:start + _CHUNK]
        marks = ",".join("?" * len(part))
        for digest, data in db.execute(
                f"SELECT hash, value FROM channel_values WHERE hash IN ({marks})",  # noqa: S608
                part):
            found[digest] = json.loads(data)
    return [found[h] for h in hashes]


def copy(db: sqlite3.Connection, source: str, target: str, up_to: int) -> None:
    """Gives `target` the channel rows of `source`'s checkpoints 0..up_to (a fork): rows only,
    the values are shared."""
    db.execute("INSERT INTO checkpoint_channels SELECT ?, step, name, hash, version, seen"
               " FROM checkpoint_channels WHERE run_id = ? AND step <= ?",
               (target, source, up_to))


def load(db: sqlite3.Connection, run_id: str, step: int) -> dict[str, ChannelValue]:
    """The channels of one checkpoint, decoded, in the order they were declared."""
    rows = db.execute(
        "SELECT c.name, v.value, c.version, c.seen FROM checkpoint_channels c"
        " JOIN channel_values v ON v.hash = c.hash"
        " WHERE c.run_id = ? AND c.step = ? ORDER BY c.rowid", (run_id, step))
    return {name: ChannelValue(_decode(db, data), version, tuple(json.loads(seen)))
            for name, data, version, seen in rows.fetchall()}


def versions(db: sqlite3.Connection, run_id: str) -> dict[int, dict[str, int]]:
    """step -> {channel: version} of every checkpoint of the run, without reading values."""
    found: dict[int, dict[str, int]] = {}
    for step, name, version in db.execute(
            "SELECT step, name, version FROM checkpoint_channels WHERE run_id = ?"
            " ORDER BY rowid", (run_id,)):
        found.setdefault(step, {})[name] = version
    return found


def delete(db: sqlite3.Connection, run_id: str, after: int = -1) -> None:
    """Forgets the run's checkpoints after step `after` (all by default) and every value no
    checkpoint refers to any more. Call inside the caller's transaction."""
    db.execute("DELETE FROM checkpoint_channels WHERE run_id = ? AND step > ?", (run_id, after))
    db.execute("DELETE FROM channel_values WHERE hash NOT IN"
               " (SELECT hash FROM checkpoint_channels) AND hash NOT IN"
               " (SELECT r.child FROM value_refs r JOIN checkpoint_channels c"
               "  ON c.hash = r.parent)")
    db.execute("DELETE FROM value_refs WHERE parent NOT IN (SELECT hash FROM channel_values)")


def stored_bytes(db: sqlite3.Connection) -> int:
    """Bytes of channel values stored (each distinct value once)."""
    row = db.execute("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM channel_values").fetchone()
    return int(row[0])

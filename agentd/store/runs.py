"""Runs on disk: SQLite in WAL mode, so a run created is a run that survives a crash.

SQLite over a directory of JSON files: one fsync per transaction, atomic updates, and the
query side (list by agent, by state) for free. The daemon is the only writer.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentd.errors import NotFound
from agentd.store.values import ChannelSpec, decode_specs, encode_specs

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    agent       TEXT NOT NULL,
    stage       TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    created_at  REAL NOT NULL,
    closed_at   REAL,
    policy_hash TEXT NOT NULL,
    policy_file TEXT NOT NULL,
    workspace   TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    label       TEXT NOT NULL DEFAULT '',
    tasks_run   INTEGER NOT NULL DEFAULT 0,
    step        INTEGER NOT NULL DEFAULT 0,
    channels    TEXT NOT NULL DEFAULT '[]',
    forked_from TEXT NOT NULL DEFAULT '',
    forked_at   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_agent ON runs(agent, state);
"""


class RunState(enum.StrEnum):
    """A run is open (steps, rollbacks, forks) until it is closed, for good."""

    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    agent: str
    stage: str
    state: RunState
    created_at: float
    closed_at: float | None
    policy_hash: str
    policy_file: str
    workspace: str
    created_by: str
    label: str
    tasks_run: int  # tasks run on this run (a column named execs before)
    step: int = 0
    channels: tuple[ChannelSpec, ...] = field(default=())  # its declared channels, in order
    forked_from: str = ""
    forked_at: int = 0
    problem: str = ""  # not stored: why the run is inconsistent, if it is (see get_run)


def _record(row: tuple[Any, ...]) -> RunRecord:
    """A runs row, decoded: its state an enum, its channel declarations typed."""
    values = list(row)
    values[3] = RunState(values[3])
    values[13] = decode_specs(values[13])
    return RunRecord(*values)


@contextlib.contextmanager
def not_synced(db: sqlite3.Connection) -> Iterator[None]:
    """Transactions in this block are committed without an fsync (synchronous=NORMAL in WAL).

    Only for rows whose loss is harmless and whose facts the audit log holds anyway: in WAL
    mode NORMAL loses a commit only to an OS crash or power loss, never to a process crash
    (kill -9 loses nothing), and the next FULL commit (every step ends in one) fsyncs the WAL
    with every frame before it. The one user is the task counter (`Run.tasks_run`, a
    statistic; every task's exec.allowed is in the audit log). A running step's attempt row
    is *not* one: recovery needs it to list a step cut short after its `step.committing`
    record (see StepStore.begin). The store is used from the event loop's thread only, so
    the pragma cannot leak into another caller's transaction.
    """
    db.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        db.execute("PRAGMA synchronous=FULL")


class RunStore:
    """CRUD over the runs table; every write is its own durable transaction, except the task
    counter (`not_synced`)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Adds the columns later versions introduced to a database made by an earlier one."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if "execs" in have:  # it counted tasks, not Exec calls: renamed
            self._db.execute("ALTER TABLE runs RENAME COLUMN execs TO tasks_run")
        for column, decl in (("step", "INTEGER NOT NULL DEFAULT 0"),
                             ("channels", "TEXT NOT NULL DEFAULT '[]'"),
                             ("forked_from", "TEXT NOT NULL DEFAULT ''"),
                             ("forked_at", "INTEGER NOT NULL DEFAULT 0")):
            if column not in have:
                self._db.execute(f"ALTER TABLE runs ADD COLUMN {column} {decl}")

    @property
    def connection(self) -> sqlite3.Connection:
        """The one connection, shared with the step store (one writer, one transaction)."""
        return self._db

    def close(self) -> None:
        self._db.close()

    def create(self, record: RunRecord) -> None:
        self.insert(self._db, record)

    @staticmethod
    def insert(db: sqlite3.Connection, record: RunRecord) -> None:
        """Inserts with `db`, so a caller can make it part of a larger transaction."""
        db.execute(
            "INSERT INTO runs VALUES (:run_id, :agent, :stage, :state, :created_at, :closed_at,"
            " :policy_hash, :policy_file, :workspace, :created_by, :label, :tasks_run, :step,"
            " :channels, :forked_from, :forked_at)",
            {**record.__dict__, "channels": encode_specs(record.channels)})

    def get(self, run_id: str) -> RunRecord:
        row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"run {run_id!r} not found; `agentctl run list` shows the runs")
        return _record(row)

    def list(self, *, agent: str = "", include_closed: bool = False) -> list[RunRecord]:
        query = "SELECT * FROM runs WHERE (? = '' OR agent = ?)"
        if not include_closed:
            query += " AND state = 'open'"
        rows = self._db.execute(query + " ORDER BY created_at", (agent, agent)).fetchall()
        return [_record(row) for row in rows]

    def count_open(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM runs WHERE state = 'open'")
                   .fetchone()[0])

    def count_task(self, run_id: str) -> None:
        with not_synced(self._db):  # a statistic; the audit log has every exec.allowed
            self._db.execute("UPDATE runs SET tasks_run = tasks_run + 1 WHERE run_id = ?",
                             (run_id,))

    def close_run(self, run_id: str, *, workspace: str) -> RunRecord:
        self._db.execute(
            "UPDATE runs SET state = 'closed', closed_at = ?, workspace = ? WHERE run_id = ?",
            (time.time(), workspace, run_id))
        return self.get(run_id)

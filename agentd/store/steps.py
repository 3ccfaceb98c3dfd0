"""Steps and checkpoints on disk, in the same SQLite database as the runs.

A checkpoint is what a committed step left: the run's workspace layer stack and its channel
values and versions (content-addressed, see `store/values.py`). The run's `step` column
points at its current checkpoint; rollback moves the pointer back and deletes the later
checkpoints, fork copies rows: both touch metadata only, never the workspace, so they cost the
same for ten files or a hundred thousand.

Every step attempt (committed, failed, pending approval, discarded, interrupted by a crash,
ambiguous after a crash with egress, accepted as done) is kept in `steps`, so a run's
timeline survives rollbacks. Committing a step is one transaction:
the checkpoint row, the run's pointer and the attempt's state change together or not at all.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from agentd.errors import Aborted, FailedPrecondition, NotFound
from agentd.store import values
from agentd.store.runs import RunRecord, RunStore
from agentd.store.values import ChannelValue

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id       TEXT NOT NULL,
    step         INTEGER NOT NULL,
    layers       TEXT NOT NULL,      -- JSON list of layer ids, lowest first
    channels     TEXT NOT NULL,      -- '{}'; before channel values were content-addressed,
                                     -- JSON {name: {value, version, seen}} (migrated at start)
    committed_at REAL NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS steps (
    attempt      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT NOT NULL,
    step         INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending_approval', 'running', 'committed',
                                                 'failed', 'discarded', 'interrupted',
                                                 'ambiguous', 'accepted')),
    request      TEXT NOT NULL,      -- JSON: the tasks as submitted
    reply        TEXT NOT NULL DEFAULT '{}',
    reason       TEXT NOT NULL DEFAULT '',
    requested_by TEXT NOT NULL,
    decided_by   TEXT NOT NULL DEFAULT '',
    created_at   REAL NOT NULL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS steps_run ON steps(run_id, step);
CREATE INDEX IF NOT EXISTS steps_state ON steps(state, run_id);
"""


class StepState(enum.StrEnum):
    """Where one attempt at a step is; stored as its value (the table's CHECK lists them)."""

    PENDING_APPROVAL = "pending_approval"
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"
    DISCARDED = "discarded"
    INTERRUPTED = "interrupted"
    AMBIGUOUS = "ambiguous"
    """Running with network egress when the daemon died: nothing committed, but its external
    effects may have happened; it waits for an approver's resolution (`resolve`)."""
    ACCEPTED = "accepted"
    """An ambiguous attempt an approver took as done: nothing committed, effects assumed."""


# What an older database's CHECK lacks: its table is rebuilt once (`_migrate_states`).
_NEW_STATES = (StepState.AMBIGUOUS, StepState.ACCEPTED)


@dataclass(frozen=True)
class CheckpointRecord:
    run_id: str
    step: int
    layers: list[str]
    channels: dict[str, ChannelValue]
    committed_at: float


@dataclass(frozen=True)
class StepRecord:
    attempt: int
    run_id: str
    step: int
    state: str
    request: dict[str, Any]
    reply: dict[str, Any]
    reason: str
    requested_by: str
    decided_by: str
    created_at: float
    finished_at: float | None


def _step(row: tuple[Any, ...]) -> StepRecord:
    return StepRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), json.loads(row[5]),
                      row[6], row[7], row[8], row[9], row[10])


class StepStore:
    """Checkpoints and step attempts; shares the runs' connection (one writer, WAL)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._migrate_states()
        self._db.executescript(SCHEMA + values.SCHEMA)
        self._migrate_channels()

    def _migrate_states(self) -> None:
        """Rebuilds a `steps` table whose CHECK constraint predates the states in
        `_NEW_STATES`, keeping every row and attempt number, in one transaction.

        SQLite cannot alter a CHECK constraint; the alternatives were editing the stored
        schema text (`PRAGMA writable_schema`: the docs' last resort, and a typo corrupts the
        database) or dropping the constraint (then nothing stops a stray state). The rebuild
        is SQLite's documented procedure: create the new table, copy, drop, rename. It runs
        once, at the first start of the new version, before anything else touches the table;
        a crash in the middle leaves the old table as it was (the transaction rolls back)."""
        row = self._db.execute("SELECT sql FROM sqlite_master WHERE type = 'table'"
                               " AND name = 'steps'").fetchone()
        if row is None or all(f"'{state}'" in row[0] for state in _NEW_STATES):
            return  # a new database (made below) or one already migrated
        create = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS steps"):]
        create = create[:create.index(");") + 2].replace(
            "CREATE TABLE IF NOT EXISTS steps", "CREATE TABLE steps_migrated")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(create)
            self._db.execute(
                "INSERT INTO steps_migrated (attempt, run_id, step, state, request, reply,"
                " reason, requested_by, decided_by, created_at, finished_at)"
                " SELECT attempt, run_id, step, state, request, reply, reason, requested_by,"
                " decided_by, created_at, finished_at FROM steps")
            # The AUTOINCREMENT counter, carried over: no attempt number is ever reused (a
            # caller may wait on one), even one whose row is gone.
            counter = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'steps'"
                                       ).fetchone()
            self._db.execute("DROP TABLE steps")  # its indexes go with it; SCHEMA remakes them
            self._db.execute("ALTER TABLE steps_migrated RENAME TO steps")
            if counter is not None:
                self._db.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?)"
                                 " WHERE name = 'steps'", (counter[0],))

    def _migrate_channels(self) -> None:
        """Moves channel values that older versions kept inline in `checkpoints.channels`
        into the content-addressed tables, in one transaction (a no-op once done)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute("SELECT run_id, step, channels FROM checkpoints"
                                    " WHERE channels != '{}'").fetchall()
            for run_id, step, text in rows:
                state = {name: ChannelValue(v["value"], v["version"], tuple(v.get("seen", ())))
                         for name, v in json.loads(text).items()}
                self._db.execute("DELETE FROM checkpoint_channels WHERE run_id = ? AND step = ?",
                                 (run_id, step))
                values.save(self._db, run_id, step, state)
                self._db.execute("UPDATE checkpoints SET channels = '{}'"
                                 " WHERE run_id = ? AND step = ?", (run_id, step))

    # -- checkpoints ---------------------------------------------------------------------

    def add_checkpoint(self, cp: CheckpointRecord) -> None:
        """Call inside a transaction: the checkpoint row and its channel rows go together."""
        self._db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, '{}', ?)",
                         (cp.run_id, cp.step, json.dumps(cp.layers), cp.committed_at))
        values.save(self._db, cp.run_id, cp.step, cp.channels)

    def checkpoint(self, run_id: str, step: int) -> CheckpointRecord:
        """One checkpoint with its channel values decoded."""
        row = self._db.execute(
            "SELECT run_id, step, layers, committed_at FROM checkpoints"
            " WHERE run_id = ? AND step = ?", (run_id, step)).fetchone()
        if row is None:
            raise NotFound(f"run {run_id} has no checkpoint at step {step}; "
                           "`agentctl checkpoints RUN` lists them")
        state = values.load(self._db, run_id, step)
        return CheckpointRecord(row[0], row[1], json.loads(row[2]), state, row[3])

    def checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        """Every checkpoint of the run, oldest first; channel values are left out (versions
        only, with value None): listing a run must not read all its state."""
        rows = self._db.execute(
            "SELECT run_id, step, layers, committed_at FROM checkpoints WHERE run_id = ?"
            " ORDER BY step", (run_id,)).fetchall()
        found = values.versions(self._db, run_id)
        return [CheckpointRecord(r[0], r[1], json.loads(r[2]),
                                 {name: ChannelValue(None, version)
                                  for name, version in found.get(r[1], {}).items()}, r[3])
                for r in rows]

    def stored_channel_bytes(self) -> int:
        """Bytes of channel values on disk, each distinct value counted once."""
        return values.stored_bytes(self._db)

    def referenced_layers(self) -> set[str]:
        layers: set[str] = set()
        for (text,) in self._db.execute("SELECT layers FROM checkpoints"):
            layers.update(json.loads(text))
        return layers

    def referenced_of(self, layers: Collection[str]) -> set[str]:
        """Those of `layers` that a checkpoint of any run still records (a scan per layer
        inside SQLite, cheaper than `referenced_layers` parsing every stack)."""
        return {layer for layer in layers if self._db.execute(
            "SELECT 1 FROM checkpoints WHERE instr(layers, ?) > 0 LIMIT 1",
            (json.dumps(layer),)).fetchone()}

    def replace_layers(self, old: list[str], new: list[str]) -> int:
        """Rewrites every checkpoint whose stack starts with `old` to start with `new` instead
        (a squash: same content, fewer layers). Returns how many were rewritten."""
        count = 0
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute("SELECT run_id, step, layers FROM checkpoints").fetchall()
            for run_id, step, text in rows:
                layers = json.loads(text)
                if layers[:len(old)] == old:
                    self._db.execute(
                        "UPDATE checkpoints SET layers = ? WHERE run_id = ? AND step = ?",
                        (json.dumps(new + layers[len(old):]), run_id, step))
                    count += 1
        return count

    # -- steps ---------------------------------------------------------------------------

    def begin(self, run_id: str, step: int, state: str, request: dict[str, Any],
              requested_by: str) -> int:
        """A new attempt, durable at once (fsynced), even a running one: if the daemon dies
        after the step's `step.committing` record and before its checkpoint, recovery must
        find this row to list the step as interrupted (`daemon.started`), or the audit log
        would show a commit that never happened."""
        cursor = self._db.execute(
            "INSERT INTO steps (run_id, step, state, request, requested_by, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, step, state, json.dumps(request), requested_by, time.time()))
        return int(cursor.lastrowid or 0)

    def finish(self, attempt: int, state: str, *, reply: dict[str, Any], reason: str = "",
               decided_by: str | None = None) -> None:
        self._db.execute(
            "UPDATE steps SET state = ?, reply = ?, reason = ?, finished_at = ?,"
            " decided_by = COALESCE(?, decided_by) WHERE attempt = ?",
            (state, json.dumps(reply), reason, time.time(), decided_by, attempt))

    def finish_unchanged(self, attempt: int, reply: dict[str, Any]) -> None:
        """A step that changed nothing is committed without a checkpoint of its own, the
        run's pointer unchanged. The attempt keeps its number (so a caller told "step N+1"
        finds it by that number); its reply says it is read-only and which head it ran on."""
        self._db.execute(
            "UPDATE steps SET state = 'committed', reply = ?, finished_at = ?"
            " WHERE attempt = ?", (json.dumps(reply), time.time(), attempt))

    def decide(self, attempt: int, state: str, *, decided_by: str, reason: str = "") -> None:
        """Moves a pending attempt to `state` (running or discarded), only if it is still
        pending: the backstop for two decisions on one step (the run's gate decides first).
        FAILED_PRECONDITION, naming who decided, if another decision won."""
        finished = None if state == "running" else time.time()
        cursor = self._db.execute(
            "UPDATE steps SET state = ?, decided_by = ?, reason = ?, finished_at = ?"
            " WHERE attempt = ? AND state = 'pending_approval'",
            (state, decided_by, reason, finished, attempt))
        if cursor.rowcount != 1:
            raise already_decided(self.attempt(attempt))

    def commit(self, attempt: int, checkpoint: CheckpointRecord, reply: dict[str, Any]) -> None:
        """The step's checkpoint, the run's pointer and the attempt's state, atomically; only
        if the run is open and still at the step below (compare-and-set), else ABORTED and
        nothing changes."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            moved = self._db.execute(
                "UPDATE runs SET step = ? WHERE run_id = ? AND step = ? AND state = 'open'",
                (checkpoint.step, checkpoint.run_id, checkpoint.step - 1)).rowcount
            if moved != 1:
                raise Aborted(f"run {checkpoint.run_id} moved or closed while step "
                              f"{checkpoint.step} ran; nothing of it was applied")
            self.add_checkpoint(checkpoint)
            self.finish(attempt, "committed", reply=reply)

    def mark_egress(self, attempt: int) -> None:
        """Notes in a running attempt's request that its tasks may reach the network, durable
        before any of them starts: recovery reads it to tell an ambiguous step (external
        effects possible) from an interrupted one, without guessing from the policy of the
        day."""
        self._db.execute("UPDATE steps SET request = json_set(request, '$.egress', json('true'))"
                         " WHERE attempt = ?", (attempt,))

    def resolve(self, attempt: int, state: str, *, resolution: dict[str, Any],
                decided_by: str, reason: str) -> None:
        """Moves an ambiguous attempt to `state` (running for a retry, accepted, discarded),
        only if it is still ambiguous (the backstop for two resolutions; the run's gate
        decides first), keeping `resolution` in its request for the timeline.
        FAILED_PRECONDITION, naming who resolved it, if another resolution won."""
        finished = None if state == StepState.RUNNING else time.time()
        cursor = self._db.execute(
            "UPDATE steps SET state = ?, decided_by = ?, reason = ?, finished_at = ?,"
            " request = json_set(request, '$.resolution', json(?))"
            " WHERE attempt = ? AND state = 'ambiguous'",
            (state, decided_by, reason, finished, json.dumps(resolution), attempt))
        if cursor.rowcount != 1:
            raise already_decided(self.attempt(attempt))

    def attempt(self, attempt: int) -> StepRecord:
        row = self._db.execute("SELECT * FROM steps WHERE attempt = ?", (attempt,)).fetchone()
        if row is None:
            raise NotFound(f"no step attempt {attempt}")
        return _step(row)

    def latest(self, run_id: str, step: int) -> StepRecord | None:
        """The last attempt at step `step` of the run, whatever its state."""
        row = self._db.execute(
            "SELECT * FROM steps WHERE run_id = ? AND step = ? ORDER BY attempt DESC LIMIT 1",
            (run_id, step)).fetchone()
        return None if row is None else _step(row)

    def attempts(self, run_id: str) -> list[StepRecord]:
        rows = self._db.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY attempt",
                                (run_id,)).fetchall()
        return [_step(r) for r in rows]

    def pending(self, run_id: str, step: int) -> StepRecord:
        row = self._db.execute(
            "SELECT * FROM steps WHERE run_id = ? AND step = ? AND state = 'pending_approval'"
            " ORDER BY attempt DESC LIMIT 1", (run_id, step)).fetchone()
        if row is None:
            raise NotFound(f"run {run_id} has no step {step} waiting for approval")
        return _step(row)

    def first_pending(self, run_id: str) -> StepRecord | None:
        """The run's step waiting for approval, if any (at most one can wait)."""
        row = self._db.execute(
            "SELECT * FROM steps WHERE run_id = ? AND state = 'pending_approval'"
            " ORDER BY attempt LIMIT 1", (run_id,)).fetchone()
        return None if row is None else _step(row)

    def first_ambiguous(self, run_id: str) -> StepRecord | None:
        """The run's step left ambiguous by a crash, if any (at most one: nothing runs on
        the run until it is resolved)."""
        row = self._db.execute(
            "SELECT * FROM steps WHERE run_id = ? AND state = 'ambiguous'"
            " ORDER BY attempt LIMIT 1", (run_id,)).fetchone()
        return None if row is None else _step(row)

    def in_state(self, state: str) -> list[StepRecord]:
        rows = self._db.execute("SELECT * FROM steps WHERE state = ?", (state,)).fetchall()
        return [_step(r) for r in rows]

    def rollback(self, run_id: str, step: int) -> list[str]:
        """Drops checkpoints after `step` and points the run at it; returns dropped layers.
        NOT_FOUND, with nothing changed, if the run has no checkpoint at `step`."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self.checkpoint(run_id, step)
            later = self._db.execute(
                "SELECT layers FROM checkpoints WHERE run_id = ? AND step > ?",
                (run_id, step)).fetchall()
            self._db.execute("DELETE FROM checkpoints WHERE run_id = ? AND step > ?",
                             (run_id, step))
            values.delete(self._db, run_id, after=step)
            self._db.execute("UPDATE runs SET step = ? WHERE run_id = ?", (step, run_id))
            # A read-only attempt numbered step + 1 ran on `step` itself: it stays.
            self._db.execute(
                "UPDATE steps SET state = 'discarded', reason = ?"
                " WHERE run_id = ? AND step > ? AND state IN ('pending_approval', 'committed')"
                " AND NOT (step = ? + 1 AND state = 'committed'"
                "          AND json_extract(reply, '$.read_only') = 1)",
                (f"rolled back to step {step}", run_id, step, step))
        dropped: set[str] = set()
        for (text,) in later:
            dropped.update(json.loads(text))
        return sorted(dropped)

    def create_run(self, run: RunRecord, base: CheckpointRecord) -> None:
        """The run and its checkpoint 0 (the empty base layer), together or not at all."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            RunStore.insert(self._db, run)
            self.add_checkpoint(base)

    def fork(self, source: CheckpointRecord, run: RunRecord) -> None:
        """A new run whose checkpoints 0..step are the source's, sharing their layers."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self.checkpoint(source.run_id, source.step)  # still there: else nothing is made
            RunStore.insert(self._db, run)
            self._db.execute(
                "INSERT INTO checkpoints SELECT ?, step, layers, channels, committed_at"
                " FROM checkpoints WHERE run_id = ? AND step <= ?",
                (run.run_id, source.run_id, source.step))
            values.copy(self._db, source.run_id, run.run_id, source.step)

    def drop_run(self, run_id: str) -> list[str]:
        """Deletes a closed run's checkpoints; returns the layers they referred to."""
        layers: set[str] = set()
        for cp in self.checkpoints(run_id):
            layers.update(cp.layers)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))
            values.delete(self._db, run_id)
        return sorted(layers)


def already_decided(record: StepRecord) -> FailedPrecondition:
    """The error for a decision on a step that is no longer pending."""
    by = f" by {record.decided_by}" if record.decided_by else ""
    return FailedPrecondition(
        f"step {record.step} of run {record.run_id} was already decided{by}: it is "
        f"{record.state}" + (f" ({record.reason})" if record.reason else "") +
        "; `agentctl timeline RUN` shows it")

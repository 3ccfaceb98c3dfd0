"""One gate per run: where every transition of a run is decided, one at a time.

A run's transitions (step begin and commit, approve and reject, rollback, close, and fork's
read of its source) each check the run's state and then change it. With an `await` between
the check and the change (an audit append, a thread), two calls on one run interleave: both
checks pass, both changes land. The gate makes each check-and-change one critical section:

    async with gate.lock:        # decisions: short, may await the audit log
        check phase / head  ->  record (audit)  ->  apply (SQLite)

A step is long (its workers run for seconds or minutes), so it does not keep the lock: it
*claims* the run under the lock (sets `holder`), runs unlocked, and commits under
the lock again, re-checking that it still holds the run (a close may have begun meanwhile).
Close marks the run CLOSING (no new claim succeeds), kills the workers, then waits on `idle`
(an asyncio.Event, not polling) until the step has released its claim, committed or failed.

Steps (and approved steps) on one run *queue* for its one writer slot (`turn`, first come
first served, at most MAX_QUEUED_STEPS waiting; more is RESOURCE_EXHAUSTED): parallel calls of
a framework on one run do not fail because they are parallel. Each still knows which state it
ran on: its reply names the checkpoint it built on (`base_step`), and a step that names the
checkpoint it expects (`expect_step`) is refused (ABORTED) rather than run on another one,
whether the head had moved when it arrived or moved while it waited. A rollback does not
queue: it is refused (ABORTED) while a step holds the run, since the caller decided it on a
head that the running step is about to move.

Alternatives weighed: an actor (one task per run draining a queue of commands) serialises
the same way but turns every call into a message and a reply future, and makes streaming
steps awkward; a compare-and-set on the run's row in SQLite alone catches a lost update only
after the losing side has run its workers and audited its decision. The lock decides first;
the store keeps a compare-and-set (`UPDATE runs ... WHERE step = ?`) as the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agentd.errors import Aborted, FailedPrecondition, ResourceExhausted

# Steps that may wait behind a run's running step; a framework's fan-out is a handful, a
# client looping without waiting for replies is not served by growing the queue.
MAX_QUEUED_STEPS = 16


class Phase(enum.Enum):
    OPEN = "open"          # new work may enter (unless a step holds the run)
    CLOSING = "closing"    # CloseRun has begun; nothing new may enter
    CLOSED = "closed"


@dataclass
class RunGate:
    """The lock and in-memory phase of one run; `holder` names the step holding the run
    ("" if none) and `idle` is set whenever no step holds it."""

    run_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    phase: Phase = Phase.OPEN
    holder: str = ""
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.Lock = field(default_factory=asyncio.Lock)
    """The run's one writer slot, held by a step from its plan to its end (FIFO)."""
    queued: int = 0
    """Steps waiting for `writer`."""
    failed_step: int | None = None
    """A step that failed and that no later commit or rollback has resolved: closing the run
    with it is an *unresolved failure*, which may demote the agent (scheduler/stages.py).
    In memory only: after a restart, a crash's interrupted steps are in `daemon.started`."""
    stopped: bool = False
    """The daemon stopped the holder's workers (a close, a demotion, a drain): its step
    fails, but not as the agent's failure. Cleared when the step releases the run."""

    def __post_init__(self) -> None:
        self.idle.set()

    def check_open(self) -> None:
        """FAILED_PRECONDITION if the run is closed or being closed."""
        if self.phase is Phase.CLOSED:
            raise FailedPrecondition(f"run {self.run_id} is closed; create a new run")
        if self.phase is Phase.CLOSING:
            raise FailedPrecondition(f"run {self.run_id} is being closed; create a new run")

    def check_idle(self, action: str) -> None:
        """Refuses `action` while the run is closed, closing or held by a step. Call with the
        lock held."""
        self.check_open()
        if self.holder:
            raise Aborted(f"{self.holder} is running on run {self.run_id}; one writer per run: "
                          f"{action} when it has ended")

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Waits, first come first served, for the run's writer slot and holds it; refused at
        once if MAX_QUEUED_STEPS are waiting already. A caller that goes away (deadline,
        cancel) leaves the queue."""
        self.check_open()
        if self.writer.locked() and self.queued >= MAX_QUEUED_STEPS:
            raise ResourceExhausted(
                f"{self.queued} steps already wait on run {self.run_id} (at most "
                f"{MAX_QUEUED_STEPS}); wait for their replies before sending more")
        self.queued += 1
        try:
            await self.writer.acquire()
        finally:
            self.queued -= 1
        try:
            yield
        finally:
            self.writer.release()

    def claim(self, holder: str) -> None:
        """Takes the run for a step. Call with the lock held, after `check_idle`."""
        self.check_idle("retry")
        self.holder = holder
        self.idle.clear()

    def release(self) -> None:
        """Gives the run back after a step, whatever happened to it (safe to call twice)."""
        self.holder = ""
        self.stopped = False
        self.idle.set()


class RunGates:
    """The gates of the runs this daemon has touched since it started (a run's gate is made
    on first use; a closed run's gate stays CLOSED so late callers are refused in memory)."""

    def __init__(self) -> None:
        self._gates: dict[str, RunGate] = {}

    def __call__(self, run_id: str) -> RunGate:
        gate = self._gates.get(run_id)
        if gate is None:
            gate = self._gates[run_id] = RunGate(run_id)
        return gate

    def forget(self, run_id: str) -> None:
        """Drops a closed run's gate (the store says closed from then on)."""
        self._gates.pop(run_id, None)

    def stepping(self) -> list[str]:
        return [g.run_id for g in self._gates.values() if g.holder]

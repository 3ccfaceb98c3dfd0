"""How results and new records get from the audit writer thread to the callers' event loops.

The writer thread must never touch an asyncio future directly (futures are not thread-safe),
and waking an event loop costs a write to its self-pipe. So:

- `Pending` is one queued append with a future of the caller's own kind: an asyncio future
  for coroutines, a concurrent future for threads (`append_sync`).
- `settle` hands a whole batch its outcomes with one `call_soon_threadsafe` per event loop,
  not one per record: at 64 concurrent writers that is one wake-up instead of 64, and every
  writer re-queues in the same loop iteration, so the next batch is full again.
- `Followers` lets `AuditLog.follow` sleep until the log grows, woken the same way.

A caller whose task was cancelled has a cancelled future; settling skips it. Its record is
written all the same: the event it records happened.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agentd.audit.record import Prepared

Outcome = int | BaseException


@dataclass(slots=True)
class Pending:
    """One queued append (parts None: a probe, which writes only a pending audit.resumed)."""

    parts: Prepared | None
    loop: asyncio.AbstractEventLoop | None
    afuture: asyncio.Future[int] | None = None
    cfuture: concurrent.futures.Future[int] | None = None

    @classmethod
    def make(cls, parts: Prepared | None, loop: asyncio.AbstractEventLoop | None) -> Pending:
        if loop is None:
            return cls(parts, None, cfuture=concurrent.futures.Future())
        return cls(parts, loop, afuture=loop.create_future())


def settle(batch: list[Pending], outcomes: list[Outcome]) -> None:
    """Gives each caller its index or exception; called from the writer thread."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], Outcome]]] = {}
    for pending, outcome in zip(batch, outcomes, strict=True):
        if pending.cfuture is not None:
            if isinstance(outcome, BaseException):
                pending.cfuture.set_exception(outcome)
            else:
                pending.cfuture.set_result(outcome)
        elif pending.loop is not None and pending.afuture is not None:
            by_loop.setdefault(pending.loop, []).append((pending.afuture, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle_in_loop, settled)


def _settle_in_loop(settled: list[tuple[asyncio.Future[int], Outcome]]) -> None:
    for future, outcome in settled:
        if future.done():  # cancelled caller
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class Followers:
    """Coroutines waiting for the log to grow past an index."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    async def wait(self, done: Callable[[], bool]) -> None:
        """Returns once `done()` is true; `wake` must be called after what `done` checks
        changes. Checking under the lock closes the race with a concurrent `wake`."""
        loop = asyncio.get_running_loop()
        waiter = (loop, loop.create_future())
        with self._lock:
            if done():
                return
            self._waiters.add(waiter)
        try:
            await waiter[1]
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    def wake(self) -> None:
        """Wakes every waiter (from any thread); each re-checks its condition."""
        with self._lock:
            waiters, self._waiters = self._waiters, set()
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

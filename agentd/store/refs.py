"""Who uses a layer right now: in-memory holds beside the checkpoints' references on disk.

A layer may be deleted only when no checkpoint records it (the store's `referenced_of`)
*and* nobody reads it at this moment: a running task has it mounted as a lower, an export or
a squash walks it, a fork is copying the checkpoint that names it. Those readers take a
`hold` on their stack for as long as they use it; squash, rollback and close hand the layers
they let go of to `release`, which deletes only those nobody references or holds, and keeps
the rest as *orphans*, deleted when their last hold ends.

Taking a hold and deciding a deletion both happen on the event loop thread with no `await`
in between the checkpoint read and the hold (callers read the checkpoint and call `hold` in
one synchronous stretch), so a layer cannot be chosen for deletion between a reader's look-up
and its hold. Only the deletion itself, of layers already chosen, runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from types import TracebackType

import structlog

from agentd.store.layers import LayerStore

log = structlog.get_logger("agentd.layers")


class LayerRefs:
    """Counts of in-memory holds per layer, and the one way layers are released."""

    def __init__(self, layers: LayerStore,
                 referenced: Callable[[Collection[str]], set[str]]) -> None:
        self._layers = layers
        self._referenced = referenced
        self._holds: Counter[str] = Counter()
        self._orphans: set[str] = set()

    def hold(self, stack: Sequence[str]) -> Hold:
        """Holds every layer of `stack` from now until the returned Hold is released."""
        self._holds.update(stack)
        return Hold(self, list(stack))

    def held(self, layer: str) -> bool:
        return self._holds[layer] > 0

    def held_layers(self) -> set[str]:
        return {layer for layer, count in self._holds.items() if count > 0}

    def _unhold(self, stack: Sequence[str]) -> list[str]:
        self._holds.subtract(stack)
        freed = [layer for layer in set(stack) if self._holds[layer] <= 0]
        for layer in freed:
            del self._holds[layer]
        return [layer for layer in freed if layer in self._orphans]

    async def release(self, candidates: Collection[str]) -> list[str]:
        """Deletes those of `candidates` that no checkpoint references and nobody holds;
        the held ones are deleted when their last hold ends. Returns what was deleted."""
        self._orphans.update(candidates)
        return await self._collect()

    async def _collect(self) -> list[str]:
        # Decided here, on the loop thread, with no await before the orphans are claimed.
        referenced = self._referenced(self._orphans)
        doomed = sorted(layer for layer in self._orphans
                        if layer not in referenced and self._holds[layer] <= 0)
        self._orphans.difference_update(doomed)
        self._orphans.difference_update(referenced)  # a checkpoint (a fork) keeps it now
        if doomed:
            await asyncio.to_thread(self._delete, doomed)
        return doomed

    def _delete(self, doomed: Sequence[str]) -> None:
        for layer in doomed:
            try:
                self._layers.delete(layer)
            except FileNotFoundError:
                continue  # already gone: the goal of a delete
            except OSError:
                log.exception("layer.delete_failed", layer=layer)  # gc at start-up retries


class Hold:
    """Layers held by one reader; `async with` releases them at the end, or call `release`."""

    def __init__(self, refs: LayerRefs, stack: list[str]) -> None:
        self._refs = refs
        self._stack: list[str] | None = stack

    async def release(self) -> None:
        """Ends the hold (once) and deletes the orphans nobody holds any more."""
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        if self._refs._unhold(stack):
            await self._refs._collect()

    def release_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ends the hold from any thread (e.g. an export's, when it stops reading)."""
        def done() -> None:
            task = loop.create_task(self.release())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        # A closed loop: the daemon is gone, and gc at start-up collects.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(done)

    async def __aenter__(self) -> Hold:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.release()


_BACKGROUND: set[asyncio.Task[None]] = set()

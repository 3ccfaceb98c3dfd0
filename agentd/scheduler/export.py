"""Export: a tarball written by a blocking writer in a thread, streamed by the event loop.

The tar writer (tarfile over the merged layers) is blocking code, and its consumer is a gRPC
stream that a client may read slowly, or abandon after one chunk. Two rules follow:

- No thread waits on the event loop without a way to be cancelled. The writer thread never
  calls into the loop and waits for an answer (`run_coroutine_threadsafe(...).result()` on a
  queue nobody drains blocks for ever). It hands chunks over with `call_soon_threadsafe`
  (which never blocks) and is paced by a `threading.Semaphore` of WINDOW credits that the
  loop side returns as it consumes chunks; while it waits for a credit it wakes every
  POLL_SECONDS to look at a cancel Event, set when the consumer goes away.
- Blocking work that can wait without bound never shares the pool that the hot path needs.
  Each export has its own thread (not the loop's default executor, which `asyncio.to_thread`
  uses for layer commits and which CreateRun, Step and Exec wait on), and at most
  MAX_EXPORTS run at once: more gets RESOURCE_EXHAUSTED rather than more threads.

When the writer thread ends, however it ends, it calls `on_end` (from the thread): the
caller's hold on the exported layers is released only then, so a squash or a rollback
never deletes a layer the writer is still reading.

    loop (consumer)                          writer thread
    ───────────────                          ─────────────
    start thread ──────────────────────────▶ write tar → Chunker.write
                                             acquire credit (poll cancel every 0.2 s)
    chunks.get() ◀── call_soon_threadsafe ── chunk
    release credit, yield chunk
    ...
    consumer gone: cancel.set() ───────────▶ next write/credit wait raises _Abandoned
                                             on_end() → hold released on the loop
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import BinaryIO, cast

from agentd.errors import ResourceExhausted
from agentd.store.refs import Hold

CHUNK = 256 * 1024      # bytes per streamed message (gRPC's default limit is 4 MiB)
WINDOW = 8              # chunks in flight between the writer and a slow consumer
POLL_SECONDS = 0.2      # how soon a writer waiting for credit notices a cancel
MAX_EXPORTS = 16        # writer threads at once
THREAD = "agentd-export"


class _Abandoned(Exception):
    """The consumer went away; the writer stops (not an error)."""


class _Chunker:
    """A write-only file object for tarfile's stream mode: cuts the stream into chunks and
    hands each to the loop, one credit per chunk."""

    def __init__(self, deliver: Callable[[bytes], None], credits: threading.Semaphore,
                 cancel: threading.Event) -> None:
        self._deliver = deliver
        self._credits = credits
        self._cancel = cancel
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        if self._cancel.is_set():
            raise _Abandoned
        self._buffer += data
        while len(self._buffer) >= CHUNK:
            self._send(bytes(self._buffer[:CHUNK]))
            del self._buffer[:CHUNK]
        return len(data)

    def flush(self) -> None:
        return None

    def finish(self) -> None:
        if self._buffer:
            self._send(bytes(self._buffer))
            self._buffer.clear()

    def _send(self, chunk: bytes) -> None:
        while not self._credits.acquire(timeout=POLL_SECONDS):
            if self._cancel.is_set():
                raise _Abandoned
        if self._cancel.is_set():
            raise _Abandoned
        self._deliver(chunk)


class Exporter:
    """Runs export writers in their own threads, at most MAX_EXPORTS at once."""

    def __init__(self) -> None:
        self.running = 0

    async def stream(self, write: Callable[[BinaryIO], None], hold: Hold
                     ) -> AsyncGenerator[bytes, None]:
        """Runs `write(fileobj)` in a new thread and yields what it writes; `hold` is
        released once the thread has ended (also if the consumer stops early)."""
        loop = asyncio.get_running_loop()
        if self.running >= MAX_EXPORTS:
            await hold.release()
            raise ResourceExhausted(f"{self.running} exports are running, the most agentd "
                                    "runs at once; retry when one has finished")
        chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        credits = threading.Semaphore(WINDOW)
        cancel = threading.Event()

        def deliver(item: bytes | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancel.set()
                raise _Abandoned from None

        def ended() -> None:
            self.running -= 1

        def body() -> None:
            # Named for the kernel too, so `top -H` and /proc show what the thread is.
            with contextlib.suppress(OSError):
                Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(THREAD)
            chunker = _Chunker(deliver, credits, cancel)
            try:
                write(cast(BinaryIO, chunker))
                chunker.finish()
                deliver(None)
            except _Abandoned:
                pass
            except BaseException as exc:  # the consumer raises it, on the loop
                with contextlib.suppress(_Abandoned):
                    deliver(exc)
            finally:
                hold.release_soon(loop)
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(ended)

        self.running += 1
        thread = threading.Thread(target=body, name=THREAD, daemon=True)
        try:
            thread.start()
        except BaseException:
            self.running -= 1
            await hold.release()
            raise
        try:
            while (item := await chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                credits.release()
                yield item
        finally:
            cancel.set()

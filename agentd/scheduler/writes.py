"""The two extra fds a step's task gets: its channel snapshot in, its structured writes out.

`$AGENTD_CHANNELS_FD` is a sealed memfd holding the channel values committed by the previous
step as one JSON object: the task reads it, cannot change it, and no sibling's writes reach it.
`$AGENTD_WRITES_FD` is the write end of a pipe the daemon drains while the task runs (a pipe
buffer is 64 KiB, so reading only at the end would block a chatty task); past the policy's
`limits.writes` the daemon stops keeping bytes and the task fails the step.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from typing import Any


def channels_snapshot_fd(snapshot: dict[str, Any]) -> int:
    """A read-only, sealed memfd with `snapshot` as JSON, positioned at its start."""
    fd = os.memfd_create("agentd-channels", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    data = json.dumps(snapshot, sort_keys=True, separators=(",", ":")).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


class WritesCollector:
    """Drains the writes pipe on the event loop, keeping at most `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self.overflow = False
        self._data = bytearray()
        self._done: asyncio.Future[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        os.set_blocking(self.read_fd, False)
        loop.add_reader(self.read_fd, self._on_readable)

    def close_write_end(self) -> None:
        """Called once the worker has its copy: EOF then means every writer is gone."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self.read_fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._stop()
            return
        room = self.limit - len(self._data)
        if len(chunk) > room:
            self.overflow = True
        self._data += chunk[:max(room, 0)]

    def _stop(self) -> None:
        asyncio.get_running_loop().remove_reader(self.read_fd)
        os.close(self.read_fd)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def finish(self) -> bytes:
        """The bytes written, once the task and everything it started have closed the pipe."""
        self.close_write_end()
        if self._done is not None:
            await self._done
        return bytes(self._data)

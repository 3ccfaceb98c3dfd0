"""A task's output as kept for its StepReply: a bounded prefix, the rest counted.

The whole output streams to a caller that asks (Exec, StreamStep); the reply keeps at most
REPLY_OUTPUT_BYTES per stream of each task, so a reply of MAX_TASKS tasks stays well under
the agreed message limit and a unary Step holds at most that much per task in memory, however
much the tool prints. Appending to a bytearray keeps it linear (no copy of the whole per chunk).
"""

from __future__ import annotations

# Per stream (stdout, stderr) of each task kept in the reply.
REPLY_OUTPUT_BYTES = 12 * 1024


class CappedOutput:
    """One stream's kept prefix plus a count of what was left out."""

    def __init__(self, cap: int = REPLY_OUTPUT_BYTES) -> None:
        self.cap = cap
        self._kept = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.cap - len(self._kept)
        if room > 0:
            self._kept += data[:room]
        self.dropped += max(len(data) - max(room, 0), 0)

    def value(self) -> bytes:
        if not self.dropped:
            return bytes(self._kept)
        return bytes(self._kept) + f"\n[... {self.dropped} bytes more, streamed ...]\n".encode()


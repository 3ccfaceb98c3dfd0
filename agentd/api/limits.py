"""The message size that client and server agree on, in one place.

gRPC refuses a message larger than the receiver's limit with RESOURCE_EXHAUSTED *after* the
sender did the work ("Received message larger than max"), with no partial delivery: a step
that committed would look failed to its client. So the server sends at most, and the client
receives at most, the same MAX_MESSAGE_BYTES, and every reply that can grow with run state is
capped below it with a marker saying what was left out: channel values (`channels_omitted`)
and each task's output kept in a StepReply (a prefix; the whole output streams with
Exec/StreamStep).
"""

from __future__ import annotations

from typing import Final

from agentd_client.connection import MAX_MESSAGE_BYTES

__all__ = ["MAX_MESSAGE_BYTES", "REPLY_HEADROOM"]

REPLY_HEADROOM: Final = 64 << 10
"""Kept free in a capped reply for framing and the fields added after the cap is computed."""

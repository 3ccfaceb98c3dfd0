"""The one message size client and server agree on, and what is capped to fit it.

gRPC refuses a message over the receiver's limit with a generic error and no partial
delivery, so no reply may be allowed to grow past it: a task's output kept in a StepReply is a
capped prefix with a marker (the full output streams with Exec/StreamStep).
"""

from __future__ import annotations

# The largest message the daemon sends and the client accepts (gRPC's default receive limit).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

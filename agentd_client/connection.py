"""Where the daemon listens and what a channel to it agrees on; shared by the light client and
agentctl (agentd/client.py imports these), so both find the socket the same way."""

from __future__ import annotations

import os
from typing import Final

#: Where `make run` (development mode) puts the socket, relative to the checkout.
DEV_SOCKET: Final = os.path.join("var", "run", "agentd.sock")
#: Where the systemd service puts it.
SYSTEM_SOCKET: Final = "/run/agentd/agentd.sock"
SOCKET_ENV: Final = "AGENTD_SOCKET"

MAX_MESSAGE_BYTES: Final = 4 << 20
"""gRPC's default receive limit, set explicitly on both sides (see agentd/api/limits.py)."""

CHANNEL_OPTIONS: Final = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES))


def resolve_socket(flag: str | None = None) -> str:
    """The socket path to use: `flag` > $AGENTD_SOCKET > ./var/run/agentd.sock if it exists
    (development mode) > /run/agentd/agentd.sock."""
    if flag:
        return flag
    from_env = os.environ.get(SOCKET_ENV, "")
    if from_env:
        return from_env
    if os.path.exists(DEV_SOCKET):
        return os.path.abspath(DEV_SOCKET)
    return SYSTEM_SOCKET


def describe_failure(code: str, details: str, socket_path: str) -> str:
    """What to tell a person about a failed call: the daemon's own message, or for a failure
    to connect, what to check."""
    # A daemon that is up but draining also says UNAVAILABLE, with its own message; only a
    # failure to connect gets the "is it running?" hint.
    if code == "UNAVAILABLE" and (details.startswith("failed to connect")
                                  or not os.path.exists(socket_path)):
        if "Permission denied" in details:
            return (f"cannot reach agentd at {socket_path}: permission denied on the socket "
                    "(ask an operator for access to it, or use --socket)")
        return (f"cannot reach agentd at {socket_path}: is it running? (start it with "
                "`make run` or `systemctl start agentd`)")
    return details or code.lower().replace("_", " ")

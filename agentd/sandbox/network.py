"""The worker's network: a new network namespace with only the loopback interface up.

Nothing leaves the namespace: no veth, no route, so `network: none` holds by construction
rather than by filtering.

Loopback is brought up with one SIOCSIFFLAGS ioctl, by hand: pyroute2 (the netlink library
agentd uses elsewhere) costs about 6 ms per worker in a freshly cloned child, a third of a
spawn, where the ioctl costs microseconds.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = "16sH22x"  # struct ifreq: name, then ifr_flags in the union


def enter() -> None:
    """Brings up `lo` inside the worker's (already new) network namespace (child side)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(_IFREQ, b"lo", 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | IFF_UP))

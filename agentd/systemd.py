"""The daemon's side of systemd's service protocols: readiness, the watchdog, passed sockets.

Pure stdlib, not python-systemd: each protocol is one datagram or three environment
variables (sd_notify(3), sd_watchdog_enabled(3), sd_listen_fds(3)), which is not worth a C
extension and libsystemd's headers on every build host.

    notify("READY=1")            -> tells systemd the daemon serves (Type=notify units)
    watchdog_interval()          -> WatchdogSec= of the unit, if this process is to pet it
    await pet_watchdog()         -> sends WATCHDOG=1 at half that interval, forever
    listen_fds()                 -> the sockets of the .socket units, by FileDescriptorName=

Every function is a no-op outside systemd (no NOTIFY_SOCKET, no LISTEN_FDS), so the daemon
calls them unconditionally, in development mode too.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from collections.abc import Callable

# The first passed descriptor; systemd passes LISTEN_FDS of them, consecutively.
LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send `state` ("READY=1", "STATUS=...", "STOPPING=1", "WATCHDOG=1", several joined by
    newlines) to the service manager. Returns False when there is none or it is unreachable;
    the caller logs that and carries on, since the daemon itself is fine."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # abstract namespace
        target: str | bytes = b"\0" + address[1:].encode()
    elif address.startswith("/"):
        target = address
    else:  # unset, or a kind this daemon has no use for (vsock: of VMs)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """WatchdogSec= in seconds when this process is the one to pet the watchdog, else None.

    systemd sets WATCHDOG_USEC for the main process and WATCHDOG_PID to its pid; a child
    that inherited the environment (the launcher, a worker) must not pet it, hence the check.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


async def pet_watchdog(healthy: Callable[[], bool] = lambda: True) -> None:
    """Send WATCHDOG=1 at half of WatchdogSec= while `healthy()` holds; run it as a task.

    Returns at once when there is no watchdog. Petting from the event loop is the point: a
    blocked loop stops the petting and systemd restarts the daemon. When `healthy()` turns
    false the petting stops (systemd then restarts agentd) unless it recovers in time.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(interval / 2)


def listen_fds(*, unset_environment: bool = True) -> dict[str, list[int]]:
    """The descriptors systemd passed, grouped by FileDescriptorName= ("unknown" if unnamed).

    Empty unless LISTEN_PID is this process (the variables may have been inherited from a
    parent). Each descriptor is made close-on-exec, so no worker inherits a listening socket.
    The variables are removed from the environment (as sd_listen_fds(1) does), so that
    nothing started later believes the sockets are its own.
    """
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    names_var = os.environ.get("LISTEN_FDNAMES")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    n = int(count)
    names = names_var.split(":") if names_var is not None else []
    if len(names) != n:  # systemd always matches them; anything else is not to be trusted
        names = ["unknown"] * n
    fds: dict[str, list[int]] = {}
    for offset, name in enumerate(names):
        fd = LISTEN_FDS_START + offset
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        fds.setdefault(name or "unknown", []).append(fd)
    return fds

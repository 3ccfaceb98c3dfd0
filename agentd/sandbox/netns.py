"""Network namespaces the daemon owns, made and used without fork().

The daemon is multi-threaded, so it cannot fork to make a namespace (see launcher.py). A
network namespace is per thread, though: `unshare(CLONE_NEWNET)` or `setns` in one thread
moves that thread only. So a namespace is made by a short-lived thread that unshares and
opens `/proc/thread-self/ns/net`, and work inside one (netlink, nftables, creating a socket:
a socket belongs to the namespace it was created in, wherever it is used later) runs on a
thread of its own that entered it once (`Namespace`).

Alternatives weighed: `ip netns add` (a bind mount under /run/netns: the namespace outlives
the daemon, which is exactly what the egress design must not allow), pyroute2's NetNS (forks
a helper process per namespace), and the launcher (single-threaded and able to fork, but it is
the spawn path: namespace work there would delay every spawn behind it).

A namespace made here is held only by its fd and by what lives in it (threads, sockets): it
dies with the daemon.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from agentd.sandbox import libc

T = TypeVar("T")


def create() -> int:
    """A new, empty network namespace (loopback down); its fd, close-on-exec."""
    return create_with(lambda: None)[0]


def create_with(setup: Callable[[], T]) -> tuple[int, T]:
    """A new, empty network namespace and what `setup` returned, run inside it by the thread
    that made it (sysctls under /proc/sys/net, sockets of the namespace) before that thread
    ends. If `setup` raises, the namespace is closed and the error raised here."""
    result: list[tuple[int, T] | BaseException] = []

    def make() -> None:
        try:
            libc.unshare(libc.CLONE_NEWNET)
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException as exc:  # handed to the caller below
            result.append(exc)
            return
        try:
            result.append((fd, setup()))
        except BaseException as exc:
            os.close(fd)
            result.append(exc)

    thread = threading.Thread(target=make, name="agentd-netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def sysctl(name: str, value: str) -> None:
    """Writes a net sysctl of the calling thread's namespace (/proc/thread-self/net is the
    thread's; /proc/sys/net follows the opener's namespace)."""
    with open(f"/proc/sys/net/{name}", "w") as f:
        f.write(value)


def open_path(path: str) -> int:
    """The fd of a namespace named by a file (`/run/netns/NAME`, `/proc/PID/ns/net`)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class Namespace:
    """A thread that lives in one network namespace: `call` runs a function there.

    Owns the fd it is given (closed by `close`). With `fd` None the thread stays in the
    daemon's own namespace.
    """

    def __init__(self, fd: int | None, name: str) -> None:
        self.fd = fd
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"agentd-ns-{name}",
                                        initializer=self._enter)

    def _enter(self) -> None:
        if self.fd is not None:
            libc.setns(self.fd, libc.CLONE_NEWNET)

    def call(self, fn: Callable[[], T]) -> T:
        """Runs `fn` in the namespace and returns its result (blocking)."""
        return self._pool.submit(fn).result()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Runs `fn` in the namespace; its future (wrap with asyncio.wrap_future)."""
        return self._pool.submit(fn)

    def close(self) -> None:
        """Stops the thread and closes the fd: the namespace lives on only while sockets or
        processes are in it."""
        self._pool.shutdown(wait=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def enter(fd: int) -> None:
    """Child side (a worker, as root, before anything else): joins the namespace `fd` made
    for it by the daemon, instead of a new empty one, and closes the fd."""
    libc.setns(fd, libc.CLONE_NEWNET)
    os.close(fd)

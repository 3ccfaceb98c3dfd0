"""The egress slots' maker: a child process that makes each slot's namespace, veth pair,
addresses and route with pyroute2, and hands the namespace back as an fd.

Why a process: pyroute2 costs ~3.5 ms of Python a slot (measured: building and parsing each
netlink message into objects), and in a daemon thread that time holds the GIL while the spawn
that just took a slot is on its way; the spawn waited behind it. Here it runs on its own
interpreter, and the daemon's side is one request and one answer on a socket.

It is started by the daemon's event-loop thread (PDEATHSIG follows the thread that started
it), holds the egress namespace only while the daemon lives (SIGKILL when the daemon dies,
even by SIGKILL), and keeps no slot: each namespace fd is closed once sent. One request at a
time over a SOCK_SEQPACKET pair: the slot's index in, then `{"ok": true}` with the fd
(SCM_RIGHTS) or `{"error": "..."}` out.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any

from agentd.sandbox import libc, netns


class SlotMakerGone(OSError):
    """The maker process is gone (killed, crashed): a new one is needed."""


class SlotMakerClient:
    """The daemon's side: `make(index, link, worker, gateway)` -> the slot namespace's fd."""

    def __init__(self, egress_fd: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "agentd.sandbox.slotmaker", str(theirs.fileno()),
             str(egress_fd)], pass_fds=[theirs.fileno(), egress_fd], stdin=subprocess.DEVNULL)
        theirs.close()
        self._sock = ours
        self._lock = threading.Lock()

    def make(self, index: int, link: str, worker: str, gateway: str) -> int:
        """A new slot namespace with its links made (blocking; OSError if it could not be)."""
        request = json.dumps({"index": index, "link": link, "worker": worker,
                              "gateway": gateway}).encode()
        with self._lock:
            if self._process.poll() is not None:
                raise SlotMakerGone(f"the slot maker exited ({self._process.returncode})")
            try:
                self._sock.sendall(request)
                data, fds, _flags, _address = socket.recv_fds(self._sock, 4096, 1)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise SlotMakerGone(f"the slot maker is gone ({exc})") from None
        if not data:
            raise SlotMakerGone("the slot maker closed its socket")
        answer = json.loads(data)
        if not answer.get("ok") or not fds:
            for fd in fds:
                os.close(fd)
            raise OSError(f"the slot maker could not make slot {index}: {answer.get('error')}")
        return fds[0]

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        self._sock.close()  # the maker sees EOF and exits
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _make(outside: Any, request: dict[str, Any]) -> int:
    """One slot: the namespace (made by a thread that unshares), the veth pair from the egress
    namespace into it, addresses, links up, default route. Raises on any failure, having
    closed the namespace (the kernel then removes the pair)."""
    from pyroute2 import IPRoute, NetlinkError

    link, worker, gateway = request["link"], request["worker"], request["gateway"]

    def no_ipv6() -> None:
        netns.sysctl("ipv6/conf/all/disable_ipv6", "1")
        netns.sysctl("ipv6/conf/default/disable_ipv6", "1")  # eth0, made after this, inherits it

    def configure() -> None:  # pyroute2 is used by the thread in the namespace it works on
        with IPRoute() as inside:
            inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
            eth0 = inside.link_lookup(ifname="eth0")[0]
            inside.addr("add", index=eth0, address=worker, prefixlen=30)
            inside.link("set", index=eth0, state="up")
            inside.route("add", dst="0.0.0.0/0", gateway=gateway)

    fd, _ = netns.create_with(no_ipv6)
    try:
        try:
            outside.link("add", ifname=link, kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": fd})
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            outside.link("del", ifname=link)  # a slot of the last turn still there
            outside.link("add", ifname=link, kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": fd})
        index = outside.link_lookup(ifname=link)[0]
        outside.addr("add", index=index, address=gateway, prefixlen=30)
        outside.link("set", index=index, state="up")
        inner = netns.Namespace(os.dup(fd), "slot")
        try:
            inner.call(configure)
        finally:
            inner.close()
    except BaseException:
        os.close(fd)
        raise
    return fd


def main() -> None:
    """Entry point: `python -m agentd.sandbox.slotmaker SOCKET_FD EGRESS_NETNS_FD`."""
    sock = libc.serve_the_daemon(int(sys.argv[1]))
    # This (main) thread lives in the egress namespace: the veths are made there.
    libc.setns(int(sys.argv[2]), libc.CLONE_NEWNET)
    os.close(int(sys.argv[2]))
    from pyroute2 import IPRoute

    with IPRoute() as outside:
        while True:
            data = sock.recv(4096)
            if not data:
                return
            try:
                fd = _make(outside, json.loads(data))
            except Exception as exc:
                sock.sendall(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}).encode())
                continue
            try:
                socket.send_fds(sock, [b'{"ok": true}'], [fd])
            finally:
                os.close(fd)


if __name__ == "__main__":
    main()

"""agentd/sandbox/netwatch.py's decisions: the addresses a watched call names, the sockets
refused at socket(), and `decide` on this test process's own sockets and memory (a call as the
launcher would see it: the arguments of a notification, the worker's fds and memory read
through /proc). The whole watch, against the kernel and a real worker, is in
tests/test_egress.py (test_refused_inside_the_worker_recorded and what follows it)."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from typing import Any

from agentd.sandbox import netwatch


def _inet(address: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(
        address) + bytes(8)


def _inet6(address: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, address) + bytes(4))


def test_sockaddr_reads_ipv4_ipv6_and_mapped_addresses() -> None:
    assert netwatch.sockaddr(_inet("198.18.0.11", 22)) == (socket.AF_INET, "198.18.0.11", 22)
    assert netwatch.sockaddr(_inet6("2001:db8::1", 443)) == (
        socket.AF_INET6, "2001:db8::1", 443)
    # The kernel connects an IPv4-mapped address over IPv4: it is judged as IPv4.
    assert netwatch.sockaddr(_inet6("::ffff:198.18.0.11", 9)) == (
        socket.AF_INET, "198.18.0.11", 9)


def test_sockaddr_ignores_other_families_and_short_addresses() -> None:
    assert netwatch.sockaddr(struct.pack("=H", socket.AF_UNIX) + b"/run/x\0") is None
    assert netwatch.sockaddr(struct.pack("=H", socket.AF_UNSPEC) + bytes(14)) is None
    assert netwatch.sockaddr(_inet("198.18.0.11", 22)[:6]) is None
    assert netwatch.sockaddr(_inet6("2001:db8::1", 443)[:20]) is None
    assert netwatch.sockaddr(b"\x02") is None


def test_socket_refusals_carry_the_kernels_errno() -> None:
    def decide(family: int, kind: int, protocol: int = 0) -> tuple[int, str]:
        err, attempt = netwatch.decide(0, netwatch.NR["socket"], (family, kind, protocol, 0, 0, 0),
                                       frozenset())
        return err, attempt.protocol if attempt else ""

    assert decide(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) == (errno.EPERM, "raw")
    assert decide(socket.AF_INET6, socket.SOCK_RAW | socket.SOCK_CLOEXEC) == (errno.EPERM, "raw")
    assert decide(socket.AF_INET, netwatch.SOCK_PACKET) == (errno.EPERM, "raw")
    assert decide(socket.AF_INET6, socket.SOCK_DGRAM) == (errno.EAFNOSUPPORT, "udp")
    assert decide(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) == (
        errno.EACCES, "icmp")
    # What the filter never notifies is let through if it ever came.
    assert decide(socket.AF_INET, socket.SOCK_STREAM) == (0, "")


def test_a_call_that_cannot_be_decided_is_refused_on_record() -> None:
    """A failure while deciding (a bug) refuses the call, with a record saying so, rather than
    letting it through unseen or stopping the launcher."""
    attempt = netwatch.unreadable(netwatch.NR["connect"], ValueError("bad"))
    assert attempt.errno == errno.EPERM
    assert attempt.details()["call"] == "connect"
    assert attempt.details()["errno"] == "EPERM"
    assert "could not decide it (ValueError)" in attempt.reason


PORTS = frozenset({443})
_keep: list[Any] = []


def _buffer(data: bytes) -> int:
    buf = ctypes.create_string_buffer(data, len(data))
    _keep.append(buf)
    return ctypes.addressof(buf)


def _connect(sock: Any, address: bytes, length: int | None = None,
             pid: int | None = None) -> tuple[int, str]:
    """decide() on connect(sock, address, length) made by this process (or thread `pid`)."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    err, attempt = netwatch.decide(pid or os.getpid(), netwatch.NR["connect"],
                                   (fd, _buffer(address), len(address) if length is None
                                    else length, 0, 0, 0), PORTS)
    return err, attempt.reason if attempt else ""


def test_decide_refuses_an_unlisted_tcp_port_and_lets_the_rest_through() -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert _connect(tcp, _inet("198.18.0.11", 22)) == (
            errno.EACCES, "port 22 is not allowed: no egress entry names TCP port 22")
        assert _connect(tcp, _inet("198.18.0.11", 443)) == (0, "")  # nft decides, records
        assert _connect(udp, _inet("198.18.0.11", 22)) == (0, "")  # its packets meet nft
        r, w = os.pipe()
        try:  # not a socket: the kernel says ENOTSOCK, nothing to decide
            assert _connect(r, _inet("198.18.0.11", 22)) == (0, "")
        finally:
            os.close(r)
            os.close(w)


def test_decide_leaves_what_the_kernel_refuses_by_length_to_it() -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET6) as tcp6:
        assert _connect(tcp, _inet("198.18.0.11", 22), length=8) == (0, "")  # EINVAL
        assert _connect(tcp, _inet("198.18.0.11", 22) + bytes(200), length=200) == (0, "")
        assert _connect(tcp, _inet("198.18.0.11", 22), length=-1) == (0, "")
        # An IPv4 address on an IPv6 socket: shorter than a sockaddr_in6, EINVAL.
        assert _connect(tcp6, _inet("198.18.0.11", 22)) == (0, "")


def test_decide_refuses_an_address_it_cannot_read() -> None:
    with socket.socket() as tcp:
        err, attempt = netwatch.decide(os.getpid(), netwatch.NR["connect"],
                                       (tcp.fileno(), 8, 16, 0, 0, 0), PORTS)  # unmapped
    assert err == errno.EFAULT
    assert attempt is not None
    assert attempt.reason == "refused: its address could not be read"


def test_decide_ipv6_and_mapped_addresses() -> None:
    with socket.socket(socket.AF_INET6) as tcp6:
        err, reason = _connect(tcp6, _inet6("2001:db8::1", 443))
        assert err == errno.ENETUNREACH
        assert reason.startswith("IPv6 is not allowed")
        assert _connect(tcp6, _inet6("::ffff:198.18.0.11", 22))[0] == errno.EACCES
        assert _connect(tcp6, _inet6("::ffff:198.18.0.11", 443)) == (0, "")


def test_decide_tcp_fast_open_by_sendmsg_reads_the_message_header() -> None:
    name = _inet("198.18.0.11", 25)
    header = struct.pack("=QI", _buffer(name), len(name)) + bytes(44)
    with socket.socket() as tcp:
        err, attempt = netwatch.decide(os.getpid(), netwatch.NR["sendmsg"],
                                       (tcp.fileno(), _buffer(header), netwatch.MSG_FASTOPEN,
                                        0, 0, 0), PORTS)
    assert err == errno.EACCES
    assert attempt is not None
    assert attempt.port == 25


def test_decide_a_call_from_a_thread() -> None:
    """A notification names the thread: its fds and memory are read through /proc/<tid>."""
    box: list[tuple[int, str]] = []
    with socket.socket() as tcp:
        thread = threading.Thread(target=lambda: box.append(
            _connect(tcp, _inet("198.18.0.11", 22), pid=threading.get_native_id())))
        thread.start()
        thread.join()
    assert box[0][0] == errno.EACCES


def test_mptcp_and_packet_sockets_refused() -> None:
    """MPTCP is outside Landlock's port rule: refused as by a kernel without it (no record:
    not an attempt to reach anything); an AF_PACKET socket is a raw socket, on record."""
    err, attempt = netwatch.decide(0, netwatch.NR["socket"],
                                   (socket.AF_INET, socket.SOCK_STREAM, netwatch.IPPROTO_MPTCP,
                                    0, 0, 0), PORTS)
    assert (err, attempt) == (errno.EPROTONOSUPPORT, None)
    err, attempt = netwatch.decide(0, netwatch.NR["socket"],
                                   (netwatch.AF_PACKET, socket.SOCK_RAW, 0, 0, 0, 0), PORTS)
    assert err == errno.EPERM
    assert attempt is not None
    assert attempt.protocol == "raw"

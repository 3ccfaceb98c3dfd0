"""The parts of agentd/sandbox/netwatch.py that are plain decoding: the addresses a watched
call names and the sockets refused at socket(). The whole watch, against the kernel and a real
worker, is in tests/test_egress.py (test_refused_inside_the_worker_recorded)."""

from __future__ import annotations

import errno
import socket
import struct

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

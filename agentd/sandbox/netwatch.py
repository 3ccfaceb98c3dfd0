"""Network refusals inside an egress worker, on record: what the worker's own kernel refuses
before any packet exists, so that nothing in the egress namespace could see it.

Three such refusals exist: a TCP connect to a port no egress entry names (Landlock's port rule,
EACCES), anything IPv6 (the slot has no IPv6 address), and raw or ping sockets (no
CAP_NET_RAW; ping sockets off). An egress worker's watch filter (agentd/sandbox/execwatch.py)
therefore also notifies, on top of execve and execveat:

    connect                              always (the address is in memory, not in a register)
    sendto, sendmsg, sendmmsg            only with MSG_FASTOPEN (a TCP connect by another name;
                                         Landlock refuses it like connect)
    socket(AF_INET6, SOCK_DGRAM | RAW)   refused: IPv6 datagrams could otherwise be sent with
                                         sendmsg, which cannot be watched per call
    socket(AF_INET(6), SOCK_RAW|PACKET)  refused (the main filter leaves raw sockets to this one
    socket(AF_PACKET, ...)               in egress workers: its errno would outrank the
    socket(AF_INET, SOCK_DGRAM, ICMP)    notification)
    socket(AF_INET(6), STREAM, MPTCP)    refused without a record, as by a kernel without MPTCP:
                                         Landlock's port rule does not cover MPTCP

and the launcher answers each with `decide`: a refusal gets an errno and a record (EACCES for a
TCP port, as Landlock; ENETUNREACH for IPv6; EPERM for raw sockets, EACCES for ping sockets,
EAFNOSUPPORT for IPv6 datagram sockets, as a kernel without IPv6 datagrams); a call is let
through (CONTINUE) only where the kernel refuses it by what the worker cannot change afterwards
(not a socket, an address length out of bounds) or where the egress namespace sees, refuses
and records what follows (UDP, a listed port). An address the launcher cannot read is refused
(EFAULT) on record, never let through unseen. Landlock keeps refusing unlisted TCP ports behind
the launcher: two walls, one record.

The launcher learns what the fd is from its socket's protocol name (`socket_kind`: the
`system.sockprotoname` attribute of /proc/<tid>/fd/<fd>), never from a copy of the fd: a copy
held by the launcher could be the last reference to the worker's socket, and closing it can
block (SO_LINGER), stalling every worker's spawns; one not closed is a leak.

Limits, said plainly. The destination is read from the worker's memory after the call was
made: a worker that rewrites it (or the fd) from another thread in that window can make the
kernel see another port than the launcher did. The refusal still holds (Landlock; MPTCP is
refused at socket()), only its record can be dodged that way, by the worker racing itself.
Memory the kernel reads and /proc/<pid>/mem cannot (memfd_secret) is refused by the main
seccomp filter. Each watched call costs a round trip to the launcher, ~0.1 ms
(`make bench BENCH_ARGS=netwatch`); only egress workers pay it, and a connection through the
egress namespace costs milliseconds anyway.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import platform
import socket
import struct
from dataclasses import dataclass

from agentd.sandbox import libc

_SYSCALLS = {"x86_64": {"socket": 41, "connect": 42, "sendto": 44, "sendmsg": 46,
                        "sendmmsg": 307},
             "aarch64": {"socket": 198, "connect": 203, "sendto": 206, "sendmsg": 211,
                         "sendmmsg": 269}}
NR = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])
_NAMES = {nr: name for name, nr in NR.items()}

MSG_FASTOPEN = 0x20000000
SOCK_TYPE_MASK = 0xF
SOCK_PACKET = 10  # the obsolete packet type on AF_INET; needs CAP_NET_RAW like SOCK_RAW
AF_PACKET = 17
IPPROTO_MPTCP = 262
_MAX_SOCKADDR = 128  # sizeof(struct sockaddr_storage)
# The shortest address the kernel takes for a TCP or UDP socket of each family
# (sizeof(struct sockaddr_in), SIN6_LEN_RFC2133).
_MIN_SOCKADDR: dict[int, int] = {socket.AF_INET: 16, socket.AF_INET6: 24}


@dataclass(frozen=True)
class NetAttempt:
    """One network call the launcher refused inside a worker."""

    call: str  # connect, sendto, sendmsg, sendmmsg, socket
    destination: str  # "" for a socket() refusal: it has none yet
    port: int
    protocol: str  # tcp, udp, icmp, raw
    errno: int  # what the worker was answered
    reason: str

    def details(self) -> dict[str, object]:
        """The `net.refused` record's fields (the egress task adds the resolver's name)."""
        return {"destination": self.destination, "port": self.port, "protocol": self.protocol,
                "by": "worker", "call": self.call, "reason": self.reason,
                "errno": errno.errorcode.get(self.errno, str(self.errno))}


def decide(pid: int, nr: int, args: tuple[int, ...],
           ports: frozenset[int]) -> tuple[int, NetAttempt | None]:
    """The answer to one watched network call of an egress worker whose Landlock lets it
    connect to TCP `ports`: (errno, the attempt on record), or (0, None) to let the kernel
    carry on.

    A call is let through only where the kernel refuses it whatever its memory says (a length
    out of range, not a socket), or where the egress namespace sees what follows (UDP, a listed
    port, another IP protocol). An address the launcher cannot read is refused (EFAULT), not
    let through unseen."""
    call = _NAMES.get(nr)
    if call is None:
        return 0, None
    if call == "socket":
        return _socket(args)
    kind = socket_kind(pid, args[0])
    if kind is None or kind[0] not in ("tcp", "udp"):
        return 0, None  # not an IP socket (or no such fd): nothing of it leaves as TCP/UDP
    protocol, family = kind
    try:
        data = _address(pid, call, args, family)
    except _Unreadable:
        return errno.EFAULT, NetAttempt(call, "?", 0, protocol, errno.EFAULT,
                                        "refused: its address could not be read")
    if data is None:
        return 0, None
    address = sockaddr(data)
    if address is None or struct.unpack_from("=H", data)[0] != family:
        return 0, None  # another family than its socket's: EAFNOSUPPORT from the kernel
    af, host, port = address
    if af == socket.AF_INET6:
        return errno.ENETUNREACH, NetAttempt(
            call, host, port, protocol, errno.ENETUNREACH,
            "IPv6 is not allowed: the worker has no IPv6 route (no egress entry can name IPv6)")
    if protocol == "udp" or port in ports:
        return 0, None  # the egress namespace decides, and records either way
    return errno.EACCES, NetAttempt(
        call, host, port, "tcp", errno.EACCES,
        f"port {port} is not allowed: no egress entry names TCP port {port}")


def unreadable(nr: int, exc: Exception) -> NetAttempt:
    """The record of a watched call refused because deciding it failed (a bug, not the
    worker's doing): refused rather than let through unseen."""
    return NetAttempt(_NAMES.get(nr, str(nr)), "", 0, "?", errno.EPERM,
                      f"refused: the launcher could not decide it ({type(exc).__name__})")


def _socket(args: tuple[int, ...]) -> tuple[int, NetAttempt | None]:
    """socket(): what the filter notified is refused (it only notifies those)."""
    family, kind, protocol = (a & 0xFFFFFFFF for a in args[:3])
    kind &= SOCK_TYPE_MASK
    if family == AF_PACKET or kind in (socket.SOCK_RAW, SOCK_PACKET):
        return errno.EPERM, NetAttempt("socket", "", 0, "raw", errno.EPERM,
                                       "raw sockets are not allowed: no egress entry can "
                                       "allow them")
    if kind == socket.SOCK_STREAM and protocol == IPPROTO_MPTCP:
        # Landlock's port rule does not cover MPTCP: refused as by a kernel without it (tools
        # fall back to TCP). Not an attempt to reach anything: no record.
        return errno.EPROTONOSUPPORT, None
    if family == socket.AF_INET6:
        return errno.EAFNOSUPPORT, NetAttempt(
            "socket", "", 0, "udp", errno.EAFNOSUPPORT,
            "IPv6 is not allowed: an IPv6 datagram socket is refused (the worker has no IPv6 "
            "route)")
    if family == socket.AF_INET and kind == socket.SOCK_DGRAM and protocol == socket.IPPROTO_ICMP:
        return errno.EACCES, NetAttempt("socket", "", 0, "icmp", errno.EACCES,
                                        "ICMP is not allowed: ping sockets are refused")
    return 0, None


class _Unreadable(Exception):
    """The call's address (or message header) is in memory the launcher cannot read."""


def _address(pid: int, call: str, args: tuple[int, ...], family: int) -> bytes | None:
    """The address the call names, as the kernel will take it; None when the kernel connects
    nothing new (no address) or refuses the call by its length: sockaddr_storage at most, at
    least a sockaddr_in(6) for its socket's family, on a length the worker cannot change
    afterwards. Raises _Unreadable."""
    where = _where(pid, call, args)
    if where is None:
        return None
    pointer, length = where
    if not _MIN_SOCKADDR[family] <= length <= _MAX_SOCKADDR:
        return None  # EINVAL from the kernel
    data = _read(pid, pointer, length)
    if data is None:
        raise _Unreadable
    return data


def _where(pid: int, call: str, args: tuple[int, ...]) -> tuple[int, int] | None:
    """(pointer, length) of the address the call names, the length as the kernel's signed
    int; None without one."""
    if call == "connect":
        pointer, length = args[1], args[2]
    elif call == "sendto":
        pointer, length = args[4], args[5]
    elif call in ("sendmsg", "sendmmsg"):  # struct msghdr (first in an mmsghdr): name, namelen
        if call == "sendmmsg" and not args[2] & 0xFFFFFFFF:
            return None  # no message: nothing is sent, nothing connects
        header = _read(pid, args[1], 12)
        if header is None:
            raise _Unreadable
        pointer, length = struct.unpack("=QI", header)
    else:
        return None
    if not pointer:
        return None
    return pointer, ctypes.c_int32(length & 0xFFFFFFFF).value


def sockaddr(data: bytes) -> tuple[int, str, int] | None:
    """(family, address, port) of a struct sockaddr_in or sockaddr_in6; an IPv4-mapped IPv6
    address is IPv4 (the kernel connects it over IPv4)."""
    if len(data) < 2:
        return None
    family = struct.unpack_from("=H", data)[0]
    if family == socket.AF_INET and len(data) >= 8:
        return family, socket.inet_ntoa(data[4:8]), struct.unpack_from("!H", data, 2)[0]
    if family == socket.AF_INET6 and len(data) >= 24:
        port = struct.unpack_from("!H", data, 2)[0]
        address = ipaddress.IPv6Address(data[8:24])
        if address.ipv4_mapped is not None:
            return socket.AF_INET, str(address.ipv4_mapped), port
        return family, str(address), port
    return None


def _read(pid: int, address: int, size: int) -> bytes | None:
    """Exactly `size` bytes of the worker's memory, or None."""
    data = libc.read_memory(pid, address, size)
    return data if data is not None and len(data) == size else None


def socket_kind(pid: int, fd: int) -> tuple[str, int] | None:
    """(protocol, family) of the worker's fd, from its socket's protocol name (the
    `system.sockprotoname` attribute of /proc/<pid>/fd/<fd>): ("tcp", AF_INET6) for TCPv6,
    ("udp", AF_INET) for UDP, (the name, family) for another protocol; None if it is not a
    socket. No reference to the worker's file is taken: the launcher never holds, and so never
    closes last, a socket of the worker (a close can block: SO_LINGER)."""
    try:
        raw = os.getxattr(f"/proc/{pid}/fd/{fd & 0xFFFFFFFF}", "system.sockprotoname")
    except OSError:
        return None
    name = raw.rstrip(b"\0").decode(errors="replace")
    family = socket.AF_INET6 if name.endswith("v6") else socket.AF_INET
    base = name.removesuffix("v6")
    protocol = {"TCP": "tcp", "MPTCP": "tcp", "UDP": "udp"}.get(base, base.lower())
    return protocol, family

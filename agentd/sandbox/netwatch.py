"""Network refusals inside an egress worker, on record: what the worker's own kernel refuses
before any packet exists, so that nothing in the egress namespace could see it.

Three such refusals exist: a TCP connect to a port no egress entry names (Landlock's port rule,
EACCES), anything IPv6 (the slot has no IPv6 address: ENETUNREACH), and raw or ping sockets
(no CAP_NET_RAW; ping sockets off). An egress worker's watch filter (agentd/sandbox/
execwatch.py) therefore also notifies, on top of execve and execveat:

    connect                              always (the address is in memory, not in a register)
    sendto, sendmsg, sendmmsg            only with MSG_FASTOPEN (a TCP connect by another name;
                                         Landlock refuses it like connect)
    socket(AF_INET6, SOCK_DGRAM | RAW)   refused here: IPv6 datagrams could otherwise be sent
                                         with sendmsg, which cannot be watched per call
    socket(AF_INET, SOCK_RAW | PACKET)   refused here (the main filter leaves raw sockets to
    socket(AF_INET, SOCK_DGRAM, ICMP)    this one in egress workers: its EPERM would outrank
                                         the notification)

and the launcher answers each with `decide`: a refusal gets an errno and a record (EACCES for a
TCP port, as Landlock; ENETUNREACH for IPv6; EPERM for raw sockets, EACCES for ping sockets,
EAFNOSUPPORT for IPv6 datagram sockets, as a kernel without IPv6 datagrams), everything else is
let through (CONTINUE) to the kernel and to the egress namespace, which record it there. Landlock
keeps refusing unlisted ports behind the launcher: two walls, one record.

Limits, said plainly. The destination is read from the worker's memory after the call was
made: a worker that rewrites it from another thread in that window can make the kernel see
another port than the launcher did. The refusal still holds (Landlock), only its record can be
dodged that way, by the worker racing itself. Each watched call costs a round trip to the
launcher, ~0.1 ms (`make bench BENCH_ARGS=netwatch`); only egress workers pay it, and a
connection through the egress namespace costs milliseconds anyway.
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

_SYSCALLS = {"x86_64": {"socket": 41, "connect": 42, "sendto": 44, "sendmsg": 46,
                        "sendmmsg": 307, "pidfd_getfd": 438},
             "aarch64": {"socket": 198, "connect": 203, "sendto": 206, "sendmsg": 211,
                         "sendmmsg": 269, "pidfd_getfd": 438}}
NR = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])
_NAMES = {nr: name for name, nr in NR.items()}

MSG_FASTOPEN = 0x20000000
SOCK_TYPE_MASK = 0xF
SOCK_PACKET = 10  # the obsolete packet type on AF_INET; needs CAP_NET_RAW like SOCK_RAW
_IPPROTO_MPTCP = 262
_MAX_SOCKADDR = 128  # sizeof(struct sockaddr_storage)
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class NetAttempt:
    """One network call the launcher refused inside a worker."""

    call: str  # connect, sendto, sendmsg, sendmmsg, socket
    destination: str  # "" for a socket() refusal: it has none yet
    port: int
    protocol: str  # tcp, udp, icmp, raw
    reason: str
    errno: int  # what the worker was answered

    def details(self) -> dict[str, object]:
        """The `net.refused` record's fields (the egress task adds the resolver's name)."""
        return {"destination": self.destination, "port": self.port, "protocol": self.protocol,
                "by": "worker", "call": self.call, "reason": self.reason,
                "errno": errno.errorcode.get(self.errno, str(self.errno))}


def decide(pid: int, nr: int, args: tuple[int, ...],
           ports: frozenset[int]) -> tuple[int, NetAttempt | None]:
    """The answer to one watched network call of an egress worker whose Landlock lets it
    connect to TCP `ports`: (errno, the attempt on record), or (0, None) to let the kernel
    carry on."""
    call = _NAMES.get(nr)
    if call is None:
        return 0, None
    if call == "socket":
        return _socket(args)
    address = _destination(pid, call, args)
    if address is None:
        return 0, None
    family, host, port = address
    if family == socket.AF_INET6:
        kind = _socket_kind(pid, args[0]) or "tcp"
        return errno.ENETUNREACH, _attempt(
            call, host, port, kind, errno.ENETUNREACH,
            "IPv6 is not allowed: the worker has no IPv6 route (no egress entry can name IPv6)")
    if port in ports:
        return 0, None  # the egress namespace decides, and records either way
    if _socket_kind(pid, args[0]) != "tcp":
        return 0, None  # UDP (or another protocol): its packets meet nft, which records them
    return errno.EACCES, _attempt(
        call, host, port, "tcp", errno.EACCES,
        f"port {port} is not allowed: no egress entry names TCP port {port}")


def unreadable(nr: int, exc: Exception) -> NetAttempt:
    """The record of a watched call refused because deciding it failed (a bug, not the
    worker's doing): refused rather than let through unseen."""
    return _attempt(_NAMES.get(nr, str(nr)), "", 0, "?", errno.EPERM,
                    f"refused: the launcher could not decide it ({type(exc).__name__})")


def _attempt(call: str, host: str, port: int, protocol: str, err: int,
             reason: str) -> NetAttempt:
    return NetAttempt(call=call, destination=host, port=port, protocol=protocol,
                      reason=reason, errno=err)


def _socket(args: tuple[int, ...]) -> tuple[int, NetAttempt | None]:
    """socket(): what the filter notified is refused (it only notifies those)."""
    family, kind, protocol = (a & 0xFFFFFFFF for a in args[:3])
    kind &= SOCK_TYPE_MASK
    if kind in (socket.SOCK_RAW, SOCK_PACKET):
        return errno.EPERM, _attempt("socket", "", 0, "raw", errno.EPERM,
                                     "raw sockets are not allowed: no egress entry can allow "
                                     "them")
    if family == socket.AF_INET6:
        return errno.EAFNOSUPPORT, _attempt(
            "socket", "", 0, "udp", errno.EAFNOSUPPORT,
            "IPv6 is not allowed: an IPv6 datagram socket is refused (the worker has no IPv6 "
            "route)")
    if family == socket.AF_INET and kind == socket.SOCK_DGRAM and protocol == socket.IPPROTO_ICMP:
        return errno.EACCES, _attempt("socket", "", 0, "icmp", errno.EACCES,
                                      "ICMP is not allowed: ping sockets are refused")
    return 0, None


def _destination(pid: int, call: str, args: tuple[int, ...]
                 ) -> tuple[int, str, int] | None:
    """(family, address, port) the call names, or None (no address, not an IP one, or memory
    the worker did not make readable: the kernel answers that call itself)."""
    if call == "connect":
        pointer, length = args[1], args[2]
    elif call == "sendto":
        pointer, length = args[4], args[5]
    elif call in ("sendmsg", "sendmmsg"):  # struct msghdr (first in an mmsghdr): name, namelen
        if call == "sendmmsg" and not args[2] & 0xFFFFFFFF:
            return None  # no message: nothing is sent, nothing connects
        header = _read(pid, args[1], 12)
        if header is None:
            return None
        pointer, length = struct.unpack("=QI", header)
    else:
        return None
    if not pointer:
        return None
    data = _read(pid, pointer, min(length & 0xFFFFFFFF, _MAX_SOCKADDR))
    return None if data is None else sockaddr(data)


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
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            data = mem.read(size)
    except (OSError, OverflowError, ValueError):
        return None
    return data if len(data) == size else None


def _socket_kind(pid: int, fd: int) -> str | None:
    """"tcp", "udp", or another protocol's number, of the worker's socket `fd` (a copy taken
    with pidfd_getfd and closed at once); None if it cannot be had."""
    try:
        pidfd = _pidfd(pid)
    except OSError:
        return None
    try:
        copy = int(_libc.syscall(ctypes.c_long(NR["pidfd_getfd"]), pidfd,
                                 ctypes.c_int(fd & 0xFFFFFFFF), 0))
        if copy < 0:
            return None
        with socket.socket(fileno=copy) as sock:
            kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            protocol = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    except OSError:
        return None
    finally:
        os.close(pidfd)
    if kind == socket.SOCK_STREAM and protocol in (socket.IPPROTO_TCP, _IPPROTO_MPTCP):
        return "tcp"
    if kind == socket.SOCK_DGRAM and protocol == socket.IPPROTO_UDP:
        return "udp"
    return str(protocol)


def _pidfd(pid: int) -> int:
    """A pidfd of the process the thread `pid` (as seccomp names it) belongs to."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):  # a thread, not its leader (by
            raise  # kernel version); a process that is gone fails again below
    with open(f"/proc/{pid}/status") as status:
        tgid = next(int(line.split()[1]) for line in status if line.startswith("Tgid:"))
    return os.pidfd_open(tgid)

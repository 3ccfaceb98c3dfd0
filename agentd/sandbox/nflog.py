"""NFLOG from Python: the packets nftables refuses, read from a netlink socket, one by one.

The egress ruleset (agentd/sandbox/egress.py) ends every refused packet with
`log group LOG_GROUP` then `drop`. Logging is an observation only: the packet is dropped by the
rule whether or not anyone reads the log, so the wall does not depend on this reader (an
NFQUEUE would: a packet waits for the reader's verdict; and this kernel has no nft `queue`
expression, while `log` is there). What the reader gets is a copy of the packet's first
COPY_RANGE bytes, enough for the IPv4 header, the ports, an ICMP type or a DNS question.

    daemon (egress netns thread)                 kernel (egress netns)
    socket(AF_NETLINK, NETLINK_NETFILTER) ──▶   nfnetlink_log
    CONFIG  CMD BIND group G              ──▶   instance for group G bound to our port id
    CONFIG  MODE copy packet, COPY_RANGE  ──▶
    CONFIG  QTHRESH 1                     ──▶   (one message per packet, no 1 s batching)
                                          ◀──   PACKET {family, PAYLOAD}   per logged packet

The earlier attempt that "delivered nothing" is not reproduced here: binding the group from a
socket made in the egress namespace, with the thresholds above, delivers each packet on the
6.18 development kernel (tests/test_egress.py). If the socket's buffer fills (a flood), the
kernel drops log messages (ENOBUFS on the next read, counted by the caller), never packets'
refusals: per-task counts come from nft's own counters, not from this log.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Final

NETLINK_NETFILTER: Final = 12
_SUBSYS_ULOG: Final = 4
_MSG_PACKET, _MSG_CONFIG = 0, 1
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLMSG_ERROR: Final = 2
_CFG_CMD, _CFG_MODE, _CFG_TIMEOUT, _CFG_QTHRESH = 1, 2, 4, 5
_CMD_BIND: Final = 1
_COPY_PACKET: Final = 2
_ATTR_PAYLOAD: Final = 9
COPY_RANGE: Final = 512
"""Bytes of each packet copied to the reader: headers and a DNS question fit."""
RCVBUF: Final = 4 << 20


@dataclass(frozen=True)
class Logged:
    """One refused packet, as far as its first COPY_RANGE bytes tell."""

    family: int
    """socket.AF_INET or AF_INET6."""
    source: str
    destination: str
    protocol: str
    """"tcp", "udp", "icmp", or the IP protocol number as text."""
    port: int | None = None
    """The destination port (TCP, UDP)."""
    icmp: tuple[int, int] | None = None
    """(type, code) of an ICMP packet."""
    data: bytes = b""
    """The transport payload copied (UDP: a DNS query to another server, say)."""


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("HH", size, kind) + data + b"\0" * (-size % 4)


def _message(kind: int, flags: int, group: int, attrs: bytes) -> bytes:
    body = struct.pack("BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    return struct.pack("IHHII", 16 + len(body), (_SUBSYS_ULOG << 8) | kind,
                       _NLM_F_REQUEST | flags, 0, 0) + body


def open_group(group: int) -> socket.socket:
    """A socket bound to log group `group` in the calling thread's network namespace
    (blocking while it is configured; the caller makes it non-blocking). OSError if the
    kernel refuses (no nfnetlink_log, or the group is bound by another socket)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 0))
        sock.settimeout(2.0)
        for attrs in (_attr(_CFG_CMD, struct.pack("BBH", _CMD_BIND, 0, 0)),
                      _attr(_CFG_MODE, struct.pack("!IBB", COPY_RANGE, _COPY_PACKET, 0)),
                      _attr(_CFG_QTHRESH, struct.pack("!I", 1)),
                      _attr(_CFG_TIMEOUT, struct.pack("!I", 1))):
            _configure(sock, group, attrs)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def _configure(sock: socket.socket, group: int, attrs: bytes) -> None:
    """Sends one CONFIG message and checks its acknowledgement."""
    sock.send(_message(_MSG_CONFIG, _NLM_F_ACK, group, attrs))
    reply = sock.recv(4096)
    _length, kind = struct.unpack_from("IH", reply)
    error = struct.unpack_from("i", reply, 16)[0] if kind == _NLMSG_ERROR else 0
    if error:
        raise OSError(-error, f"nfnetlink_log group {group}: {os.strerror(-error)}")


def parse(data: bytes) -> list[Logged]:
    """The packets in one datagram read from the socket (other messages are skipped)."""
    found = []
    offset = 0
    while offset + 20 <= len(data):
        length, kind = struct.unpack_from("IH", data, offset)
        if length < 16:
            break
        if kind == (_SUBSYS_ULOG << 8) | _MSG_PACKET:
            family = data[offset + 16]
            at, end = offset + 20, offset + length
            while at + 4 <= end:
                size, attr = struct.unpack_from("HH", data, at)
                if size < 4:
                    break
                if attr & 0x3FFF == _ATTR_PAYLOAD:
                    packet = _packet(family, data[at + 4:at + size])
                    if packet is not None:
                        found.append(packet)
                at += (size + 3) & ~3
        offset += (length + 3) & ~3
    return found


def _packet(family: int, raw: bytes) -> Logged | None:
    """Reads the IP and transport headers of a copied packet."""
    if family == socket.AF_INET and len(raw) >= 20:
        header = (raw[0] & 0x0F) * 4
        number = raw[9]
        source, destination = socket.inet_ntoa(raw[12:16]), socket.inet_ntoa(raw[16:20])
        rest = raw[header:]
    elif family == socket.AF_INET6 and len(raw) >= 40:
        number = raw[6]
        source = str(ipaddress.IPv6Address(raw[8:24]))
        destination = str(ipaddress.IPv6Address(raw[24:40]))
        rest = raw[40:]
    else:
        return None
    if number in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) and len(rest) >= 4:
        port = struct.unpack_from("!H", rest, 2)[0]
        protocol = "tcp" if number == socket.IPPROTO_TCP else "udp"
        return Logged(family, source, destination, protocol, port=port,
                      data=rest[8:] if protocol == "udp" else b"")
    if number in (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6) and len(rest) >= 2:
        return Logged(family, source, destination, "icmp", icmp=(rest[0], rest[1]))
    return Logged(family, source, destination, str(number))

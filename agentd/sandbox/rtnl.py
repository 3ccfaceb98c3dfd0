"""Just enough rtnetlink for the egress slots, by hand: a veth pair, an address, a default
route, a link up or deleted.

Why not pyroute2 (used here before): a slot cost ~5.6 ms of CPU through it, three quarters of
it Python holding the GIL (parsing every reply into objects, an IPRoute per namespace), in a
daemon thread that runs while a spawn is on its way: the event loop and the spawn waited
behind it. The messages themselves are a few fixed structs; here a slot costs the kernel's
work and a few hundred microseconds of Python (measured). Every request asks for an ack and
any error is raised (OSError with the kernel's errno): nothing is half-made silently.

A netlink socket belongs to the network namespace it was created in, whichever thread uses
it afterwards (agentd/sandbox/netns.py), so one made once in a namespace configures it from
any thread. One socket must not be used by two threads at once (`Rtnl` is not locked).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Final

NETLINK_ROUTE: Final = 0
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR: Final = 20
RTM_NEWROUTE: Final = 24
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFLA_IFNAME, IFLA_LINKINFO, IFLA_NET_NS_FD = 3, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER: Final = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_GATEWAY: Final = 5
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1
IFF_UP: Final = 0x1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst/src len, tos, table, proto, scope,
#                                      type, flags


def _attr(kind: int, data: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


def _ifinfo(index: int = 0, up: bool = False) -> bytes:
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP if up else 0)


class Rtnl:
    """An rtnetlink socket of the calling thread's network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, *messages: tuple[int, int, bytes]) -> list[bytes]:
        """Sends (type, flags, payload) messages in one datagram (the kernel runs them in
        order, each to its ack) and waits for every ack. Raises the first error; else the
        reply of each (a get's answer; b"" for the others)."""
        out = []
        replies: dict[int, bytes] = {}
        for kind, flags, payload in messages:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            replies[self._seq] = b""
            out.append(_HEADER.pack(_HEADER.size + len(payload), kind,
                                    NLM_F_REQUEST | NLM_F_ACK | flags, self._seq, 0) + payload)
        self._sock.send(b"".join(out))
        acked: set[int] = set()
        error: OSError | None = None
        while len(acked) < len(replies):
            data = self._sock.recv(65536)
            at = 0
            while at + _HEADER.size <= len(data):
                length, kind, _flags, seq, _pid = _HEADER.unpack_from(data, at)
                if length < _HEADER.size:
                    break
                body = data[at + _HEADER.size:at + length]
                at += (length + 3) & ~3
                if seq not in replies:
                    continue
                if kind == NLMSG_ERROR:
                    acked.add(seq)
                    code = -struct.unpack_from("=i", body)[0]
                    if code and error is None:
                        error = OSError(code, f"rtnetlink: {os.strerror(code)}")
                elif kind != NLMSG_DONE:
                    replies[seq] = body
        if error is not None:
            raise error
        return list(replies.values())

    def index(self, name: str) -> int:
        """The ifindex of the link `name` (OSError ENODEV if there is none)."""
        reply = self._request((RTM_GETLINK, 0, _ifinfo() + _attr(IFLA_IFNAME, _name(name))))[0]
        if len(reply) < _IFINFO.size:
            raise OSError(errno.EPROTO, f"rtnetlink: no link in the answer for {name}")
        return int(_IFINFO.unpack_from(reply)[2])

    def add_veth(self, name: str, peer: str, peer_netns_fd: int) -> None:
        """A veth pair: `name` here, up, and `peer` in the namespace `peer_netns_fd`, down
        (a veth cannot be opened before its pair is linked: the kernel refuses a peer made
        up with ENOTCONN). OSError EEXIST if `name` (or `peer` there) exists."""
        peer_info = (_ifinfo() + _attr(IFLA_IFNAME, _name(peer))
                     + _attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd)))
        info = _attr(IFLA_INFO_KIND, b"veth") + _attr(
            IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_info))
        self._request((RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                       _ifinfo(up=True) + _attr(IFLA_IFNAME, _name(name))
                       + _attr(IFLA_LINKINFO, info)))

    def delete_link(self, name: str) -> None:
        """Deletes the link `name` (OSError ENODEV if there is none)."""
        self._request((RTM_DELLINK, 0, _ifinfo() + _attr(IFLA_IFNAME, _name(name))))

    def set_up(self, name: str) -> None:
        self._request((RTM_NEWLINK, 0, _ifinfo(up=True) + _attr(IFLA_IFNAME, _name(name))))

    def configure(self, index: int, address: str, prefixlen: int,
                  gateway: str | None = None, *, up: bool = False) -> None:
        """Adds `address`/`prefixlen` to link `index`, with `up` brings it up, and with a
        `gateway` adds the default route through it: one round trip."""
        packed = socket.inet_aton(address)
        messages = [(RTM_NEWLINK, 0, _ifinfo(index, up=True))] if up else []
        messages += [(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
                     _IFADDR.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
                     + _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed))]
        if gateway is not None:
            messages.append((RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL,
                             _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                                         RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
                             + _attr(RTA_GATEWAY, socket.inet_aton(gateway))))
        self._request(*messages)

"""The kernel side of network egress: the egress namespace, worker slots and the nftables wall.

    uplink netns (the daemon's own,           egress netns (the daemon's; no link to
    or one the config names)                  anything but the workers' veths)
    ┌──────────────────────────┐              ┌────────────────────────────────────┐
    │ proxy's outbound sockets │◀── daemon ──▶│ resolver 100.127.255.254:53 (lo)   │
    │ resolver's upstream,     │   (process)  │ proxy :PROXY_PORT  (nft redirect)  │
    │ UDP relay's sockets      │              │ UDP relay :UDP_PORT (nft tproxy)   │
    │                          │              │ refusals :REFUSED_PORT (records)   │
    └──────────────────────────┘              │ nft: prerouting filter + redirect  │
                                              │ ae-N ──veth── eth0 (worker slot N) │
                                              └────────────────────────────────────┘

A worker with egress is cloned into a *slot*: a network namespace made in advance with one veth
to the egress namespace (`eth0`, 100.127.x.y/30, default route to its peer). The egress
namespace has no route anywhere: it forwards nothing (ip_forward 0, forward policy drop), so
the only ways out of it are the daemon's own sockets: the resolver (UDP 53 on RESOLVER), the
proxy and the UDP relay, which connect out from the uplink namespace. nft's prerouting filter
lets through only: DNS to the resolver, allowed UDP (to the relay, below), replies of
established flows, and new TCP (a SYN). The nat chain then
redirects each new TCP connection: to the proxy (PROXY_PORT) if its (worker address,
destination, port) is in the set `allowed` (literal addresses and networks with no timeout,
resolved addresses with the DNS TTL as timeout), else to the refusal listener (REFUSED_PORT),
which records it and resets it. So every TCP attempt is on record, and the set stays the
kernel's say: a destination it does not hold can only reach a socket that never connects out
(the proxy re-checks the destination too). UDP whose (worker address, destination, port) is
in the set `allowed_udp` (the same way: `/udp` entries), or that belongs to a flow the relay
already answered, is sent by nft's `tproxy` to the UDP relay (UDP_PORT on 127.0.0.1) with
its destination unchanged: marked UDP_MARK, it is delivered locally by the namespace's one
policy route (`_udp_routing`), and the relay re-checks it and carries it from the uplink
namespace. Everything else (DNS to other servers, UDP the set lacks, ICMP; IPv6 too, though
it is disabled by sysctl in both namespaces, so a worker has no IPv6 address to send from and
that rule is a backstop) is counted per worker address and protocol in the set `dropped`,
copied to NFLOG group LOG_GROUP (at most LOG_RATE a second per worker; agentd/sandbox/nflog.py)
and dropped: the daemon records each logged packet and the counts when the task ends. The drop
does not depend on the log being read.

Fail closed: the egress namespace is held only by the daemon (an fd, its threads, its
sockets): when the daemon dies, even by SIGKILL, the kernel destroys the namespace and with it
every veth pair, so a worker that outlived it (it does not: PDEATHSIG) would have loopback
only. And even while it lives, no packet is forwarded by the kernel; a path out exists only as
a daemon socket that re-checks the destination. Were the proxy's or the refusal listener's
socket gone, a redirected connection would meet no listener and be reset.

Slots are used once, made ahead by `SlotPool` off the call path, so the call only pays the
setns in the worker. Making one (namespace, veth pair, addresses, route) is the slot maker's
work (agentd/sandbox/slotmaker.py): a child process with pyroute2, ~4 ms a slot of which ~3.5
are Python. In a daemon thread that Python held the GIL while the spawn that had just taken a
slot was on its way, which was most of what egress added to a spawn. Used once rather than
reused: nothing of one task (TIME_WAIT sockets, neighbour entries, set elements) can be seen
by the next, and a slot's address is not reused until the whole /16 has turned over.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from agentd.sandbox import netns
from agentd.sandbox.nft import Nft
from agentd.sandbox.slotmaker import SlotMakerClient, SlotMakerGone

SUBNET: Final = ipaddress.IPv4Network("100.127.0.0/16")
RESOLVER: Final = "100.127.255.254"
PROXY_PORT: Final = 15001
REFUSED_PORT: Final = 15002
"""The refusal listener: new TCP to a destination the set does not hold. It records and resets;
it has no code that connects anywhere."""
UDP_PORT: Final = 15003
"""The UDP relay (agentd/egress/udp.py) on 127.0.0.1: nft's tproxy hands it each allowed
datagram with its destination unchanged (IP_RECVORIGDSTADDR tells it)."""
UDP_MARK: Final = 0x1D
"""The mark a tproxied datagram gets: the egress namespace's policy routing (`ip rule fwmark
UDP_MARK lookup UDP_TABLE`, a table holding `local 0.0.0.0/0 dev lo`) delivers it locally,
whatever its destination; nothing else is routed anywhere."""
UDP_TABLE: Final = 100
CONNECT_PORT: Final = 3128
"""The HTTPS proxy (CONNECT host:port; a worker's https_proxy) on the resolver's address: the
one TCP destination inside the egress namespace a worker may reach directly."""
LOG_GROUP: Final = 7
"""The NFLOG group refused packets are copied to (agentd/sandbox/nflog.py)."""
LOG_RATE, LOG_BURST = 50, 100  # logged packets per second per worker; all are counted
_LIMIT: Final = f"limit rate {LOG_RATE}/second burst {LOG_BURST} packets"
_TPROXY: Final = f"tproxy ip to 127.0.0.1:{UDP_PORT} meta mark set {UDP_MARK} accept"
TABLE: Final = "agentd_egress"
# Slots' /30s: 100.127.0.0 .. 100.127.255.248 (the last /30 holds the resolver).
_SLOTS: Final = (SUBNET.num_addresses // 4) - 1
MAX_TTL: Final = 3600  # a DNS answer's addresses stay allowed at most this long
_DROPPED: Final = re.compile(r"([0-9.]+) \. (\w+) counter packets (\d+)")

RULESET: Final = f"""
table inet {TABLE} {{
    set allowed {{
        type ipv4_addr . ipv4_addr . inet_service
        flags interval, timeout
    }}
    set allowed_udp {{
        type ipv4_addr . ipv4_addr . inet_service
        flags interval, timeout
    }}
    set dropped {{
        type ipv4_addr . inet_proto
        size 65536
        flags dynamic
        counter
    }}
    chain refuse {{
        counter
        meta nfproto ipv4 update @dropped {{ ip saddr . meta l4proto }}
        meter logged {{ ip saddr {_LIMIT} }} log group {LOG_GROUP}
        meta nfproto ipv6 {_LIMIT} log group {LOG_GROUP}
        drop
    }}
    chain from_workers {{
        type filter hook prerouting priority -110; policy accept;
        iifname != "ae-*" accept
        meta nfproto ipv6 jump refuse
        ip daddr {RESOLVER} udp dport 53 accept
        meta l4proto udp ip saddr . ip daddr . udp dport @allowed_udp {_TPROXY}
        meta l4proto udp ct state established {_TPROXY}
        meta l4proto udp jump refuse
        ct state established,related accept
        tcp flags & (syn | ack) == syn accept
        meta l4proto tcp counter drop
        jump refuse
    }}
    chain to_proxy {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "ae-*" ip daddr {RESOLVER} tcp dport {CONNECT_PORT} accept
        iifname "ae-*" ip saddr . ip daddr . tcp dport @allowed redirect to :{PROXY_PORT}
        iifname "ae-*" meta l4proto tcp redirect to :{REFUSED_PORT}
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        ip daddr {RESOLVER} udp dport 53 accept
        tcp dport {{ {PROXY_PORT}, {REFUSED_PORT} }} ct status dnat accept
        meta l4proto udp meta mark {UDP_MARK} accept
        ip daddr {RESOLVER} tcp dport {CONNECT_PORT} accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
    }}
}}
"""


def _lo_up(address: str) -> None:
    """Loopback up with `address` in the calling thread's namespace (once, at start)."""
    from pyroute2 import IPRoute  # imported where used: the daemon loads it only for egress

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=index, state="up")
        ipr.addr("add", index=index, address=address, prefixlen=32)


def _udp_routing() -> None:
    """The policy routing of tproxied datagrams in the calling thread's namespace (the egress
    one has no name for `ip -n`): `ip rule add fwmark UDP_MARK lookup UDP_TABLE` and `ip route
    add local 0.0.0.0/0 dev lo table UDP_TABLE`, through pyroute2 as `_lo_up`."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.rule("add", fwmark=UDP_MARK, table=UDP_TABLE, priority=100)
        ipr.route("add", dst="0.0.0.0/0", type="local", oif=ipr.link_lookup(ifname="lo")[0],
                  table=UDP_TABLE, scope="host")


@dataclass
class Slot:
    """A worker's network namespace with its veth to the egress namespace, used once."""

    index: int
    fd: int
    """The slot namespace (the launcher's child setns()es into it)."""
    address: str
    """The worker's address (eth0); the proxy and resolver map it back to the task."""
    gateway: str
    link: str
    """The veth's name in the egress namespace."""
    elements: list[str] = field(default_factory=list)
    """Set elements added for it, deleted when it is released."""
    udp_elements: list[str] = field(default_factory=list)
    """The same, of the set `allowed_udp`."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_SETS: Final = {"tcp": "allowed", "udp": "allowed_udp"}


def _elements(slot: Slot, protocol: str) -> list[str]:
    return slot.udp_elements if protocol == "udp" else slot.elements


def slot_addresses(index: int) -> tuple[str, str]:
    """(worker, gateway) of slot `index`: the /30 at index*4."""
    base = int(SUBNET.network_address) + 4 * index
    return str(ipaddress.IPv4Address(base + 2)), str(ipaddress.IPv4Address(base + 1))


class EgressNetwork:
    """The egress namespace (made at `start`), its nft table, and the slots' links."""

    def __init__(self) -> None:
        self.ns: netns.Namespace | None = None
        self._nft: Nft | None = None
        self._maker: SlotMakerClient | None = None
        self._next = 0
        self._lock = threading.Lock()

    def start(self) -> netns.Namespace:
        """Makes the egress namespace: loopback with the resolver's address, no forwarding,
        no IPv6, the ruleset. Returns its thread (sockets for it are made there)."""
        self.ns = netns.Namespace(netns.create(), "egress")

        def setup() -> None:
            _lo_up(RESOLVER)
            _udp_routing()
            netns.sysctl("ipv4/ip_forward", "0")
            netns.sysctl("ipv6/conf/all/disable_ipv6", "1")
            netns.sysctl("ipv6/conf/default/disable_ipv6", "1")
            self._nft = Nft()
            self._nft.run(RULESET)

        self.ns.call(setup)
        return self.ns

    def start_maker(self) -> None:
        """Starts the slot maker (agentd/sandbox/slotmaker.py). Call from the thread that
        lives as long as the daemon (the event loop's): the maker dies when it ends."""
        assert self.ns is not None, "start() first"
        assert self.ns.fd is not None
        self._maker = SlotMakerClient(self.ns.fd)

    def make_slot(self) -> Slot:
        """A new slot: namespace, veth pair, addresses, links up, default route, made by the
        slot maker process (blocking, ~4 ms there, little here)."""
        assert self._maker is not None, "start_maker() first"
        with self._lock:
            index = self._next
            self._next = (self._next + 1) % _SLOTS
        worker, gateway = slot_addresses(index)
        link = f"ae-{index}"
        try:
            fd = self._maker.make(index, link, worker, gateway)
        except SlotMakerGone:
            # Killed or crashed: a new one, started by this thread (it dies when this thread
            # ends, and is started again by the next take), then the slot once more.
            with self._lock:
                self._maker.close()
                self.start_maker()
            fd = self._maker.make(index, link, worker, gateway)
        return Slot(index, fd, worker, gateway, link)

    def allow(self, slot: Slot, target: str, port: int, ttl: int | None,
              protocol: str = "tcp") -> None:
        """Lets `slot`'s worker open TCP (or send UDP, `protocol` "udp") to `target` (an
        address or network) on `port`, for `ttl` seconds (None: until the slot is
        released)."""
        self.allow_all(slot, [(target, port, ttl)], protocol)

    def allow_all(self, slot: Slot, grants: Iterable[tuple[str, int, int | None]],
                  protocol: str = "tcp") -> None:
        """`allow` for each (target, port, ttl): one nft transaction (all or none), and
        none at all when there is nothing to add."""
        added: dict[str, str] = {}  # element -> its timeout
        for target, port, ttl in grants:
            added[f"{slot.address} . {target} . {port}"] = (
                "" if ttl is None else f" timeout {max(1, min(ttl, MAX_TTL))}s")
        if not added:
            return
        name, elements = _SETS[protocol], _elements(slot, protocol)
        listed = ", ".join(element + timeout for element, timeout in added.items())
        self._run(f"add element inet {TABLE} {name} {{ {listed} }}")
        elements.extend(e for e in added if e not in elements)

    def release(self, slot: Slot) -> None:
        """Deletes the slot's set elements (one nft transaction a set) and closes its
        namespace (the kernel removes its link with it)."""
        for protocol, name in _SETS.items():
            elements = _elements(slot, protocol)
            if not elements:
                continue
            try:
                self._run(f"delete element inet {TABLE} {name} {{ {', '.join(elements)} }}")
            except OSError:  # an element whose timeout passed is gone, and the batch failed
                for element in elements:
                    with contextlib.suppress(OSError):
                        self._run(f"delete element inet {TABLE} {name} {{ {element} }}")
            elements.clear()
        slot.close()

    def take_dropped(self, slot: Slot) -> dict[str, int]:
        """Packets the kernel refused from `slot`'s worker, by IPv4 protocol ("udp": 3), read
        from the set `dropped` and deleted from it (a later slot may have the address)."""
        listed = self._run(f"list set inet {TABLE} dropped")
        counts: dict[str, int] = {}
        for address, protocol, packets in _DROPPED.findall(listed):
            if address == slot.address:
                counts[protocol] = counts.get(protocol, 0) + int(packets)
        if counts:
            elements = ", ".join(f"{slot.address} . {p}" for p in counts)
            with contextlib.suppress(OSError):
                self._run(f"delete element inet {TABLE} dropped {{ {elements} }}")
        return counts

    def list_allowed(self, protocol: str = "tcp") -> str:
        """The set (`allowed`, or `allowed_udp`) as nft prints it (tests, debugging)."""
        return self._run(f"list set inet {TABLE} {_SETS[protocol]}")

    def _run(self, command: str) -> str:
        assert self.ns is not None
        assert self._nft is not None
        nft = self._nft
        return self.ns.call(lambda: nft.run(command))

    def close(self) -> None:
        """Drops the daemon's hold on the egress namespace (its sockets must be closed too)."""
        if self._maker is not None:
            self._maker.close()
            self._maker = None
        if self.ns is not None:
            nft, self._nft = self._nft, None
            if nft is not None:
                self.ns.call(nft.close)
            self.ns.close()
            self.ns = None


class SlotPool:
    """Slots made ahead, off the call path, by a thread of their own."""

    def __init__(self, network: EgressNetwork, depth: int = 2) -> None:
        self.network = network
        self.depth = depth
        self._ready: deque[Slot] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._fill, name="agentd-egress-slots",
                                        daemon=True)
        self._thread.start()

    def take(self) -> Slot:
        """A ready slot, or one made now if none is (blocking)."""
        slot = self.take_ready()
        return slot if slot is not None else self.network.make_slot()

    def take_ready(self) -> Slot | None:
        """A ready slot, or None (never blocks: the event loop calls it, and hands `take` to
        a thread only when it returns None)."""
        with self._cond:
            slot = self._ready.popleft() if self._ready else None
            self._cond.notify_all()  # the filler makes the next one
        return slot

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._ready) >= self.depth:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                slot = self.network.make_slot()
            except OSError:
                with self._cond:
                    self._cond.wait(1.0)  # retried; take() makes its own meanwhile
                continue
            with self._cond:
                if self._closed:
                    slot.close()
                    return
                self._ready.append(slot)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        while self._ready:
            self._ready.popleft().close()

"""One task's egress: its rules, what its resolver answers allowed, its budget, its records.

Shared by the resolver, the proxy and the UDP relay, so all decide from the same state: an
address and port are reachable by a task over a protocol when an ip or cidr entry of that
protocol names them, or when the daemon's resolver answered the address for a name an entry
of that protocol and port allows, until that answer's TTL ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentd.egress.secrets import LoadedSecret
from agentd.egress.tls import RunAuthority
from agentd.policy.egress import EgressRule, address_rule, name_matches, special_address
from agentd.sandbox.egress import Slot

# Records one task may write; the rest are counted (in `dropped`), so a worker that loops
# on refused connections cannot flood the audit log.
MAX_RECORDS = 256
# Of those, refusals (TCP at the refusal listener, packets from the kernel's log) at most this
# many, so a worker that floods refused packets cannot crowd its connections off the record.
# Every refusal is still counted: `refused` (TCP) and the kernel's counters (net.dropped).
MAX_REFUSALS = 128

MAX_OPEN = 64
"""Connections (TCP, both doors of the proxy) and UDP flows one task may have open at once:
each costs the daemon a task and sockets."""

Recorder = Callable[[str, dict[str, Any]], None]


@dataclass
class TaskEgress:
    """The egress state of one running task (its slot is its identity on the wire)."""

    run_id: str
    task_id: str
    rules: tuple[EgressRule, ...]
    bytes_limit: int
    rate: float
    slot: Slot
    recorder: Recorder
    bytes_used: int = 0
    connections: int = 0
    refused: int = 0
    dropped: int = 0
    written: int = 0
    resolved: dict[tuple[str, int, str], tuple[str, str, float]] = field(default_factory=dict)
    """(address, port, protocol) -> (the name it was answered for, its rule, monotonic
    expiry)."""
    answered: dict[str, str] = field(default_factory=dict)
    """address -> the last name the resolver gave it to this task for (kept after its TTL:
    a refusal names what the worker probably meant)."""
    refusals: int = 0
    """Refusal records written (at most MAX_REFUSALS); `unrecorded` counts the rest."""
    unrecorded: int = 0
    log_lost_at_open: int = 0
    """The service's count of log overflows when the task opened (one since: count anyway)."""
    logged: int = 0
    """Packets of this task the kernel's log delivered."""
    dropped_packets: dict[str, int] = field(default_factory=dict)
    """Packets the kernel refused, by protocol (read from nft when the task ends)."""
    open: set[asyncio.Task[None]] = field(default_factory=set)
    secrets: tuple[LoadedSecret, ...] = ()
    """The policy's secrets, read when the task opened (agentd/egress/secrets.py)."""
    authority: RunAuthority | None = None
    """The run's CA, when it has secrets: TLS to a secret's name ends at the proxy."""
    bundle: str = ""
    """The trust bundle (host's and the run's CA) the worker mounts; "" without secrets."""
    in_worker: int = 0
    """Network calls refused inside the worker (agentd/sandbox/netwatch.py) the launcher
    passed on; the launcher counts them all (`count_in_worker`)."""
    _tokens: float = -1.0
    _refilled: float = 0.0

    def record(self, event: str, details: dict[str, Any]) -> None:
        """Puts one event on record (the first MAX_RECORDS; the rest are counted)."""
        if self.written >= MAX_RECORDS:
            self.dropped += 1
            return
        self.written += 1
        self.recorder(event, details)

    def refusal(self, details: dict[str, Any]) -> None:
        """Puts one refused attempt on record as `net.refused` (within MAX_REFUSALS), with the
        name the resolver gave this task for its destination, if it did."""
        if self.refusals >= MAX_REFUSALS:
            self.unrecorded += 1
            return
        self.refusals += 1
        name = self.answered.get(details.get("destination", ""))
        self.record("net.refused", {**details, "name": name or ""})

    def refused_in_worker(self, details: dict[str, Any]) -> None:
        """A network call the worker's own kernel would refuse (no packet exists): the
        launcher refused it on the spot and passed it on; on record as `net.refused`."""
        self.in_worker += 1
        self.refused += 1
        self.refusal(details)

    def count_in_worker(self, total: int) -> None:
        """At the worker's end: the launcher passes on only its first refusals in the worker;
        the rest are counted, as unrecorded refusals."""
        missing = max(0, total - self.in_worker)
        self.in_worker += missing
        self.refused += missing
        self.unrecorded += missing

    def why_refused(self, address: str, port: int, protocol: str = "tcp") -> str:
        """Why `protocol` to `address`:`port` is not allowed, in the words of the policy."""
        if any(a == address and p == port and pr == protocol and expiry <= time.monotonic()
               for (a, p, pr), (_n, _r, expiry) in self.resolved.items()):
            return "its DNS answer expired (TTL); resolve the name again"
        if any(a == address and pr == protocol for a, _p, pr in self.resolved) or any(
                address_rule(self.rules, address, r.port, protocol) is not None
                for r in self.rules if r.port is not None):
            return f"port {port} is not allowed for this destination"
        if protocol == "udp":
            return "no egress entry allows UDP to this destination"
        return "no egress entry allows this destination"

    def destination(self, address: str, port: int,
                    protocol: str = "tcp") -> tuple[str, str] | None:
        """(name or "", the rule) if the task may open TCP (or send UDP) to `address`:`port`
        now."""
        rule = address_rule(self.rules, address, port, protocol)
        if rule is not None:
            return "", rule.text
        answer = self.resolved.get((address, port, protocol))
        if answer is not None and answer[2] > time.monotonic():
            return answer[0], answer[1]
        return None

    def rebinding(self, address: str, port: int, protocol: str = "tcp") -> bool:
        """Whether a resolved `address` is DNS rebinding for this task: loopback, private,
        link-local or shared space that no address entry names (the resolver drops it from
        an answer; the HTTPS proxy does not connect to it)."""
        return special_address(address) and address_rule(
            self.rules, address, port, protocol) is None

    def name_allowed(self, name: str, port: int, protocol: str = "tcp") -> str:
        """The rule letting `protocol` to `name`:`port` (a domain or wildcard entry), or
        ""."""
        return next((r.text for r in self.rules if r.port == port and r.protocol == protocol
                     and name_matches(r, name)), "")

    def over_limits(self) -> str:
        """Why a new connection (or UDP flow) is over the task's limits, or "" (a token is
        taken when it is not)."""
        return ("limits.bytes reached" if self.bytes_used >= self.bytes_limit else
                "limits.connections_per_second reached" if not self.take_token() else "")

    def take_token(self) -> bool:
        """The connection-rate budget: a bucket of one second's worth, refilled continuously."""
        now = time.monotonic()
        if self._tokens < 0:
            self._tokens, self._refilled = self.rate, now
        self._tokens = min(self.rate, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def summary(self) -> dict[str, int]:
        """For the task's exec.exited record."""
        return {"connections": self.connections, "refused": self.refused,
                "bytes": self.bytes_used, "records_dropped": self.dropped,
                "refusals_unrecorded": self.unrecorded,
                "packets_dropped": sum(self.dropped_packets.values())}

"""One task's egress: its rules, what its resolver answers allowed, its budget, its records.

Shared by the resolver and the proxy, so both decide from the same state: an address is
reachable by a task when an ip or cidr entry names it, or when the daemon's resolver answered
it for a name the task may resolve, until that answer's TTL ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentd.policy.egress import EgressRule, address_rule
from agentd.sandbox.egress import Slot

# Records one task may write; the rest are counted (in `dropped`), so a worker that loops
# on refused connections cannot flood the audit log.
MAX_RECORDS = 256

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
    resolved: dict[tuple[str, int], tuple[str, str, float]] = field(default_factory=dict)
    """(address, port) -> (the name it was answered for, its rule, monotonic expiry)."""
    open: set[asyncio.Task[None]] = field(default_factory=set)
    _tokens: float = -1.0
    _refilled: float = 0.0

    def record(self, event: str, details: dict[str, Any]) -> None:
        """Puts one event on record (the first MAX_RECORDS; the rest are counted)."""
        if self.written >= MAX_RECORDS:
            self.dropped += 1
            return
        self.written += 1
        self.recorder(event, details)

    def destination(self, address: str, port: int) -> tuple[str, str] | None:
        """(name or "", the rule) if the task may open TCP to `address`:`port` now."""
        rule = address_rule(self.rules, address, port)
        if rule is not None:
            return "", rule.text
        answer = self.resolved.get((address, port))
        if answer is not None and answer[2] > time.monotonic():
            return answer[0], answer[1]
        return None

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
                "bytes": self.bytes_used, "records_dropped": self.dropped}

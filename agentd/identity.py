"""Who is calling: established by the daemon, never taken from a field the caller fills in.

grpcio does not expose SO_PEERCRED, so agentd listens on one unix socket per role and lets
the filesystem decide who may connect to which (client 0660 to the agentd group, approver
0660 to the approvers' group, admin 0600 root). The role is therefore vouched for by the
kernel's permission check at connect(); a name the caller sends (a label) is recorded beside
it and marked as caller-supplied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("client", "approver", "admin")


@dataclass(frozen=True)
class Caller:
    role: str
    socket: str
    peer: str = ""
    claimed_name: str = ""

    def actor(self) -> dict[str, Any]:
        """The audit record's actor: what the daemon knows, and what the caller only says."""
        actor: dict[str, Any] = {"role": self.role, "socket": self.socket}
        if self.peer:
            actor["peer"] = self.peer
        if self.claimed_name:
            actor["claimed_name (caller-supplied)"] = self.claimed_name
        return actor

    def __str__(self) -> str:
        return f"{self.role}@{self.socket}"


SYSTEM = Caller(role="system", socket="")

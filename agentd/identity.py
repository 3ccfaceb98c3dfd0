"""Who is calling: established by the daemon, never taken from a field the caller fills in.

Two things the kernel vouches for make a caller. Its role: agentd listens on one unix socket
per role and the filesystem decides who may connect to which (client 0660 to the agentd
group, approver 0660 to the approvers' group, admin 0600 root). Its uid, gid and pid:
SO_PEERCRED, read by agentd itself where it accepts the connection (grpcio does not expose
it, so every role socket is accepted by the daemon's forwarder, agentd.activation, in every
mode). "Another person" (an approval) means another uid. A name the caller sends is recorded
beside these and marked as caller-supplied.
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
    uid: int | None = None
    """SO_PEERCRED of the connection; None only for the daemon itself (SYSTEM)."""
    gid: int | None = None
    pid: int | None = None

    def actor(self) -> dict[str, Any]:
        """The audit record's actor: what the daemon knows, and what the caller only says."""
        actor: dict[str, Any] = {"role": self.role, "socket": self.socket}
        if self.uid is not None:
            actor.update(uid=self.uid, gid=self.gid, pid=self.pid)
        elif self.peer:
            actor["peer"] = self.peer
        if self.claimed_name:
            actor["claimed_name (caller-supplied)"] = self.claimed_name
        return actor

    def __str__(self) -> str:
        return f"{self.role}@{self.socket}"


SYSTEM = Caller(role="system", socket="")

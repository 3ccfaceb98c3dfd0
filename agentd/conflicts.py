"""The one Conflict type: two tasks of one step changed the same channel or path.

Channel conflicts are found by the barrier (agentd/scheduler/barrier.py), path conflicts by
the layer store, which alone knows what kind of change each entry is
(agentd/store/layers.py `conflicts`). Either fails the whole step and applies nothing; the
reply and the audit record list them in this one form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Conflict:
    """`tasks` is in task order; `key` is the channel or the path; `reason` says how they
    collide (for a path: changed by both, or written under what the other replaced)."""

    what: Literal["channel", "path"]
    key: str
    tasks: tuple[str, str]
    reason: str = ""

    def __str__(self) -> str:
        first, second = self.tasks
        if self.what == "channel":
            return f"tasks {first} and {second} both wrote channel {self.key!r} (last_value)"
        return f"{self.key}: {self.reason} (tasks {first!r} and {second!r})"

"""Accepted policy versions, kept by content so that an agent can keep running the version a
reviewer accepted while its file says something newer.

A promoted agent's policy is pinned to the version its promotion (or a later acceptance on the
approver socket) recorded, by the sha256 of the file's bytes. The daemon keeps those bytes
here, `<sha256>.yaml`, written and fsynced before the audit record that names them, so a
restart loads exactly what was accepted, not whatever the file holds by then. A copy whose
bytes no longer hash to its name is refused, never loaded.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from agentd import durable
from agentd.errors import FailedPrecondition

_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def source_hash(raw: bytes) -> str:
    """The name of a policy version: the sha256 of the file's bytes, comments included."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class PolicyCopies:
    """A directory of policy file versions named by their hash."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, digest: str) -> Path:
        if not _HASH.fullmatch(digest):
            raise FailedPrecondition(f"{digest!r} is not a policy version (sha256:<64 hex>)")
        return self.directory / f"{digest.removeprefix('sha256:')}.yaml"

    def keep(self, raw: bytes) -> str:
        """Stores `raw` durably (once) and returns its hash."""
        digest = source_hash(raw)
        target = self.path(digest)
        if target.exists():
            return digest
        durable.make_dir(self.directory, 0o700)
        durable.write_atomic(target, raw, 0o600)
        return digest

    def read(self, digest: str) -> bytes:
        """The bytes of an accepted version; FailedPrecondition if missing or altered."""
        target = self.path(digest)
        try:
            raw = target.read_bytes()
        except OSError as exc:
            raise FailedPrecondition(
                f"the accepted policy version {digest} is not in {self.directory} "
                f"({exc.strerror}); restore {target.name} from a backup of the state "
                "directory: the audit log says this version is the one in force") from None
        if source_hash(raw) != digest:
            raise FailedPrecondition(
                f"{target} no longer hashes to {digest}: the accepted copy was altered; "
                "restore it from a backup of the state directory")
        return raw

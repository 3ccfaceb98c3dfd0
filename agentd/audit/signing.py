"""The log's Ed25519 key and its signed tree heads (`tree-heads.jsonl`).

Files in the audit directory (0700):

    audit.key          private key, PKCS#8 PEM, mode 0600, created on first start
    audit.pub          public key, SubjectPublicKeyInfo PEM: give it to verifiers
    tree-heads.jsonl   one signed head per line: {"root_hash","signature","timestamp","tree_size"}

A head signs `signed_data`: the canonical JSON of {"log": "agentd-audit-v1", "root_hash",
"timestamp", "tree_size"}. The "log" field separates these signatures from anything else the
key could ever be asked to sign. Hashes and signatures are lower-case hex.

A verifier should hold its own copy of audit.pub (or its `key_id`): a log re-signed with
another key, audit.pub included, is only caught against a key obtained out of band.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agentd.audit import record
from agentd.audit.segments import AppendOnlyFile, fsync_dir
from agentd.errors import FailedPrecondition

KEY_FILE = "audit.key"
PUB_FILE = "audit.pub"
HEADS_FILE = "tree-heads.jsonl"
LOG_ID = "agentd-audit-v1"


def signed_data(tree_size: int, root_hash: bytes, timestamp: str) -> bytes:
    """The exact bytes a tree head's signature covers."""
    return record.canonical({"log": LOG_ID, "root_hash": root_hash.hex(),
                             "timestamp": timestamp, "tree_size": tree_size})


@dataclass(frozen=True)
class TreeHead:
    """A signed statement: 'the log had `tree_size` records with root `root_hash` at time'."""

    tree_size: int
    root_hash: bytes
    timestamp: str
    signature: bytes

    def signed_data(self) -> bytes:
        return signed_data(self.tree_size, self.root_hash, self.timestamp)

    def to_json(self) -> dict[str, Any]:
        return {"root_hash": self.root_hash.hex(), "signature": self.signature.hex(),
                "timestamp": self.timestamp, "tree_size": self.tree_size}

    def line(self) -> bytes:
        return record.canonical(self.to_json())

    @classmethod
    def parse(cls, line: bytes) -> TreeHead:
        """Reads one line of tree-heads.jsonl; raises ValueError saying what is wrong."""
        try:
            data = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a tree head: {exc}") from None
        fields = sorted(data) if isinstance(data, dict) else type(data).__name__
        if fields != ["root_hash", "signature", "timestamp", "tree_size"]:
            raise ValueError(f"not a tree head: its fields are {fields}")
        try:
            head = cls(tree_size=data["tree_size"], root_hash=bytes.fromhex(data["root_hash"]),
                       timestamp=data["timestamp"], signature=bytes.fromhex(data["signature"]))
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a tree head: {exc}") from None
        if type(head.tree_size) is not int or head.tree_size < 0 or len(head.root_hash) != 32:
            raise ValueError("not a tree head: bad tree_size or root_hash")
        return head


def key_id(public: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: short enough to compare by eye or pin in config."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Reads a PEM public key; raises ValueError if it is not an Ed25519 key."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")  # noqa: TRY004 - bad file
    return key


def verify_head(public: Ed25519PublicKey, head: TreeHead) -> bool:
    try:
        public.verify(head.signature, head.signed_data())
    except InvalidSignature:
        return False
    return True


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Writes a file atomically (temp file, fsync, rename, fsync dir) with `mode`."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Signer:
    """Holds the private key; signs tree heads."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def load_or_create(cls, directory: Path) -> Signer:
        """Loads audit.key, or creates it if the log has never been signed; exports audit.pub.

        Refuses a key others can read (like ssh does), and refuses to make a new key for a
        log that already has signed heads: that would silently orphan them.
        """
        path = directory / KEY_FILE
        if path.exists():
            st = path.stat()
            if st.st_mode & 0o077 or st.st_uid != os.geteuid():
                raise FailedPrecondition(
                    f"{path} is mode {st.st_mode & 0o777:04o} owned by uid {st.st_uid}; it must be "
                    f"0600 and owned by uid {os.geteuid()}: `chmod 600 {path}` (and consider it "
                    "leaked if others could read it)")
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise FailedPrecondition(f"{path} is not an Ed25519 private key")
        else:
            heads = directory / HEADS_FILE
            if heads.exists() and heads.stat().st_size > 0:
                raise FailedPrecondition(
                    f"{path} is missing but {heads} has signed heads: restore the key, or move "
                    "the old log aside to start a new one")
            private = Ed25519PrivateKey.generate()
            _write_new(path, private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), 0o600)
        signer = cls(private)
        pub = directory / PUB_FILE
        if not pub.exists() or pub.read_bytes() != public_pem(signer.public):
            _write_new(pub, public_pem(signer.public), 0o644)
        return signer

    def sign(self, tree_size: int, root_hash: bytes, timestamp: str | None = None) -> TreeHead:
        timestamp = timestamp or record.now()
        signature = self._private.sign(signed_data(tree_size, root_hash, timestamp))
        return TreeHead(tree_size, root_hash, timestamp, signature)


class HeadFile:
    """tree-heads.jsonl, appended one fsynced head at a time."""

    def __init__(self, path: Path, last: TreeHead | None) -> None:
        self.path = path
        self.last = last
        created = not path.exists()
        self._file = AppendOnlyFile(path)
        if created:  # the file's name must be as durable as the heads written into it
            fsync_dir(path.parent)

    @classmethod
    def open(cls, directory: Path, public: Ed25519PublicKey
             ) -> tuple[HeadFile, dict[str, Any] | None]:
        """Opens the file, cutting a torn last line (a head whose write never returned).

        Returns the file and, if something was cut, a description for the audit.recovered
        event. The last head must verify with our key: anything else is not ours to extend.
        """
        path = directory / HEADS_FILE
        data = path.read_bytes() if path.exists() else b""
        cut: dict[str, Any] | None = None
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            saved = path.with_name(f"{path.name}.torn-{keep}")
            _write_new(saved, data[keep:], 0o600)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, keep)
                os.fsync(fd)
            finally:
                os.close(fd)
            cut = {"file": path.name, "offset": keep, "bytes": len(data) - keep,
                   "sha256": hashlib.sha256(data[keep:]).hexdigest(), "saved_as": saved.name,
                   "reason": "torn tree head after a crash: a head never returned was cut"}
        last = None
        lines = data[:keep].splitlines()
        if lines:
            try:
                last = TreeHead.parse(lines[-1])
            except ValueError as exc:
                raise FailedPrecondition(f"{path}: last line: {exc}; run `agentctl audit "
                                         "verify`") from None
            if not verify_head(public, last):
                raise FailedPrecondition(
                    f"{path}: the last tree head does not verify with audit.pub (key "
                    f"{key_id(public)[:16]}); the heads or the key were replaced. Run "
                    "`agentctl audit verify` with the published key")
        return cls(path, last), cut

    def append(self, head: TreeHead) -> None:
        """Appends and fsyncs one head; rolls back on failure (see AppendOnlyFile)."""
        self._file.append(head.line() + b"\n")
        self.last = head

    def close(self) -> None:
        self._file.close()

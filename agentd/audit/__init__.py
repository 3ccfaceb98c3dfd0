"""The audit log: append-only canonical-JSON records in segments, an RFC 6962 Merkle tree over
them, Ed25519-signed tree heads, inclusion and consistency proofs, and a verifier that needs
nothing but the files. See DESIGN.md, "Audit log".

    record.py    record schema, canonical bytes, secret redaction
    merkle.py    RFC 9162 hashing, frontier, proofs and their verification (pure)
    segments.py  segment files, durable batches with rollback, torn-tail recovery
    tree.py      the tree's hashes at chunk granularity, persisted in tree.idx (a cache)
    signing.py   the key, audit.pub, signed tree heads (tree-heads.jsonl)
    log.py       AuditLog: group commit, fail closed, reads, proofs, follow
    verify.py    `agentctl audit verify`
"""

from agentd.audit.log import SYSTEM_ACTOR, AuditLog, durable
from agentd.audit.merkle import (
    EMPTY_ROOT,
    leaf_hash,
    node_hash,
    root_from_inclusion,
    verify_consistency,
    verify_inclusion,
)
from agentd.audit.record import REDACTED, RedactedEnv, canonical, redact_env
from agentd.audit.signing import TreeHead, load_public_key, verify_head
from agentd.audit.verify import Problem, Report, verify

__all__ = [
    "EMPTY_ROOT",
    "REDACTED",
    "SYSTEM_ACTOR",
    "AuditLog",
    "Problem",
    "RedactedEnv",
    "Report",
    "TreeHead",
    "canonical",
    "durable",
    "leaf_hash",
    "load_public_key",
    "node_hash",
    "redact_env",
    "root_from_inclusion",
    "verify",
    "verify_consistency",
    "verify_head",
    "verify_inclusion",
]

"""RFC 6962 / RFC 9162 §2.1 Merkle tree hashing, proofs and their verification. Pure functions.

    MTH({})      = SHA-256()
    MTH({d0})    = SHA-256(0x00 || d0)                         leaf hash
    MTH(D[n])    = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))  k = largest power of 2 < n

The tree is never stored whole. Two views of it are enough:

- `Frontier` (a "compact range"): the roots of the perfect subtrees that make up a tree of
  size n, one per set bit of n. Appending a leaf merges equal-sized subtrees, like adding 1 to
  a binary counter: O(1) amortised, O(log n) worst case, and the root is O(log n). It is all a
  writer or a streaming verifier needs.
- A `Subtree` function, MTH(D[a:b]) for the aligned ranges the RFC's recursion visits. Proof
  generation is written against it, so the same code runs over a brute-force list (tests) and
  over `agentd.audit.tree.TreeStore` (the log), which answers from cached subtree hashes.

Verification follows RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency) step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256

Subtree = Callable[[int, int], bytes]
"""MTH(D[start:end]) for 0 <= start < end <= n."""


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the hash of one record line (without its newline)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an interior node."""
    return _sha256(b"\x01" + left + right).digest()


def split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): where the RFC splits a tree."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH by the RFC's recursive definition; O(n). The reference the fast paths are tested
    against, and what builds a small perfect subtree from its leaves."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hashes[0]
    k = split(n)
    return node_hash(root_of(leaf_hashes[:k]), root_of(leaf_hashes[k:]))


class Frontier:
    """The compact range [0, size): perfect-subtree roots, largest (leftmost) first."""

    __slots__ = ("nodes", "size")

    def __init__(self, size: int = 0, nodes: Iterable[bytes] = ()) -> None:
        self.size = size
        self.nodes = list(nodes)
        if len(self.nodes) != size.bit_count():
            raise ValueError(f"a frontier of size {size} needs {size.bit_count()} node(s), "
                             f"one per set bit, not {len(self.nodes)}")

    def append(self, leaf: bytes) -> None:
        """Adds one leaf hash; merges the subtrees the new leaf completes."""
        n = self.size
        nodes = self.nodes
        while n & 1:
            leaf = _sha256(b"\x01" + nodes.pop() + leaf).digest()
            n >>= 1
        nodes.append(leaf)
        self.size += 1

    def root(self) -> bytes:
        """MTH of the whole range: fold the subtree roots from the right."""
        if not self.nodes:
            return EMPTY_ROOT
        nodes = self.nodes
        acc = nodes[-1]
        for node in reversed(nodes[:-1]):
            acc = _sha256(b"\x01" + node + acc).digest()
        return acc

    def copy(self) -> Frontier:
        return Frontier(self.size, self.nodes)


def inclusion_path(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """PATH(index, D[size]) of RFC 9162 §2.1.3.1, leaf-side first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = split(end - start)
        if index < start + k:
            path.append(subtree(start + k, end))
            end = start + k
        else:
            path.append(subtree(start, start + k))
            start += k
    path.reverse()
    return path


def consistency_path(first: int, second: int, subtree: Subtree) -> list[bytes]:
    """PROOF(first, D[second]) of RFC 9162 §2.1.4.1; empty when first is 0 or equal to second."""
    if not 0 <= first <= second:
        raise ValueError(f"no consistency proof from size {first} to size {second}")
    if first in (0, second):
        return []
    proof: list[bytes] = []
    start, end, m, complete = 0, second, first, True
    while m != end - start:
        k = split(end - start)
        if m <= k:
            proof.append(subtree(start + k, end))
            end = start + k
        else:
            proof.append(subtree(start, start + k))
            start, m, complete = start + k, m - k, False
    if not complete:
        proof.append(subtree(start, end))
    proof.reverse()
    return proof


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to (RFC 9162 §2.1.3.2); raises ValueError if the
    proof has the wrong shape for (index, size)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not below tree size {size}")
    if len(leaf) != HASH_SIZE or any(len(p) != HASH_SIZE for p in path):
        raise ValueError("hashes in an inclusion proof are 32 bytes")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ValueError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes],
                     root: bytes) -> bool:
    """True if `path` proves that `leaf` is leaf `index` of the tree of `size` with `root`."""
    try:
        return root_from_inclusion(index, size, leaf, path) == root
    except ValueError:
        return False


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> bool:
    """True if `path` proves the tree (first, first_root) is a prefix of (second, second_root).

    RFC 9162 §2.1.4.2, plus the edge cases it leaves to the caller: equal sizes need equal
    roots and an empty proof; from size 0 everything is consistent with an empty proof.
    """
    if not 0 <= first <= second or any(len(p) != HASH_SIZE for p in path):
        return False
    if first == second:
        return not path and first_root == second_root
    if first == 0:
        return not path
    if not path:
        return False
    nodes = list(path)
    if first & (first - 1) == 0:  # first is a power of two: its root is the first node
        nodes.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root

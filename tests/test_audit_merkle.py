"""RFC 6962 / RFC 9162 Merkle hashing and proofs: published vectors, then brute force.

The vectors are the Certificate Transparency ones used across implementations, taken from
transparency-dev/merkle (the successor of google/certificate-transparency-go's merkle code):
  - leaves and roots 0..8: testonly/constants.go (LeafInputs, RootHashes, NodeHashes)
  - inclusion and consistency proofs: proof/verify_test.go (inclusionProofs,
    consistencyProofs; there leaf numbers are 1-based, here indexes are 0-based)
https://github.com/transparency-dev/merkle
"""

from __future__ import annotations

import itertools

import pytest

from agentd.audit import merkle
from agentd.audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_path,
    inclusion_path,
    leaf_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f")]
ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]


def h(text: str) -> bytes:
    return bytes.fromhex(text)


INCLUSION = [  # (index, size, path)
    (0, 8, [h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (5, 8, [h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (2, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (1, 5, [h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
    (0, 1, []),
]
CONSISTENCY = [  # (first, second, path)
    (1, 1, []),
    (1, 8, [h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (2, 5, [h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
    (6, 7, [h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
]
HASHES = [leaf_hash(leaf) for leaf in LEAVES]


def brute(hashes: list[bytes]) -> merkle.Subtree:
    return lambda a, b: root_of(hashes[a:b])


class TestVectors:
    @pytest.mark.parametrize("size", range(9))
    def test_roots_of_the_reference_trees(self, size: int) -> None:
        """The roots of the trees of 0..8 reference leaves are the published ones."""
        assert root_of(HASHES[:size]) == ROOTS[size]
        frontier = Frontier()
        for leaf in HASHES[:size]:
            frontier.append(leaf)
        assert frontier.root() == ROOTS[size]

    def test_empty_root_is_sha256_of_nothing(self) -> None:
        """MTH({}) is SHA-256 of the empty string."""
        assert ROOTS[0] == EMPTY_ROOT

    @pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
    def test_inclusion_vectors(self, index: int, size: int, path: list[bytes]) -> None:
        """Generated inclusion paths equal the published ones, and verify."""
        assert inclusion_path(index, size, brute(HASHES)) == path
        assert verify_inclusion(index, size, HASHES[index], path, ROOTS[size])

    @pytest.mark.parametrize(("first", "second", "path"), CONSISTENCY)
    def test_consistency_vectors(self, first: int, second: int, path: list[bytes]) -> None:
        """Generated consistency proofs equal the published ones, and verify."""
        assert consistency_path(first, second, brute(HASHES)) == path
        assert verify_consistency(first, second, ROOTS[first], ROOTS[second], path)


def _corrupt_paths(path: list[bytes], root: bytes) -> list[list[bytes]]:
    bad = [[*path, b""], [*path, root], [b"", *path], [root, *path]]
    if path:
        bad.append(path[:-1])
    for i in range(len(path)):
        flipped = list(path)
        flipped[i] = bytes([flipped[i][0] ^ 8]) + flipped[i][1:]
        bad.append(flipped)
    if len(path) > 1:
        bad.append([path[0], b"\xab" * 32, *path[1:]])
    return bad


class TestRejection:
    @pytest.mark.parametrize(("index", "size", "path"), INCLUSION[:4])
    def test_corrupt_inclusion_proofs_fail(self, index: int, size: int,
                                           path: list[bytes]) -> None:
        """Wrong index, size, leaf, root or any altered proof is rejected (the probes of
        transparency-dev/merkle's verifierCheck)."""
        leaf, root = HASHES[index], ROOTS[size]
        for i, n in ((index - 1, size), (index + 1, size), (index ^ 2, size),
                     (index, size * 2), (index, size // 2)):
            assert not verify_inclusion(i, n, leaf, path, root)
        assert not verify_inclusion(index, size, leaf_hash(b"WrongLeaf"), path, root)
        assert not verify_inclusion(index, size, leaf, path, EMPTY_ROOT)
        for bad in _corrupt_paths(path, root):
            assert not verify_inclusion(index, size, leaf, bad, root)

    @pytest.mark.parametrize(("first", "second", "path"), CONSISTENCY[1:])
    def test_corrupt_consistency_proofs_fail(self, first: int, second: int,
                                             path: list[bytes]) -> None:
        """Wrong sizes, roots or any altered proof is rejected."""
        r1, r2 = ROOTS[first], ROOTS[second]
        for a, b in ((first - 1, second), (first + 1, second), (first ^ 2, second),
                     (first, second * 2), (first, second // 2)):
            assert not verify_consistency(a, b, r1, r2, path)
        assert not verify_consistency(first, second, r2, r1, path)
        assert not verify_consistency(first, second, EMPTY_ROOT, r2, path)
        assert not verify_consistency(first, second, r1, r2, [])
        for bad in [*_corrupt_paths(path, r1), [r2, *path], [path[0], *path]]:
            assert not verify_consistency(first, second, r1, r2, bad)

    def test_edge_cases(self) -> None:
        """Equal sizes need equal roots and no proof; from 0 anything is consistent."""
        assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
        assert verify_consistency(0, 5, EMPTY_ROOT, ROOTS[5], [])
        assert not verify_consistency(3, 3, ROOTS[3], ROOTS[4], [])
        assert not verify_consistency(3, 3, ROOTS[3], ROOTS[3], [ROOTS[3]])
        assert not verify_consistency(4, 3, ROOTS[4], ROOTS[3], [])
        assert not verify_inclusion(0, 0, HASHES[0], [], EMPTY_ROOT)
        with pytest.raises(ValueError, match="not in a tree"):
            inclusion_path(3, 3, brute(HASHES))


class TestBruteForce:
    def test_every_proof_of_every_size_up_to_40(self) -> None:
        """For all sizes <= 40, every inclusion and consistency proof verifies against roots
        computed by the recursive definition, and the frontier agrees with it."""
        hashes = [leaf_hash(bytes([i, i * 7 % 256])) for i in range(40)]
        subtree = brute(hashes)
        frontier = Frontier()
        for n in range(1, 41):
            frontier.append(hashes[n - 1])
            root = root_of(hashes[:n])
            assert frontier.root() == root
            for i in range(n):
                assert verify_inclusion(i, n, hashes[i], inclusion_path(i, n, subtree), root)
            for m in range(n + 1):
                proof = consistency_path(m, n, subtree)
                assert verify_consistency(m, n, root_of(hashes[:m]), root, proof)

    def test_proof_lengths_are_logarithmic(self) -> None:
        """Proof sizes stay within ceil(log2 n) (+1 for consistency) hashes."""
        hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(300)]
        subtree = brute(hashes)
        for n, m in itertools.product((255, 256, 257, 300), (1, 100, 128, 255)):
            bound = (n - 1).bit_length()
            assert len(inclusion_path(m - 1, n, subtree)) <= bound
            assert len(consistency_path(m, n, subtree)) <= bound + 1

    def test_split_is_the_largest_power_of_two_below(self) -> None:
        """k is the largest power of two strictly smaller than n (not the midpoint)."""
        assert [merkle.split(n) for n in (2, 3, 4, 5, 8, 9, 1000)] == [1, 2, 2, 4, 4, 8, 512]

    def test_frontier_rejects_a_wrong_node_count(self) -> None:
        """A frontier of size n has one node per set bit of n."""
        with pytest.raises(ValueError, match=r"needs 1 node\(s\), one per set bit, not 2"):
            Frontier(4, [EMPTY_ROOT] * 2)

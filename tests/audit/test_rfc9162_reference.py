"""Tests for the independent RFC 9162 verifier in tests/audit/rfc9162.py.

Two kinds of checks:

* Published known-answer vectors for the 8-leaf reference tree of RFC 6962 / RFC 9162 (same
  hashing with SHA-256), typed in here as data. They come from:
    - google/certificate-transparency, cpp/merkletree/merkle_tree_test.cc
      (kInputs, kSHA256EmptyTreeHash, kSHA256Roots, kSHA256Paths, kSHA256Proofs), and
    - transparency-dev/merkle, proof/verify_test.go (the same tree, roots, inclusionProofs and
      consistencyProofs, plus the extra consistency proof 6 -> 7), and
      transparency-dev/merkle, rfc6962/rfc6962_test.go (leaf and node hash vectors).
  Both projects number leaves from 1 in their path vectors; they are converted to the 0-based
  leaf_index of RFC 9162 below.
* An exhaustive cross-check for every tree size 1..70: every proof produced by the generators
  (straight from the RFC definitions) verifies, and tampered proofs / parameters are rejected.
"""

from __future__ import annotations

import hashlib
from functools import cache

import pytest

from tests.audit.rfc9162 import (
    EMPTY_TREE_HASH,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)


def h(hex_string: str) -> bytes:
    return bytes.fromhex(hex_string)


# --- Published vectors (see the module docstring for where they come from) -------------------

EMPTY_TREE_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# The eight entries of the reference tree (hex of the raw entry bytes).
REFERENCE_INPUTS = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]

# MTH of the first n entries, n = 1..8 (kSHA256Roots / roots).
REFERENCE_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]

# (leaf_index (0-based), tree_size, inclusion path) -- kSHA256Paths / inclusionProofs, whose
# 1-based leaf numbers 1, 1, 6, 3, 2 become indices 0, 0, 5, 2, 1.
REFERENCE_INCLUSION = [
    (0, 1, []),
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        3,
        ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    ),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]

# (size1, size2, consistency proof) -- kSHA256Proofs / consistencyProofs (6 -> 7 only in
# transparency-dev/merkle).
REFERENCE_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


def reference_leaves() -> list[bytes]:
    return [leaf_hash(h(x)) for x in REFERENCE_INPUTS]


# --- Hashing ------------------------------------------------------------------------------------


def test_empty_tree_hash_is_sha256_of_nothing() -> None:
    assert EMPTY_TREE_HASH == h(EMPTY_TREE_HEX)
    assert root_hash([]) == h(EMPTY_TREE_HEX)


def test_leaf_and_node_hash_vectors() -> None:
    # transparency-dev/merkle rfc6962/rfc6962_test.go: the empty leaf differs from the empty
    # tree; leaf "L123456"; node over the (non-hash) children "N123" and "N456".
    assert leaf_hash(b"") == h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    assert leaf_hash(b"") != EMPTY_TREE_HASH
    assert leaf_hash(b"L123456") == h(
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert node_hash(b"N123", b"N456") == h(
        "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    )


def test_domain_separation_and_order() -> None:
    a, b = leaf_hash(b"Hello"), leaf_hash(b"World")
    assert a != b
    assert node_hash(a, b) != node_hash(b, a)
    assert node_hash(a, b) != leaf_hash(a + b)
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()


@pytest.mark.parametrize("size", range(1, 9))
def test_reference_roots(size: int) -> None:
    assert root_hash(reference_leaves()[:size]) == h(REFERENCE_ROOTS[size - 1])


# --- Published proofs: generators reproduce them, verifier accepts them ----------------------


@pytest.mark.parametrize(("index", "size", "path"), REFERENCE_INCLUSION)
def test_reference_inclusion_proofs(index: int, size: int, path: list[str]) -> None:
    leaves = reference_leaves()
    proof = [h(x) for x in path]
    root = h(REFERENCE_ROOTS[size - 1])
    assert inclusion_proof(index, leaves[:size]) == proof
    assert verify_inclusion(index, size, leaves[index], proof, root)
    # The proof for index i is not a proof for the neighbouring indices, nor for another leaf.
    for other in (index - 1, index + 1, index ^ 2):
        assert not verify_inclusion(other, size, leaves[index], proof, root)
    assert not verify_inclusion(index, size, leaf_hash(b"WrongLeaf"), proof, root)
    assert not verify_inclusion(index, size, leaves[index], proof, h(EMPTY_TREE_HEX))


@pytest.mark.parametrize(("size1", "size2", "path"), REFERENCE_CONSISTENCY)
def test_reference_consistency_proofs(size1: int, size2: int, path: list[str]) -> None:
    leaves = reference_leaves()
    proof = [h(x) for x in path]
    root1, root2 = h(REFERENCE_ROOTS[size1 - 1]), h(REFERENCE_ROOTS[size2 - 1])
    assert consistency_proof(size1, leaves[:size2]) == proof
    assert verify_consistency(size1, size2, root1, root2, proof)
    if size1 != size2:
        assert not verify_consistency(size1, size2, root2, root1, proof)
        assert not verify_consistency(size1, size2, root1, root2, [])
        assert not verify_consistency(size1 + 1, size2, root1, root2, proof)


def test_reference_consistency_from_one_equals_inclusion_of_leaf_zero() -> None:
    # PROOF(1, D[n]) and PATH(0, D[n]) are the same list (both published as such).
    leaves = reference_leaves()
    for n in range(1, 9):
        assert consistency_proof(1, leaves[:n]) == inclusion_proof(0, leaves[:n])


# --- Special cases and malformed input -------------------------------------------------------

SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


def test_inclusion_rejects_out_of_range_and_malformed_input() -> None:
    leaf = leaf_hash(b"data")
    # A one-leaf tree: the root is the leaf hash and the proof is empty.
    assert verify_inclusion(0, 1, leaf, [], leaf)
    assert not verify_inclusion(0, 1, leaf, [], SOME_HASH)
    assert not verify_inclusion(0, 1, SOME_HASH, [], leaf)
    assert not verify_inclusion(0, 1, leaf, [leaf], leaf)
    for index, size in ((0, 0), (1, 0), (1, 1), (2, 1), (5, 5), (-1, 3), (0, -1)):
        assert not verify_inclusion(index, size, leaf, [], leaf)
        assert not verify_inclusion(index, size, SOME_HASH, [], EMPTY_TREE_HASH)
    bad_inputs = [
        (0, 1, b"", [], leaf),
        (0, 1, leaf, [], b""),
        (0, 1, leaf[:31], [], leaf[:31]),
        (0, 2, leaf, [b""], leaf),
        (0, 2, leaf, [SOME_HASH + b"\x00"], leaf),
        (0, 2, leaf, None, leaf),
        (0, 2, leaf, [None], leaf),
        ("0", 1, leaf, [], leaf),
        (0, "1", leaf, [], leaf),
        (0.0, 1, leaf, [], leaf),
        (False, True, leaf, [], leaf),
        (0, 1, leaf.hex(), [], leaf),
        (0, 1, None, [], None),
    ]
    for args in bad_inputs:
        assert verify_inclusion(*args) is False, args


def test_consistency_special_cases() -> None:
    r1, r2 = leaf_hash(b"one"), leaf_hash(b"two")
    # size1 == size2: empty proof and equal roots, nothing else.
    assert verify_consistency(1, 1, r1, r1, [])
    assert verify_consistency(5, 5, r2, r2, [])
    assert not verify_consistency(1, 1, r1, r2, [])
    assert not verify_consistency(1, 1, r1, r1, [r1])
    assert not verify_consistency(5, 5, r1, r1, [EMPTY_TREE_HASH])
    # size1 == 0 (the decision documented in verify_consistency): empty proof and the
    # empty-tree hash as root1.
    assert verify_consistency(0, 0, EMPTY_TREE_HASH, EMPTY_TREE_HASH, [])
    assert verify_consistency(0, 1, EMPTY_TREE_HASH, r2, [])
    assert verify_consistency(0, 70, EMPTY_TREE_HASH, r2, [])
    assert not verify_consistency(0, 0, r1, r1, [])
    assert not verify_consistency(0, 0, EMPTY_TREE_HASH, r2, [])
    assert not verify_consistency(0, 1, r1, r2, [])
    assert not verify_consistency(0, 1, EMPTY_TREE_HASH, r2, [r2])
    assert not verify_consistency(0, 0, EMPTY_TREE_HASH, EMPTY_TREE_HASH, [EMPTY_TREE_HASH])
    # Time travel, and an empty proof between different sizes.
    assert not verify_consistency(1, 0, r1, r2, [])
    assert not verify_consistency(2, 1, r1, r2, [])
    assert not verify_consistency(1, 2, r1, r2, [])
    bad_inputs = [
        (-1, 1, r1, r2, []),
        (1, -1, r1, r2, []),
        (1, 2, r1, r2, None),
        (1, 2, r1, r2, [b""]),
        (1, 2, r1, r2, [None]),
        (1, 2, r1[:16], r2, [r2]),
        (1, 2, r1, b"WrongRoot", [r2]),
        (1, 1, b"x", b"x", []),
        ("1", 2, r1, r2, [r2]),
        (1, 2.0, r1, r2, [r2]),
        (None, None, None, None, None),
    ]
    for args in bad_inputs:
        assert verify_consistency(*args) is False, args


def test_generators_reject_out_of_range() -> None:
    leaves = reference_leaves()
    for index in (-1, 8, 9):
        with pytest.raises(ValueError):
            inclusion_proof(index, leaves)
    with pytest.raises(ValueError):
        inclusion_proof(0, [])
    for size1 in (-1, 9):
        with pytest.raises(ValueError):
            consistency_proof(size1, leaves)
    assert consistency_proof(0, leaves) == []
    assert consistency_proof(8, leaves) == []


# --- Exhaustive cross-check over sizes 1..70 --------------------------------------------------

MAX_SIZE = 70


@cache
def leaves_for(n: int) -> tuple[bytes, ...]:
    return tuple(leaf_hash(b"carevault-rfc9162-%d" % i) for i in range(n))


@cache
def root_of(n: int) -> bytes:
    return root_hash(list(leaves_for(n)))


@cache
def path_len(index: int, size: int) -> int:
    return len(inclusion_proof(index, list(leaves_for(size))))


@cache
def proof_len(size1: int, size2: int) -> int:
    return len(consistency_proof(size1, list(leaves_for(size2))))


def flip(proof: list[bytes], j: int, at: int) -> list[bytes]:
    element = bytearray(proof[j])
    element[at] ^= 0x08
    return proof[:j] + [bytes(element)] + proof[j + 1 :]


def proof_mutations(proof: list[bytes], extra: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """Structurally altered copies of `proof`: bit flips, dropped, added and reordered nodes."""
    out: list[tuple[str, list[bytes]]] = []
    for j in range(len(proof)):
        out.append((f"flip first byte of [{j}]", flip(proof, j, 0)))
        out.append((f"flip last byte of [{j}]", flip(proof, j, -1)))
        out.append((f"drop [{j}]", proof[:j] + proof[j + 1 :]))
        out.append((f"duplicate [{j}]", proof[: j + 1] + proof[j:]))
    for j in range(len(proof) - 1):
        if proof[j] != proof[j + 1]:
            out.append(
                (f"swap [{j}] and [{j + 1}]", proof[:j] + [proof[j + 1], proof[j]] + proof[j + 2 :])
            )
    for x in extra:
        out.append(("append", proof + [x]))
        out.append(("prepend", [x] + proof))
    return out


def _stable_mutations(proof: list[bytes], extra: list[bytes]) -> list[tuple[str, list[bytes]]]:
    return [(d, p) for d, p in proof_mutations(proof, extra) if p != proof]


@pytest.mark.parametrize("size", range(1, MAX_SIZE + 1))
def test_exhaustive_inclusion(size: int) -> None:
    leaves = list(leaves_for(size))
    root = root_of(size)
    for index in range(size):
        proof = inclusion_proof(index, leaves)
        leaf = leaves[index]
        assert verify_inclusion(index, size, leaf, proof, root), (index, size)

        # Tampered proof elements / structure.
        for desc, bad in _stable_mutations(proof, [SOME_HASH, root, leaf]):
            assert not verify_inclusion(index, size, leaf, bad, root), (index, size, desc)

        # Wrong index (and the right proof for another leaf does not prove this one).
        for other in {index - 1, index + 1, index ^ 1, index ^ 2, size, size + 1}:
            if other != index:
                assert not verify_inclusion(other, size, leaf, proof, root), (index, size, other)
        # Another leaf's hash at this index / this leaf with another leaf's proof.
        if size > 1:
            other = (index + 1) % size
            assert not verify_inclusion(index, size, leaves[other], proof, root)
            assert not verify_inclusion(index, size, leaf, inclusion_proof(other, leaves), root)

        # Wrong root: another tree size's root, the empty root, the leaf itself.
        for wrong_root in {root_of(size - 1), root_of(size + 1), EMPTY_TREE_HASH, SOME_HASH}:
            assert not verify_inclusion(index, size, leaf, proof, wrong_root), (index, size)
        if size > 1:
            assert not verify_inclusion(index, size, leaf, proof, leaf)

        # Wrong tree size. RFC 9162's algorithm binds tree_size only through the proof's shape
        # (the signed tree head binds size and root together), so a size whose PATH has a
        # different length must fail; a same-length size may legitimately pass (e.g. index 0 of
        # a 3-leaf proof also verifies as "index 0 of 4"), see the pinned case below.
        for other_size in {size - 1, size + 1, size * 2, size // 2, 0}:
            if other_size == size:
                continue
            if index >= other_size:
                assert not verify_inclusion(index, other_size, leaf, proof, root)
                continue
            other_len = path_len(index, other_size)
            if other_len != len(proof):
                assert not verify_inclusion(index, other_size, leaf, proof, root), (
                    index,
                    size,
                    other_size,
                )


def test_inclusion_size_is_bound_only_by_shape() -> None:
    # Pinned illustration of the note above: PATH(0, D[3]) has the same shape as PATH(0, D[4]).
    leaves = list(leaves_for(3))
    proof = inclusion_proof(0, leaves)
    assert verify_inclusion(0, 4, leaves[0], proof, root_of(3))
    # ... but not the shape of PATH(2, D[4]) vs PATH(2, D[3]).
    assert not verify_inclusion(2, 4, leaves[2], inclusion_proof(2, leaves), root_of(3))


@pytest.mark.parametrize("size2", range(1, MAX_SIZE + 1))
def test_exhaustive_consistency(size2: int) -> None:
    leaves = list(leaves_for(size2))
    root2 = root_of(size2)
    for size1 in range(0, size2 + 1):
        root1 = root_of(size1)
        proof = consistency_proof(size1, leaves)
        assert verify_consistency(size1, size2, root1, root2, proof), (size1, size2)
        assert (proof == []) == (size1 in (0, size2)), (size1, size2)

        # Tampered proof elements / structure (includes adding a node to an empty proof).
        extra = [SOME_HASH, root1, root2, EMPTY_TREE_HASH] + proof[:1]
        for desc, bad in _stable_mutations(proof, extra):
            assert not verify_consistency(size1, size2, root1, root2, bad), (size1, size2, desc)
        if proof:
            assert not verify_consistency(size1, size2, root1, root2, [])

        # Swapped / wrong roots.
        if root1 != root2:
            assert not verify_consistency(size1, size2, root2, root1, proof), (size1, size2)
        for wrong in {SOME_HASH, root_of(size1 + 1), root_of(size2 + 1)}:
            if wrong != root1:
                assert not verify_consistency(size1, size2, wrong, root2, proof)
        if size1 > 0:
            for wrong in {SOME_HASH, root_of(size2 - 1), root_of(size2 + 1)}:
                if wrong != root2:
                    assert not verify_consistency(size1, size2, root1, wrong, proof)

        # Wrong size1: always rejected (root1 pins it).
        for other1 in {size1 - 1, size1 + 1, size1 ^ 1, size1 ^ 2, size2 + 1}:
            if other1 != size1:
                assert not verify_consistency(other1, size2, root1, root2, proof), (
                    size1,
                    size2,
                    other1,
                )

        # Wrong size2: as for inclusion, a size2 whose PROOF has a different length must fail.
        for other2 in {size2 - 1, size2 + 1, size2 * 2, size2 // 2}:
            if other2 == size2:
                continue
            if other2 < size1:
                assert not verify_consistency(size1, other2, root1, root2, proof)
                continue
            if size1 == 0:
                continue  # nothing binds root2 to size2 for an empty old tree (documented)
            other_len = proof_len(size1, other2)
            if other_len != len(proof):
                assert not verify_consistency(size1, other2, root1, root2, proof), (
                    size1,
                    size2,
                    other2,
                )

        # The proof between two *other* trees of the same sizes does not carry over.
        if 0 < size1 < size2:
            forged = [leaf_hash(b"other-%d" % i) for i in range(size2)]
            assert not verify_consistency(
                size1, size2, root1, root2, consistency_proof(size1, forged)
            )
            assert not verify_consistency(size1, size2, root1, root_hash(forged), proof)


REINTERPRET_MAX = 20


@pytest.mark.parametrize("size", range(1, REINTERPRET_MAX + 1))
def test_inclusion_proof_cannot_be_reinterpreted(size: int) -> None:
    # A valid proof presented with any other (leaf_index, tree_size) must fail whenever PATH for
    # that pair has another length: in RFC 9162 2.1.3.2 the sn counter must reach 0 exactly at
    # the last element (the "sn is 0: fail" step inside the loop and the final sn check). E.g.
    # without the in-loop check, PATH(5, D[8]) would verify as "leaf 1 of a 4-leaf tree".
    leaves = list(leaves_for(size))
    root = root_of(size)
    for index in range(size):
        proof = inclusion_proof(index, leaves)
        for other_size in range(1, 2 * REINTERPRET_MAX + 1):
            for other_index in range(other_size):
                if (other_index, other_size) == (index, size):
                    continue
                if path_len(other_index, other_size) == len(proof):
                    continue
                assert not verify_inclusion(other_index, other_size, leaves[index], proof, root), (
                    index,
                    size,
                    other_index,
                    other_size,
                )


@pytest.mark.parametrize("size2", range(1, REINTERPRET_MAX + 1))
def test_consistency_proof_cannot_be_reinterpreted(size2: int) -> None:
    # Likewise for consistency proofs presented with any other (size1, size2).
    leaves = list(leaves_for(size2))
    for size1 in range(1, size2):
        proof = consistency_proof(size1, leaves)
        root1, root2 = root_of(size1), root_of(size2)
        for other2 in range(0, 2 * REINTERPRET_MAX + 1):
            for other1 in range(0, other2 + 1):
                if (other1, other2) == (size1, size2):
                    continue
                if proof_len(other1, other2) == len(proof):
                    continue
                assert not verify_consistency(other1, other2, root1, root2, proof), (
                    size1,
                    size2,
                    other1,
                    other2,
                )

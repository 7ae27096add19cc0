"""Independent reference for RFC 9162 (Certificate Transparency v2) Merkle tree proofs.

Written from the text of RFC 9162 section 2.1 only, with SHA-256 as the hash. It deliberately
imports nothing from `carevault`: tests use it to check the proofs the server serves without
trusting the server's own code.

Two halves:

* Verifiers (`verify_inclusion`, `verify_consistency`) follow the step lists of RFC 9162
  2.1.3.2 and 2.1.4.2 literally (the fn/sn/fr/sr iteration with LSB tests and right shifts).
  They never raise: any malformed input (wrong types, negative or out-of-range sizes, hashes
  that are not 32 bytes, proofs of the wrong length) gives False.
* Generators (`root_hash`, `inclusion_proof`, `consistency_proof`) follow the recursive
  definitions MTH (2.1.1), PATH (2.1.3.1) and PROOF/SUBPROOF (2.1.4.1) literally, over a list
  of *leaf hashes* (MTH of a one-element list is that element). They are slow (they recompute
  subtree hashes) but obviously match the definitions, which is the point.

Indices are 0-based, as in RFC 9162 (leaf_index in the inclusion_proof structure).
"""

from __future__ import annotations

import hashlib

HASH_SIZE = 32
EMPTY_TREE_HASH = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """MTH({d(0)}) = HASH(0x00 || d(0)) (RFC 9162 2.1.1)."""
    return hashlib.sha256(b"\x00" + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """HASH(0x01 || left || right), the interior node hash of RFC 9162 2.1.1."""
    return hashlib.sha256(b"\x01" + bytes(left) + bytes(right)).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1): k < n <= 2k."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def root_hash(leaf_hashes: list[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 2.1.1, given the leaf hashes MTH({d(i)}) of the n entries.

    MTH({}) = HASH() (SHA-256 of the empty string); MTH of one leaf is its leaf hash;
    otherwise MTH(D[n]) = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n])) with k the largest power
    of two smaller than n.
    """
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_TREE_HASH
    if n == 1:
        return bytes(leaf_hashes[0])
    k = _split(n)
    return node_hash(root_hash(leaf_hashes[:k]), root_hash(leaf_hashes[k:]))


def inclusion_proof(index: int, leaf_hashes: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1 for m = index, n = len(leaf_hashes).

    Defined for 0 <= m < n; raises ValueError otherwise.
    """
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is not in a tree of size {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return inclusion_proof(index, leaf_hashes[:k]) + [root_hash(leaf_hashes[k:])]
    return inclusion_proof(index - k, leaf_hashes[k:]) + [root_hash(leaf_hashes[:k])]


def _subproof(m: int, leaf_hashes: list[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of RFC 9162 2.1.4.1 (0 < m <= n)."""
    n = len(leaf_hashes)
    if m == n:
        return [] if b else [root_hash(leaf_hashes)]
    k = _split(n)
    if m <= k:
        return _subproof(m, leaf_hashes[:k], b) + [root_hash(leaf_hashes[k:])]
    return _subproof(m - k, leaf_hashes[k:], False) + [root_hash(leaf_hashes[:k])]


def consistency_proof(size1: int, leaf_hashes: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) = SUBPROOF(m, D[n], true) of RFC 9162 2.1.4.1, n = len(leaf_hashes).

    The RFC defines it for 0 < m < n; SUBPROOF(n, D[n], true) is the empty list, so m == n
    gives []. m == 0 is outside the definition: the empty tree is a prefix of every tree and
    there is nothing to prove, so this returns [] too (see `verify_consistency`). Raises
    ValueError for m < 0 or m > n.
    """
    n = len(leaf_hashes)
    if not 0 <= size1 <= n:
        raise ValueError(f"size1 {size1} is not in 0..{n}")
    if size1 == 0:
        return []
    return _subproof(size1, leaf_hashes, True)


def _is_size(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_hash(x: object) -> bool:
    return isinstance(x, bytes | bytearray | memoryview) and len(x) == HASH_SIZE


def _is_hash_list(xs: object) -> bool:
    return isinstance(xs, list | tuple) and all(_is_hash(x) for x in xs)


def _lsb(x: int) -> int:
    return x & 1


def verify_inclusion(
    leaf_index: int, tree_size: int, leaf_hash: bytes, proof: list[bytes], root: bytes
) -> bool:
    """RFC 9162 2.1.3.2: does `proof` show `leaf_hash` at `leaf_index` in the tree `root`?

    `leaf_hash` is the entry's leaf hash HASH(0x00 || entry), i.e. the "hash" of the RFC.
    Returns False (never raises) on any malformed input.
    """
    if not (_is_size(leaf_index) and _is_size(tree_size)):
        return False
    if not (_is_hash(leaf_hash) and _is_hash(root) and _is_hash_list(proof)):
        return False
    # 1. leaf_index >= tree_size fails.
    if leaf_index >= tree_size:
        return False
    # 2. fn = leaf_index, sn = tree_size - 1.
    fn, sn = leaf_index, tree_size - 1
    # 3. r = hash.
    r = bytes(leaf_hash)
    # 4. For each p in inclusion_path:
    for p in proof:
        # a. sn == 0: stop and fail.
        if sn == 0:
            return False
        # b. LSB(fn) set, or fn == sn:
        if _lsb(fn) or fn == sn:
            # i. r = HASH(0x01 || p || r)
            r = node_hash(p, r)
            # ii. If LSB(fn) is not set, right-shift fn and sn equally until LSB(fn) is set
            #     or fn is 0.
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            # i. r = HASH(0x01 || r || p)
            r = node_hash(r, p)
        # c. Right-shift fn and sn once.
        fn >>= 1
        sn >>= 1
    # 5. sn must be 0 and r must equal root_hash.
    return sn == 0 and r == bytes(root)


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: list[bytes]
) -> bool:
    """RFC 9162 2.1.4.2: is the tree (size2, root2) an append-only extension of (size1, root1)?

    The RFC algorithm covers 0 < size1 < size2. The other cases, decided here:

    * size1 > size2 (or a negative size, or any malformed hash / proof): False.
    * size1 == size2: True iff the proof is empty and root1 == root2 (PROOF(n, D[n]) is
      SUBPROOF(n, D[n], true) = {} per 2.1.4.1; the trees are consistent iff identical).
    * size1 == 0 (and size2 >= 0): the empty tree is a prefix of every tree, so there is nothing
      to prove and the RFC gives no algorithm. Decided: True iff the proof is empty and root1 is
      the empty-tree hash SHA-256("") (so a bogus "old root" for size 0 is still rejected);
      root2 is NOT checked when size2 > 0 (nothing in such a proof binds it), and when
      size2 == 0 the rule above (root2 == root1) also applies. A non-empty proof is False.
    """
    if not (_is_size(size1) and _is_size(size2)):
        return False
    if not (_is_hash(root1) and _is_hash(root2) and _is_hash_list(proof)):
        return False
    if size1 > size2:
        return False
    if size1 == 0:
        if len(proof) != 0 or bytes(root1) != EMPTY_TREE_HASH:
            return False
        return size2 > 0 or bytes(root2) == bytes(root1)
    if size1 == size2:
        return len(proof) == 0 and bytes(root1) == bytes(root2)

    # 0 < size1 < size2 from here on: the steps of 2.1.4.2.
    path = [bytes(c) for c in proof]
    # 1. Empty consistency_path fails.
    if not path:
        return False
    # 2. size1 an exact power of 2: prepend first_hash.
    if size1 & (size1 - 1) == 0:
        path.insert(0, bytes(root1))
    # 3. fn = first - 1, sn = second - 1.
    fn, sn = size1 - 1, size2 - 1
    # 4. While LSB(fn) is set, right-shift fn and sn equally.
    while _lsb(fn):
        fn >>= 1
        sn >>= 1
    # 5. fr = sr = first value of consistency_path.
    fr = sr = path[0]
    # 6. For each subsequent value c:
    for c in path[1:]:
        # sn == 0: stop and fail.
        if sn == 0:
            return False
        if _lsb(fn) or fn == sn:
            # 1. fr = HASH(0x01 || c || fr); 2. sr = HASH(0x01 || c || sr)
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            # 3. If LSB(fn) is not set, right-shift fn and sn equally until LSB(fn) is set or
            #    fn is 0.
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            # 1. sr = HASH(0x01 || sr || c)
            sr = node_hash(sr, c)
        # Finally, right-shift fn and sn once.
        fn >>= 1
        sn >>= 1
    # 7. fr == first_hash, sr == second_hash, sn == 0.
    return fr == bytes(root1) and sr == bytes(root2) and sn == 0

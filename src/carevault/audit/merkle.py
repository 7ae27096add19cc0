"""The Merkle tree of the audit trail, as RFC 9162 (Certificate Transparency v2) section 2.1
defines it: leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || left || right), MTH of n
leaves split at the largest power of two below n.

Leaf i of the tree is the audit entry with sequence number i + 1. The store keeps the hash of
every complete, aligned block of `BLOCK` leaves, so a subtree hash over many entries needs the
block hashes and only the leaves of the (at most two) partial blocks at its edges; that is what
keeps proofs and checkpoints cheap and lets retention drop old entries without losing the
ability to prove the newer ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

BLOCK = 1024  # leaves per stored block hash (a power of two)
BLOCK_HEIGHT = BLOCK.bit_length() - 1
EMPTY_ROOT = hashlib.sha256(b"").digest()

Range = tuple[int, int]  # [lo, hi) leaf indices


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_hash(
    lo: int, hi: int, leaf: Callable[[int], bytes], block: Callable[[int], bytes | None]
) -> bytes:
    """MTH(D[lo:hi]) for a range the RFC recursion produces; `block(b)` may answer None when
    block b is not stored, and the leaves are then used."""
    n = hi - lo
    if n == 1:
        return leaf(lo)
    if n == BLOCK and lo % BLOCK == 0:
        stored = block(lo // BLOCK)
        if stored is not None:
            return stored
    k = _split(n)
    return node_hash(range_hash(lo, lo + k, leaf, block), range_hash(lo + k, hi, leaf, block))


def root_of(leaves: list[bytes]) -> bytes:
    if not leaves:
        return EMPTY_ROOT
    return range_hash(0, len(leaves), leaves.__getitem__, lambda _b: None)


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The subtrees whose hashes form the inclusion proof of leaf `index` in a tree of `size`
    leaves (RFC 9162 2.1.3.1 PATH), nearest the leaf first."""
    if not 0 <= index < size:
        raise ValueError("leaf index outside the tree")
    ranges: list[Range] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo = lo + k
    ranges.reverse()
    return ranges


def consistency_ranges(size1: int, size2: int) -> list[Range]:
    """The subtrees whose hashes form the consistency proof between trees of `size1` and
    `size2` leaves (RFC 9162 2.1.4.1 PROOF/SUBPROOF)."""
    if not 0 < size1 <= size2:
        raise ValueError("sizes must satisfy 0 < size1 <= size2")
    ranges: list[Range] = []
    lo, hi, complete = 0, size2, True
    m = size1
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            m -= k
            lo = lo + k
            complete = False
    if not complete:
        ranges.append((lo, hi))
    ranges.reverse()
    return ranges


def verify_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes], root: bytes) -> bool:
    """RFC 9162 2.1.3.2."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: list[bytes]
) -> bool:
    """RFC 9162 2.1.4.2."""
    if not 0 < size1 <= size2:
        return False
    if size1 == size2:
        return not proof and root1 == root2
    if not proof:
        return False
    if size1 & (size1 - 1) == 0:  # a power of two: the old root is the proof's first node
        proof = [root1, *proof]
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn & 1 == 0 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == root1 and sr == root2 and sn == 0


class CompactRange:
    """The roots of the perfect subtrees covering leaves [0, size): appending is O(log n) and
    the root of the tree so far is always at hand (verification of a whole trail)."""

    def __init__(self) -> None:
        self.size = 0
        self._peaks: list[bytes] = []  # largest subtree first
        self.last_block: bytes | None = None  # the hash of the newest complete block

    def append(self, leaf: bytes) -> None:
        peaks = self._peaks
        peaks.append(leaf)
        size = self.size
        height = 0
        while size & 1:
            right = peaks.pop()
            peaks[-1] = node_hash(peaks[-1], right)
            size >>= 1
            height += 1
            if height == BLOCK_HEIGHT:
                self.last_block = peaks[-1]
        self.size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        if not self._peaks:
            return EMPTY_ROOT
        root = self._peaks[-1]
        for peak in reversed(self._peaks[:-1]):
            root = node_hash(peak, root)
        return root

    def peaks(self) -> list[bytes]:
        return list(self._peaks)

    @classmethod
    def from_peaks(cls, size: int, peaks: list[bytes]) -> CompactRange:
        if len(peaks) != size.bit_count():
            raise ValueError("a compact range has one peak per set bit of its size")
        compact = cls()
        compact.size = size
        compact._peaks = list(peaks)
        return compact

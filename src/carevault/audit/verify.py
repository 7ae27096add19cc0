"""Verification of the audit trail, from the database or from an export file.

One pass in sequence order recomputes, for every entry, the chain MAC (with the audit key, when
it is at hand) and the Merkle leaf; at each checkpoint it compares the recomputed root with the
signed one and checks the Ed25519 signature with the published public key. The first problem
found is reported with its sequence number and what it is:

- `missing`: a sequence number is absent (an entry was deleted);
- `inserted`: an entry that does not chain sits where the chain continues without it;
- `reordered`: an entry stands at another sequence number than the one it was written with;
- `modified`: an entry (or a column that repeats it) differs from what was chained or signed;
- `truncated`: a checkpoint signs more entries than the trail holds;
- `bad-signature`: a checkpoint's signature does not verify.

Without the audit key (an auditor holding only the public key) the MACs are not checked, and a
change is still caught at the next signed checkpoint as `modified`.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from carevault.audit import merkle
from carevault.audit.entry import GENESIS_MAC
from carevault.audit.log import Checkpoint, checkpoint_note


@dataclass(frozen=True)
class Problem:
    seq: int
    kind: str  # missing | inserted | reordered | modified | truncated | bad-signature
    message: str


@dataclass(frozen=True)
class Row:
    """An entry as stored: the canonical entry text, its MAC, and the columns that repeat it
    (None when verifying an export, which carries no columns)."""

    seq: int
    entry: str
    mac: bytes
    columns: dict[str, Any] | None = None


@dataclass
class Report:
    first: int
    last: int = 0
    entries: int = 0
    checkpoints: int = 0
    macs_checked: bool = True
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class Start:
    """Where verification begins: entry `seq`, after the chain MAC `previous_mac` and the
    Merkle tree of the `seq - 1` entries before it (as its compact range)."""

    seq: int = 1
    previous_mac: bytes = GENESIS_MAC
    peaks: tuple[bytes, ...] = ()


class Verifier:
    def __init__(
        self,
        mac_key: Any | None,
        public_keys: dict[str, bytes],
        checkpoints: Iterable[Checkpoint],
        start: Start = Start(),
        blocks: dict[int, bytes] | None = None,
    ) -> None:
        self._mac = mac_key
        self._keys = {
            kid: Ed25519PublicKey.from_public_bytes(raw) for kid, raw in public_keys.items()
        }
        self._checkpoints = sorted(
            (c for c in checkpoints if c.size >= start.seq - 1), key=lambda c: c.size
        )
        self._next_checkpoint = 0
        self._expected = start.seq
        self._previous = start.previous_mac
        self._tree = merkle.CompactRange.from_peaks(start.seq - 1, list(start.peaks))
        self._blocks = blocks or {}
        self._block_leaves: list[bytes] = []
        self._pending: Row | None = None  # a row that failed its MAC, pending the next one
        self.report = Report(first=start.seq, macs_checked=mac_key is not None)
        self._check_checkpoints_up_to(start.seq - 1)

    def feed(self, rows: Iterable[Row]) -> Iterator[int]:
        """Verify rows in sequence order; yields after each (for a progress bar). Stops at the
        first problem."""
        for row in rows:
            if self.report.problem is not None:
                return
            self._row(row)
            yield row.seq

    def finish(self, *, whole: bool = True) -> Report:
        """After the last row. `whole`: the rows were the trail's tail, so a checkpoint larger
        than what was read means truncation."""
        if self.report.problem is None and self._pending is not None:
            self._fail(self._pending.seq, "modified", "the entry does not match its chain MAC")
        if self.report.problem is None and whole:
            remaining = self._checkpoints[self._next_checkpoint :]
            if remaining:
                largest = remaining[-1].size
                self._fail(
                    self._expected,
                    "truncated",
                    f"checkpoint {largest} signs {largest} entries but the trail ends at "
                    f"{self._expected - 1}",
                )
        return self.report

    # -- one row ----------------------------------------------------------------------------

    def _row(self, row: Row) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if self._chains(row, self._previous) and _seq_of(row) == pending.seq:
                self._fail(pending.seq, "inserted", "an entry that does not chain was inserted")
                return
            self._fail(pending.seq, "modified", "the entry does not match its chain MAC")
            return
        if row.seq != self._expected:
            self._fail(self._expected, "missing", f"entry {self._expected} is missing")
            return
        try:
            document = orjson.loads(row.entry)
        except orjson.JSONDecodeError:
            self._fail(row.seq, "modified", "the entry is not valid JSON")
            return
        written_as = document.get("seq") if isinstance(document, dict) else None
        if written_as != row.seq:
            kind = "reordered" if isinstance(written_as, int) else "modified"
            self._fail(row.seq, kind, f"entry written as {written_as} stands at {row.seq}")
            return
        if row.columns is not None and not _columns_match(row.columns, document):
            self._fail(row.seq, "modified", "a column differs from the chained entry")
            return
        if self._mac is not None and not self._chains(row, self._previous):
            self._pending = row  # modified, or inserted: the next row tells
            return
        self._accept(row)

    def _chains(self, row: Row, previous: bytes) -> bool:
        if self._mac is None:
            return True
        expected = self._mac.compute(previous + row.entry.encode(), 32)
        return hmac.compare_digest(expected, row.mac)

    def _accept(self, row: Row) -> None:
        leaf = merkle.leaf_hash(row.entry.encode() + row.mac)
        self._tree.append(leaf)
        self._previous = row.mac
        self._expected = row.seq + 1
        self.report.entries += 1
        self.report.last = row.seq
        self._check_block(leaf)
        self._check_checkpoints_up_to(self._tree.size)

    def _check_block(self, leaf: bytes) -> None:
        if not self._blocks:
            return
        index = self._tree.size - 1
        if index % merkle.BLOCK == 0:
            self._block_leaves = []
        self._block_leaves.append(leaf)
        if len(self._block_leaves) == merkle.BLOCK:
            block = index // merkle.BLOCK
            stored = self._blocks.get(block)
            if stored is not None and stored != merkle.root_of(self._block_leaves):
                self._fail(
                    block * merkle.BLOCK + 1,
                    "modified",
                    f"the stored hash of entries {block * merkle.BLOCK + 1}.."
                    f"{(block + 1) * merkle.BLOCK} is not theirs",
                )

    def _check_checkpoints_up_to(self, size: int) -> None:
        while (
            self.report.problem is None
            and self._next_checkpoint < len(self._checkpoints)
            and self._checkpoints[self._next_checkpoint].size <= size
        ):
            checkpoint = self._checkpoints[self._next_checkpoint]
            self._next_checkpoint += 1
            if checkpoint.size < size:
                continue  # before where this verification started: its root is not at hand
            if not self._signed(checkpoint):
                self._fail(
                    checkpoint.size,
                    "bad-signature",
                    f"checkpoint {checkpoint.size}: the signature does not verify",
                )
                return
            if checkpoint.size > 0 and self._tree.root() != checkpoint.root:
                self._fail(
                    checkpoint.size,
                    "modified",
                    f"entries up to {checkpoint.size} do not hash to the root that checkpoint "
                    "signs",
                )
                return
            self.report.checkpoints += 1

    def _signed(self, checkpoint: Checkpoint) -> bool:
        key = self._keys.get(checkpoint.key_id)
        if key is None:
            return False
        try:
            key.verify(
                checkpoint.signature,
                checkpoint_note(checkpoint.size, checkpoint.root, checkpoint.at),
            )
        except InvalidSignature:
            return False
        return True

    def _fail(self, seq: int, kind: str, message: str) -> None:
        if self.report.problem is None:
            self.report.problem = Problem(seq, kind, message)


def _seq_of(row: Row) -> int | None:
    try:
        document = orjson.loads(row.entry)
    except orjson.JSONDecodeError:
        return None
    return document.get("seq") if isinstance(document, dict) else None


_COLUMN_FIELDS = (
    ("at", "at"),
    ("action", "action"),
    ("outcome", "outcome"),
    ("user_id", "user"),
    ("patient_id", "patient"),
)


def _columns_match(columns: dict[str, Any], document: dict[str, Any]) -> bool:
    for column, key in _COLUMN_FIELDS:
        if columns.get(column) != document.get(key):
            return False
    return bool(columns.get("break_glass")) == bool(document.get("break_glass"))


def decode_b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)

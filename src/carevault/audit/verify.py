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


# An entry as stored: (seq, canonical entry text, MAC, columns) where columns repeat fields of
# the entry for filtering (at, action, outcome, user_id, patient_id, break_glass), or None
# when verifying an export, which carries none. Plain tuples: verification reads a million.
Row = tuple[int, str, bytes, tuple[Any, ...] | None]


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
        self._pending: int | None = None  # seq of a row that failed its MAC, until the next
        self.report = Report(first=start.seq, macs_checked=mac_key is not None)
        self._next_size: int | None = None
        self._check_checkpoints_up_to(start.seq - 1)

    def feed(self, rows: Iterable[Row]) -> Iterator[int]:
        """Verify rows in sequence order; yields after each (for a progress bar). Stops at the
        first problem."""
        for row in rows:
            if self.report.problem is not None:
                return
            self._row(*row)
            yield row[0]

    def finish(self, *, whole: bool = True) -> Report:
        """After the last row. `whole`: the rows were the trail's tail, so a checkpoint larger
        than what was read means truncation."""
        if self.report.problem is None and self._pending is not None:
            self._fail(self._pending, "modified", "the entry does not match its chain MAC")
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

    def state(self) -> Start:
        """Where a verification continuing after the rows fed so far would start."""
        return Start(self._expected, self._previous, tuple(self._tree.peaks()))

    # -- one row ----------------------------------------------------------------------------

    def _row(self, seq: int, entry: str, mac: bytes, columns: tuple[Any, ...] | None) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if self._chains(entry, mac, self._previous) and _seq_of(entry) == pending:
                self._fail(pending, "inserted", "an entry that does not chain was inserted")
                return
            self._fail(pending, "modified", "the entry does not match its chain MAC")
            return
        if seq != self._expected:
            self._fail(self._expected, "missing", f"entry {self._expected} is missing")
            return
        try:
            document = orjson.loads(entry)
        except orjson.JSONDecodeError:
            self._fail(seq, "modified", "the entry is not valid JSON")
            return
        written_as = document.get("seq") if isinstance(document, dict) else None
        if written_as != seq:
            kind = "reordered" if isinstance(written_as, int) else "modified"
            self._fail(seq, kind, f"entry written as {written_as} stands at {seq}")
            return
        if columns is not None and not _columns_match(columns, document):
            self._fail(seq, "modified", "a column differs from the chained entry")
            return
        data = entry.encode()
        if self._mac is not None and not hmac.compare_digest(
            self._mac.compute(self._previous + data, 32), mac
        ):
            self._pending = seq  # modified, or inserted: the next row tells
            return
        tree = self._tree
        tree.append(merkle.leaf_hash(data + mac))
        self._previous = mac
        self._expected = seq + 1
        report = self.report
        report.entries += 1
        report.last = seq
        size = tree.size
        if size % merkle.BLOCK == 0 and self._blocks:
            self._check_block(size // merkle.BLOCK - 1)
        if self._next_size is not None and size >= self._next_size:
            self._check_checkpoints_up_to(size)

    def _chains(self, entry: str, mac: bytes, previous: bytes) -> bool:
        if self._mac is None:
            return True
        expected = self._mac.compute(previous + entry.encode(), 32)
        return hmac.compare_digest(expected, mac)

    def _check_block(self, block: int) -> None:
        stored = self._blocks.get(block)
        if stored is not None and stored != self._tree.last_block:
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
        self._next_size = (
            self._checkpoints[self._next_checkpoint].size
            if self._next_checkpoint < len(self._checkpoints)
            else None
        )

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


def _seq_of(entry: str) -> int | None:
    try:
        document = orjson.loads(entry)
    except orjson.JSONDecodeError:
        return None
    return document.get("seq") if isinstance(document, dict) else None


def _columns_match(columns: tuple[Any, ...], document: dict[str, Any]) -> bool:
    at, action, outcome, user_id, patient_id, break_glass = columns
    return (
        at == document.get("at")
        and action == document.get("action")
        and outcome == document.get("outcome")
        and user_id == document.get("user")
        and patient_id == document.get("patient")
        and bool(break_glass) == bool(document.get("break_glass"))
    )

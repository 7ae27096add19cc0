"""The audit trail in the database: appending chained entries, signing checkpoints, serving
Merkle proofs. The only code that writes audit rows.

Sequence numbers come from the database, not from a process: a batch is one atomic INSERT
numbered from the last entry's number, and the primary key lets only one batch take a number,
so any number of workers and instances produce one gap-free chain (a writer that lost the race
reads the tip again under a lock that keeps the other writers out, and re-chains its batch).
The group commit of `writer.py` makes that one INSERT for all the requests waiting on it.

The leaf of entry `seq` (leaf index seq - 1) is `merkle.leaf_hash(entry || mac)`: the canonical
entry bytes followed by its 32-byte chain MAC, so a signed root covers the chain as well.
Checkpoints need no lock: entries never change once committed, so the root over the first n is
the same whoever computes it; two instances signing the same size collide on the primary key
and one insert is simply dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.numeric import Int8
from sqlalchemy import Select, bindparam, insert, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from carevault.audit import merkle
from carevault.audit.entry import GENESIS_MAC, AuditEntry, canonical, chain_mac, format_time
from carevault.crypto.custody import AuditKeys
from carevault.db.engine import (
    URGENT_MAX_DELAY,
    SqliteWriteThread,
    WriteLockWait,
    close_write_connection,
    dedicated_write_connection,
    read_connection,
    write_transaction,
    writer_turn,
)
from carevault.db.key_reads import read_by_key
from carevault.db.tables import audit_blocks, audit_checkpoints, audit_entries, audit_retention

_APPEND_ATTEMPTS = 20
ORIGIN = "carevault audit trail"
_COLUMNS = (
    "seq",
    "at",
    "action",
    "outcome",
    "user_id",
    "patient_id",
    "break_glass",
    "entry",
    "mac",
)
_PG_INSERT = (
    "INSERT INTO audit_entries "
    "(seq, at, action, outcome, user_id, patient_id, break_glass, entry, mac) "
    "SELECT * FROM unnest(%b::bigint[], %b::varchar[], %b::varchar[], %b::varchar[], "
    "%b::varchar[], %b::varchar[], %b::boolean[], %b::text[], %b::bytea[])"
)

_PG_INSERT_ONTO = (
    "INSERT INTO audit_entries "
    "(seq, at, action, outcome, user_id, patient_id, break_glass, entry, mac) "
    "SELECT * FROM unnest(%b::bigint[], %b::varchar[], %b::varchar[], %b::varchar[], "
    "%b::varchar[], %b::varchar[], %b::boolean[], %b::text[], %b::bytea[]) "
    # max() is one step down the primary key's index whatever the plan; `NOT EXISTS (... seq >
    # $1)` got a generic plan that scanned the whole table (11 ms a batch at a million entries).
    "WHERE coalesce((SELECT max(seq) FROM audit_entries), 0) <= %b::bigint"
)
_PG_LOCK = "LOCK TABLE audit_entries IN SHARE ROW EXCLUSIVE MODE"
# The tip: the last entry, or where retention stopped if it removed every entry (its mark is
# never beyond the last entry), or the genesis (no row).
_PG_TIP = (
    "SELECT seq, mac FROM (("
    "SELECT seq, mac FROM audit_entries ORDER BY seq DESC LIMIT 1) UNION ALL ("
    "SELECT up_to, last_mac FROM audit_retention ORDER BY up_to DESC LIMIT 1)"
    ") AS tips ORDER BY seq DESC LIMIT 1"
)


class ChainBroken(Exception):
    """An entry since the last checkpoint does not match its chain MAC: it was changed in the
    database. Nothing is signed over it; `audit verify` names it."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        super().__init__(f"entry {seq} does not match its chain MAC")


class AppendContention(Exception):
    """Other writers appended every time this one tried (extreme contention)."""


class ProofUnavailable(Exception):
    """The sizes asked for are not checkpoints, or the entries were removed by retention."""


@dataclass(frozen=True)
class Checkpoint:
    size: int
    root: bytes
    at: str
    key_id: str
    signature: bytes

    def document(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "root": base64.b64encode(self.root).decode(),
            "timestamp": self.at,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
        }


def checkpoint_note(size: int, root: bytes, at: str) -> bytes:
    """The signed bytes of a checkpoint, in the shape of a transparency-log checkpoint:
    origin, tree size, base64 root hash, timestamp, one per line."""
    return f"{ORIGIN}\n{size}\n{base64.b64encode(root).decode()}\n{at}\n".encode()


@functools.lru_cache(maxsize=64)
def _sqlite_insert(rows: int) -> str:
    """The INSERT of `rows` rows (at most 2,000: 18,000 parameters, within SQLite's 32,766)."""
    one = "(" + ", ".join("?" * len(_COLUMNS)) + ")"
    columns = ", ".join(_COLUMNS)
    # Constant column names and placeholders only: no value is ever part of the text.
    return f"INSERT INTO audit_entries ({columns}) VALUES " + ", ".join([one] * rows)  # noqa: S608


def stored_row(entry: AuditEntry, seq: int, at: str, body: bytes, mac: bytes) -> dict[str, Any]:
    """The stored row of a chained entry: its canonical text, MAC and the filter columns;
    `at` as `format_time` writes it."""
    return {
        "seq": seq,
        "at": at,
        "action": entry.action,
        "outcome": str(entry.outcome),
        "user_id": entry.user,
        "patient_id": entry.patient,
        "break_glass": entry.break_glass,
        "entry": body.decode(),
        "mac": mac,
    }


def leaf_of(entry: bytes, mac: bytes) -> bytes:
    return merkle.leaf_hash(entry + mac)


class AuditLog:
    def __init__(
        self,
        engine: AsyncEngine,
        keys: Callable[[], AuditKeys],
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self._engine = engine
        self._keys = keys  # loaded on first use: the CLI's commands that never audit skip it
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._blocks: dict[int, bytes] = {}  # append-only, so safe to keep
        # Leaf hashes of a prefix of one block (the one the last checkpoint ended in), each of a
        # row whose chain MAC this instance verified: `_LeafCache` says when they are used.
        self._cache = _LeafCache(0, ())
        self._writer: AsyncConnection | None = None  # PostgreSQL
        self._thread = SqliteWriteThread(engine) if engine.dialect.name == "sqlite" else None
        self._tip: tuple[int, bytes] | None = None  # (seq, mac) this process last wrote
        self._append_lock = asyncio.Lock()

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def keys(self) -> AuditKeys:
        return self._keys()

    # -- appending ----------------------------------------------------------------------------

    async def append(self, entries: list[AuditEntry]) -> int:
        """Chain and commit `entries` atomically; the trail's size afterwards.

        SQLite: on the trail's write thread, in one transaction that takes the database's
        write lock (`BEGIN IMMEDIATE`), reads the tip and inserts the batch chained onto it:
        one crossing from the event loop, and the lock held only while its statements run.
        The chain is computed beforehand on the tip this process last wrote, and again on the
        thread only if another worker appended since.

        PostgreSQL: one INSERT statement, committed by itself, chained onto the tip this
        process last saw, that inserts nothing if an entry beyond that tip exists: one round
        trip. If another writer appended since, the batch is chained anew onto the tip read
        under a lock that keeps every other writer out until it commits (the table in SHARE
        ROW EXCLUSIVE mode), so the second try always lands: two round trips, pipelined. The
        primary key is what keeps the chain whole (two batches can never both take a number);
        the condition only spares the refused INSERT of a lost race. With two workers, about a
        third of the appends lost it, each an error in the server's log, a rollback and the
        locked path's five round trips through the pool. The condition reads only the table's
        last number, so it relies on the table never being emptied once written: retention
        appends its own entry before it removes any (audit/archive.py)."""
        async with self._append_lock, writer_turn(self._engine, urgent=True):
            if self._thread is not None:
                return await self._append_on_thread(entries)
            attempts = 0
            while attempts < _APPEND_ATTEMPTS:
                if self._writer is None:
                    self._writer = await dedicated_write_connection(self._engine)
                    self._tip = None
                try:
                    raw = (await self._writer.get_raw_connection()).driver_connection
                    guess = None
                    if self._tip is not None:
                        guess = self._chain(entries, self._tip)
                        if await _pg_insert_onto(raw, guess):
                            self._tip = guess.last
                            return self._tip[0]
                except (IntegrityError, psycopg.IntegrityError):
                    # Another writer's INSERT was uncommitted when this one looked. Under
                    # autocommit the connection is idle again: keep it, and take the lock.
                    guess = None
                except BaseException:
                    await self._drop_writer()  # it may be broken: the next append reconnects
                    raise
                # The tip is unknown or was just lost to another writer: read it under the
                # trail's lock, so that busy writers cannot starve this one.
                try:
                    self._tip = await self._append_locked_pg(raw, entries, guess)
                    return self._tip[0]
                except BaseException as err:
                    # An error in the pipeline skips its transaction's COMMIT and ROLLBACK
                    # alike: the connection is left in a failed transaction. Drop it.
                    self._tip = None
                    await self._drop_writer()
                    if not isinstance(err, IntegrityError | psycopg.IntegrityError):
                        raise
                    attempts += 1  # cannot happen under the lock; bounded all the same
        raise AppendContention("the audit trail's tip kept moving")

    async def _append_on_thread(self, entries: list[AuditEntry]) -> int:
        assert self._thread is not None
        lock_wait = WriteLockWait(URGENT_MAX_DELAY)
        guess = self._chain(entries, self._tip) if self._tip is not None else None
        while True:
            try:
                self._tip = await self._thread.run(
                    functools.partial(self._append_locked, entries, guess)
                )
                return self._tip[0]
            except OperationalError as err:
                await lock_wait.pause(err)  # another process holds the lock; else raised
            except BaseException:
                self._tip = None
                raise

    def _append_locked(
        self, entries: list[AuditEntry], guess: _Chained | None, conn: sqlite3.Connection
    ) -> tuple[int, bytes]:
        """On the write thread: the whole append under the database's write lock."""
        conn.execute("BEGIN IMMEDIATE")
        tip = _sqlite_tip(conn)
        chained = guess if guess is not None and guess.tip == tip else self._chain(entries, tip)
        conn.execute(
            _sqlite_insert(len(chained.rows)), [row[c] for row in chained.rows for c in _COLUMNS]
        )
        conn.execute("COMMIT")
        return chained.last

    def _chain(self, entries: list[AuditEntry], tip: tuple[int, bytes]) -> _Chained:
        mac_key = self.keys.mac
        seq, previous = tip
        at = format_time(self._clock())
        rows = []
        for entry in entries:
            seq += 1
            body = canonical(entry.document(seq, at))
            previous = chain_mac(mac_key, previous, body)
            rows.append(stored_row(entry, seq, at, body, previous))
        return _Chained(tip, (seq, previous), rows)

    async def _append_locked_pg(
        self, raw: psycopg.AsyncConnection[Any], entries: list[AuditEntry], guess: _Chained | None
    ) -> tuple[int, bytes]:
        """PostgreSQL: lock, read the tip, insert, commit, in one transaction of two round
        trips (the statements before the tip's read go with it, the INSERT with the COMMIT)."""
        async with raw.pipeline(), raw.transaction():
            # Blocks every other INSERT (not reads) until this one commits: the tip read here
            # is still the tip when the batch lands, so a writer that lost a race cannot lose
            # again to optimistic ones.
            await raw.execute(_PG_LOCK, prepare=True)
            row = await (await raw.execute(_PG_TIP, prepare=True)).fetchone()
            tip = (row[0], bytes(row[1])) if row else (0, GENESIS_MAC)
            chained = guess if guess is not None and guess.tip == tip else self._chain(entries, tip)
            await raw.execute(_PG_INSERT, _pg_columns(chained), prepare=True)
        return chained.last

    async def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                await close_write_connection(writer)

    async def close(self) -> None:
        await self._drop_writer()
        if self._thread is not None:
            await self._thread.close()

    async def size(self) -> int:
        async with read_connection(self._engine) as conn:
            return (await _tip(conn))[0]

    # -- checkpoints --------------------------------------------------------------------------

    async def latest_checkpoint(self) -> Checkpoint | None:
        async with read_connection(self._engine) as conn:
            row = (
                await conn.execute(
                    select(audit_checkpoints).order_by(audit_checkpoints.c.size.desc()).limit(1)
                )
            ).first()
        return _checkpoint(row) if row else None

    async def checkpoint_at(self, size: int) -> Checkpoint | None:
        async with read_connection(self._engine) as conn:
            row = (
                await conn.execute(
                    select(audit_checkpoints).where(audit_checkpoints.c.size == size)
                )
            ).first()
        return _checkpoint(row) if row else None

    async def checkpoints(self, first: int = 0, last: int | None = None) -> list[Checkpoint]:
        query = select(audit_checkpoints).where(audit_checkpoints.c.size >= first)
        if last is not None:
            query = query.where(audit_checkpoints.c.size <= last)
        async with read_connection(self._engine) as conn:
            rows = (await conn.execute(query.order_by(audit_checkpoints.c.size))).all()
        return [_checkpoint(row) for row in rows]

    async def checkpoint(self, *, unless_covered: int | None = None) -> Checkpoint | None:
        """Sign a tree head over every entry committed so far, unless the latest checkpoint
        already covers them all. Also stores the block hashes completed since.

        With `unless_covered` (the writer of each worker process, which all reach their
        threshold at about the same time): sign nothing and answer the latest checkpoint if one
        of at least that many entries exists, looked at before the work and again just before
        signing, so that a worker finishing second usually finds the first one's checkpoint."""
        size = await self.size()
        latest = await self.latest_checkpoint()
        if size == 0 or (latest is not None and latest.size >= size):
            return latest
        if unless_covered is not None and latest is not None and latest.size >= unless_covered:
            return latest
        root = await self._verified_root(latest.size if latest else 0, size)
        if unless_covered is not None:
            newer = await self.latest_checkpoint()
            if newer is not None and newer.size >= unless_covered:
                return newer
        at = format_time(self._clock())
        keys = self.keys
        signed = Checkpoint(
            size, root, at, keys.key_id, keys.signer.sign(checkpoint_note(size, root, at))
        )
        try:
            async with write_transaction(self._engine) as conn:
                await conn.execute(
                    insert(audit_checkpoints).values(
                        size=signed.size,
                        root=signed.root,
                        at=signed.at,
                        key_id=signed.key_id,
                        signature=signed.signature,
                    )
                )
        except IntegrityError:  # another instance signed this size first
            return await self.checkpoint_at(size)
        return signed

    async def _verified_root(self, signed: int, size: int) -> bytes:
        """The root over entries 1..size, with the chain MACs of entries signed+1..size
        checked (and of any others read), and the block hashes completed since stored.

        The rows are read once, for the MAC check and the leaves alike, up to `size`: from
        `signed` or, if lower, from where the leaves the tree needs stop being at hand (the end
        of those this instance holds for the first block whose hash is not stored, else that
        block's start). Only the leaves of that one block are held between checkpoints.

        Why the held leaves may stand in for rows, and only below `signed`: a leaf is held only
        if this instance checked its row's chain MAC, and a row that passes is the one written
        (nobody without the audit key makes a MAC that chains), so a held leaf is the genuine
        leaf for good: entries never change. Below `signed` that is all it takes: those rows
        are under a signed checkpoint, and any checkpoint was signed only after its signer
        checked them, so the held leaves are the ones it covers. A row changed there since is
        caught by `audit verify` against that signature, whatever is signed now; the new root
        stays consistent with the old one rather than taking up the change. Above `signed`
        nothing vouches for the rows yet: a held leaf there (checked by a checkpoint of ours
        that was never signed: it failed, or was skipped for another process's) would be signed
        over a row that may have been changed since it was checked, and the change would go
        unnoticed until someone ran `audit verify`. So the read always starts at or below
        `signed`, every row it returns is checked again, and a change since raises ChainBroken
        here and signs nothing. Block hashes come from the store as before."""
        complete = size // merkle.BLOCK
        await self._load_blocks(complete)
        missing = [b for b in range(complete) if b not in self._blocks]
        need = (missing[0] if missing else complete) * merkle.BLOCK  # first leaf index needed
        held = self._cache  # a concurrent checkpoint replaces it, never changes it
        start = min(signed, held.end if held.start == need else need)
        read = await self._verified_leaves(start, size)  # leaves start .. size - 1
        # leaves[i - need] is leaf i, need <= i < size
        if start >= need:
            leaves = [*held.leaves[: start - need], *read]
        else:
            leaves = read[need - start :]
        if missing:
            await self._store_blocks(
                {
                    b: merkle.root_of(
                        leaves[b * merkle.BLOCK - need : (b + 1) * merkle.BLOCK - need]
                    )
                    for b in missing
                }
            )
        tail = complete * merkle.BLOCK
        kept = _LeafCache(tail, tuple(leaves[tail - need :]))
        if kept.end >= self._cache.end:  # else a concurrent checkpoint got further
            self._cache = kept
        return merkle.range_hash(0, size, lambda i: leaves[i - need], self._blocks.get)

    async def _verified_leaves(self, start: int, size: int) -> list[bytes]:
        """Leaf hashes of entries start+1 .. size, each entry's chain MAC checked from entry
        `start`'s (the retention mark's if retention removed that entry; the genesis MAC for
        0), in one read. Any entry missing or not chaining, `start` included, is ChainBroken."""
        rows = await self._rows(start, size)
        mac_key = self.keys.mac
        first = 0
        if start == 0:
            previous = GENESIS_MAC
        elif rows and rows[0].seq == start:
            previous, first = rows[0].mac, 1
        else:
            async with read_connection(self._engine) as conn:
                previous = (
                    await conn.execute(
                        select(audit_retention.c.last_mac).where(audit_retention.c.up_to == start)
                    )
                ).scalar()
            if previous is None:
                raise ChainBroken(start)
        expected = start + 1
        leaves = []
        for index in range(first, len(rows)):
            row = rows[index]
            body = row.entry.encode()
            if row.seq != expected or chain_mac(mac_key, previous, body) != row.mac:
                raise ChainBroken(expected)
            leaves.append(leaf_of(body, row.mac))
            previous = row.mac
            expected += 1
        if expected != size + 1:
            raise ChainBroken(expected)
        return leaves

    async def _rows(self, first: int, last: int) -> list[Any]:
        """(seq, entry, mac) of entries first..last, in order: on the driver's own connection
        (`read_by_key`), without SQLAlchemy's row machinery around each of up to a few
        thousand rows."""
        return await read_by_key(self._engine, _RANGE, {"first": first, "last": last})

    # -- Merkle -------------------------------------------------------------------------------

    async def root(self, size: int) -> bytes:
        source = await self._subtrees([(0, size)], size)
        return merkle.range_hash(0, size, source.leaf, source.block)

    async def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        if not 1 <= seq <= size:
            raise ProofUnavailable("seq must be within the tree")
        ranges = merkle.inclusion_ranges(seq - 1, size)
        source = await self._subtrees(ranges, size)
        return [merkle.range_hash(lo, hi, source.leaf, source.block) for lo, hi in ranges]

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        if not 0 < first <= second:
            raise ProofUnavailable("sizes must satisfy 0 < from <= to")
        ranges = merkle.consistency_ranges(first, second)
        source = await self._subtrees(ranges, second)
        return [merkle.range_hash(lo, hi, source.leaf, source.block) for lo, hi in ranges]

    async def leaf_hash(self, seq: int) -> bytes:
        async with read_connection(self._engine) as conn:
            row = (
                await conn.execute(
                    select(audit_entries.c.entry, audit_entries.c.mac).where(
                        audit_entries.c.seq == seq
                    )
                )
            ).first()
        if row is None:
            raise ProofUnavailable("no such entry")
        return leaf_of(row.entry.encode(), row.mac)

    async def _subtrees(self, ranges: Iterable[tuple[int, int]], size: int) -> _Subtrees:
        """Block hashes for every complete block below `size` (computing and storing any not
        stored yet), and the leaves of the partial blocks the ranges touch."""
        complete = size // merkle.BLOCK
        await self._load_blocks(complete)
        missing = [b for b in range(complete) if b not in self._blocks]
        # The recursion of RFC 9162 only ever asks for a range shorter than a block inside one
        # block, and a longer one starting on a block boundary: leaves are needed for the first
        # kind and for the block a range ends inside of.
        partial: set[int] = set()
        for lo, hi in ranges:
            if hi - lo < merkle.BLOCK:
                partial.add(lo // merkle.BLOCK)
            if hi % merkle.BLOCK:
                partial.add((hi - 1) // merkle.BLOCK)
        leaves: dict[int, bytes] = {}
        for block in sorted(set(missing) | partial):
            lo = block * merkle.BLOCK
            hi = min(lo + merkle.BLOCK, size)
            leaves.update(await self._leaves(lo, hi))
        if missing:
            computed = {}
            for block in missing:
                lo = block * merkle.BLOCK
                computed[block] = merkle.root_of([leaves[i] for i in range(lo, lo + merkle.BLOCK)])
            await self._store_blocks(computed)
        return _Subtrees(leaves, self._blocks)

    async def _load_blocks(self, complete: int) -> None:
        if all(b in self._blocks for b in range(complete)):
            return
        async with read_connection(self._engine) as conn:
            rows = (
                await conn.execute(
                    select(audit_blocks.c.block, audit_blocks.c.hash).where(
                        audit_blocks.c.block < complete
                    )
                )
            ).all()
        self._blocks.update({row.block: row.hash for row in rows})

    async def _store_blocks(self, computed: dict[int, bytes]) -> None:
        for block, digest in computed.items():
            try:
                async with write_transaction(self._engine) as conn:
                    await conn.execute(insert(audit_blocks).values(block=block, hash=digest))
            except IntegrityError:
                pass  # stored meanwhile by another instance: the same hash
            self._blocks[block] = digest

    async def _leaves(self, lo: int, hi: int) -> dict[int, bytes]:
        """Leaf hashes of leaf indices [lo, hi) (entries lo+1 .. hi), read from the rows (the
        proofs: not the leaves a checkpoint holds, so that entries removed by retention are
        never proved from memory)."""
        rows = await self._rows(lo + 1, hi)
        if len(rows) != hi - lo:
            raise ProofUnavailable("entries of this range were removed by retention")
        return {row.seq - 1: leaf_of(row.entry.encode(), row.mac) for row in rows}


@dataclass(frozen=True)
class _Chained:
    """A batch chained onto `tip` (seq, mac): its rows, and the new tip `last`."""

    tip: tuple[int, bytes]
    last: tuple[int, bytes]
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class _LeafCache:
    """Leaf hashes `start` .. `end` - 1 of one block (`start` is its first leaf), each of a row
    whose chain MAC a checkpoint of this instance checked (`AuditLog._verified_root`)."""

    start: int
    leaves: tuple[bytes, ...]

    @property
    def end(self) -> int:
        return self.start + len(self.leaves)


@dataclass
class _Subtrees:
    leaves: dict[int, bytes]
    blocks: dict[int, bytes]

    def leaf(self, index: int) -> bytes:
        return self.leaves[index]

    def block(self, index: int) -> bytes | None:
        return self.blocks.get(index)


_TIP = (
    select(audit_entries.c.seq, audit_entries.c.mac).order_by(audit_entries.c.seq.desc()).limit(1)
)
_RANGE = (
    select(audit_entries.c.seq, audit_entries.c.entry, audit_entries.c.mac)
    .where(audit_entries.c.seq >= bindparam("first"), audit_entries.c.seq <= bindparam("last"))
    .order_by(audit_entries.c.seq)
)
# Empty: a new trail, or one whose every entry retention removed.
_RETAINED_TIP = (
    select(audit_retention.c.up_to, audit_retention.c.last_mac)
    .order_by(audit_retention.c.up_to.desc())
    .limit(1)
)


def _pg_columns(chained: _Chained) -> list[list[Any]]:
    """The INSERT's arrays, one a column: sent in binary, which spares the driver escaping
    every quote of the entries' JSON (a multi-row VALUES built by the ORM layer was compiled
    anew for every batch size and cost more than the commit)."""
    return [[row[c] for row in chained.rows] for c in _COLUMNS]


async def _pg_insert_onto(raw: psycopg.AsyncConnection[Any], chained: _Chained) -> bool:
    """Insert `chained` under autocommit if nothing follows the tip it was chained onto;
    whether it landed. A writer whose INSERT is still uncommitted is not seen: the primary key
    then refuses this one (IntegrityError), as before the condition."""
    cursor = await raw.execute(
        _PG_INSERT_ONTO, [*_pg_columns(chained), Int8(chained.tip[0])], prepare=True
    )
    return cursor.rowcount == len(chained.rows)


async def _tip(conn: AsyncConnection) -> tuple[int, bytes]:
    row = (await conn.execute(_TIP)).first() or (await conn.execute(_RETAINED_TIP)).first()
    return (row[0], row[1]) if row else (0, GENESIS_MAC)


def _sqlite_tip(conn: sqlite3.Connection) -> tuple[int, bytes]:
    row = (
        conn.execute(_sqlite_text(_TIP)).fetchone()
        or conn.execute(_sqlite_text(_RETAINED_TIP)).fetchone()
    )
    return (row[0], bytes(row[1])) if row else (0, GENESIS_MAC)


@functools.cache
def _sqlite_text(statement: Select[Any]) -> str:
    return statement.compile(
        dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}
    ).string


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(row.size, row.root, row.at, row.key_id, row.signature)

"""Checkpoints read each row once, and an instance keeps the leaves of the block in progress, on
SQLite and PostgreSQL: a checkpoint reads only the rows since the last one it checked, in one
statement on the driver's connection; its root is the RFC 9162 root over every entry, for sizes
across block boundaries and whichever instance signed before; a row changed after an earlier
checkpoint of this instance checked it still stops the next one unless a signed checkpoint
covers it (and then the new root keeps to the signed one); and a worker that finds another's
checkpoint covering its entries once its work is done signs nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.audit.entry import AuditEntry, Outcome
from carevault.audit.log import AuditLog, ChainBroken
from carevault.audit.writer import AuditWriter
from carevault.config import Settings
from carevault.crypto.custody import KeyCustody
from carevault.db import key_reads
from carevault.db.engine import create_engine, dispose, read_engines
from carevault.db.tables import audit_checkpoints, audit_entries
from tests.audit import rfc9162
from tests.audit.conftest import owner, verify_db


def _entries(n: int, first: int = 0) -> list[AuditEntry]:
    return [
        AuditEntry(
            action="fhir.read",
            outcome=Outcome.permit,
            status=200,
            user=f"user-{(first + i) % 7}",
            patient=f"pat-{(first + i) % 11}",
            resource_type="Observation",
            resource_id=f"obs-{first + i}",
        )
        for i in range(n)
    ]


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    made = create_engine(settings)
    yield made
    await dispose(made)


def _log(settings: Settings, engine: AsyncEngine, keys: Any = None) -> AuditLog:
    return AuditLog(engine, keys or KeyCustody.from_settings(settings).audit_keys)


async def _append(log: AuditLog, n: int) -> None:
    if n > 0:
        await log.append(_entries(n, await log.size()))


async def _leaves(engine: AsyncEngine) -> list[bytes]:
    """Every entry's leaf, from the rows as they are now (independently of AuditLog's reads)."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(audit_entries.c.seq, audit_entries.c.entry, audit_entries.c.mac).order_by(
                    audit_entries.c.seq
                )
            )
        ).all()
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    return [rfc9162.leaf_hash(r.entry.encode() + bytes(r.mac)) for r in rows]


class _Reads:
    """The statements that read audit entries, with the rows each returned: through the
    driver (`key_reads`), and through SQLAlchemy's execution (counted, rows unknown: -1). The
    database is the real one; only the reads are watched on their way back."""

    def __init__(self, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[str, int]] = []
        self._engines = (engine.sync_engine, *read_engines(engine))
        for watched in self._engines:
            event.listen(watched, "after_cursor_execute", self._executed)
        fetch, sqlite_rows = key_reads._fetch, key_reads._sqlite_rows

        async def watched_fetch(conn: Any, sql: str, params: Any) -> Any:
            rows = await fetch(conn, sql, params)
            self._note(sql, len(rows))
            return rows

        def watched_rows(dbapi_connection: Any, sql: str, values: Any) -> Any:
            rows, changed = sqlite_rows(dbapi_connection, sql, values)
            self._note(sql, len(rows))
            return rows, changed

        monkeypatch.setattr(key_reads, "_fetch", watched_fetch)
        monkeypatch.setattr(key_reads, "_sqlite_rows", watched_rows)

    def _note(self, sql: str, rows: int) -> None:
        if "audit_entries.entry" in sql and sql.lstrip().upper().startswith("SELECT"):
            self.reads.append(("driver", rows))

    def _executed(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "audit_entries.entry" in statement and statement.lstrip().upper().startswith("SELECT"):
            self.reads.append(("sqlalchemy", -1))

    def close(self) -> None:
        for watched in self._engines:
            event.remove(watched, "after_cursor_execute", self._executed)


@contextmanager
def _watching(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Reads]:
    reads = _Reads(engine, monkeypatch)
    try:
        yield reads
    finally:
        reads.close()


async def test_each_checkpoint_reads_the_rows_since_the_last_once(
    settings: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _log(settings, engine)
    try:
        await _append(log, 1500)
        with _watching(engine, monkeypatch) as first:
            assert (await log.checkpoint()).size == 1500  # type: ignore[union-attr]
        # a new instance: every row of the first block and of the block in progress, once
        assert first.reads == [("driver", 1500)]

        await _append(log, 300)
        with _watching(engine, monkeypatch) as second:
            assert (await log.checkpoint()).size == 1800  # type: ignore[union-attr]
        # entry 1500 for its MAC (the chain's start) and the 300 since
        assert second.reads == [("driver", 301)]

        await _append(log, 800)  # completes block 1 (leaves 1024..2047)
        with _watching(engine, monkeypatch) as third:
            signed = await log.checkpoint()
        assert signed is not None and signed.size == 2600
        assert third.reads == [("driver", 801)]
        assert signed.root == rfc9162.root_hash(await _leaves(engine))

        with _watching(engine, monkeypatch) as nothing_new:
            assert (await log.checkpoint()) == signed
        assert nothing_new.reads == []
    finally:
        await log.close()


SIZES = (1, 2, 3, 7, 20, 100, 511, 1000, 1023, 1024, 1025, 1030, 1500, 2047, 2048, 2049, 2100)


async def test_roots_match_a_recomputation_across_block_boundaries(
    settings: Settings, engine: AsyncEngine
) -> None:
    """One instance signs at every size, except every third, which another instance (another
    worker) signs first: the kept leaves then end below the latest checkpoint."""
    warm, other = _log(settings, engine), _log(settings, engine)
    try:
        for i, size in enumerate(SIZES):
            await _append(warm, size - await warm.size())
            if i % 3 == 2:
                assert (await other.checkpoint()).size == size  # type: ignore[union-attr]
                await _append(warm, 1)
                size += 1
            signed = await warm.checkpoint()
            assert signed is not None and signed.size == size
            leaves = await _leaves(engine)
            assert signed.root == rfc9162.root_hash(leaves), size
            fresh = _log(settings, engine)
            try:
                assert await fresh.root(size) == signed.root, size
            finally:
                await fresh.close()
        # proofs from the instance that kept leaves agree with the RFC's definitions
        last = (await warm.latest_checkpoint()).size  # type: ignore[union-attr]
        for seq in (1, 1024, 1025, 2048, last):
            assert await warm.inclusion_proof(seq, last) == rfc9162.inclusion_proof(seq - 1, leaves)
        for first in (1000, 1025, 2048):
            if await warm.checkpoint_at(first) is not None:
                assert await warm.consistency_proof(first, last) == rfc9162.consistency_proof(
                    first, leaves
                )
    finally:
        await warm.close()
        await other.close()
    report = verify_db(settings)
    assert report.ok, report.problem


class _FailingSigner:
    def sign(self, data: bytes) -> bytes:
        raise RuntimeError("the process died before signing")


def _change(settings: Settings, seq: int, *, mac: bool = False) -> None:
    with owner(settings) as conn:
        if mac:
            old = conn.execute(
                select(audit_entries.c.mac).where(audit_entries.c.seq == seq)
            ).scalar_one()
            values: dict[str, Any] = {"mac": bytes(reversed(bytes(old)))}
        else:
            entry = conn.execute(
                select(audit_entries.c.entry).where(audit_entries.c.seq == seq)
            ).scalar_one()
            changed = entry.replace('"user-', '"user-x')
            assert changed != entry
            values = {"entry": changed}
        conn.execute(update(audit_entries).where(audit_entries.c.seq == seq).values(**values))


def _signed_sizes(settings: Settings) -> list[int]:
    from carevault.audit import archive

    with archive.connect(settings.sqlalchemy_url) as conn:
        return list(
            conn.execute(select(audit_checkpoints.c.size).order_by(audit_checkpoints.c.size))
            .scalars()
            .all()
        )


@pytest.mark.parametrize("mac", [False, True], ids=["entry", "mac"])
async def test_a_change_to_rows_checked_but_never_signed_stops_the_next_checkpoint(
    settings: Settings, engine: AsyncEngine, mac: bool
) -> None:
    """Rows 101..150 were checked by a checkpoint that was never signed (its process failed
    after the check), and their leaves kept; one is changed afterwards. No signed checkpoint
    vouches for them, so the kept leaves must not stand in for them: the next checkpoint
    checks them again and signs nothing."""
    real = KeyCustody.from_settings(settings).audit_keys
    failing = {"now": False}

    def keys() -> Any:
        loaded = real()
        return dataclasses.replace(loaded, signer=_FailingSigner()) if failing["now"] else loaded

    log = _log(settings, engine, keys=keys)
    try:
        await _append(log, 100)
        assert (await log.checkpoint()).size == 100  # type: ignore[union-attr]
        await _append(log, 50)
        failing["now"] = True
        with pytest.raises(RuntimeError):
            await log.checkpoint()
        failing["now"] = False
        _change(settings, 130, mac=mac)
        await _append(log, 10)
        with pytest.raises(ChainBroken) as broken:
            await log.checkpoint()
        assert broken.value.seq == 130
    finally:
        await log.close()
    assert _signed_sizes(settings) == [100]


async def test_a_change_under_a_signed_checkpoint_is_never_taken_into_a_new_root(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Row 50, under checkpoint 100, is changed. The instance that checked it signs the next
    root over the leaf it checked (consistent with checkpoint 100, so `audit verify` names
    the changed row against it); a new instance, which has to read the block's rows again,
    checks them and refuses to sign."""
    warm = _log(settings, engine)
    try:
        await _append(warm, 100)
        assert (await warm.checkpoint()).size == 100  # type: ignore[union-attr]
        genuine = await _leaves(engine)
        _change(settings, 50)
        await _append(warm, 10)
        signed = await warm.checkpoint()
        assert signed is not None and signed.size == 110
        assert signed.root == rfc9162.root_hash(genuine + (await _leaves(engine))[100:])
        await _append(warm, 5)
    finally:
        await warm.close()
    fresh = _log(settings, engine)
    try:
        with pytest.raises(ChainBroken) as broken:
            await fresh.checkpoint()
        assert broken.value.seq == 50
    finally:
        await fresh.close()
    assert _signed_sizes(settings) == [100, 110]
    problem = verify_db(settings).problem
    assert problem is not None and (problem.kind, problem.seq) == ("modified", 50)


class _Racing(AuditLog):
    """An instance during whose work another worker appends and signs (a test seam: the
    other worker's checkpoint lands between this one's check of the rows and its signing)."""

    other: AuditLog

    async def _verified_root(self, signed: int, size: int) -> bytes:
        root = await super()._verified_root(signed, size)
        await _append(self.other, 10)
        await self.other.checkpoint()
        return root


async def test_a_worker_signs_nothing_when_another_covered_its_entries_meanwhile(
    settings: Settings, engine: AsyncEngine
) -> None:
    keys = KeyCustody.from_settings(settings).audit_keys
    racing, other = _Racing(engine, keys), _log(settings, engine)
    racing.other = other
    try:
        await _append(racing, 300)
        got = await racing.checkpoint(unless_covered=300 - 50)
        assert got is not None and got.size == 310  # the other worker's
        assert _signed_sizes(settings) == [310]
        # without the bound (a timer, the CLI), it signs what it computed
        await _append(racing, 5)
        got = await racing.checkpoint()
        assert got is not None and got.size == 315
        assert _signed_sizes(settings) == [310, 315, 325]
        # a bound the other's checkpoint does not reach: signed as well
        await _append(racing, 100)
        got = await racing.checkpoint(unless_covered=436)
        assert got is not None and got.size == 425
        assert _signed_sizes(settings) == [310, 315, 325, 425, 435]
    finally:
        await racing.close()
        await other.close()
    report = verify_db(settings)
    assert report.ok, report.problem


async def test_a_writer_alone_still_signs_every_interval(
    settings: Settings, engine: AsyncEngine
) -> None:
    log = _log(settings, engine)
    writer = AuditWriter(log, checkpoint_every=100)
    try:
        for i in range(90):
            await writer.write(_entries(7, 7 * i))
            await writer.drain()
    finally:
        await log.close()
    signed = _signed_sizes(settings)
    assert signed[0] == 7  # the first write after a start
    gaps = [b - a for a, b in zip(signed, signed[1:], strict=False)]
    assert gaps and all(100 <= gap <= 100 + 7 for gap in gaps), signed
    assert 630 - signed[-1] < 100 + 7

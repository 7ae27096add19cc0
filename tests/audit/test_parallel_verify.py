"""Verifying a trail in parallel ranges gives the verdict of one pass: the same sequence number
and kind for every tampering, the same counts when nothing was touched, on SQLite and on
PostgreSQL.

The trail: 4,200 entries, checkpoints at 1,000, 2,048, 3,000 and 4,200. Split over three
processes it verifies as 1..1024, 1025..2048 and 2049..4200: the attacks sit inside a range, on
both sides of a boundary and on the stored state a range starts from (the block hashes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, delete, insert, update

from carevault.audit import archive, parallel
from carevault.audit.log import AuditLog
from carevault.config import Settings
from carevault.crypto.custody import KeyCustody
from carevault.db.engine import create_engine, dispose
from carevault.db.tables import audit_blocks, audit_checkpoints, audit_entries
from tests.audit.conftest import owner, verify_db
from tests.audit.test_tamper import (
    _document,
    _entry,
    _forged_row,
    _move,
    _restore,
    _set_document,
    _shift_up_from,
    _snapshot,
    templates,  # noqa: F401 - the module's trail per store
)

SIZE = 4200
CHECKPOINTS = (1000, 2048, 3000, 4200)
PARALLEL = {"processes": 3, "min_range": 1}
SERIAL = {"processes": 1}


async def _build(settings: Settings) -> None:
    engine = create_engine(settings)
    trail = AuditLog(engine, KeyCustody.from_settings(settings).audit_keys)
    try:
        written = 0
        for size in CHECKPOINTS:
            while written < size:
                batch = min(300, size - written)
                await trail.append([_entry(written + k + 1) for k in range(batch)])
                written += batch
            assert (await trail.checkpoint()).size == size  # also stores the block hashes
    finally:
        await trail.close()
        await dispose(engine)


@pytest.fixture
async def long_trail(store: str, templates: dict[str, Any]) -> Settings:  # noqa: F811
    if store not in templates:
        settings = templates["settings_for"](store)
        await _build(settings)
        templates[store] = (settings, _snapshot(settings))
    settings, snapshot = templates[store]
    _restore(settings, snapshot)
    return settings  # type: ignore[no-any-return]


def test_split_is_block_aligned() -> None:
    assert parallel.split(1, 4200, 3, 1) == [
        parallel.Range(1, 1024, False),
        parallel.Range(1025, 2048, False),
        parallel.Range(2049, 4200, True),
    ]
    assert parallel.split(1, 4200, 3, 10_000) == [parallel.Range(1, 4200, True)]
    assert parallel.split(1, 1000, 8, 1) == [parallel.Range(1, 1000, True)]
    for part in parallel.split(5000, 1_000_000, 7, 1)[1:]:
        assert (part.first - 1) % 1024 == 0


def test_ranges_verify_and_stitch(long_trail: Settings) -> None:
    """The parallel path itself (no fallback) verifies every entry and checkpoint."""
    keys = KeyCustody.from_settings(long_trail).audit_keys()
    ranges = parallel.split(1, SIZE, 3, 1)
    with archive.connect(long_trail.sqlalchemy_url) as conn:
        signed, blocks = archive.checkpoints(conn), archive.blocks(conn)
    seen: list[int] = []
    report, first_bad = parallel.verify_ranges(
        long_trail.sqlalchemy_url, keys, ranges, signed, blocks, seen.append
    )
    assert first_bad is None
    assert (report.first, report.last, report.entries) == (1, SIZE, SIZE)
    assert report.checkpoints == len(CHECKPOINTS) and report.macs_checked
    assert sum(seen) == SIZE  # progress from every process

    # A stored block hash is the state the next range starts from: the stitch refuses it.
    with owner(long_trail) as conn:
        conn.execute(update(audit_blocks).where(audit_blocks.c.block == 1).values(hash=b"x" * 32))
    with archive.connect(long_trail.sqlalchemy_url) as conn:
        blocks = archive.blocks(conn)
    _, first_bad = parallel.verify_ranges(
        long_trail.sqlalchemy_url, keys, ranges, signed, blocks, None
    )
    assert first_bad == 1025


def test_untampered_counts_match_one_pass(long_trail: Settings) -> None:
    serial, parallel_report = verify_db(long_trail, **SERIAL), verify_db(long_trail, **PARALLEL)
    assert serial.ok and parallel_report.ok
    assert parallel_report == serial
    assert (serial.first, serial.last, serial.entries, serial.checkpoints) == (
        1,
        SIZE,
        SIZE,
        len(CHECKPOINTS),
    )
    for bounds in ({"first": 900, "last": 3100}, {"first": 1025}, {"last": 2048}):
        assert verify_db(long_trail, **bounds, **PARALLEL) == verify_db(
            long_trail, **bounds, **SERIAL
        )


def _modify(seq: int) -> Callable[[Connection], None]:
    def attack(conn: Connection) -> None:
        document = _document(conn, seq)
        document["id"] = "obs-other"
        _set_document(conn, seq, document)

    return attack


def _modify_mac(seq: int) -> Callable[[Connection], None]:
    def attack(conn: Connection) -> None:
        conn.execute(
            update(audit_entries).where(audit_entries.c.seq == seq).values(mac=os.urandom(32))
        )

    return attack


def _delete(seq: int) -> Callable[[Connection], None]:
    return lambda conn: conn.execute(delete(audit_entries).where(audit_entries.c.seq == seq))


def _insert_forged(seq: int) -> Callable[[Connection], None]:
    def attack(conn: Connection) -> None:
        forged = _forged_row(conn, seq, like=seq)
        _shift_up_from(conn, seq)
        conn.execute(insert(audit_entries).values(**forged))

    return attack


def _swap(a: int, b: int) -> Callable[[Connection], None]:
    def attack(conn: Connection) -> None:
        _move(conn, a, -1)
        _move(conn, b, a)
        _move(conn, -1, b)

    return attack


def _truncate_after(seq: int) -> Callable[[Connection], None]:
    return lambda conn: conn.execute(delete(audit_entries).where(audit_entries.c.seq > seq))


def _bad_signature(size: int) -> Callable[[Connection], None]:
    return lambda conn: conn.execute(
        update(audit_checkpoints)
        .where(audit_checkpoints.c.size == size)
        .values(signature=os.urandom(64))
    )


def _bad_block(block: int) -> Callable[[Connection], None]:
    return lambda conn: conn.execute(
        update(audit_blocks).where(audit_blocks.c.block == block).values(hash=os.urandom(32))
    )


ATTACKS: dict[str, tuple[Callable[[Connection], None], str, int]] = {
    # name: (attack, kind, seq), as one pass reports them
    "modify-in-first-range": (_modify(500), "modified", 500),
    "modify-in-middle-range": (_modify(1500), "modified", 1500),
    "modify-last-of-a-range": (_modify(2048), "modified", 2048),
    "modify-first-of-a-range": (_modify(2049), "modified", 2049),
    "mac-of-last-of-a-range": (_modify_mac(2048), "modified", 2048),
    "delete-last-of-a-range": (_delete(2048), "missing", 2048),
    "delete-first-of-a-range": (_delete(2049), "missing", 2049),
    "insert-at-a-boundary": (_insert_forged(2049), "inserted", 2049),
    "swap-across-a-boundary": (_swap(2048, 2049), "reordered", 2048),
    "swap-between-ranges": (_swap(700, 3500), "reordered", 700),
    "truncate-tail": (_truncate_after(3100), "truncated", 3101),
    "truncate-at-a-boundary": (_truncate_after(2048), "truncated", 2049),
    "signature-at-a-boundary": (_bad_signature(2048), "bad-signature", 2048),
    "signature-in-last-range": (_bad_signature(3000), "bad-signature", 3000),
    "block-hash-a-range-starts-from": (_bad_block(1), "modified", 1025),
    "two-problems-first-wins": (
        lambda conn: (_modify(3500)(conn), _delete(1200)(conn)),
        "missing",
        1200,
    ),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_parallel_names_what_one_pass_names(long_trail: Settings, name: str) -> None:
    attack, kind, seq = ATTACKS[name]
    with owner(long_trail) as conn:
        attack(conn)
    serial = verify_db(long_trail, **SERIAL)
    assert serial.problem is not None and (serial.problem.kind, serial.problem.seq) == (kind, seq)
    assert verify_db(long_trail, **PARALLEL) == serial

"""Concurrent writers: separate processes, each with its own engine and AuditWriter over the same
database, append many entries at once (several requests' worth per process, so group commit
batches them) while another process keeps signing checkpoints. Afterwards the trail verifies,
its sequence numbers are exactly 1..N with N the number of entries written, every entry written
is there once, and each process's writes kept their order and stayed contiguous.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from carevault.audit.entry import AuditEntry, Outcome
from carevault.audit.log import AuditLog
from carevault.audit.writer import AuditWriter
from carevault.config import Settings
from carevault.crypto.custody import KeyCustody
from carevault.db.engine import create_engine, dispose
from carevault.db.tables import audit_blocks, audit_checkpoints, audit_entries

WRITERS = 8  # processes
TASKS = 5  # concurrent "requests" per process
WRITES = 20  # writes per task, 1..3 entries each
CHECKPOINT_EVERY = 150
TIMEOUT = 120.0


def _entries_of(write: int) -> int:
    return 1 + write % 3


EXPECTED = WRITERS * TASKS * sum(_entries_of(w) for w in range(WRITES))


def _settings(data_dir: str, database_url: str | None) -> Settings:
    return Settings(data_dir=Path(data_dir), database_url=database_url)


async def _write(data_dir: str, database_url: str | None, index: int, barrier: Any) -> None:
    settings = _settings(data_dir, database_url)
    engine = create_engine(settings)
    trail = AuditLog(engine, KeyCustody.from_settings(settings).audit_keys)
    trail.keys  # noqa: B018 - load the keys before the start line, not inside the race
    writer = AuditWriter(trail, checkpoint_every=CHECKPOINT_EVERY)

    async def task(t: int) -> None:
        for w in range(WRITES):
            await writer.write(
                [
                    AuditEntry(
                        action="test.concurrent",
                        outcome=Outcome.permit,
                        user=f"writer-{index}",
                        patient=f"pat-{(index + t + w) % 5}",
                        detail={"p": index, "t": t, "w": w, "k": k},
                    )
                    for k in range(_entries_of(w))
                ]
            )

    await asyncio.to_thread(barrier.wait)
    try:
        await asyncio.gather(*(task(t) for t in range(TASKS)))
        await writer.drain()
    finally:
        await trail.close()
        await dispose(engine)


def writer_process(data_dir: str, database_url: str | None, index: int, barrier: Any) -> None:
    asyncio.run(_write(data_dir, database_url, index, barrier))


async def _checkpoints(data_dir: str, database_url: str | None, barrier: Any, done: Any) -> None:
    settings = _settings(data_dir, database_url)
    engine = create_engine(settings)
    trail = AuditLog(engine, KeyCustody.from_settings(settings).audit_keys)
    trail.keys  # noqa: B018
    await asyncio.to_thread(barrier.wait)
    try:
        while not done.is_set():
            await trail.checkpoint()
            await asyncio.sleep(0.05)
    finally:
        await dispose(engine)


def checkpoint_process(data_dir: str, database_url: str | None, barrier: Any, done: Any) -> None:
    asyncio.run(_checkpoints(data_dir, database_url, barrier, done))


def _run_processes(settings: Settings) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS + 2)
    done = ctx.Event()
    args = (str(settings.data_dir), settings.database_url)
    writers = [ctx.Process(target=writer_process, args=(*args, i, barrier)) for i in range(WRITERS)]
    signer = ctx.Process(target=checkpoint_process, args=(*args, barrier, done))
    for process in (*writers, signer):
        process.start()
    try:
        barrier.wait(timeout=TIMEOUT)  # everyone loaded: go
        for process in writers:
            process.join(TIMEOUT)
        done.set()
        signer.join(TIMEOUT)
        codes = [p.exitcode for p in (*writers, signer)]
        assert codes == [0] * (WRITERS + 1), f"a process failed or hung: exit codes {codes}"
    finally:
        for process in (*writers, signer):
            if process.is_alive():
                process.kill()
                process.join()


async def test_concurrent_writers_and_checkpoints_make_one_gap_free_chain(
    settings: Settings,
) -> None:
    await asyncio.to_thread(_run_processes, settings)

    from carevault.audit import archive  # here: the writer processes need not load it
    from tests.audit.conftest import verify_db

    with archive.connect(settings.sqlalchemy_url) as conn:
        rows = conn.execute(
            select(audit_entries.c.seq, audit_entries.c.entry).order_by(audit_entries.c.seq)
        ).all()
        signed = conn.execute(select(audit_checkpoints.c.size)).scalars().all()
        stored_blocks = conn.execute(select(audit_blocks.c.block)).scalars().all()

    # exactly 1..N, N == everything written, each entry once
    seqs = [r.seq for r in rows]
    assert len(seqs) == EXPECTED
    assert seqs == list(range(1, EXPECTED + 1))
    documents = [orjson.loads(r.entry) for r in rows]
    assert [d["seq"] for d in documents] == seqs
    keys = Counter(tuple(d["detail"][f] for f in "ptwk") for d in documents)
    assert len(keys) == EXPECTED and max(keys.values()) == 1

    # one write's entries are one run of numbers; a task's writes keep their order
    by_write: dict[tuple[int, int, int], list[int]] = {}
    for d in documents:
        detail = d["detail"]
        by_write.setdefault((detail["p"], detail["t"], detail["w"]), []).append(d["seq"])
    for (p, t, w), numbers in by_write.items():
        assert numbers == list(range(numbers[0], numbers[0] + _entries_of(w))), (p, t, w)
    for p in range(WRITERS):
        for t in range(TASKS):
            firsts = [by_write[(p, t, w)][0] for w in range(WRITES)]
            assert firsts == sorted(firsts), (p, t)
    # the processes really interleaved: no process wrote all its entries in one stretch
    owners = [d["detail"]["p"] for d in documents]
    switches = sum(1 for a, b in zip(owners, owners[1:], strict=False) if a != b)
    assert switches >= 2 * WRITERS

    # checkpoints signed concurrently, block hashes stored by several processes: all agree
    assert len(signed) >= 3 and max(signed) <= EXPECTED
    assert sorted(stored_blocks) == list(range(len(stored_blocks)))
    report = verify_db(settings)
    assert report.ok, report.problem
    assert report.entries == EXPECTED and report.checkpoints == len(signed)


async def test_a_lost_race_on_postgresql_takes_the_lock_without_a_refused_insert(
    settings: Settings,
) -> None:
    """Two trails (two workers) on one PostgreSQL database: when the other appended since, an
    append chained onto a stale tip inserts nothing and takes the locked path, rather than
    sending an INSERT the primary key refuses (an error in the server's log and a rollback
    each time: about a third of the appends with two busy workers)."""
    if settings.database_url is None:
        pytest.skip("the optimistic INSERT and its lock are PostgreSQL's path")
    engine = create_engine(settings)
    keys = KeyCustody.from_settings(settings).audit_keys
    first, second = AuditLog(engine, keys), AuditLog(engine, keys)
    try:
        entry = AuditEntry(action="test.race", outcome=Outcome.permit, user="u", patient="p")
        await first.append([entry])
        await second.append([entry, entry])  # the tip `first` knows is stale now
        assert first._writer is not None
        raw = (await first._writer.get_raw_connection()).driver_connection
        sent: list[tuple[str, str | None]] = []
        execute = raw.execute

        async def watched(query: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                cursor = await execute(query, *args, **kwargs)
            except Exception as err:
                sent.append((str(query).split()[0], type(err).__name__))
                raise
            sent.append((str(query).split()[0], None))
            return cursor

        raw.execute = watched  # type: ignore[method-assign]
        assert await first.append([entry]) == 4
        assert sent == [("INSERT", None), ("LOCK", None), ("SELECT", None), ("INSERT", None)]
        await first.append([entry])  # its own tip again: one statement
        assert sent[4:] == [("INSERT", None)]
    finally:
        await first.close()
        await second.close()
        await dispose(engine)
    async with create_engine(settings).connect() as conn:
        seqs = (await conn.execute(select(audit_entries.c.seq))).scalars().all()
    assert sorted(seqs) == [1, 2, 3, 4, 5]
    from tests.audit.conftest import verify_db  # as above

    report = verify_db(settings)
    assert report.ok, report.problem

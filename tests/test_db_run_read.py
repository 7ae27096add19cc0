"""`run_read`: the hot reads' one-call path, a read-only connection on a worker thread (on
SQLite, reads by key on the event loop's own connection)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from carevault.db.engine import dispose, run_read, write_transaction
from carevault.db.tables import users
from carevault.runtime import Services

NOW = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)


@pytest.mark.parametrize("by_key", [False, True], ids=["threads", "by-key"])
async def test_a_read_sees_what_a_write_transaction_committed(
    services: Services, by_key: bool
) -> None:
    engine = services.engine
    before = await run_read(
        engine, lambda conn: conn.execute(select(users.c.id)).all(), by_key=by_key
    )
    async with write_transaction(engine) as conn:
        await conn.execute(
            users.insert().values(
                id="u-run-read",
                username="run.read",
                password_hash="x",
                roles=["physician"],
                created_at=NOW,
                updated_at=NOW,
            )
        )
    after = await run_read(
        engine, lambda conn: conn.execute(select(users.c.id)).all(), by_key=by_key
    )
    assert {r.id for r in after} - {r.id for r in before} == {"u-run-read"}


async def test_reads_leave_the_event_loop_thread(services: Services) -> None:
    loop_thread = threading.get_ident()
    ran_on = await run_read(services.engine, lambda conn: threading.get_ident())
    assert ran_on != loop_thread


@pytest.mark.parametrize("by_key", [False, True], ids=["threads", "by-key"])
async def test_read_connections_refuse_to_write(services: Services, by_key: bool) -> None:
    """A read path that tried to write (a bug, or SQL smuggled into one) cannot: SQLite's
    connection is `query_only`, PostgreSQL's transactions are read-only; nothing changes."""

    def write(conn):  # type: ignore[no-untyped-def]
        conn.execute(text("DELETE FROM users"))

    count = await run_read(
        services.engine, lambda conn: conn.execute(text("SELECT count(*) FROM users")).scalar()
    )
    with pytest.raises(DBAPIError, match="readonly|read-only"):
        await run_read(services.engine, write, by_key=by_key)
    after = await run_read(
        services.engine, lambda conn: conn.execute(text("SELECT count(*) FROM users")).scalar()
    )
    assert after == count


async def test_reads_by_key_stay_on_the_loop_on_sqlite_only(services: Services) -> None:
    """On SQLite a read by key skips the crossing to a thread; PostgreSQL's is a network
    round trip, which must never hold the loop up."""
    loop_thread = threading.get_ident()
    ran_on = await run_read(services.engine, lambda conn: threading.get_ident(), by_key=True)
    assert (ran_on == loop_thread) == (services.engine.dialect.name == "sqlite")


async def test_a_locked_sqlite_database_sends_reads_by_key_to_the_threads(
    tmp_path: Path,
) -> None:
    """Another process holding the database exclusively (as while it recovers a crashed
    writer's log) must not stall the event loop: the read by key does not wait on the loop,
    it waits on a worker thread, and answers once the lock is gone."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    holder.execute("INSERT INTO t VALUES (7)")
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("COMMIT")  # exclusive mode: the lock stays until the connection closes
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    released = asyncio.get_running_loop().call_later(0.3, holder.close)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        loop_thread = threading.get_ident()
        ran_on, found = await run_read(
            engine,
            lambda conn: (
                threading.get_ident(),
                conn.execute(text("SELECT id FROM t WHERE id = 7")).scalar(),
            ),
            by_key=True,
        )
    finally:
        ticker.cancel()
        released.cancel()
        holder.close()
        await dispose(engine)
    assert ran_on != loop_thread  # it went to a worker thread ...
    assert found == 7
    assert ticks >= 10  # ... and the loop ran on while it waited (0.3 s: ~30 ticks)

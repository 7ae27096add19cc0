"""`run_read`: the hot reads' one-call path: a read-only connection on a worker thread, or on
SQLite first the event loop's own, with a budget."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from carevault.db.engine import dispose, run_read, write_transaction
from carevault.db.tables import users
from carevault.runtime import Services
from tests.loop_ticks import ticking

NOW = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)


async def test_a_read_sees_what_a_write_transaction_committed(services: Services) -> None:
    """Also: a read on the loop's held connection leaves no transaction open behind it (its
    old snapshot would hide the write)."""
    engine = services.engine
    before = await run_read(engine, lambda conn: conn.execute(select(users.c.id)).all())
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
    after = await run_read(engine, lambda conn: conn.execute(select(users.c.id)).all())
    assert {r.id for r in after} - {r.id for r in before} == {"u-run-read"}


async def test_a_read_that_runs_no_statement_leaves_no_snapshot(services: Services) -> None:
    """The loop's connection begins the read's transaction itself: it must end even when
    `work` sent nothing through SQLAlchemy, or every later read would see the past."""
    await run_read(services.engine, lambda conn: None)
    await test_a_read_sees_what_a_write_transaction_committed(services)


def _write(conn):  # type: ignore[no-untyped-def]
    conn.execute(text("DELETE FROM users"))


def _slow_then_write(conn):  # type: ignore[no-untyped-def]
    conn.execute(_SLOW).scalar()  # over the loop's budget: SQLite ends up on a thread
    conn.execute(text("DELETE FROM users"))


@pytest.mark.parametrize("work", [_write, _slow_then_write], ids=["short", "long"])
async def test_read_connections_refuse_to_write(services: Services, work: Any) -> None:
    """A read path that tried to write (a bug, or SQL smuggled into one) cannot: SQLite's
    connections (the loop's, and the threads' a long read ends up on) are `query_only`,
    PostgreSQL's transactions are read-only; nothing changes."""
    count = await run_read(
        services.engine, lambda conn: conn.execute(text("SELECT count(*) FROM users")).scalar()
    )
    with pytest.raises(DBAPIError, match="readonly|read-only"):
        await run_read(services.engine, work)
    after = await run_read(
        services.engine, lambda conn: conn.execute(text("SELECT count(*) FROM users")).scalar()
    )
    assert after == count


async def test_reads_stay_on_the_loop_on_sqlite_only(services: Services) -> None:
    """On SQLite a short read skips the crossing to a thread; PostgreSQL's is a network
    round trip, which must never hold the loop up."""
    loop_thread = threading.get_ident()
    ran_on = await run_read(services.engine, lambda conn: threading.get_ident())
    assert (ran_on == loop_thread) == (services.engine.dialect.name == "sqlite")


# Counts to two million in SQLite's virtual machine: ~0.3 s, far over the loop's budget.
_SLOW = text(
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000000) "
    "SELECT count(*) FROM n"
)


async def test_a_long_read_leaves_the_loop_for_a_thread(services: Services) -> None:
    """A read over the loop's budget is interrupted there and done in full on a thread: the
    loop runs on meanwhile, and the answer is whole."""
    loop_thread = threading.get_ident()
    (ran_on, count), ticks = await ticking(
        lambda: run_read(
            services.engine,
            lambda conn: (threading.get_ident(), conn.execute(_SLOW).scalar()),
        )
    )
    assert count == 2_000_000
    assert ran_on != loop_thread
    assert ticks >= 5


async def test_a_locked_sqlite_database_sends_reads_to_the_threads(tmp_path: Path) -> None:
    """Another process holding the database exclusively (as while it recovers a crashed
    writer's log) must not stall the event loop: the read does not wait on the loop, it waits
    on a worker thread, and answers once the lock is gone."""
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
    try:
        loop_thread = threading.get_ident()
        (ran_on, found), ticks = await ticking(
            lambda: run_read(
                engine,
                lambda conn: (
                    threading.get_ident(),
                    conn.execute(text("SELECT id FROM t WHERE id = 7")).scalar(),
                ),
            )
        )
    finally:
        released.cancel()
        holder.close()
        await dispose(engine)
    assert ran_on != loop_thread  # it went to a worker thread ...
    assert found == 7
    assert ticks >= 10  # ... and the loop ran on while it waited (0.3 s: ~30 ticks)


async def test_reads_survive_the_server_closing_their_connections(services: Services) -> None:
    """The read pool pings no connection before use; when PostgreSQL has closed its connection
    (a restart, a failover, an idle timeout) the read runs again on a new one instead of
    failing."""
    engine = services.engine
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite's connections are files")

    def backend(conn):  # type: ignore[no-untyped-def]
        return conn.execute(text("SELECT pg_backend_pid()")).scalar()

    before = await run_read(engine, backend)  # the pool's only connection, so far
    async with engine.connect() as admin:
        killed = (
            await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": before})
        ).scalar()
        await admin.rollback()
    assert killed
    after = await run_read(engine, backend)
    assert after != before
    count = await run_read(
        engine, lambda conn: conn.execute(text("SELECT count(*) FROM users")).scalar()
    )
    assert count is not None


async def test_a_read_that_starts_past_its_budget_goes_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's progress handler may run during the read's own BEGIN (its step counter
    accumulates over the cached statement's runs); if the loop's budget is already spent by
    then (the loop thread waited for the GIL), the read must still go to a thread, not fail
    with the driver's bare "interrupted" (it was once a 500 under load)."""
    import carevault.db.engine as db_engine

    monkeypatch.setattr(db_engine, "_PROGRESS_STEPS", 1)  # the handler runs on every step
    monkeypatch.setattr(db_engine, "_LOOP_BUDGET_SECONDS", -1.0)  # and finds the budget spent
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'spent.db'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO t VALUES (7)"))
        loop_thread = threading.get_ident()
        for _ in range(3):  # the held connection stays usable
            ran_on, found = await run_read(
                engine,
                lambda conn: (
                    threading.get_ident(),
                    conn.execute(text("SELECT id FROM t WHERE id = 7")).scalar(),
                ),
            )
            assert (ran_on != loop_thread, found) == (True, 7)
    finally:
        await dispose(engine)

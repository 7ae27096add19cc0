"""`run_read`: the hot reads' one-call path, a read-only connection on a worker thread."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from carevault.db.engine import run_read, write_transaction
from carevault.db.tables import users
from carevault.runtime import Services

NOW = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)


async def test_a_read_sees_what_a_write_transaction_committed(services: Services) -> None:
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


async def test_reads_leave_the_event_loop_thread(services: Services) -> None:
    loop_thread = threading.get_ident()
    ran_on = await run_read(services.engine, lambda conn: threading.get_ident())
    assert ran_on != loop_thread


async def test_read_connections_refuse_to_write(services: Services) -> None:
    """A read path that tried to write (a bug, or SQL smuggled into one) cannot: SQLite's
    connection is `query_only`, PostgreSQL's transactions are read-only; nothing changes."""

    def write(conn):  # type: ignore[no-untyped-def]
        conn.execute(text("DELETE FROM users"))

    count = await run_read(
        services.engine, lambda conn: conn.execute(text("SELECT count(*) FROM users")).scalar()
    )
    with pytest.raises(DBAPIError, match="readonly|read-only"):
        await run_read(services.engine, write)
    after = await run_read(
        services.engine, lambda conn: conn.execute(text("SELECT count(*) FROM users")).scalar()
    )
    assert after == count

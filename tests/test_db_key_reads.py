"""`read_by_key`: the hot reads by key; on PostgreSQL on psycopg's own asyncio connections."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import psycopg
import pytest
from sqlalchemy import bindparam, func, select, text
from sqlalchemy.exc import DBAPIError

from carevault.db import key_reads
from carevault.db.engine import run_read, write_transaction
from carevault.db.key_reads import read_by_key
from carevault.db.tables import users
from carevault.runtime import Services

NOW = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
_BY_NAME = select(users.c.id, users.c.username, users.c.roles).where(
    users.c.username == bindparam("username")
)


async def _add_user(services: Services, user_id: str, username: str) -> None:
    async with write_transaction(services.engine) as conn:
        await conn.execute(
            users.insert().values(
                id=user_id,
                username=username,
                password_hash="x",
                roles=["physician"],
                created_at=NOW,
                updated_at=NOW,
            )
        )


async def test_rows_match_what_sqlalchemy_reads(services: Services) -> None:
    await _add_user(services, "u-key-read", "key.read")
    rows = await read_by_key(services.engine, _BY_NAME, {"username": "key.read"})
    expected = await run_read(
        services.engine, lambda conn: conn.execute(_BY_NAME, {"username": "key.read"}).all()
    )
    assert [tuple(r) for r in rows] == [tuple(r) for r in expected]
    assert rows[0].id == "u-key-read" and rows[0].username == "key.read"
    assert await read_by_key(services.engine, _BY_NAME, {"username": "nobody"}) == []


async def test_a_read_sees_the_latest_commit(services: Services) -> None:
    """Autocommit connections held between reads: none keeps an old snapshot."""
    assert await read_by_key(services.engine, _BY_NAME, {"username": "later"}) == []
    await _add_user(services, "u-later", "later")
    rows = await read_by_key(services.engine, _BY_NAME, {"username": "later"})
    assert [r.id for r in rows] == ["u-later"]


async def test_parameters_are_bound_never_spliced(services: Services) -> None:
    hostile = "x' OR '1'='1"
    await _add_user(services, "u-plain", "plain")
    assert await read_by_key(services.engine, _BY_NAME, {"username": hostile}) == []


def _postgres(services: Services) -> None:
    if services.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite's reads by key are run_read's")


async def test_the_connections_refuse_to_write(services: Services) -> None:
    """Even a SELECT that would change something (here: advance a sequence) is refused."""
    _postgres(services)
    async with write_transaction(services.engine) as conn:
        await conn.execute(text("CREATE SEQUENCE IF NOT EXISTS key_reads_probe"))
    advance = select(text("nextval('key_reads_probe') AS n")).where(
        bindparam("x") == bindparam("x")
    )
    with pytest.raises(DBAPIError) as raised:  # as SQLAlchemy's: callers catch those
        await read_by_key(services.engine, advance, {"x": 1})
    assert isinstance(raised.value.orig, psycopg.errors.ReadOnlySqlTransaction)


async def terminate_idle(services: Services, pool: Any) -> None:
    """What a restart, a failover or `idle_session_timeout` does to a driver pool's idle
    connections: the server ends their backends."""
    held = [conn.info.backend_pid for conn in pool._idle]  # noqa: SLF001
    assert held
    async with services.engine.connect() as admin:
        for pid in held:
            killed = (
                await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            ).scalar()
            assert killed
        await admin.rollback()


async def test_reads_survive_the_server_closing_their_connections(services: Services) -> None:
    _postgres(services)
    await _add_user(services, "u-survivor", "survivor")
    assert await read_by_key(services.engine, _BY_NAME, {"username": "survivor"})
    await terminate_idle(services, key_reads.driver_pool(services.engine))
    rows = await read_by_key(services.engine, _BY_NAME, {"username": "survivor"})
    assert [r.id for r in rows] == ["u-survivor"]


async def test_a_cancelled_read_does_not_poison_the_pool(services: Services) -> None:
    """A read cancelled while the server works on it (a client gone) leaves its connection
    closed, not back in the pool mid-query; the next reads answer, and every slot is free."""
    _postgres(services)
    slow = select(func.pg_sleep(bindparam("s")).label("slept"))
    task = asyncio.create_task(read_by_key(services.engine, slow, {"s": 2.0}))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _add_user(services, "u-after", "after.cancel")
    results = await asyncio.gather(
        *(read_by_key(services.engine, _BY_NAME, {"username": "after.cancel"}) for _ in range(20))
    )
    assert all([r.id for r in rows] == ["u-after"] for rows in results)
    pool = key_reads.driver_pool(services.engine)
    assert pool._slots._value == key_reads._CONNECTIONS  # noqa: SLF001 - no slot leaked


_SECRET = {"x": "value-never-in-an-error"}


async def _execute_async(services: Services, statement: Any) -> None:
    async with services.engine.connect() as conn:
        await conn.execute(statement, _SECRET)


async def test_errors_are_not_swallowed(services: Services) -> None:
    """... nor do they carry the values sent (ids, blind-index keys) into their text."""
    bad = select(text("no_such_column")).where(bindparam("x") == bindparam("x"))
    with pytest.raises(DBAPIError) as raised:
        await read_by_key(services.engine, bad, {"x": "value-never-in-an-error"})
    assert "value-never-in-an-error" not in str(raised.value)
    for run in (  # nor does any engine's error: the async one, and run_read's
        lambda: _execute_async(services, bad),
        lambda: run_read(services.engine, lambda conn: conn.execute(bad, _SECRET)),
    ):
        with pytest.raises(DBAPIError) as raised:
            await run()
        assert "value-never-in-an-error" not in str(raised.value)
    await _add_user(services, "u-fine", "fine")
    assert await read_by_key(services.engine, _BY_NAME, {"username": "fine"})

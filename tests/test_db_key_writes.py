"""`write_by_key`: a login's short write transactions; on PostgreSQL on psycopg's own asyncio
connections, on SQLite on the event loop's own write connection. All or nothing, errors as
SQLAlchemy's, and no connection reused in an unknown state."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from carevault.db import key_reads
from carevault.db.key_reads import read_by_key
from carevault.db.key_writes import write_by_key
from carevault.db.tables import users
from carevault.runtime import Services
from tests.test_db_key_reads import terminate_idle

NOW = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
_NEW_USER = insert(users).values(
    id=bindparam("new_id"),
    username=bindparam("new_username"),
    password_hash="x",
    roles=bindparam("new_roles"),
    created_at=bindparam("at"),
    updated_at=bindparam("at"),
)
_RENAME = (
    update(users)
    .where(users.c.username == bindparam("old_username"))
    .values(username=bindparam("new_username"))
    .returning(users.c.id, users.c.username, users.c.roles)
)
_DISABLE = update(users).where(users.c.id == bindparam("user_id")).values(enabled=False)
_BY_NAME = select(users.c.id, users.c.roles, users.c.enabled).where(
    users.c.username == bindparam("username")
)
_SLEEP = select(func.pg_sleep(bindparam("s")).label("slept"))


def _user(user_id: str, username: str) -> dict[str, object]:
    return {"new_id": user_id, "new_username": username, "new_roles": ["nurse"], "at": NOW}


async def _names(services: Services, username: str) -> list[str]:
    return [r.id for r in await read_by_key(services.engine, _BY_NAME, {"username": username})]


async def test_rows_and_counts_as_sqlalchemy_gives_them(services: Services) -> None:
    async with write_by_key(services.engine) as writes:
        assert await writes.count(_NEW_USER, _user("u-kw-1", "kw.one")) == 1
        renamed = await writes.rows(_RENAME, {"old_username": "kw.one", "new_username": "kw.1"})
        assert await writes.count(_DISABLE, {"user_id": "nobody"}) == 0
    assert [(r.id, r.username, list(r.roles)) for r in renamed] == [("u-kw-1", "kw.1", ["nurse"])]
    rows = await read_by_key(services.engine, _BY_NAME, {"username": "kw.1"})
    # JSON as JSON; `enabled`, not given, took its column default (SQLAlchemy computes those
    # in Python at execution: the driver path must not write NULL instead)
    assert [(r.id, list(r.roles), bool(r.enabled)) for r in rows] == [("u-kw-1", ["nurse"], True)]


async def test_a_failed_statement_rolls_back_the_whole_transaction(services: Services) -> None:
    """The duplicate key fails as SQLAlchemy's IntegrityError (what callers catch), without
    the values sent in its text, and the first insert is gone with it."""
    with pytest.raises(IntegrityError) as raised:
        async with write_by_key(services.engine) as writes:
            await writes.count(_NEW_USER, _user("u-kw-2", "kw.two"))
            await writes.count(_NEW_USER, _user("u-kw-2", "kw.two-again-never-in-errors"))
    assert "never-in-errors" not in str(raised.value)
    assert await _names(services, "kw.two") == []
    async with write_by_key(services.engine) as writes:  # the next transaction is clean
        await writes.count(_NEW_USER, _user("u-kw-2", "kw.two"))
    assert await _names(services, "kw.two") == ["u-kw-2"]


async def test_an_error_in_the_block_rolls_back(services: Services) -> None:
    with pytest.raises(RuntimeError):
        async with write_by_key(services.engine) as writes:
            await writes.count(_NEW_USER, _user("u-kw-3", "kw.three"))
            raise RuntimeError("the caller changed its mind")
    assert await _names(services, "kw.three") == []


def _postgres(services: Services) -> None:
    if services.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite's statements cannot be cancelled midway")


async def test_a_cancelled_transaction_commits_nothing_and_leaks_no_connection(
    services: Services,
) -> None:
    _postgres(services)

    async def slow() -> None:
        async with write_by_key(services.engine) as writes:
            await writes.count(_NEW_USER, _user("u-kw-4", "kw.four"))
            await writes.rows(_SLEEP, {"s": 2.0})

    task = asyncio.create_task(slow())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _names(services, "kw.four") == []
    await asyncio.gather(*(_write_one(services, f"u-kw-4-{i}", f"kw.four.{i}") for i in range(12)))
    assert await _names(services, "kw.four.11") == ["u-kw-4-11"]
    pool = key_reads.driver_pool(services.engine, writes=True)
    assert pool._slots._value == key_reads._CONNECTIONS  # noqa: SLF001 - no slot leaked


async def _write_one(services: Services, user_id: str, username: str) -> None:
    async with write_by_key(services.engine) as writes:
        await writes.count(_NEW_USER, _user(user_id, username))


async def test_writes_survive_the_server_closing_idle_connections(services: Services) -> None:
    """A restart, a failover, `idle_session_timeout`: the next transaction begins on a new
    connection (nothing had been sent on the dead one)."""
    _postgres(services)
    await _write_one(services, "u-kw-5", "kw.five")
    await terminate_idle(services, key_reads.driver_pool(services.engine, writes=True))
    await _write_one(services, "u-kw-6", "kw.six")
    assert await _names(services, "kw.six") == ["u-kw-6"]


async def test_the_connections_can_write_and_name_the_application(services: Services) -> None:
    """Not the read pool's read-only connections; and they keep the application name the
    database URL gives (a test's schema name here, which its lock-wait helper relies on)."""
    _postgres(services)
    await _write_one(services, "u-kw-7", "kw.seven")
    pool = key_reads.driver_pool(services.engine, writes=True)
    conn = pool._idle[-1]  # noqa: SLF001
    cursor = await conn.execute("SELECT current_setting('transaction_read_only')")
    assert (await cursor.fetchone()) == ("off",)
    expected = services.engine.url.query.get("application_name")
    cursor = await conn.execute("SELECT current_setting('application_name')")
    assert (await cursor.fetchone())[0] == (expected or "")


async def test_sqlite_holds_the_write_lock_only_while_its_statements_run(
    services: Services,
) -> None:
    """From BEGIN IMMEDIATE to COMMIT no other task gets the loop: through aiosqlite every
    statement was a crossing to its thread, and a login's transaction held the database's
    write lock across turns of a loop busy with requests while every read's audit append, in
    this worker and the others, waited for it."""
    if services.engine.dialect.name != "sqlite":
        pytest.skip("SQLite only: PostgreSQL locks rows, not the database")
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    other = asyncio.create_task(other_task())
    await asyncio.sleep(0.01)
    try:
        async with write_by_key(services.engine) as writes:
            before = turns
            await writes.count(_NEW_USER, _user("u-kw-9", "kw.nine"))
            renamed = await writes.rows(
                _RENAME, {"old_username": "kw.nine", "new_username": "kw.nine.b"}
            )
            await writes.count(_DISABLE, {"user_id": "u-kw-9"})
        during = turns - before
        await asyncio.sleep(0.01)
    finally:
        other.cancel()
    assert during == 0
    assert turns > 0  # the other task did run, before and after
    assert [r.id for r in renamed] == ["u-kw-9"]
    assert await _names(services, "kw.nine.b") == ["u-kw-9"]

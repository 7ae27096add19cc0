"""SQLite: a process's write transactions run on one connection kept open (`_KeptWriter`):
the same connection each time, left clean after a failed or cancelled transaction, and a
transaction that failed midway leaves nothing behind."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from carevault.db.engine import write_transaction
from carevault.runtime import Services


def _driver(conn) -> object:  # type: ignore[no-untyped-def]
    return conn.sync_connection.connection.dbapi_connection


async def _rows(services: Services) -> list[int]:
    async with services.engine.connect() as conn:
        return list((await conn.execute(text("SELECT n FROM kept ORDER BY n"))).scalars())


@pytest.fixture
async def kept(services: Services) -> Services:
    if services.engine.dialect.name != "sqlite":
        pytest.skip("SQLite only: PostgreSQL's writers use the pool")
    async with write_transaction(services.engine) as conn:
        await conn.execute(text("CREATE TABLE kept (n INTEGER PRIMARY KEY)"))
    return services


async def test_write_transactions_share_one_connection(kept: Services) -> None:
    seen = []
    for n in range(3):
        async with write_transaction(kept.engine) as conn:
            seen.append(_driver(conn))
            await conn.execute(text("INSERT INTO kept VALUES (:n)"), {"n": n})
    assert len({id(d) for d in seen}) == 1
    assert await _rows(kept) == [0, 1, 2]
    async with kept.engine.connect() as conn:  # the pool's own still wait for locks
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one() > 0


async def test_a_failed_transaction_leaves_nothing_and_the_next_one_commits(
    kept: Services,
) -> None:
    with pytest.raises(IntegrityError):
        async with write_transaction(kept.engine) as conn:
            await conn.execute(text("INSERT INTO kept VALUES (1)"))
            await conn.execute(text("INSERT INTO kept VALUES (1)"))  # the key again
    async with write_transaction(kept.engine) as conn:
        await conn.execute(text("INSERT INTO kept VALUES (2)"))
    assert await _rows(kept) == [2]


async def test_a_cancelled_transaction_leaves_nothing_and_the_next_one_commits(
    kept: Services,
) -> None:
    inside = asyncio.Event()

    async def interrupted() -> None:
        async with write_transaction(kept.engine) as conn:
            await conn.execute(text("INSERT INTO kept VALUES (1)"))
            inside.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(interrupted())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with write_transaction(kept.engine) as conn:
        await conn.execute(text("INSERT INTO kept VALUES (2)"))
    assert await _rows(kept) == [2]


async def test_concurrent_writers_take_turns_on_it(kept: Services) -> None:
    async def write(n: int) -> None:
        async with write_transaction(kept.engine) as conn:
            await conn.execute(text("INSERT INTO kept VALUES (:n)"), {"n": n})
            await asyncio.sleep(0)  # another writer's turn would interleave here

    await asyncio.gather(*(write(n) for n in range(20)))
    assert await _rows(kept) == list(range(20))

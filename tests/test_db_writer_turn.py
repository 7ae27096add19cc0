"""`writer_turn`: on SQLite a process's writers queue for their turn (urgent ones first)
instead of sleeping in SQLite's busy handler."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from carevault.db import engine as db_engine
from carevault.db.engine import writer_turn


@pytest.fixture
def sqlite_engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    return create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}")


async def test_turns_are_taken_in_order_with_urgent_ones_first(sqlite_engine) -> None:  # type: ignore[no-untyped-def]
    order: list[str] = []
    holding = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with writer_turn(sqlite_engine):
            holding.set()
            await release.wait()
            order.append("first")

    async def writer(name: str, urgent: bool = False) -> None:
        async with writer_turn(sqlite_engine, urgent=urgent):
            order.append(name)
            await asyncio.sleep(0)

    holder = asyncio.create_task(first())
    await holding.wait()
    waiting = [
        asyncio.create_task(writer("a")),
        asyncio.create_task(writer("b")),
        asyncio.create_task(writer("audit", urgent=True)),
    ]
    await asyncio.sleep(0.01)
    assert order == []  # nobody writes while the first one holds its turn
    release.set()
    await asyncio.gather(holder, *waiting)
    assert order == ["first", "audit", "a", "b"]


async def test_the_holder_passes_again_and_others_wait(sqlite_engine) -> None:  # type: ignore[no-untyped-def]
    async with writer_turn(sqlite_engine), writer_turn(sqlite_engine):  # no self-deadlock
        other = asyncio.create_task(_take(sqlite_engine))
        await asyncio.sleep(0.01)
        assert not other.done()
    await asyncio.wait_for(other, 1)


async def _take(engine) -> None:  # type: ignore[no-untyped-def]
    async with writer_turn(engine):
        pass


async def test_a_turn_that_never_comes_fails_like_a_locked_database(
    sqlite_engine, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(db_engine, "_WRITER_WAIT_SECONDS", 0.05)
    async with writer_turn(sqlite_engine):
        with pytest.raises(OperationalError, match="database is locked"):
            await asyncio.create_task(_take(sqlite_engine))
    # the one that gave up left the queue: the next writer gets its turn at once
    await asyncio.wait_for(_take(sqlite_engine), 1)


async def test_postgresql_has_no_gate() -> None:
    engine = create_async_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    async with writer_turn(engine):
        await asyncio.wait_for(_take(engine), 1)  # would wait on SQLite

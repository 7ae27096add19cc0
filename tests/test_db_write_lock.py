"""Waiting for SQLite's write lock held by another process: polls on the event loop
(`WriteLockWait`), never SQLite's busy handler, bounded, for transactions, writes by key and
audit appends."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from carevault.audit.entry import AuditEntry, Outcome
from carevault.db import engine as db_engine
from carevault.db.engine import write_transaction
from carevault.db.key_writes import write_by_key
from carevault.db.tables import audit_entries, users
from carevault.runtime import Services
from tests.loop_ticks import ticking
from tests.test_db_key_writes import _NEW_USER, _user

T = TypeVar("T")


def _sqlite(services: Services) -> str:
    if services.engine.dialect.name != "sqlite":
        pytest.skip("SQLite only: PostgreSQL's writers wait in the server")
    path = services.engine.url.database
    assert path
    return path


_USER = _user("u-lock-1", "lock.one")


async def _user_ids(services: Services) -> list[str]:
    async with services.engine.connect() as conn:
        found = await conn.execute(select(users.c.id).where(users.c.id == "u-lock-1"))
        return list(found.scalars())


def _hold_write_lock(path: str) -> sqlite3.Connection:
    """Another connection, as another worker process would be, holding the write lock."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


async def _while_held(services: Services, work: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """`work()` while another process holds the write lock for 0.3 s, and how many 10 ms
    ticks the loop made meanwhile (`loop_ticks.ticking`)."""
    holder = _hold_write_lock(_sqlite(services))
    released = asyncio.get_running_loop().call_later(0.3, holder.commit)
    try:
        return await ticking(work)
    finally:
        released.cancel()
        holder.close()


async def test_a_transaction_waits_for_another_process_then_commits(services: Services) -> None:
    async def write() -> int:
        async with write_transaction(services.engine) as conn:
            await conn.execute(text("CREATE TABLE waited (n INTEGER)"))
            await conn.execute(text("INSERT INTO waited VALUES (1)"))
        async with services.engine.connect() as conn:
            return (await conn.execute(text("SELECT n FROM waited"))).scalar_one()

    written, ticks = await _while_held(services, write)
    assert written == 1
    assert ticks >= 10  # the loop ran on while the transaction waited (0.3 s: ~30 ticks)


async def test_a_write_by_key_waits_for_another_process_then_commits(services: Services) -> None:
    async def write() -> int:
        async with write_by_key(services.engine) as writes:
            return await writes.count(_NEW_USER, _USER)

    written, ticks = await _while_held(services, write)
    assert written == 1
    assert ticks >= 10  # the loop ran on while the transaction waited (0.3 s: ~30 ticks)
    assert await _user_ids(services) == ["u-lock-1"]


async def test_an_audit_append_waits_for_another_process_then_lands(services: Services) -> None:
    entry = AuditEntry(action="test.write_lock", outcome=Outcome.permit)
    size, _ = await _while_held(services, lambda: services.audit.append([entry]))
    async with services.engine.connect() as conn:
        action = (
            await conn.execute(select(audit_entries.c.action).where(audit_entries.c.seq == size))
        ).scalar_one()
    assert action == "test.write_lock"


async def test_the_wait_is_bounded_and_writes_nothing(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock never released fails the write as a locked database (fail closed: a request
    answers an error, an audit append makes its request fail), and nothing of it lands."""
    holder = _hold_write_lock(_sqlite(services))
    monkeypatch.setattr(db_engine, "_WRITER_WAIT_SECONDS", 0.2)
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError, match="locked|busy"):
            async with write_transaction(services.engine) as conn:
                await conn.execute(text("CREATE TABLE never (n INTEGER)"))
        with pytest.raises(OperationalError, match="locked|busy"):
            await services.audit.append([AuditEntry(action="test.never", outcome=Outcome.permit)])
        with pytest.raises(OperationalError, match="locked|busy"):
            async with write_by_key(services.engine) as writes:
                await writes.count(_NEW_USER, _USER)
    finally:
        holder.close()
    # The bound is ours (0.2 s here, 30 s by default), not SQLite's busy timeout: a coarse
    # check that the waits were polls on the loop and not a sleep in the busy handler.
    assert time.monotonic() - started < 10
    async with services.engine.connect() as conn:
        tables = (
            await conn.execute(text("SELECT name FROM sqlite_master WHERE name = 'never'"))
        ).all()
        never = (
            await conn.execute(
                select(audit_entries.c.seq).where(audit_entries.c.action == "test.never")
            )
        ).all()
    assert tables == [] and never == []
    assert await _user_ids(services) == []


async def test_a_writer_outside_write_transaction_still_waits(services: Services) -> None:
    """Only this module's writers poll: any other transaction (a tool's, a test's
    `engine.begin()`) waits for the lock in SQLite's busy handler as SQLite's own connections
    do, instead of failing at once because another process was writing."""
    holder = _hold_write_lock(_sqlite(services))
    released = asyncio.get_running_loop().call_later(0.3, holder.commit)
    try:
        async with services.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE waited_plainly (n INTEGER)"))
    finally:
        released.cancel()
        holder.close()
    async with services.engine.connect() as conn:
        found = await conn.execute(
            text("SELECT name FROM sqlite_master WHERE name = 'waited_plainly'")
        )
        assert found.scalar_one() == "waited_plainly"


async def test_no_pooled_connection_is_left_without_a_busy_timeout(services: Services) -> None:
    """The audit writer's connection (busy timeout 0) is dropped when the writer closes it,
    never handed to another user of the pool; a write transaction restores its own."""
    _sqlite(services)
    await services.audit.append([AuditEntry(action="test.pool", outcome=Outcome.permit)])
    async with write_transaction(services.engine) as conn:
        await conn.execute(text("SELECT 1"))
    await services.audit.close()
    for _ in range(12):  # more than the pool keeps: every connection it hands out
        async with services.engine.connect() as conn:
            timeout = (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one()
            assert timeout == 30000

"""Interleaving transactions in race tests: a transaction the test holds open by hand, and a
wait until the service calls started meanwhile are queued behind it (or have finished without
waiting: what the race tests exist to catch)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

# SQLite has no view of who waits: a writer queues at the process's writer gate on its first
# steps, and this many seconds is hundreds of event-loop turns.
SQLITE_SETTLE_SECONDS = 0.2
WAIT_LIMIT_SECONDS = 10.0
POLL_SECONDS = 0.01

# This test's connections carry its schema's name (tests/db_templates.schema_url); the read
# threads' connections carry another and never wait for a row lock.
_LOCK_WAITERS = text(
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE application_name = current_setting('application_name') "
    "AND wait_event_type = 'Lock'"
)


async def until_queued(engine: AsyncEngine, tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Return once each of `tasks` is either done (it never asked for a lock held meanwhile:
    what a race test exists to catch) or waiting for a lock, as one of this test's PostgreSQL
    connections. On SQLite, after a short settle: there every writer waits for the one that
    holds the write lock."""
    tasks = list(tasks)
    if engine.dialect.name == "sqlite":
        await asyncio.wait(tasks, timeout=SQLITE_SETTLE_SECONDS)
        return
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    async with engine.connect() as conn:
        while True:
            running = sum(1 for task in tasks if not task.done())
            waiting = (await conn.execute(_LOCK_WAITERS)).scalar_one()
            await conn.rollback()  # the next poll takes a new snapshot of the activity view
            if waiting >= running:
                return
            assert time.monotonic() < deadline, f"{waiting} of {running} wait for a lock"
            await asyncio.sleep(POLL_SECONDS)

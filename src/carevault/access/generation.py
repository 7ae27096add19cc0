"""The generation of the access facts (care teams, practitioner roles, managing organizations,
consents, label and break-glass grants): caches of those facts are valid while it stands still.

Every write that changes such a fact calls `bump_in(conn)` inside its own transaction, so the
new generation commits with the change, then `AccessGeneration.changed()` after the commit,
which moves the host's memory-mapped change counter. Readers ask `current()` once per request:
the counter answers at the cost of a memory read, so a change made on this host takes effect
on the next request of every worker of the host. On PostgreSQL, where other hosts may write,
the database row is read as well, at most every `poll_seconds` (a read per request cost 1.2 ms,
72% of a read in `python -m bench access`): a change made on another host takes effect within
that bound. One read serves every request that finds the poll due meanwhile (32 requests in
flight once sent 32 reads each second). A failed read of the row raises, for every request
that waited on it: no decision is made on facts that may be stale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from carevault.db.key_reads import read_by_key
from carevault.db.tables import access_generation
from carevault.tokens.signal import ChangeSignal

# Writes of these types change relationships or consent: the store bumps the generation.
ACCESS_FACT_TYPES = frozenset({"CareTeam", "PractitionerRole", "Patient", "Consent"})
_GENERATION = select(access_generation.c.generation).where(access_generation.c.id == 1)


async def bump_in(conn: AsyncConnection) -> None:
    await conn.execute(
        update(access_generation)
        .where(access_generation.c.id == 1)
        .values(generation=access_generation.c.generation + 1)
    )


class AccessGeneration:
    def __init__(
        self,
        engine: AsyncEngine,
        signal: ChangeSignal,
        poll_seconds: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._signal = signal
        self._shared_database = engine.dialect.name != "sqlite"
        self._poll_seconds = poll_seconds
        self._monotonic = monotonic
        self._polled_at = float("-inf")
        self._database_generation = 0
        self._poll: asyncio.Task[None] | None = None

    def changed(self) -> None:
        """After a committed `bump_in`: tell this host's other processes at once."""
        self._signal.bump()

    async def current(self) -> tuple[int, int]:
        """(this host's counter, the database's generation as last polled)."""
        if self._shared_database and self._monotonic() - self._polled_at >= self._poll_seconds:
            # Shared only under a poll interval: with none, every request reads for itself
            # (a read begun before it arrived might miss a change it must see).
            if (
                self._poll is None
                or self._poll_seconds <= 0
                or self._poll.get_loop() is not asyncio.get_running_loop()
            ):
                self._poll = asyncio.create_task(self._read_database())
                self._poll.add_done_callback(self._polled)
            # Shielded: a request cancelled meanwhile must not cancel the others' read.
            await asyncio.shield(self._poll)
        return self._signal.read(), self._database_generation

    def _polled(self, task: asyncio.Task[None]) -> None:
        if self._poll is task:
            self._poll = None
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have gone meanwhile

    async def _read_database(self) -> None:
        rows = await read_by_key(self._engine, _GENERATION, {})
        if not rows:
            raise RuntimeError("access_generation row missing")  # fail closed: no stale facts
        self._database_generation = int(rows[0].generation)
        self._polled_at = self._monotonic()

    def close(self) -> None:
        self._signal.close()

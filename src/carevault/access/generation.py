"""The generation of the access facts (care teams, practitioner roles, managing organizations,
consents, label and break-glass grants): caches of those facts are valid while it stands still.

Every write that changes such a fact calls `bump_in(conn)` inside its own transaction, so the
new generation commits with the change, then `AccessGeneration.changed()` after the commit.
Readers ask `current()` once per request: on SQLite (one host by construction) the host's
memory-mapped change counter answers at the cost of a memory read; on PostgreSQL, where other
hosts may write, the database row does (one primary-key read), so a change made anywhere takes
effect on the next request everywhere.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from carevault.db.engine import read_connection
from carevault.db.tables import access_generation
from carevault.tokens.signal import ChangeSignal

# Writes of these types change relationships or consent: the store bumps the generation.
ACCESS_FACT_TYPES = frozenset({"CareTeam", "PractitionerRole", "Patient", "Consent"})


async def bump_in(conn: AsyncConnection) -> None:
    await conn.execute(
        update(access_generation)
        .where(access_generation.c.id == 1)
        .values(generation=access_generation.c.generation + 1)
    )


class AccessGeneration:
    def __init__(self, engine: AsyncEngine, signal: ChangeSignal) -> None:
        self._engine = engine
        self._signal = signal
        self._shared_database = engine.dialect.name != "sqlite"

    def changed(self) -> None:
        """After a committed `bump_in`: tell this host's other processes at once."""
        self._signal.bump()

    async def current(self) -> int:
        if not self._shared_database:
            return self._signal.read()
        async with read_connection(self._engine) as conn:
            value = (
                await conn.execute(
                    select(access_generation.c.generation).where(access_generation.c.id == 1)
                )
            ).scalar_one_or_none()
        if value is None:
            raise RuntimeError("access_generation row missing")  # fail closed: no stale facts
        return int(value)

    def close(self) -> None:
        self._signal.close()

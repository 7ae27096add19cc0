"""One label granted to one user by parallel calls (two administrators, a retried command): one
call grants it, every other says the user already had it, and the access generation moves
once. On SQLite and PostgreSQL; the calls are lined up behind another change of the access
facts that the test holds open."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

from carevault.access.generation import bump_in
from carevault.access.label_grants import grant_label, labels_of_user
from carevault.db.engine import write_transaction
from carevault.db.tables import access_generation
from carevault.identity.roles import Role
from tests.conftest import STRONG_PASSWORD
from tests.lock_waits import until_queued

PARALLEL = 10


async def _generation(services: Any) -> int:
    async with services.engine.connect() as conn:
        return (
            await conn.execute(
                select(access_generation.c.generation).where(access_generation.c.id == 1)
            )
        ).scalar_one()


async def test_parallel_grants_of_one_label_grant_it_once(services: Any) -> None:
    """Every call checks for the grant while the first one's insert is not committed (it waits
    to move the generation). On PostgreSQL (READ COMMITTED) each then read no grant, and all
    but the first failed on the primary key instead of answering False."""
    user = await services.accounts.add_user("dr.psy", STRONG_PASSWORD, Role.physician)
    before = await _generation(services)

    holding, release = asyncio.Event(), asyncio.Event()

    async def change_access_facts() -> None:
        async with write_transaction(services.engine) as conn:
            await bump_in(conn)
            holding.set()
            await release.wait()

    holder = asyncio.create_task(change_access_facts())
    await holding.wait()
    grants = [
        asyncio.create_task(
            grant_label(services.engine, services.access_generation, user.id, "PSY")
        )
        for _ in range(PARALLEL)
    ]
    await until_queued(services.engine, grants)
    release.set()
    await holder
    granted = await asyncio.gather(*grants)

    assert sorted(granted) == [False] * (PARALLEL - 1) + [True]
    assert await labels_of_user(services.engine, user.id) == ["PSY"]
    assert await _generation(services) == before + 2  # the held change and the one grant

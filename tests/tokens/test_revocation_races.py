"""A user's sessions ended (logout everywhere) while stolen refresh tokens are replayed: a family
revoked for reuse keeps that reason and its time, the evidence of the theft. On SQLite and
PostgreSQL; the interleaving is forced with a lock the test holds on the user's families."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

from carevault.db.engine import write_transaction
from carevault.db.tables import refresh_families
from tests.audit.trail import audit_documents
from tests.lock_waits import until_queued

PARALLEL = 5


async def test_logout_everywhere_keeps_the_reuse_revocations(
    settings_factory: Any, harness_factory: Any
) -> None:
    """Replays of used refresh tokens queue first, a logout everywhere behind them. Each
    replay revokes its family for reuse; the logout had read those families live, and on
    PostgreSQL (READ COMMITTED) its UPDATE by id then overwrote their reason and time."""
    # No grace window: the second presentation of a token is reuse at once.
    harness = await harness_factory(settings_factory(refresh_grace_seconds=0))
    user = await harness.add_user("stolen.user")
    stolen = []
    for _ in range(PARALLEL):
        token = (await harness.login("stolen.user"))["refresh_token"]
        assert (await harness.refresh(token)).status_code == 200
        stolen.append(token)
    current = await harness.login("stolen.user")
    engine = harness.services.engine

    holding, release = asyncio.Event(), asyncio.Event()

    async def hold_families() -> None:
        async with write_transaction(engine) as conn:
            await conn.execute(
                select(refresh_families.c.id)
                .where(refresh_families.c.user_id == user.id)
                .with_for_update()
            )
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold_families())
    await holding.wait()
    replays = [asyncio.create_task(harness.refresh(token)) for token in stolen]
    await until_queued(engine, replays)
    logout = asyncio.create_task(
        harness.client.post(
            "/auth/logout-all", headers={"Authorization": f"Bearer {current['access_token']}"}
        )
    )
    await until_queued(engine, [*replays, logout])
    release.set()
    await holder

    assert [(await replay).status_code for replay in replays] == [401] * PARALLEL
    assert (await logout).status_code == 204
    detected = [
        event["detail"]["family"]
        for event in await audit_documents(engine, "security.refresh_reuse")
    ]
    async with engine.connect() as conn:
        reasons = {
            row.id: row.revoked_reason
            for row in await conn.execute(
                select(refresh_families.c.id, refresh_families.c.revoked_reason)
            )
        }
    assert len(set(detected)) == len(detected) == PARALLEL
    assert {family: reasons[family] for family in detected} == dict.fromkeys(detected, "reuse")
    others = set(reasons) - set(detected)
    assert [reasons[family] for family in others] == ["logout_all"]

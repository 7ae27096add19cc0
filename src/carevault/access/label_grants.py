"""Per-user permission to see records carrying a sensitive label (a psychotherapist may see
PSY notes that other physicians may not). Grants count only for roles whose policy accepts
them (`label_grants = true`); each change moves the access generation in its transaction."""

from __future__ import annotations

import time

from sqlalchemy import and_, delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.access.generation import AccessGeneration, bump_in
from carevault.access.labels import ALL_LABELS
from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import user_label_grants


class UnknownLabel(ValueError):
    pass


async def grant_label(
    engine: AsyncEngine, generation: AccessGeneration, user_id: str, label: str
) -> bool:
    """Grant; False if the user already had it."""
    if label not in ALL_LABELS:
        raise UnknownLabel(f"not a sensitive label: choose from {', '.join(sorted(ALL_LABELS))}")
    async with write_transaction(engine) as conn:
        exists = (
            await conn.execute(
                select(user_label_grants.c.label).where(
                    and_(user_label_grants.c.user_id == user_id, user_label_grants.c.label == label)
                )
            )
        ).first()
        if exists:
            return False
        await conn.execute(
            user_label_grants.insert().values(user_id=user_id, label=label, granted_at=time.time())
        )
        await bump_in(conn)
    generation.changed()
    return True


async def revoke_label(
    engine: AsyncEngine, generation: AccessGeneration, user_id: str, label: str
) -> bool:
    """Revoke; False if the user did not have it."""
    async with write_transaction(engine) as conn:
        result = await conn.execute(
            delete(user_label_grants).where(
                and_(user_label_grants.c.user_id == user_id, user_label_grants.c.label == label)
            )
        )
        if not result.rowcount:
            return False
        await bump_in(conn)
    generation.changed()
    return True


async def labels_of_user(engine: AsyncEngine, user_id: str) -> list[str]:
    async with read_connection(engine) as conn:
        rows = await conn.execute(
            select(user_label_grants.c.label)
            .where(user_label_grants.c.user_id == user_id)
            .order_by(user_label_grants.c.label)
        )
        return list(rows.scalars())

"""Per-user permission to see records carrying a sensitive label (a psychotherapist may see
PSY notes that other physicians may not). Grants count only for roles whose policy accepts
them (`label_grants = true`); each change moves the access generation in its transaction."""

from __future__ import annotations

import time

from sqlalchemy import and_, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.access.generation import AccessGeneration, bump_in
from carevault.access.labels import ALL_LABELS
from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import user_label_grants

# Dialects whose INSERT takes ON CONFLICT .. DO NOTHING .. RETURNING (SQLite 3.35+, PostgreSQL
# 9.5+); another dialect is a KeyError, and nothing is granted. RETURNING says whether a row was
# inserted (the INSERT's rowcount is not reported by every driver).
_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class UnknownLabel(ValueError):
    pass


async def grant_label(
    engine: AsyncEngine, generation: AccessGeneration, user_id: str, label: str
) -> bool:
    """Grant; False if the user already had it."""
    if label not in ALL_LABELS:
        raise UnknownLabel(f"not a sensitive label: choose from {', '.join(sorted(ALL_LABELS))}")
    async with write_transaction(engine) as conn:
        # Insert-if-absent in one statement: on PostgreSQL (READ COMMITTED) a grant checked for
        # by a plain read could be committed by a parallel call before this insert, which would
        # then fail on the primary key instead of answering False.
        inserted = (
            await conn.execute(
                _INSERTS[conn.dialect.name](user_label_grants)
                .values(user_id=user_id, label=label, granted_at=time.time())
                .on_conflict_do_nothing(
                    index_elements=[user_label_grants.c.user_id, user_label_grants.c.label]
                )
                .returning(user_label_grants.c.label)
            )
        ).first()
        if inserted is None:
            return False
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

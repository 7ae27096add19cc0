"""What a user approved for a client, remembered until the user revokes it: the consent page
is shown again only for scopes beyond it."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import and_, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.engine import write_transaction
from carevault.db.tables import oauth_consents
from carevault.oauth.scopes import split

# Dialects whose INSERT takes ON CONFLICT .. DO UPDATE .. RETURNING (SQLite 3.35+, PostgreSQL
# 9.5+); another dialect is a KeyError, and nothing is remembered.
_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class Consents:
    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    async def approved(self, user_id: str, client_id: str) -> frozenset[str]:
        async with self._engine.connect() as conn:
            scope = (
                await conn.execute(
                    select(oauth_consents.c.scope).where(
                        and_(
                            oauth_consents.c.user_id == user_id,
                            oauth_consents.c.client_id == client_id,
                        )
                    )
                )
            ).scalar_one_or_none()
        return frozenset(split(scope))

    async def remember(self, user_id: str, client_id: str, scopes: list[str]) -> None:
        async with write_transaction(self._engine) as conn:
            upsert = _INSERTS[conn.dialect.name](oauth_consents).values(
                user_id=user_id,
                client_id=client_id,
                scope=" ".join(scopes),
                granted_at=self._clock(),
            )
            # One statement makes the row exist and locks it until the transaction ends, so the
            # merge below starts from the latest approval: on PostgreSQL (READ COMMITTED) a plain
            # read would let parallel approvals each write back their own merge and lose the
            # others' scopes, and two first approvals would both insert. A row deleted meanwhile
            # (a withdrawal) is inserted again instead of being missed by a separate read.
            current = (
                await conn.execute(
                    upsert.on_conflict_do_update(
                        index_elements=[oauth_consents.c.user_id, oauth_consents.c.client_id],
                        set_={"granted_at": upsert.excluded.granted_at},
                    ).returning(oauth_consents.c.scope)
                )
            ).scalar_one()
            merged = " ".join(dict.fromkeys([*split(current), *scopes]))
            if merged != current:
                await conn.execute(
                    update(oauth_consents)
                    .where(
                        and_(
                            oauth_consents.c.user_id == user_id,
                            oauth_consents.c.client_id == client_id,
                        )
                    )
                    .values(scope=merged)
                )

    async def revoke(self, user_id: str, client_id: str) -> bool:
        async with write_transaction(self._engine) as conn:
            result = await conn.execute(
                delete(oauth_consents).where(
                    and_(
                        oauth_consents.c.user_id == user_id,
                        oauth_consents.c.client_id == client_id,
                    )
                )
            )
        return bool(result.rowcount)

    async def of_user(self, user_id: str) -> list[tuple[str, str, float]]:
        """(client id, scope, granted at) of every remembered approval of a user."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(
                    oauth_consents.c.client_id, oauth_consents.c.scope, oauth_consents.c.granted_at
                ).where(oauth_consents.c.user_id == user_id)
            )
            return [(r.client_id, r.scope, r.granted_at) for r in rows]

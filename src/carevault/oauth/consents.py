"""What a user approved for a client, remembered until the user revokes it: the consent page
is shown again only for scopes beyond it."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.engine import write_transaction
from carevault.db.tables import oauth_consents
from carevault.oauth.scopes import split


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
            where = and_(
                oauth_consents.c.user_id == user_id, oauth_consents.c.client_id == client_id
            )
            current = (
                await conn.execute(select(oauth_consents.c.scope).where(where))
            ).scalar_one_or_none()
            now = self._clock()
            if current is None:
                await conn.execute(
                    insert(oauth_consents).values(
                        user_id=user_id, client_id=client_id, scope=" ".join(scopes), granted_at=now
                    )
                )
            else:
                merged = " ".join(dict.fromkeys([*split(current), *scopes]))
                await conn.execute(
                    update(oauth_consents).where(where).values(scope=merged, granted_at=now)
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

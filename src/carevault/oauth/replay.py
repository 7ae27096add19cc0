"""A replay cache for one-time values (DPoP proof `jti`s, client assertion `jti`s).

`first_use(key, expires_at)` answers True exactly once per key while the key is remembered
(until `expires_at`), and False on every later use. The cache is shared by every worker process
and every host of a deployment: a one-time value seen by one uvicorn worker must be refused by
the others, so it is never kept in process memory.

- `DatabaseReplayCache`: one row per key in `oauth_replay`; the primary key decides the race (the
  insert that finds a live row is the replay).
- `RedisReplayCache`: `SET key 1 NX PX ttl`; Redis decides the race.

Both fail closed: when the store cannot answer, `ReplayCacheUnavailable` is raised and the
caller refuses the request (503), never accepts it. Keys are stored as the SHA-256 of the key, so
their size is bounded whatever the caller passes and no caller value is kept verbatim.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Protocol

import structlog
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.config import Settings
from carevault.db.engine import write_transaction
from carevault.db.tables import oauth_replay

log = structlog.get_logger("carevault.oauth")

# Expired rows are removed every PURGE_EVERY successful inserts of one instance, at most
# PURGE_BATCH rows at a time, so a purge never holds the write lock for long.
PURGE_EVERY = 128
PURGE_BATCH = 1000
# Dialects whose INSERT takes ON CONFLICT .. DO UPDATE .. WHERE .. RETURNING (SQLite 3.35+,
# PostgreSQL 9.5+). On an older SQLite the statement fails: the cache is then unavailable.
_UPSERT_INSERTS = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}


class ReplayCacheUnavailable(Exception):
    """The replay cache cannot answer; the caller must refuse the request (503)."""


class ReplayCache(Protocol):
    """What every replay cache backend promises."""

    async def first_use(self, key: str, expires_at: float) -> bool:
        """True the first time `key` is seen (remembered until `expires_at`), False on every
        later use. Raises `ReplayCacheUnavailable` when the store cannot answer."""

    async def close(self) -> None: ...


def stored_key(key: str) -> str:
    """The form a key is stored in: SHA-256 hex (64 characters), whatever its length."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class DatabaseReplayCache:
    """Replay cache on the data database (`oauth_replay`), for deployments without Redis.

    One statement per use, `INSERT .. ON CONFLICT (key) DO UPDATE .. WHERE expires_at <= now`:
    the primary key decides the race, an expired row of the same key is taken over, and a live
    one is left alone (no row changed: the key was seen). On SQLite the write transaction begins
    with `BEGIN IMMEDIATE`, so uses are serialised; on PostgreSQL a concurrent insert of the same
    key waits for the first one to commit and then finds its row.

    The conflict is resolved in SQL rather than by catching the unique violation
    (`IntegrityError`): on SQLite, a unique violation raised while more writers wait than the
    pool holds stalled every writer until the pool timeout (30 s) in testing.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        clock: Callable[[], float] = time.time,
        *,
        purge_every: int = PURGE_EVERY,
        purge_batch: int = PURGE_BATCH,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._purge_every = max(1, purge_every)
        self._purge_batch = max(1, purge_batch)
        self._inserts = 0

    async def first_use(self, key: str, expires_at: float) -> bool:
        stored = stored_key(key)
        now = self._clock()
        expires_at = float(expires_at)
        try:
            async with write_transaction(self._engine) as conn:
                # Only SQLite and PostgreSQL are supported: another dialect is a KeyError here,
                # which fails closed like any other error.
                upsert = _UPSERT_INSERTS[conn.dialect.name](oauth_replay).values(
                    key=stored, expires_at=expires_at
                )
                upsert = upsert.on_conflict_do_update(
                    index_elements=[oauth_replay.c.key],
                    set_={"expires_at": upsert.excluded.expires_at},
                    where=oauth_replay.c.expires_at <= now,
                ).returning(oauth_replay.c.key)
                # A row comes back when it was inserted or taken over, none when a live row
                # stood (the INSERT's rowcount is not reported by every driver: psycopg says -1).
                first = (await conn.execute(upsert)).first() is not None
        except Exception as err:
            raise ReplayCacheUnavailable("replay cache database unavailable") from err
        if first:
            self._inserts += 1
            if self._inserts >= self._purge_every:
                self._inserts = 0
                await self.purge_expired()
        return first

    async def purge_expired(self) -> int:
        """Delete up to `purge_batch` expired rows; return how many. A failure is logged and
        ignored: expired rows are only clutter, and `first_use` replaces them when needed."""
        now = self._clock()
        expired = (
            select(oauth_replay.c.key)
            .where(oauth_replay.c.expires_at <= now)
            .limit(self._purge_batch)
            .scalar_subquery()
        )
        try:
            async with write_transaction(self._engine) as conn:
                result = await conn.execute(
                    delete(oauth_replay).where(oauth_replay.c.key.in_(expired))
                )
        except Exception as err:
            log.warning("replay_purge_failed", error=type(err).__name__)
            return 0
        return result.rowcount or 0

    async def close(self) -> None:
        return None


class RedisReplayCache:
    """Replay cache on Redis, shared by every instance that uses the same Redis.

    The expiry is given to Redis as a time to live computed with this process's clock (the
    clock the caller computed `expires_at` with), not as an absolute time: Redis's own clock may
    differ from the application hosts', and a key set with an absolute expiry already past on
    Redis's clock would be forgotten at once, letting the replay through.
    """

    PREFIX = "carevault:replay:"

    def __init__(self, redis_url: str, clock: Callable[[], float] = time.time) -> None:
        import redis.asyncio as redis

        self._clock = clock
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
        )

    async def first_use(self, key: str, expires_at: float) -> bool:
        # At least one millisecond: PX 0 is an error, and a key must be set to be refused later.
        ttl_ms = max(1, math.ceil((float(expires_at) - self._clock()) * 1000))
        try:
            created = await self._redis.set(self.PREFIX + stored_key(key), "1", nx=True, px=ttl_ms)
        except Exception as err:
            raise ReplayCacheUnavailable("replay cache redis unavailable") from err
        return bool(created)

    async def close(self) -> None:
        await self._redis.aclose()


def build_replay_cache(
    settings: Settings, engine: AsyncEngine, clock: Callable[[], float] = time.time
) -> ReplayCache:
    """Redis when the deployment has one (`settings.redis_url`), otherwise the database."""
    if settings.redis_url:
        return RedisReplayCache(settings.redis_url, clock)
    return DatabaseReplayCache(engine, clock)

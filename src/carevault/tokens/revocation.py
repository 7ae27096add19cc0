"""Revocation: the denials checked on every request, after the signature.

Three kinds of denial, each kept only as long as a token it could match can be alive:
- `jti`: one access token (logout);
- `sid`: every access token of one login session (logout, refresh-token reuse, logout-all);
- `user`: every token of a user issued before a moment (logout-all, disable, role change,
  password reset). `sid` covers the tokens issued in the same second as that moment, which an
  integer `iat` cannot order.

`DatabaseRevocationList` keeps the live set in memory over the database and re-reads it when the
host's `ChangeSignal` moves; `RedisRevocationList` shares it across hosts. Both fail closed:
if the check cannot be made, `RevocationUnavailable` is raised and the request is denied.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import structlog
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import revocations
from carevault.tokens.access import AccessClaims
from carevault.tokens.signal import ChangeSignal

log = structlog.get_logger("carevault.tokens")


class RevocationUnavailable(Exception):
    """The revocation state cannot be read; the caller must deny."""


class RevocationList(Protocol):
    """What every revocation backend promises."""

    async def start(self) -> None: ...

    async def is_revoked(self, claims: AccessClaims) -> bool:
        """True when the token was revoked by jti, by session, or by a user-wide cut-off."""

    async def revoke_token(self, jti: str, expires_at: float) -> None: ...

    async def revoke_sessions(self, sids: list[str], expires_at: float) -> None: ...

    async def revoke_user(self, user_id: str, not_before: float, expires_at: float) -> None: ...

    async def close(self) -> None: ...


class _LiveSet:
    """In-memory copy of the unexpired revocations."""

    def __init__(self) -> None:
        self.jti: dict[str, float] = {}
        self.sid: dict[str, float] = {}
        self.user: dict[str, tuple[float, float]] = {}  # user -> (not_before, expires_at)

    def add(self, kind: str, value: str, not_before: float | None, expires_at: float) -> None:
        if kind == "jti":
            self.jti[value] = max(expires_at, self.jti.get(value, 0))
        elif kind == "sid":
            self.sid[value] = max(expires_at, self.sid.get(value, 0))
        elif kind == "user" and not_before is not None:
            old_nb, old_exp = self.user.get(value, (0.0, 0.0))
            self.user[value] = (max(not_before, old_nb), max(expires_at, old_exp))

    def matches(self, claims: AccessClaims) -> bool:
        if claims.jti in self.jti or claims.sid in self.sid:
            return True
        cutoff = self.user.get(claims.sub)
        return cutoff is not None and claims.iat < int(cutoff[0])


class DatabaseRevocationList:
    def __init__(
        self,
        engine: AsyncEngine,
        signal: ChangeSignal,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._signal = signal
        self._clock = clock
        self._live = _LiveSet()
        self._seen = -1
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._sync()

    async def _sync(self) -> None:
        async with self._lock:
            seen = self._signal.read()
            if seen == self._seen:
                return
            now = self._clock()
            live = _LiveSet()
            try:
                async with read_connection(self._engine) as conn:
                    rows = await conn.execute(
                        select(
                            revocations.c.kind,
                            revocations.c.value,
                            revocations.c.not_before,
                            revocations.c.expires_at,
                        ).where(revocations.c.expires_at > now)
                    )
                    for kind, value, not_before, expires_at in rows:
                        live.add(kind, value, not_before, expires_at)
            except Exception as err:
                raise RevocationUnavailable from err
            self._live = live
            self._seen = seen

    async def is_revoked(self, claims: AccessClaims) -> bool:
        if self._signal.read() != self._seen:
            await self._sync()
        return self._live.matches(claims)

    async def _record(self, rows: list[dict[str, object]]) -> None:
        if not rows:
            return
        now = self._clock()
        for row in rows:
            row["created_at"] = now
        async with write_transaction(self._engine) as conn:
            await conn.execute(delete(revocations).where(revocations.c.expires_at <= now))
            await conn.execute(insert(revocations), rows)
        for row in rows:
            self._live.add(row["kind"], row["value"], row.get("not_before"), row["expires_at"])  # type: ignore[arg-type]
        self._signal.bump()

    async def revoke_token(self, jti: str, expires_at: float) -> None:
        await self._record(
            [{"kind": "jti", "value": jti, "not_before": None, "expires_at": expires_at}]
        )

    async def revoke_sessions(self, sids: list[str], expires_at: float) -> None:
        await self._record(
            [
                {"kind": "sid", "value": s, "not_before": None, "expires_at": expires_at}
                for s in sids
            ]
        )

    async def revoke_user(self, user_id: str, not_before: float, expires_at: float) -> None:
        await self._record(
            [{"kind": "user", "value": user_id, "not_before": not_before, "expires_at": expires_at}]
        )

    async def close(self) -> None:
        return None


class RedisRevocationList:
    """Cluster backend: one round trip per check; the database stays the durable record.

    Redis may lose its data (restart without persistence, eviction), which must never bring a
    revoked token back. A sentinel key without expiry is written after the unexpired rows are
    loaded from the database; every check reads it in the same MGET, and when it is gone the
    rows are loaded again before the answer is given. Configure Redis with
    `maxmemory-policy noeviction` so that denials are not evicted one by one.
    """

    PREFIX = "carevault:revoked:"
    SENTINEL = "carevault:revoked:loaded"

    def __init__(self, engine: AsyncEngine, redis_url: str, clock: Callable[[], float] = time.time):
        import redis.asyncio as redis

        self._engine = engine
        self._clock = clock
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
        )
        self._reload_lock = asyncio.Lock()
        # A denial is in the database but Redis did not take it: until every worker has been
        # made to re-read the database, this worker answers nothing (see `_forget_loaded`).
        self._unpublished = False

    def _key(self, kind: str, value: str) -> str:
        return f"{self.PREFIX}{kind}:{value}"

    async def start(self) -> None:
        """Load the denials into Redis; if Redis is down, serve anyway: every check then
        fails closed (503) until Redis answers and the sentinel path has loaded them."""
        try:
            await self._load()
        except RevocationUnavailable:
            log.warning("revocation_backend_unavailable")

    async def _load(self) -> None:
        now = self._clock()
        try:
            async with read_connection(self._engine) as conn:
                rows = (
                    await conn.execute(
                        select(
                            revocations.c.kind,
                            revocations.c.value,
                            revocations.c.not_before,
                            revocations.c.expires_at,
                        ).where(revocations.c.expires_at > now)
                    )
                ).all()
        except Exception as err:
            raise RevocationUnavailable from err
        await self._publish([dict(r._mapping) for r in rows])
        try:
            await self._redis.set(self.SENTINEL, "1")
        except Exception as err:
            raise RevocationUnavailable from err

    async def _publish(self, rows: list[dict[str, object]]) -> None:
        if not rows:
            return
        now = self._clock()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for row in rows:
                    ttl_ms = max(1, int((float(row["expires_at"]) - now) * 1000))  # type: ignore[arg-type]
                    key = self._key(str(row["kind"]), str(row["value"]))
                    if row["kind"] == "user":
                        # Keep the latest cut-off if two arrive out of order.
                        await pipe.eval(
                            "local v = redis.call('GET', KEYS[1]) "
                            "if (not v) or tonumber(v) < tonumber(ARGV[1]) then "
                            "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end return 1",
                            1,
                            key,
                            repr(float(row["not_before"])),  # type: ignore[arg-type]
                            ttl_ms,
                        )
                    else:
                        await pipe.set(key, "1", px=ttl_ms)
                await pipe.execute()
        except Exception as err:
            raise RevocationUnavailable from err

    async def _forget_loaded(self) -> None:
        """Remove the sentinel, so that every worker loads the denials from the database (the
        durable record) before its next answer; a denial whose publication failed is then
        honoured everywhere. Best effort: on failure the flag stays and this worker retries
        before each answer, denying (503) meanwhile."""
        try:
            await self._redis.delete(self.SENTINEL)
        except Exception:
            log.warning("revocation_publish_pending")
            return
        self._unpublished = False

    async def is_revoked(self, claims: AccessClaims) -> bool:
        if self._unpublished:
            await self._forget_loaded()
            if self._unpublished:
                raise RevocationUnavailable
        keys = (
            self._key("jti", claims.jti),
            self._key("sid", claims.sid),
            self._key("user", claims.sub),
            self.SENTINEL,
        )
        try:
            jti, sid, cutoff, loaded = await self._redis.mget(*keys)
            if loaded is None:  # Redis lost its data: re-load the denials before answering
                async with self._reload_lock:
                    if await self._redis.get(self.SENTINEL) is None:
                        await self._load()
                jti, sid, cutoff, loaded = await self._redis.mget(*keys)
        except RevocationUnavailable:
            raise
        except Exception as err:
            raise RevocationUnavailable from err
        if loaded is None:
            raise RevocationUnavailable
        if jti is not None or sid is not None:
            return True
        return cutoff is not None and claims.iat < int(float(cutoff))

    async def _record(self, rows: list[dict[str, object]]) -> None:
        now = self._clock()
        for row in rows:
            row["created_at"] = now
        async with write_transaction(self._engine) as conn:
            await conn.execute(delete(revocations).where(revocations.c.expires_at <= now))
            await conn.execute(insert(revocations), rows)
        try:
            await self._publish(rows)
        except RevocationUnavailable:
            # Recorded but not published: other workers would accept the token until Redis
            # lost its data. Make them all re-read the database instead, now or at this
            # worker's next check.
            self._unpublished = True
            await self._forget_loaded()
            raise

    async def revoke_token(self, jti: str, expires_at: float) -> None:
        await self._record(
            [{"kind": "jti", "value": jti, "not_before": None, "expires_at": expires_at}]
        )

    async def revoke_sessions(self, sids: list[str], expires_at: float) -> None:
        if sids:
            await self._record(
                [
                    {"kind": "sid", "value": s, "not_before": None, "expires_at": expires_at}
                    for s in sids
                ]
            )

    async def revoke_user(self, user_id: str, not_before: float, expires_at: float) -> None:
        await self._record(
            [{"kind": "user", "value": user_id, "not_before": not_before, "expires_at": expires_at}]
        )

    async def close(self) -> None:
        await self._redis.aclose()

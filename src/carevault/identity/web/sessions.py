"""The server-side browser session store, and the user's token logins for the session list.

The cookie holds 256 random bits; the table holds only their SHA-256 (`token_hash`), so a
database reader cannot ride a session. Rows are listed and ended by a public `id` that is never
a credential. A change of who the session is or what it proves (the password, then the second
factor) is a rotation: the old row ends and a new one starts with a new cookie value and a new
CSRF token, so a session id planted in a browser before login is worthless after it.

Each use checks the idle and absolute limits on the injected clock. `last_seen_at` is written at
most once per `TOUCH_SECONDS` of a session, so a burst of requests costs one read each rather
than a write each; the idle limit may then end a session up to that much early, never late.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import and_, delete, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.requests import cookie_parser
from starlette.types import Scope

from carevault.config import Settings
from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import browser_sessions, refresh_families, refresh_tokens
from carevault.identity.authentication import RequestContext
from carevault.identity.mfa.challenges import token_hash

COOKIE = "__Host-carevault-session"
TOKEN_BYTES = 32  # 256 bits
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{43}")  # what token_urlsafe(32) hands out
TOUCH_SECONDS = 60.0
RETAIN_SECONDS = 86400.0  # ended rows linger a day; the security events keep the history
# Passes of `end_all`, each after the rotations it waited for committed: a session rotated
# more often than this while one logout-all runs is left live.
END_ALL_PASSES = 8
_STATE_KEY = "carevault.browser_session"  # the request's session, looked up once

ANONYMOUS = "anonymous"
MFA_PENDING = "mfa_pending"
ACTIVE = "active"
ENDED = "ended"


class SessionGone(Exception):
    """The session was ended or rotated by another request meanwhile."""


@dataclass(frozen=True)
class BrowserSession:
    id: str
    user_id: str | None
    state: str
    csrf_token: str
    mfa_attempt: str | None
    amr: tuple[str, ...]
    acr: str | None
    auth_time: int | None
    created_at: float
    last_seen_at: float
    absolute_expires_at: float
    address: str | None
    device: str | None
    idle_seconds: float

    @property
    def idle_expires_at(self) -> float:
        return self.last_seen_at + self.idle_seconds

    @property
    def expires_at(self) -> float:
        return min(self.idle_expires_at, self.absolute_expires_at)


@dataclass(frozen=True)
class TokenLogin:
    """A refresh family (a login through `POST /auth/login`), as the session list shows it."""

    id: str
    client_id: str
    acr: str | None
    created_at: float
    last_used_at: float | None
    address: str | None
    device: str | None


def cookie_value(scope: Scope) -> str | None:
    """The session cookie of a request, if it has the shape of one the server hands out."""
    for name, raw in scope.get("headers", ()):
        if name == b"cookie":
            value = cookie_parser(raw.decode("latin-1")).get(COOKIE)
            return value if value and _COOKIE_VALUE.fullmatch(value) else None
    return None


class BrowserSessions:
    def __init__(
        self, settings: Settings, engine: AsyncEngine, clock: Callable[[], float] = time.time
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._clock = clock

    # -- starting and rotating ------------------------------------------------------------------

    async def start(
        self,
        ctx: RequestContext,
        *,
        state: str,
        user_id: str | None = None,
        amr: Sequence[str] = (),
        acr: str | None = None,
        auth_time: int | None = None,
        mfa_attempt: str | None = None,
        lifetime: float | None = None,
    ) -> tuple[BrowserSession, str]:
        """A new session; returns it and the cookie value (handed out once, never stored)."""
        async with write_transaction(self._engine) as conn:
            return await self._insert(
                conn, ctx, state, user_id, amr, acr, auth_time, mfa_attempt, lifetime
            )

    async def rotate(
        self,
        old: BrowserSession,
        ctx: RequestContext,
        *,
        state: str,
        user_id: str | None,
        amr: Sequence[str] = (),
        acr: str | None = None,
        auth_time: int | None = None,
        lifetime: float | None = None,
    ) -> tuple[BrowserSession, str]:
        """End `old` and start its successor in one transaction. Raises `SessionGone` when `old`
        is no longer live in the state it was read in: of two requests finishing the same login,
        one gets the new session. `lifetime` caps the successor's absolute lifetime (a step-up
        keeps the login's deadline)."""
        now = self._clock()
        async with write_transaction(self._engine) as conn:
            ended = await conn.execute(
                update(browser_sessions)
                .where(
                    browser_sessions.c.id == old.id,
                    browser_sessions.c.state == old.state,
                    browser_sessions.c.ended_at.is_(None),
                )
                .values(state=ENDED, ended_at=now, ended_reason="rotated")
            )
            if ended.rowcount != 1:
                raise SessionGone
            return await self._insert(
                conn, ctx, state, user_id, amr, acr, auth_time, None, lifetime
            )

    async def _insert(
        self,
        conn: AsyncConnection,
        ctx: RequestContext,
        state: str,
        user_id: str | None,
        amr: Sequence[str],
        acr: str | None,
        auth_time: int | None,
        mfa_attempt: str | None,
        lifetime: float | None,
    ) -> tuple[BrowserSession, str]:
        now = self._clock()
        value = secrets.token_urlsafe(TOKEN_BYTES)
        absolute = self._settings.session_absolute_seconds
        session = BrowserSession(
            id=str(uuid.uuid4()),
            user_id=user_id,
            state=state,
            csrf_token=secrets.token_urlsafe(TOKEN_BYTES),
            mfa_attempt=mfa_attempt,
            amr=tuple(amr),
            acr=acr,
            auth_time=auth_time,
            created_at=now,
            last_seen_at=now,
            absolute_expires_at=now + min(absolute, lifetime or absolute),
            address=ctx.address[:64] if ctx.address else None,
            device=ctx.device[:128] if ctx.device else None,
            idle_seconds=self._settings.session_idle_seconds,
        )
        # Old rows go as new ones arrive, like the MFA challenges: no sweeper to schedule.
        await conn.execute(
            delete(browser_sessions).where(
                or_(
                    browser_sessions.c.absolute_expires_at < now - RETAIN_SECONDS,
                    browser_sessions.c.ended_at < now - RETAIN_SECONDS,
                )
            )
        )
        await conn.execute(
            insert(browser_sessions).values(
                id=session.id,
                token_hash=token_hash(value),
                user_id=user_id,
                state=state,
                csrf_token=session.csrf_token,
                mfa_attempt=mfa_attempt,
                amr=list(session.amr),
                acr=acr,
                auth_time=auth_time,
                created_at=now,
                last_seen_at=now,
                absolute_expires_at=session.absolute_expires_at,
                address=session.address,
                device=session.device,
            )
        )
        return session, value

    # -- using ----------------------------------------------------------------------------------

    async def of_request(self, scope: Scope) -> BrowserSession | None:
        """The live session of the request's cookie, looked up (and touched) once per request:
        the CSRF check and the authenticate step share the answer."""
        value = cookie_value(scope)
        if value is None:
            return None
        state = scope.setdefault("state", {})
        cached = state.get(_STATE_KEY)
        if cached is not None and cached[0] == value:
            return cached[1]  # type: ignore[no-any-return]
        session = await self.lookup(value)
        state[_STATE_KEY] = (value, session)
        return session

    async def lookup(self, value: str) -> BrowserSession | None:
        """The live session behind a cookie value, or None (unknown, ended or expired)."""
        async with read_connection(self._engine) as conn:
            row = (
                await conn.execute(
                    select(browser_sessions).where(
                        browser_sessions.c.token_hash == token_hash(value)
                    )
                )
            ).first()
        if row is None or row.state == ENDED or row.ended_at is not None:
            return None
        session = self._session(row)
        now = self._clock()
        if now >= session.absolute_expires_at:
            await self.end(session.id, "absolute_timeout")
            return None
        if now >= session.idle_expires_at:
            await self.end(session.id, "idle_timeout")
            return None
        if now - session.last_seen_at >= min(TOUCH_SECONDS, session.idle_seconds / 10):
            async with write_transaction(self._engine) as conn:
                await conn.execute(
                    update(browser_sessions)
                    .where(browser_sessions.c.id == session.id)
                    .values(last_seen_at=now)
                )
            session = replace(session, last_seen_at=now)
        return session

    # -- ending ---------------------------------------------------------------------------------

    async def end(
        self, session_id: str, reason: str, *, user_id: str | None = None
    ) -> BrowserSession | None:
        """End a live session (only one of `user_id`'s when given); the session as it ended
        (state `ended`), or None when there was no such live session, also when a parallel
        request ended or rotated it first: of parallel callers, one gets the session back."""
        conditions = [browser_sessions.c.id == session_id, browser_sessions.c.ended_at.is_(None)]
        if user_id is not None:
            conditions.append(browser_sessions.c.user_id == user_id)
        async with write_transaction(self._engine) as conn:
            # One statement, no read before it: on PostgreSQL (READ COMMITTED) parallel ends
            # all read the row live, and the UPDATEs queued behind the first then matched
            # nothing, unseen. The row an UPDATE returns is the one it ended.
            row = (
                await conn.execute(
                    update(browser_sessions)
                    .where(*conditions)
                    .values(state=ENDED, ended_at=self._clock(), ended_reason=reason[:32])
                    .returning(*browser_sessions.c)
                )
            ).first()
        return None if row is None else self._session(row)

    async def end_all(self, user_id: str, reason: str) -> list[str]:
        """End every live session of a user (for logout-all and account changes); their ids."""
        live = (browser_sessions.c.user_id == user_id, browser_sessions.c.ended_at.is_(None))
        now = self._clock()
        ended: list[str] = []
        async with write_transaction(self._engine) as conn:
            for _ in range(END_ALL_PASSES):
                ended += (
                    await conn.execute(
                        update(browser_sessions)
                        .where(*live)
                        .values(state=ENDED, ended_at=now, ended_reason=reason[:32])
                        .returning(browser_sessions.c.id)
                    )
                ).scalars()
                # On PostgreSQL (READ COMMITTED) the UPDATE ends the rows of its own snapshot:
                # when it waited for a parallel rotation, it skips the row that rotation ended
                # and never sees the successor it committed. A later statement does.
                left = await conn.execute(select(browser_sessions.c.id).where(*live).limit(1))
                if left.first() is None:
                    break
        return ended

    # -- the session list -----------------------------------------------------------------------

    async def active_for_user(self, user_id: str) -> list[BrowserSession]:
        now = self._clock()
        idle = self._settings.session_idle_seconds
        async with read_connection(self._engine) as conn:
            rows = (
                await conn.execute(
                    select(browser_sessions)
                    .where(
                        browser_sessions.c.user_id == user_id,
                        browser_sessions.c.state == ACTIVE,
                        browser_sessions.c.ended_at.is_(None),
                        browser_sessions.c.absolute_expires_at > now,
                        browser_sessions.c.last_seen_at > now - idle,
                    )
                    .order_by(browser_sessions.c.created_at)
                )
            ).all()
        return [self._session(row) for row in rows]

    async def token_logins(self, user_id: str, family_id: str | None = None) -> list[TokenLogin]:
        """The user's live refresh families: not revoked, not past their absolute lifetime, and
        holding a refresh token that can still be used."""
        now = self._clock()
        usable = exists().where(
            refresh_tokens.c.family_id == refresh_families.c.id,
            refresh_tokens.c.used_at.is_(None),
            refresh_tokens.c.idle_expires_at > now,
        )
        query = select(refresh_families).where(
            and_(
                refresh_families.c.user_id == user_id,
                refresh_families.c.revoked_at.is_(None),
                refresh_families.c.expires_at > now,
                usable,
            )
        )
        if family_id is not None:
            query = query.where(refresh_families.c.id == family_id)
        async with read_connection(self._engine) as conn:
            rows = (await conn.execute(query.order_by(refresh_families.c.created_at))).all()
        return [
            TokenLogin(
                id=row.id,
                client_id=row.client_id,
                acr=row.acr,
                created_at=row.created_at,
                last_used_at=row.last_used_at,
                address=row.address,
                device=row.device,
            )
            for row in rows
        ]

    def _session(self, row: Any) -> BrowserSession:
        return BrowserSession(
            id=row.id,
            user_id=row.user_id,
            state=row.state,
            csrf_token=row.csrf_token,
            mfa_attempt=row.mfa_attempt,
            amr=tuple(row.amr or ()),
            acr=row.acr,
            auth_time=row.auth_time,
            created_at=row.created_at,
            last_seen_at=row.last_seen_at,
            absolute_expires_at=row.absolute_expires_at,
            address=row.address,
            device=row.device,
            idle_seconds=self._settings.session_idle_seconds,
        )

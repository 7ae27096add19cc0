"""Password login and token refresh for carevault's own login endpoint.

Every path through `login` costs one Argon2 verify (a dummy one for unknown users and locked
accounts) and ends in the same `LoginFailed`, so neither the response nor its timing tells an
unknown username from a wrong password or a locked account.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from carevault.audit.events import SecurityEvent, SecurityEventLog
from carevault.crypto.instance_secrets import InstanceSecrets
from carevault.crypto.passwords import PasswordHasher
from carevault.identity.accounts import USERNAME_PATTERN, User, UserStore, normalize_username
from carevault.identity.roles import Role
from carevault.identity.throttle import LoginThrottle
from carevault.tokens.access import AccessTokenIssuer
from carevault.tokens.refresh import RefreshError, RefreshTokenService
from carevault.tokens.sessions import SessionRevoker

FIRST_PARTY_CLIENT = "carevault-login"
MAX_USERNAME_CHARS = 64
MAX_PASSWORD_CHARS = 128


class LoginFailed(Exception):
    """Wrong username, wrong password, disabled or locked account: deliberately one error."""


@dataclass(frozen=True)
class TokenGrant:
    access_token: str
    expires_in: int
    refresh_token: str


@dataclass(frozen=True)
class RequestContext:
    address: str | None = None
    request_id: str | None = None


def first_party_scope(user: User) -> str:
    # SMART v2 scope syntax; access control intersects it with the role's permissions.
    if Role.patient in user.roles:
        return "openid fhirUser patient/*.cruds"
    return "openid fhirUser user/*.cruds"


class Authenticator:
    def __init__(
        self,
        *,
        users: UserStore,
        hasher: PasswordHasher,
        throttle: LoginThrottle,
        events: SecurityEventLog,
        refresh: RefreshTokenService,
        issuer: AccessTokenIssuer,
        sessions: SessionRevoker,
        instance_secrets: InstanceSecrets,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._users = users
        self._hasher = hasher
        self._throttle = throttle
        self._events = events
        self._refresh = refresh
        self._issuer = issuer
        self._sessions = sessions
        self._secrets = instance_secrets
        self._clock = clock

    async def login(self, username: str, password: str, ctx: RequestContext) -> TokenGrant:
        if ctx.address:
            await self._throttle.check_address(ctx.address)  # raises AddressThrottled
        name = normalize_username(username)[:MAX_USERNAME_CHARS]
        subject_hash = self._secrets.keyed_hash(name)
        verdict = await self._throttle.begin_attempt(subject_hash)
        # A name that could never have been registered is not looked up (PostgreSQL refuses
        # NUL bytes outright), but still costs the dummy verify below.
        lookup = verdict.allowed and USERNAME_PATTERN.fullmatch(name) is not None
        user = await self._users.by_username(name) if lookup else None
        stored_hash = user.password_hash if user is not None else None
        matches, needs_rehash = await self._hasher.verify(
            stored_hash, password[:MAX_PASSWORD_CHARS]
        )
        event = SecurityEvent(
            event="login",
            outcome="failure",
            user_id=user.id if user else None,
            client_id=FIRST_PARTY_CLIENT,
            subject_hash=subject_hash,
            source_address=ctx.address,
            request_id=ctx.request_id,
        )

        if not verdict.allowed:
            event.event = "login_locked" if verdict.reason == "locked" else "login_throttled"
            event.outcome = "denied"
            await self._events.record(event)
            raise LoginFailed
        if user is None or not matches or not user.enabled:
            if user is not None and matches and not user.enabled:
                event.details = {"reason": "disabled"}
            locked_now = await self._throttle.failed(subject_hash)
            if ctx.address:
                await self._throttle.address_failed(ctx.address)
            await self._events.record(event)
            if locked_now:
                await self._events.record(
                    SecurityEvent(
                        event="account_locked",
                        outcome="alert",
                        user_id=event.user_id,
                        subject_hash=subject_hash,
                        source_address=ctx.address,
                        request_id=ctx.request_id,
                    )
                )
            raise LoginFailed

        await self._throttle.succeeded(subject_hash)
        if needs_rehash:
            await self._users.set_password_hash(user.id, await self._hasher.hash(password))
        event.outcome = "success"
        event.details = {"rehashed": True} if needs_rehash else {}
        # Recorded before any token exists: no session starts that the trail does not show.
        await self._events.record(event)
        return await self._start_session(user)

    async def _start_session(self, user: User) -> TokenGrant:
        auth_time = int(self._clock())
        scope = first_party_scope(user)
        family, refresh_token = await self._refresh.start_family(
            user_id=user.id,
            client_id=FIRST_PARTY_CLIENT,
            scope=scope,
            amr=["pwd"],
            auth_time=auth_time,
        )
        token, _ = self._issuer.issue(
            subject=user.id,
            session_id=family.id,
            client_id=FIRST_PARTY_CLIENT,
            scope=scope,
            roles=list(user.roles),
            amr=["pwd"],
            auth_time=auth_time,
        )
        return TokenGrant(token, self._issuer.ttl, refresh_token)

    async def refresh(
        self, refresh_token: str, ctx: RequestContext, client_id: str = FIRST_PARTY_CLIENT
    ) -> TokenGrant:
        try:
            rotation = await self._refresh.rotate(refresh_token, client_id)
        except RefreshError as err:
            if err.reuse and err.family_id:
                await self._sessions.end_family(err.family_id)
                await self._events.record(
                    SecurityEvent(
                        event="refresh_reuse",
                        outcome="alert",
                        user_id=err.user_id,
                        client_id=client_id,
                        source_address=ctx.address,
                        request_id=ctx.request_id,
                        details={"family": err.family_id},
                    )
                )
            else:
                await self._events.record(
                    SecurityEvent(
                        event="token_refresh",
                        outcome="failure",
                        user_id=err.user_id,
                        client_id=client_id,
                        source_address=ctx.address,
                        request_id=ctx.request_id,
                    )
                )
            raise
        family = rotation.family
        user = await self._users.by_id(family.user_id)
        if user is None or not user.enabled:
            await self._sessions.end_all(family.user_id, "disabled")
            raise RefreshError("user disabled")
        token, _ = self._issuer.issue(
            subject=user.id,
            session_id=family.id,
            client_id=family.client_id,
            scope=family.scope,
            roles=list(user.roles),
            amr=family.amr,
            auth_time=family.auth_time,
        )
        await self._events.record(
            SecurityEvent(
                event="token_refresh",
                outcome="success",
                user_id=user.id,
                client_id=family.client_id,
                source_address=ctx.address,
                request_id=ctx.request_id,
                details={"family": family.id},
            )
        )
        return TokenGrant(token, self._issuer.ttl, rotation.refresh_token)

"""Password login and token refresh for carevault's own login endpoint.

Every path through `login` costs one Argon2 verify (a dummy one for unknown users and locked
accounts) and ends in the same `LoginFailed`, so neither the response nor its timing tells an
unknown username from a wrong password or a locked account.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from carevault.audit.events import SecurityEvent, SecurityEventLog
from carevault.crypto.instance_secrets import InstanceSecrets
from carevault.crypto.passwords import PasswordHasher
from carevault.identity.accounts import USERNAME_PATTERN, User, UserStore, normalize_username
from carevault.identity.mfa.policy import AMR_PASSWORD, acr_of
from carevault.identity.roles import Role
from carevault.identity.throttle import LoginThrottle
from carevault.tokens.access import AccessTokenIssuer
from carevault.tokens.refresh import RefreshError, RefreshTokenService, Rotation
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
class MfaRequired:
    """The password was right; a second factor finishes the login (`POST /auth/mfa/verify`)."""

    mfa_token: str
    methods: list[str]
    expires_in: int


@dataclass(frozen=True)
class EnrollmentRequired:
    """The password was right but the account must have a second factor and has none: this
    token can enroll one and do nothing else."""

    access_token: str
    expires_in: int


LoginResult = TokenGrant | MfaRequired | EnrollmentRequired


@dataclass(frozen=True)
class RequestContext:
    address: str | None = None
    request_id: str | None = None
    device: str | None = None  # a short description of the User-Agent, for the session list

    def event(self, name: str, outcome: str, user_id: str | None, **details: Any) -> SecurityEvent:
        """A security event of this request."""
        return SecurityEvent(
            name,
            outcome,
            user_id=user_id,
            source_address=self.address,
            request_id=self.request_id,
            details=details,
        )


def first_party_scope(user: User) -> str:
    # SMART v2 scope syntax; access control intersects it with the role's permissions.
    if Role.patient in user.roles:
        return "openid fhirUser patient/*.cruds"
    return "openid fhirUser user/*.cruds"


class MfaGate(Protocol):
    async def after_password(
        self, user: User, ctx: RequestContext
    ) -> MfaRequired | EnrollmentRequired | None: ...


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
        self.mfa: MfaGate | None = None  # set by build_services (identity/mfa/service.py)

    async def login(self, username: str, password: str, ctx: RequestContext) -> LoginResult:
        """The password step; then a second factor, enrollment, or the tokens."""
        user, second = await self.check_password(username, password, ctx)
        if second is not None:
            return second
        return await self.start_session(user, [AMR_PASSWORD], ctx)

    async def check_password(
        self, username: str, password: str, ctx: RequestContext
    ) -> tuple[User, MfaRequired | EnrollmentRequired | None]:
        """Check a password (every path one Argon2 verify, one generic `LoginFailed`) and what
        the account needs next: a second factor (`MfaRequired`), a factor enrolled first
        (`EnrollmentRequired`), or nothing (the caller starts the session). The browser
        session login shares it with `login`."""
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

        if needs_rehash:
            await self._users.set_password_hash(user.id, await self._hasher.hash(password))
        event.details = {"rehashed": True} if needs_rehash else {}
        if self.mfa is not None:
            second = await self.mfa.after_password(user, ctx)
            if second is not None:
                # The account throttle is cleared only once the login completes: a stolen
                # password alone cannot reset the count of wrong codes.
                await self._throttle.release(subject_hash)
                event.outcome = "success"
                event.details["second_factor"] = (
                    "required" if isinstance(second, MfaRequired) else "enrollment_required"
                )
                await self._events.record(event)
                return user, second
        await self._throttle.succeeded(subject_hash)
        event.outcome = "success"
        # Recorded before any token exists: no session starts that the trail does not show.
        await self._events.record(event)
        return user, None

    async def start_session(
        self,
        user: User,
        amr: list[str],
        ctx: RequestContext,
        *,
        user_verified: bool = False,
        auth_time: int | None = None,
    ) -> TokenGrant:
        """A new login: a refresh family and its first access token."""
        auth_time = int(self._clock()) if auth_time is None else auth_time
        scope = first_party_scope(user)
        acr = acr_of(amr, user_verified=user_verified)
        family, refresh_token = await self._refresh.start_family(
            user_id=user.id,
            client_id=FIRST_PARTY_CLIENT,
            scope=scope,
            amr=amr,
            auth_time=auth_time,
            acr=acr,
            address=ctx.address,
            device=ctx.device,
        )
        token, _ = self._issuer.issue(
            subject=user.id,
            session_id=family.id,
            client_id=FIRST_PARTY_CLIENT,
            scope=scope,
            roles=list(user.roles),
            amr=amr,
            auth_time=auth_time,
            acr=acr,
        )
        return TokenGrant(token, self._issuer.ttl, refresh_token)

    async def account_succeeded(self, user: User) -> None:
        """Clear the account's failure count once a login has fully succeeded."""
        await self._throttle.succeeded(self._secrets.keyed_hash(user.username))

    async def account_failed(self, user: User, ctx: RequestContext) -> bool:
        """A wrong second factor counts like a wrong password; True when it locked the account."""
        if ctx.address:
            await self._throttle.address_failed(ctx.address)
        return await self._throttle.failed(self._secrets.keyed_hash(user.username))

    async def account_open(self, user: User, ctx: RequestContext) -> bool:
        """Reserve an attempt at a second factor, as `login` does for a password: False when the
        account is locked or backing off. Every reservation ends in `account_succeeded`,
        `account_failed` or `account_release`."""
        if ctx.address:
            await self._throttle.check_address(ctx.address)  # raises AddressThrottled
        verdict = await self._throttle.begin_attempt(self._secrets.keyed_hash(user.username))
        return verdict.allowed

    async def account_release(self, user: User) -> None:
        await self._throttle.release(self._secrets.keyed_hash(user.username))

    async def rotate_refresh(
        self, refresh_token: str, ctx: RequestContext, client_id: str
    ) -> tuple[Rotation, User]:
        """Rotate a refresh token of `client_id` and return the rotation with its user; a used
        token coming back ends its family (theft) and raises an alert. Raises `RefreshError`."""
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
        return rotation, user

    async def refresh(
        self, refresh_token: str, ctx: RequestContext, client_id: str = FIRST_PARTY_CLIENT
    ) -> TokenGrant:
        rotation, user = await self.rotate_refresh(refresh_token, ctx, client_id)
        family = rotation.family
        token, _ = self._issuer.issue(
            subject=user.id,
            session_id=family.id,
            client_id=family.client_id,
            scope=family.scope,
            roles=list(user.roles),
            amr=family.amr,
            auth_time=family.auth_time,
            acr=family.acr,
        )
        return TokenGrant(token, self._issuer.ttl, rotation.refresh_token)

"""The second step of a login, step-up, and the management of a user's factors.

A login whose password was right continues here (`after_password`): an account with a factor
gets an `mfa_token` (single use, `mfa_token_ttl_seconds`, only its hash stored, and no JWT, so
it is useless as an access token); an account that must have MFA and has none gets an
enrollment-scoped token. `verify_login` takes the mfa_token and one factor's proof and starts
the session. Every attempt at a factor reserves an attempt on the account's login throttle, so
wrong codes lock the account like wrong passwords do (and the TOTP factor locks on its own).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from carevault.audit.events import SecurityEventLog
from carevault.config import Settings
from carevault.identity.accounts import User, UserStore
from carevault.identity.authentication import (
    Authenticator,
    EnrollmentRequired,
    MfaRequired,
    RequestContext,
    TokenGrant,
)
from carevault.identity.mfa.challenges import (
    MAX_TOKEN_CHARS,
    ChallengeInvalid,
    ChallengeStore,
    token_hash,
)
from carevault.identity.mfa.policy import (
    AMR_OTP,
    AMR_PASSWORD,
    ENROLL_SCOPE,
    METHOD_RECOVERY,
    METHOD_TOTP,
    METHOD_WEBAUTHN,
    acr_of,
    mfa_required,
)
from carevault.identity.mfa.recovery import RecoveryCodes
from carevault.identity.mfa.totp import Enrollment, TotpFactors, TotpResult
from carevault.identity.principal import Principal
from carevault.tokens.access import AccessTokenIssuer
from carevault.tokens.sessions import SessionRevoker

LOGIN_PURPOSE = "login"


class MfaFailed(Exception):
    """The proof was not accepted (wrong, replayed, unknown method). Generic for the client;
    `reason` is for the trail."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class MfaTokenInvalid(Exception):
    """The mfa_token is unknown, expired or used."""


class MfaLocked(Exception):
    """Too many wrong factors: the account (or the factor) is locked for a while."""

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__("locked")


class FactorRequired(Exception):
    """Removing this factor would leave an account that must have MFA without one."""


@dataclass(frozen=True)
class WebAuthnProof:
    amr: str  # hwk | swk
    user_verified: bool


class WebAuthnFailed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class WebAuthnFactors(Protocol):
    """The WebAuthn side (identity/mfa/webauthn.py): assertions checked against a challenge
    issued for `bound_to` (the login attempt or the session stepping up)."""

    async def has_credentials(self, user_id: str) -> bool: ...

    async def describe(self, user_id: str) -> list[dict[str, Any]]: ...

    async def authenticate(
        self, user: User, bound_to: str, credential: dict[str, Any], ctx: RequestContext
    ) -> WebAuthnProof: ...

    async def remove_all(self, user_id: str) -> int: ...


@dataclass(frozen=True)
class FactorProof:
    method: str
    code: str | None = None
    credential: dict[str, Any] | None = None


@dataclass(frozen=True)
class Verified:
    amr: list[str]
    user_verified: bool = False


@dataclass(frozen=True)
class Confirmation:
    recovery_codes: list[str]
    grant: TokenGrant | None = None  # when enrollment-scoped: the full session it unlocks


@dataclass
class FactorSummary:
    totp: list[dict[str, Any]] = field(default_factory=list)
    recovery_codes_remaining: int = 0


class MfaService:
    def __init__(
        self,
        *,
        settings: Settings,
        users: UserStore,
        authenticator: Authenticator,
        issuer: AccessTokenIssuer,
        challenges: ChallengeStore,
        totp: TotpFactors,
        recovery: RecoveryCodes,
        sessions: SessionRevoker,
        events: SecurityEventLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._users = users
        self._auth = authenticator
        self._issuer = issuer
        self.challenges = challenges
        self.totp = totp
        self.recovery = recovery
        self._sessions = sessions
        self._events = events
        self._clock = clock
        self.webauthn: WebAuthnFactors | None = None

    # -- the login's second step ----------------------------------------------------------------

    async def methods(self, user_id: str) -> list[str]:
        """The factors a user can finish a login with, strongest first."""
        return (await self._factors(user_id))[0]

    async def _factors(self, user_id: str) -> tuple[list[str], bool]:
        """`methods`, and whether every key of the account was flagged as possibly cloned:
        the account still has a factor then, so the password alone must not lead to
        enrolling a new one (whoever cloned the key may hold the password too); a recovery
        code or an admin's reset gets back in. One read of the keys answers both."""
        keys = await self.webauthn.describe(user_id) if self.webauthn is not None else []
        usable_key = any(not key.get("flagged") for key in keys)
        only_flagged_keys = bool(keys) and not usable_key
        found = [METHOD_WEBAUTHN] if usable_key else []
        if await self.totp.factors(user_id):
            found.append(METHOD_TOTP)
        if (found or only_flagged_keys) and await self.recovery.remaining(user_id):
            found.append(METHOD_RECOVERY)
        return found, only_flagged_keys

    async def after_password(
        self, user: User, ctx: RequestContext
    ) -> MfaRequired | EnrollmentRequired | None:
        methods, only_flagged_keys = await self._factors(user.id)
        if methods or only_flagged_keys:
            ttl = self._settings.mfa_token_ttl_seconds
            token = await self.challenges.issue(LOGIN_PURPOSE, user.id, ttl)
            return MfaRequired(token, methods, ttl)
        if mfa_required(self._settings, user.roles):
            token, ttl = self.enrollment_token(user)
            return EnrollmentRequired(token, ttl)
        return None

    def enrollment_token(self, user: User) -> tuple[str, int]:
        """A token that can enroll a factor and nothing else: its only scope is the enrollment
        scope and it carries no role, so every other route refuses it."""
        token, claims = self._issuer.issue(
            subject=user.id,
            session_id=f"enroll-{uuid.uuid4()}",
            client_id="carevault-login",
            scope=ENROLL_SCOPE,
            roles=[],
            amr=[AMR_PASSWORD],
            auth_time=int(self._clock()),
            acr=acr_of([AMR_PASSWORD]),
        )
        return token, claims.exp - claims.iat

    async def login_user(self, mfa_token: str) -> User:
        """The user an mfa_token was issued to (for WebAuthn options), without using it."""
        try:
            challenge = await self.challenges.peek(mfa_token, LOGIN_PURPOSE)
        except ChallengeInvalid:
            raise MfaTokenInvalid from None
        user = await self._users.by_id(challenge.user_id)
        if user is None or not user.enabled:
            raise MfaTokenInvalid
        return user

    async def verify_login(
        self, mfa_token: str, proof: FactorProof, ctx: RequestContext
    ) -> TokenGrant:
        user, verified = await self.complete(mfa_token, proof, ctx)
        return await self._auth.start_session(
            user, verified.amr, ctx, user_verified=verified.user_verified
        )

    async def complete(
        self, mfa_token: str, proof: FactorProof, ctx: RequestContext
    ) -> tuple[User, Verified]:
        """Check the factor against the login attempt of `mfa_token` and use the token up;
        the caller starts the session (tokens, or a browser session)."""
        if not mfa_token or len(mfa_token) > MAX_TOKEN_CHARS:
            await self._record("mfa_verify", "failure", None, ctx, reason="mfa_token")
            raise MfaTokenInvalid
        return await self.complete_attempt(token_hash(mfa_token), proof, ctx)

    async def complete_attempt(
        self, attempt: str, proof: FactorProof, ctx: RequestContext
    ) -> tuple[User, Verified]:
        """As `complete`, by the hash of the login attempt's token (`Challenge.id_hash`), which
        is all a browser session keeps of it."""
        try:
            challenge = await self.challenges.peek_hash(attempt, LOGIN_PURPOSE)
        except ChallengeInvalid:
            await self._record("mfa_verify", "failure", None, ctx, reason="mfa_token")
            raise MfaTokenInvalid from None
        user = await self._users.by_id(challenge.user_id)
        if user is None or not user.enabled:
            await self._record("mfa_verify", "failure", challenge.user_id, ctx, reason="disabled")
            raise MfaTokenInvalid
        verified = await self._check(user, proof, challenge.id_hash, ctx, "mfa_verify")
        try:
            await self.challenges.consume_hash(attempt, LOGIN_PURPOSE)
        except ChallengeInvalid:  # another request finished this login first
            await self._record("mfa_verify", "failure", user.id, ctx, reason="mfa_token_used")
            raise MfaTokenInvalid from None
        await self._record("mfa_verify", "success", user.id, ctx, method=proof.method)
        return user, verified

    # -- step-up ----------------------------------------------------------------------------

    async def step_up(self, principal: Principal, proof: FactorProof, ctx: RequestContext) -> str:
        """A fresh access token for the same session, its auth_time now and its amr showing
        the factor just proved."""
        user = await self._users.by_id(principal.user_id)
        if user is None or not user.enabled or ENROLL_SCOPE in principal.scopes:
            raise MfaFailed("account")
        verified = await self.prove(user, proof, f"sid:{principal.session_id}", ctx)
        amr = sorted({AMR_PASSWORD, *principal.amr, *verified.amr})
        token, _ = self._issuer.issue(
            subject=user.id,
            session_id=principal.session_id,
            client_id=principal.client_id,
            scope=" ".join(principal.scopes),
            roles=list(user.roles),
            amr=amr,
            auth_time=int(self._clock()),
            acr=acr_of(amr, user_verified=verified.user_verified),
        )
        await self._record("step_up", "success", user.id, ctx, method=proof.method)
        return token

    async def prove(
        self, user: User, proof: FactorProof, bound_to: str, ctx: RequestContext
    ) -> Verified:
        """A factor proved again by a signed-in user (step-up of a token or a browser session);
        `bound_to` names the session a WebAuthn challenge was issued for."""
        return await self._check(user, proof, bound_to, ctx, "step_up")

    # -- one factor -------------------------------------------------------------------------

    async def _check(
        self, user: User, proof: FactorProof, bound_to: str, ctx: RequestContext, event: str
    ) -> Verified:
        if not await self._auth.account_open(user, ctx):
            await self._record(event, "denied", user.id, ctx, reason="locked")
            raise MfaLocked(self._settings.login_lockout_seconds)
        try:
            verified = await self._proof(user, proof, bound_to, ctx)
        except MfaLocked:
            await self._auth.account_failed(user, ctx)
            await self._record(event, "denied", user.id, ctx, reason="factor_locked")
            raise
        except MfaFailed as err:
            locked = await self._auth.account_failed(user, ctx)
            await self._record(event, "failure", user.id, ctx, reason=err.reason)
            if locked:
                await self._record("account_locked", "alert", user.id, ctx)
            raise
        except BaseException:
            await self._auth.account_release(user)
            raise
        await self._auth.account_succeeded(user)
        return verified

    async def _proof(
        self, user: User, proof: FactorProof, bound_to: str, ctx: RequestContext
    ) -> Verified:
        if proof.method == METHOD_TOTP and proof.code is not None:
            result = await self.totp.verify(user.id, proof.code)
            if result is TotpResult.ok:
                return Verified([AMR_PASSWORD, AMR_OTP])
            if result is TotpResult.locked_now:
                await self._record("mfa_factor_locked", "alert", user.id, ctx, method="totp")
            if result in (TotpResult.locked, TotpResult.locked_now):
                raise MfaLocked(self._settings.login_lockout_seconds)
            raise MfaFailed(f"totp_{result.value}")
        if proof.method == METHOD_RECOVERY and proof.code is not None:
            if not await self.recovery.use(user.id, proof.code):
                raise MfaFailed("recovery_code")
            remaining = await self.recovery.remaining(user.id)
            await self._record("recovery_code_used", "alert", user.id, ctx, remaining=remaining)
            return Verified([AMR_PASSWORD, AMR_OTP])
        if proof.method == METHOD_WEBAUTHN and proof.credential is not None:
            if self.webauthn is None:
                raise MfaFailed("webauthn_unavailable")
            try:
                key = await self.webauthn.authenticate(user, bound_to, proof.credential, ctx)
            except WebAuthnFailed as err:
                raise MfaFailed(f"webauthn_{err.reason}") from None
            return Verified([AMR_PASSWORD, key.amr], key.user_verified)
        raise MfaFailed("method")

    # -- factors ----------------------------------------------------------------------------

    async def enroll_totp(self, principal: Principal, ctx: RequestContext) -> Enrollment:
        user = await self._require_user(principal)
        enrollment = await self.totp.enroll(user.id, user.username)
        await self._record("mfa_enroll_started", "success", user.id, ctx, method="totp")
        return enrollment

    async def confirm_totp(
        self, principal: Principal, code: str, ctx: RequestContext
    ) -> Confirmation:
        user = await self._require_user(principal)
        result = await self.totp.confirm(user.id, code)
        if result is not TotpResult.ok:
            await self._auth.account_failed(user, ctx)
            await self._record("mfa_enrolled", "failure", user.id, ctx, reason=result.value)
            if result in (TotpResult.locked, TotpResult.locked_now):
                raise MfaLocked(self._settings.login_lockout_seconds)
            raise MfaFailed(f"totp_{result.value}")
        codes = []
        if not await self.recovery.remaining(user.id):
            codes = await self.recovery.generate(user.id)
        await self._record("mfa_enrolled", "success", user.id, ctx, method="totp")
        grant = await self._after_enrollment(principal, user, ctx, AMR_OTP)
        return Confirmation(codes, grant)

    async def factor_added(
        self, principal: Principal, proof: WebAuthnProof, ctx: RequestContext
    ) -> Confirmation:
        """After a WebAuthn registration: recovery codes for a first factor, and the full
        session an enrollment-scoped token was waiting for."""
        user = await self._require_user(principal)
        codes = []
        if not await self.recovery.remaining(user.id):
            codes = await self.recovery.generate(user.id)
        await self._record("mfa_enrolled", "success", user.id, ctx, method=METHOD_WEBAUTHN)
        grant = await self._after_enrollment(
            principal, user, ctx, proof.amr, user_verified=proof.user_verified
        )
        return Confirmation(codes, grant)

    async def _after_enrollment(
        self,
        principal: Principal,
        user: User,
        ctx: RequestContext,
        method_amr: str,
        *,
        user_verified: bool = False,
    ) -> TokenGrant | None:
        if ENROLL_SCOPE not in principal.scopes:
            return None
        # The factor was just proved (its first code or its registration): the login that
        # was waiting for it completes, and the enrollment token is spent.
        await self._sessions.end_session(
            principal.session_id, principal.token_id, principal.token_expires_at
        )
        await self._auth.account_succeeded(user)
        return await self._auth.start_session(
            user, [AMR_PASSWORD, method_amr], ctx, user_verified=user_verified
        )

    async def ensure_removable(self, user: User, *, remaining_factors: int) -> None:
        """Refuse to leave an account that must have MFA without a factor."""
        if remaining_factors == 0 and mfa_required(self._settings, user.roles):
            raise FactorRequired

    async def factor_removed(self, user: User, method: str, ctx: RequestContext) -> None:
        if not await self.methods(user.id):
            await self.recovery.remove_all(user.id)  # no factor left for them to stand in for
        await self._record("mfa_factor_removed", "success", user.id, ctx, method=method)

    async def regenerate_recovery_codes(
        self, principal: Principal, ctx: RequestContext
    ) -> list[str]:
        user = await self._require_user(principal)
        if not await self.methods(user.id):
            raise FactorRequired
        codes = await self.recovery.generate(user.id)
        await self._record("recovery_codes_regenerated", "success", user.id, ctx)
        return codes

    async def summary(self, user_id: str) -> FactorSummary:
        summary = FactorSummary(recovery_codes_remaining=await self.recovery.remaining(user_id))
        for factor in await self.totp.factors(user_id):
            summary.totp.append(
                {
                    "id": factor.id,
                    "created_at": int(factor.created_at),
                    "last_used_at": int(factor.last_used_at) if factor.last_used_at else None,
                    "locked": bool(factor.locked_until and factor.locked_until > self._clock()),
                }
            )
        return summary

    async def remove_totp(self, principal: Principal, factor_id: str, ctx: RequestContext) -> bool:
        user = await self._require_user(principal)
        factors = await self.totp.factors(user.id)
        if factor_id not in {f.id for f in factors}:
            return False
        others = self.webauthn is not None and await self.webauthn.has_credentials(user.id)
        await self.ensure_removable(user, remaining_factors=len(factors) - 1 + int(others))
        await self.totp.remove(user.id, factor_id)
        await self.factor_removed(user, METHOD_TOTP, ctx)
        return True

    async def reset(self, user: User, ctx: RequestContext, *, by: str | None) -> None:
        """Remove every factor and recovery code and end every session: the next login starts
        enrollment over (an admin's act, for a lost or compromised authenticator)."""
        await self.totp.remove_all(user.id)
        if self.webauthn is not None:
            await self.webauthn.remove_all(user.id)
        await self.recovery.remove_all(user.id)
        await self.challenges.revoke_user(user.id)
        sessions = await self._sessions.end_all(user.id, "mfa_reset")
        await self._record(
            "mfa_reset", "success", user.id, ctx, by=by or "cli", sessions=len(sessions)
        )

    async def _require_user(self, principal: Principal) -> User:
        user = await self._users.by_id(principal.user_id)
        if user is None or not user.enabled:
            raise MfaFailed("account")
        return user

    async def _record(
        self, event: str, outcome: str, user_id: str | None, ctx: RequestContext, **details: Any
    ) -> None:
        await self._events.record(ctx.event(event, outcome, user_id, **details))

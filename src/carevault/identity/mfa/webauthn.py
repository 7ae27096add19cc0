"""WebAuthn / passkeys through the `webauthn` package (py_webauthn): the registration and
authentication ceremonies and the credentials they leave.

A challenge is 64 random bytes in the challenge store, bound to what it was issued for (the
login attempt, or the session registering or stepping up) and used up by the first response
that comes back, accepted or not: a response can be checked against one challenge only once.
Origin and RP id are checked against the settings; user verification is required of the roles
that must have MFA. A validly signed assertion whose sign counter did not move forward means
the key exists twice (a cloned authenticator): the credential is flagged, an alert recorded,
and it is refused from then on.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    base64url_to_bytes,
    bytes_to_base64url,
    generate_challenge,
    parse_authentication_credential_json,
    parse_registration_credential_json,
)
from webauthn.helpers.exceptions import InvalidJSONStructure, WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from carevault.audit.events import SecurityEventLog
from carevault.config import Settings
from carevault.db.engine import write_transaction
from carevault.db.key_reads import read_by_key
from carevault.db.tables import users, webauthn_credentials
from carevault.identity.accounts import User
from carevault.identity.authentication import RequestContext
from carevault.identity.mfa.challenges import ChallengeInvalid, ChallengeStore
from carevault.identity.mfa.policy import (
    AMR_HARDWARE_KEY,
    AMR_SOFTWARE_KEY,
    METHOD_WEBAUTHN,
    mfa_required,
)
from carevault.identity.mfa.service import WebAuthnFailed, WebAuthnProof

REGISTER_PURPOSE = "webauthn-register"
LOGIN_PURPOSE = "webauthn-login"  # the login's second step and step-up alike
MAX_CREDENTIALS = 10
MAX_CREDENTIAL_ID_CHARS = 1400  # the column; the spec allows 1023 bytes (1364 characters)
DEFAULT_LABEL = "Security key"
# Earlier live challenges used up per options call: each call leaves one, racing calls a few.
SWEEP_LIMIT = 8

T = TypeVar("T")

# The library raises one exception type for every cause of a refused response; its message is
# the only distinction. The reason goes to the trail (never to the client), and a message not
# listed here still refuses, as "invalid".
_OF_USER = webauthn_credentials.c.user_id == bindparam("user_id")
_IN_ORDER = (webauthn_credentials.c.created_at, webauthn_credentials.c.id)
_CREDENTIALS = select(webauthn_credentials).where(_OF_USER).order_by(*_IN_ORDER)
_USABLE_CREDENTIALS = (
    select(webauthn_credentials)
    .where(_OF_USER, webauthn_credentials.c.flagged_at.is_(None))
    .order_by(*_IN_ORDER)
)
_CREDENTIAL = select(webauthn_credentials).where(
    _OF_USER, webauthn_credentials.c.credential_id == bindparam("credential_id")
)

_REASONS = (
    ("Unexpected client data origin", "origin"),
    ("Unexpected RP ID hash", "rp_id"),
    ("Client data challenge was not expected challenge", "challenge_mismatch"),
    ("User verification is required", "user_verification"),
    ("User was not present", "user_presence"),
    ("User presence was required", "user_presence"),
    ("Could not verify authentication signature", "signature"),
    ("Unexpected client data type", "client_data_type"),
)


class CredentialLimit(WebAuthnFailed):
    """The account already has `MAX_CREDENTIALS` credentials."""

    def __init__(self) -> None:
        super().__init__("limit")


class NoCredentials(WebAuthnFailed):
    """Authentication options for an account without a usable credential."""

    def __init__(self) -> None:
        super().__init__("no_credentials")


@dataclass(frozen=True)
class Registered:
    credential: dict[str, Any]  # as `describe` lists it
    proof: WebAuthnProof


def _checked(verify: Callable[[], T]) -> T:
    """Run one of the library's parsers or verifiers on client-supplied data; any refusal is
    a `WebAuthnFailed`."""
    try:
        return verify()
    except InvalidJSONStructure:
        raise WebAuthnFailed("malformed") from None
    except WebAuthnException as err:
        message = str(err)
        reason = next((r for prefix, r in _REASONS if message.startswith(prefix)), "invalid")
        raise WebAuthnFailed(reason) from None
    except Exception:
        # Some malformed inputs escape the library's own exception types (binascii.Error from
        # a challenge that is not base64url, TypeError from a field of the wrong JSON type):
        # they are refusals like any other, not server errors.
        raise WebAuthnFailed("malformed") from None


def _is_synced(device_type: CredentialDeviceType, backed_up: bool) -> bool:
    # Backup eligible (multi-device) already means the key can leave this authenticator.
    return device_type is CredentialDeviceType.MULTI_DEVICE or backed_up


def _transports(values: Iterable[str]) -> list[AuthenticatorTransport]:
    known = {t.value for t in AuthenticatorTransport}
    return [AuthenticatorTransport(v) for v in values if v in known]


def _descriptor(row: Any) -> PublicKeyCredentialDescriptor:
    return PublicKeyCredentialDescriptor(
        id=base64url_to_bytes(row.credential_id), transports=_transports(row.transports or [])
    )


def _summary(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": values["id"],
        "label": values["label"],
        "created_at": int(values["created_at"]),
        "last_used_at": int(values["last_used_at"]) if values["last_used_at"] else None,
        "backed_up": bool(values["backed_up"]),
        "flagged": values["flagged_at"] is not None,
    }


class WebAuthnCredentials:
    """Implements `service.WebAuthnFactors` (what the login's second step and step-up call),
    and the registration ceremony and credential list the routes use."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        challenges: ChallengeStore,
        events: SecurityEventLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._challenges = challenges
        self._events = events
        self._clock = clock

    # -- the credentials ---------------------------------------------------------------------

    async def has_credentials(self, user_id: str) -> bool:
        return bool(await self._rows(user_id, usable_only=True))

    async def describe(self, user_id: str) -> list[dict[str, Any]]:
        return [_summary(row._asdict()) for row in await self._rows(user_id)]

    async def remove(self, user_id: str, credential_id: str) -> bool:
        """Remove one of the user's credentials (by its id in `describe`)."""
        async with write_transaction(self._engine) as conn:
            removed = await conn.execute(
                delete(webauthn_credentials).where(
                    webauthn_credentials.c.id == credential_id,
                    webauthn_credentials.c.user_id == user_id,
                )
            )
        return removed.rowcount == 1

    async def remove_all(self, user_id: str) -> int:
        async with write_transaction(self._engine) as conn:
            removed = await conn.execute(
                delete(webauthn_credentials).where(webauthn_credentials.c.user_id == user_id)
            )
        return removed.rowcount

    # -- registration ------------------------------------------------------------------------

    async def registration_options(self, user: User, bound_to: str, ctx: RequestContext) -> str:
        """The options for `navigator.credentials.create()` (JSON), their challenge stored for
        `bound_to`."""
        existing = await self._rows(user.id)
        if len(existing) >= MAX_CREDENTIALS:
            raise CredentialLimit
        challenge = generate_challenge()
        ttl = self._settings.mfa_token_ttl_seconds
        options = generate_registration_options(
            rp_id=self._settings.webauthn_rp_id,
            rp_name=self._settings.webauthn_rp_name,
            user_name=user.username,
            # The account's random id, not its name: the handle is stored on the authenticator.
            user_id=user.id.encode(),
            challenge=challenge,
            timeout=ttl * 1000,
            attestation=AttestationConveyancePreference.NONE,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.PREFERRED,
                user_verification=self._user_verification(user),
            ),
            # Flagged ones too: a cloned key is not to come back under a new label.
            exclude_credentials=[_descriptor(row) for row in existing],
        )
        await self._issue(REGISTER_PURPOSE, user, ttl, bound_to, challenge)
        await self._record("mfa_enroll_started", "success", user.id, ctx, method=METHOD_WEBAUTHN)
        return options_to_json(options)

    async def register(
        self,
        user: User,
        bound_to: str,
        credential: dict[str, Any],
        label: str | None,
        ctx: RequestContext,
    ) -> Registered:
        """Check the authenticator's response to the live registration challenge of
        `bound_to` and store the new credential."""
        try:
            return await self._register(user, bound_to, credential, label)
        except WebAuthnFailed as err:
            await self._record(
                "mfa_enrolled", "failure", user.id, ctx, method=METHOD_WEBAUTHN, reason=err.reason
            )
            raise

    async def _register(
        self, user: User, bound_to: str, credential: dict[str, Any], label: str | None
    ) -> Registered:
        expected = await self._consume(REGISTER_PURPOSE, user, bound_to)
        parsed = _checked(lambda: parse_registration_credential_json(credential))
        verified = _checked(
            lambda: verify_registration_response(
                credential=parsed,
                expected_challenge=expected,
                expected_rp_id=self._settings.webauthn_rp_id,
                expected_origin=list(self._settings.webauthn_origins),
                require_user_verification=self._uv_required(user),
            )
        )
        credential_id = bytes_to_base64url(verified.credential_id)
        if len(credential_id) > MAX_CREDENTIAL_ID_CHARS:
            raise WebAuthnFailed("malformed")
        synced = _is_synced(verified.credential_device_type, verified.credential_backed_up)
        row = {
            "id": str(uuid.uuid4()),
            "user_id": user.id,
            "credential_id": credential_id,
            "public_key": verified.credential_public_key,
            "sign_count": verified.sign_count,
            "transports": [t.value for t in parsed.response.transports or []],
            "aaguid": verified.aaguid,
            "backed_up": synced,
            "user_verified": verified.user_verified,
            "label": (label or "").strip()[:64] or DEFAULT_LABEL,
            "created_at": self._clock(),
            "last_used_at": None,
            "flagged_at": None,
        }
        try:
            async with write_transaction(self._engine) as conn:
                # The account's row, locked first: on PostgreSQL (READ COMMITTED) parallel
                # registrations would otherwise all count the same credentials and all insert.
                # NO KEY UPDATE: serialises registrations without blocking the foreign-key
                # checks of other tables' inserts (a login's refresh family).
                await conn.execute(
                    select(users.c.id).where(users.c.id == user.id).with_for_update(key_share=True)
                )
                count = (
                    await conn.execute(
                        select(func.count())
                        .select_from(webauthn_credentials)
                        .where(webauthn_credentials.c.user_id == user.id)
                    )
                ).scalar_one()
                if count >= MAX_CREDENTIALS:
                    raise CredentialLimit
                await conn.execute(insert(webauthn_credentials).values(**row))
        except IntegrityError:
            # The credential id is registered already (to this account or another): a key is
            # one account's.
            raise WebAuthnFailed("duplicate") from None
        amr = AMR_SOFTWARE_KEY if synced else AMR_HARDWARE_KEY
        return Registered(_summary(row), WebAuthnProof(amr, verified.user_verified))

    # -- authentication ----------------------------------------------------------------------

    async def authentication_options(self, user: User, bound_to: str) -> str:
        """The options for `navigator.credentials.get()` (JSON) listing the user's usable
        credentials, their challenge stored for `bound_to` (the login attempt's token hash, or
        `sid:<session>` for step-up)."""
        rows = await self._rows(user.id, usable_only=True)
        if not rows:
            raise NoCredentials
        challenge = generate_challenge()
        ttl = self._settings.mfa_token_ttl_seconds
        options = generate_authentication_options(
            rp_id=self._settings.webauthn_rp_id,
            challenge=challenge,
            timeout=ttl * 1000,
            allow_credentials=[_descriptor(row) for row in rows],
            user_verification=self._user_verification(user),
        )
        await self._issue(LOGIN_PURPOSE, user, ttl, bound_to, challenge)
        return options_to_json(options)

    async def authenticate(
        self, user: User, bound_to: str, credential: dict[str, Any], ctx: RequestContext
    ) -> WebAuthnProof:
        expected = await self._consume(LOGIN_PURPOSE, user, bound_to)
        parsed = _checked(lambda: parse_authentication_credential_json(credential))
        row = await self._find(user.id, bytes_to_base64url(parsed.raw_id))
        if row is None:
            raise WebAuthnFailed("unknown_credential")
        if row.flagged_at is not None:
            raise WebAuthnFailed("flagged")
        verified = _checked(
            lambda: verify_authentication_response(
                credential=parsed,
                expected_challenge=expected,
                expected_rp_id=self._settings.webauthn_rp_id,
                expected_origin=list(self._settings.webauthn_origins),
                credential_public_key=row.public_key,
                # 0 turns the library's counter check off: it would refuse before checking the
                # signature, and a forged assertion must not be able to flag someone's key. The
                # counter is compared below, once the signature is known good.
                credential_current_sign_count=0,
                require_user_verification=self._uv_required(user),
            )
        )
        stored, presented = row.sign_count, verified.new_sign_count
        if (stored or presented) and presented <= stored:
            await self._flag(row, user, ctx, stored, presented)
            raise WebAuthnFailed("counter_regression")
        synced = _is_synced(verified.credential_device_type, verified.credential_backed_up)
        async with write_transaction(self._engine) as conn:
            used = await conn.execute(
                update(webauthn_credentials)
                .where(
                    webauthn_credentials.c.id == row.id,
                    webauthn_credentials.c.flagged_at.is_(None),
                    # Another assertion moved the counter since it was read: one of the two
                    # loses rather than the counter going backwards.
                    webauthn_credentials.c.sign_count == stored,
                )
                .values(sign_count=presented, last_used_at=self._clock(), backed_up=synced)
            )
        if used.rowcount != 1:
            raise WebAuthnFailed("concurrent_use")
        amr = AMR_SOFTWARE_KEY if synced else AMR_HARDWARE_KEY
        return WebAuthnProof(amr, verified.user_verified)

    async def _flag(
        self, row: Any, user: User, ctx: RequestContext, stored: int, presented: int
    ) -> None:
        async with write_transaction(self._engine) as conn:
            flagged = await conn.execute(
                update(webauthn_credentials)
                .where(
                    webauthn_credentials.c.id == row.id,
                    webauthn_credentials.c.flagged_at.is_(None),
                )
                .values(flagged_at=self._clock())
            )
        if flagged.rowcount == 1:
            await self._record(
                "webauthn_counter_regression",
                "alert",
                user.id,
                ctx,
                credential=row.id,
                stored_count=stored,
                presented_count=presented,
            )

    # -- helpers -----------------------------------------------------------------------------

    def _uv_required(self, user: User) -> bool:
        return mfa_required(self._settings, user.roles)

    def _user_verification(self, user: User) -> UserVerificationRequirement:
        if self._uv_required(user):
            return UserVerificationRequirement.REQUIRED
        return UserVerificationRequirement.PREFERRED

    async def _issue(
        self, purpose: str, user: User, ttl: float, bound_to: str, challenge: bytes
    ) -> None:
        # One live challenge per ceremony: a response is checked against the newest challenge
        # issued for `bound_to`, so earlier ones (options asked for twice, within one clock
        # tick even) are used up here rather than left to be picked instead.
        for _ in range(SWEEP_LIMIT):
            try:
                await self._challenges.consume_bound(purpose, bound_to)
            except ChallengeInvalid:
                break
        await self._challenges.issue(purpose, user.id, ttl, bound_to=bound_to, challenge=challenge)

    async def _consume(self, purpose: str, user: User, bound_to: str) -> bytes:
        try:
            challenge = await self._challenges.consume_bound(purpose, bound_to)
        except ChallengeInvalid:
            raise WebAuthnFailed("challenge_missing") from None
        if challenge.user_id != user.id or not challenge.challenge:
            raise WebAuthnFailed("challenge_missing")
        return challenge.challenge

    async def _rows(self, user_id: str, *, usable_only: bool = False) -> list[Any]:
        query = _USABLE_CREDENTIALS if usable_only else _CREDENTIALS
        return await read_by_key(self._engine, query, {"user_id": user_id})

    async def _find(self, user_id: str, credential_id: str) -> Any:
        if len(credential_id) > MAX_CREDENTIAL_ID_CHARS:
            return None
        rows = await read_by_key(
            self._engine, _CREDENTIAL, {"user_id": user_id, "credential_id": credential_id}
        )
        return rows[0] if rows else None

    async def _record(
        self, event: str, outcome: str, user_id: str | None, ctx: RequestContext, **details: Any
    ) -> None:
        await self._events.record(ctx.event(event, outcome, user_id, **details))

"""Break-glass: time-boxed emergency access of one clinician to one patient's record.

A physician or nurse (any role whose policy says `break_glass = true`; never admin or billing,
whatever the policy says) who proved a second factor recently (step-up: an MFA `amr` and an
`auth_time` at most `step_up_max_age_seconds` old, or `break_glass_max_auth_age_seconds` if that
is shorter; whatever `mfa_required_roles` says) gives a reason and gets, for `minutes` (default
`break_glass_default_minutes`, at most `break_glass_max_minutes`), access to the patient
overriding the relationship and consent rules.
The decision point asks `active_patients(user_id)` and flags every decision that relied on a
grant with the "break-glass" obligation.

The reason is free text and may hold PHI, so it is stored only as ciphertext under the patient's
data key (associated data binds it to the grant): erasing the patient erases it, and the list
then shows it as null. Opening and revoking change the access facts: the row and the access
generation are written in one transaction, then the other processes are told. Each grant raises
exactly one alert (`alerts.AlertSinks`) after it has committed.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import and_, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.access.generation import AccessGeneration, bump_in
from carevault.access.policy import NEVER_BREAK_GLASS, PURPOSES, Policy
from carevault.audit.events import SecurityEvent, SecurityEventLog
from carevault.config import Settings
from carevault.crypto.envelope import DecryptionFailed, EnvelopeCipher
from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import break_glass_grants, fhir_resources
from carevault.identity.mfa.policy import is_fresh_mfa
from carevault.identity.principal import Principal

PATIENT_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
GRANT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
REASON_MIN = 20
REASON_MAX = 2000


class BreakGlassError(Exception):
    """Base class; messages are fixed strings, never input."""


class NotEligible(BreakGlassError):
    """No role of the principal may open break-glass (403)."""


class StaleAuthentication(BreakGlassError):
    """The principal must prove a second factor again (401, RFC 9470
    insufficient_user_authentication): no MFA `amr`, or an `auth_time` older than `max_age`."""

    def __init__(self, max_age: int) -> None:
        super().__init__("a fresh authentication with a second factor is required")
        self.max_age = max_age


class InvalidRequest(BreakGlassError):
    """A field is out of bounds (422); `field` names it, never its value."""

    def __init__(self, field: str, kind: str) -> None:
        super().__init__(f"{field}: {kind}")
        self.field = field
        self.kind = kind


class PatientNotFound(BreakGlassError):
    """No current Patient with that id (404)."""


class GrantNotFound(BreakGlassError):
    """No active grant with that id that the caller may revoke (404)."""


class Alerts(Protocol):
    async def emit(self, alert: dict[str, object]) -> None: ...


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    user_id: str
    patient_id: str
    purpose: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    revoked_by: str | None = None
    reason: str | None = None  # only in auditors' listing; None once it no longer decrypts

    def active(self, now: float) -> bool:
        return self.revoked_at is None and self.expires_at > now


def reason_ad(grant_id: str) -> bytes:
    return b"break-glass:" + grant_id.encode()


def _scope(patient_id: str) -> str:
    return f"patient:{patient_id}"


class BreakGlass:
    def __init__(
        self,
        engine: AsyncEngine,
        envelope: EnvelopeCipher,
        events: SecurityEventLog,
        policy: Policy,
        settings: Settings,
        generation: AccessGeneration,
        alerts: Alerts,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._envelope = envelope
        self._events = events
        self._policy = policy
        self._settings = settings
        self._generation = generation
        self._alerts = alerts
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    # -- who may ------------------------------------------------------------------------------

    def eligible_roles(self, principal: Principal, purpose: str = "ETREAT") -> tuple[str, ...]:
        eligible = []
        for role in principal.roles:
            if role in NEVER_BREAK_GLASS:
                continue
            rules = self._policy.for_role(role)
            if rules is not None and rules.break_glass and purpose in rules.purposes:
                eligible.append(role)
        return tuple(eligible)

    def check_principal(self, principal: Principal, purpose: str = "ETREAT") -> None:
        """Raise `NotEligible` or `StaleAuthentication`; the route calls it before the body."""
        if purpose not in PURPOSES or not self.eligible_roles(principal, purpose):
            raise NotEligible("this role may not open break-glass access")
        if not is_fresh_mfa(principal.amr, principal.auth_time, self._clock(), self.max_age):
            raise StaleAuthentication(self.max_age)

    @property
    def max_age(self) -> int:
        """How old the MFA authentication that opens break-glass may be, in seconds."""
        return min(
            self._settings.step_up_max_age_seconds,
            self._settings.break_glass_max_auth_age_seconds,
        )

    # -- open ---------------------------------------------------------------------------------

    async def open(
        self,
        principal: Principal,
        patient_id: str,
        reason: str,
        minutes: int | None = None,
        purpose: str = "ETREAT",
        *,
        source_address: str | None = None,
        request_id: str | None = None,
    ) -> Grant:
        try:
            self.check_principal(principal, purpose)
        except BreakGlassError as err:
            await self.record_denied(principal, type(err).__name__, source_address, request_id)
            raise
        reason = reason.strip() if isinstance(reason, str) else ""
        if not REASON_MIN <= len(reason) <= REASON_MAX:
            raise InvalidRequest("reason", "length")
        if minutes is None:
            minutes = self._settings.break_glass_default_minutes
        if (
            isinstance(minutes, bool)
            or not isinstance(minutes, int)
            or not 1 <= minutes <= self._settings.break_glass_max_minutes
        ):
            raise InvalidRequest("minutes", "range")
        if not isinstance(patient_id, str) or not PATIENT_ID.fullmatch(patient_id):
            raise InvalidRequest("patient", "format")

        # Checked before encrypting: encrypting under an unknown patient's scope would create a
        # data key for a patient that does not exist.
        async with read_connection(self._engine) as conn:
            exists = await self._patient_exists(conn, patient_id)
        if not exists:
            await self.record_denied(principal, "PatientNotFound", source_address, request_id)
            raise PatientNotFound("no such patient")

        grant_id = str(uuid.uuid4())
        try:
            ciphertext = await self._envelope.encrypt(
                _scope(patient_id), reason.encode("utf-8"), reason_ad(grant_id)
            )
        except DecryptionFailed:  # the patient's key was destroyed (erased) meanwhile
            raise PatientNotFound("no such patient") from None
        now = self._clock()
        grant = Grant(
            id=grant_id,
            user_id=principal.user_id,
            patient_id=patient_id,
            purpose=purpose,
            created_at=now,
            expires_at=now + minutes * 60,
        )
        async with write_transaction(self._engine) as conn:
            # Again inside the transaction: an erasure that committed meanwhile wins. FOR
            # SHARE: on PostgreSQL (READ COMMITTED) a plain read does not wait for an erasure
            # still writing the Patient row and finds it live; this one waits for it to
            # commit and reads the row again (an erasure starting later waits for this grant).
            if not await self._patient_exists(conn, patient_id, for_share=True):
                raise PatientNotFound("no such patient")
            await conn.execute(
                insert(break_glass_grants).values(
                    id=grant.id,
                    user_id=grant.user_id,
                    patient_id=grant.patient_id,
                    reason=ciphertext,
                    purpose=grant.purpose,
                    created_at=grant.created_at,
                    expires_at=grant.expires_at,
                )
            )
            await bump_in(conn)
        self._generation.changed()
        await self._events.record(
            SecurityEvent(
                event="break_glass_opened",
                outcome="alert",
                user_id=principal.user_id,
                roles=principal.roles,
                client_id=principal.client_id,
                source_address=source_address,
                request_id=request_id,
                details={"grant_id": grant.id, "minutes": minutes, "purpose": purpose},
                patient_id=grant.patient_id,
            )
        )
        await self._alerts.emit(
            {
                "alert": "break_glass_opened",
                "grant_id": grant.id,
                "user_id": grant.user_id,
                "patient_id": grant.patient_id,
                "purpose": grant.purpose,
                "roles": list(self.eligible_roles(principal, purpose)),
                "created_at": grant.created_at,
                "expires_at": grant.expires_at,
            }
        )
        return grant

    @staticmethod
    async def _patient_exists(conn: object, patient_id: str, *, for_share: bool = False) -> bool:
        query = select(fhir_resources.c.id).where(
            and_(
                fhir_resources.c.resource_type == "Patient",
                fhir_resources.c.id == patient_id,
                fhir_resources.c.deleted.is_(False),
                fhir_resources.c.erased_at.is_(None),
            )
        )
        if for_share:
            # Conflicts with the erasure's (and a deletion's) UPDATE of the row; SQLite's write
            # transactions are serialised anyway, and it has no row locks.
            query = query.with_for_update(read=True)
        row = (await conn.execute(query)).first()  # type: ignore[attr-defined]
        return row is not None

    async def record_denied(
        self,
        principal: Principal,
        why: str,
        source_address: str | None,
        request_id: str | None,
    ) -> None:
        await self._events.record(
            SecurityEvent(
                event="break_glass_denied",
                outcome="denied",
                user_id=principal.user_id,
                roles=principal.roles,
                client_id=principal.client_id,
                source_address=source_address,
                request_id=request_id,
                details={"why": why},
            )
        )

    # -- the decision point's question ------------------------------------------------------

    async def active_grants(
        self, user_id: str, now: float | None = None
    ) -> list[tuple[str, float]]:
        """(patient id, expires_at) of the user's unexpired, unrevoked grants (one query on
        the (user_id, expires_at) index); `access.facts.GrantSource`."""
        at = self._clock() if now is None else now
        async with read_connection(self._engine) as conn:
            rows = await conn.execute(
                select(break_glass_grants.c.patient_id, break_glass_grants.c.expires_at).where(
                    and_(
                        break_glass_grants.c.user_id == user_id,
                        break_glass_grants.c.expires_at > at,
                        break_glass_grants.c.revoked_at.is_(None),
                    )
                )
            )
            return [(row[0], float(row[1])) for row in rows]

    async def active_patients(self, user_id: str, now: float | None = None) -> frozenset[str]:
        """Patients the user holds an unexpired, unrevoked grant for."""
        return frozenset(patient for patient, _ in await self.active_grants(user_id, now))

    # -- auditors -----------------------------------------------------------------------------

    async def list_grants(self, active_only: bool = False, limit: int = 100) -> list[Grant]:
        """Newest first, reasons decrypted (None when the patient's key is gone)."""
        now = self._clock()
        query = select(break_glass_grants).order_by(
            break_glass_grants.c.created_at.desc(), break_glass_grants.c.id
        )
        if active_only:
            query = query.where(
                and_(
                    break_glass_grants.c.expires_at > now,
                    break_glass_grants.c.revoked_at.is_(None),
                )
            )
        async with read_connection(self._engine) as conn:
            rows = (await conn.execute(query.limit(limit))).all()
        grants = []
        for row in rows:
            try:
                reason: str | None = (
                    await self._envelope.decrypt(
                        _scope(row.patient_id), bytes(row.reason), reason_ad(row.id)
                    )
                ).decode("utf-8")
            except (DecryptionFailed, UnicodeDecodeError):
                reason = None
            grants.append(
                Grant(
                    id=row.id,
                    user_id=row.user_id,
                    patient_id=row.patient_id,
                    purpose=row.purpose,
                    created_at=row.created_at,
                    expires_at=row.expires_at,
                    revoked_at=row.revoked_at,
                    revoked_by=row.revoked_by,
                    reason=reason,
                )
            )
        return grants

    async def revoke(
        self,
        grant_id: str,
        by_user_id: str,
        *,
        only_own: bool = False,
        client_id: str | None = None,
        source_address: str | None = None,
        request_id: str | None = None,
    ) -> None:
        """End an active grant now. `only_own`: the caller may revoke only their own grants.
        An unknown, foreign (with `only_own`), expired or already revoked grant: `GrantNotFound`.
        """
        if not isinstance(grant_id, str) or not GRANT_ID.fullmatch(grant_id):
            raise GrantNotFound("no such grant")
        now = self._clock()
        conditions = [
            break_glass_grants.c.id == grant_id,
            break_glass_grants.c.revoked_at.is_(None),
            break_glass_grants.c.expires_at > now,
        ]
        if only_own:
            conditions.append(break_glass_grants.c.user_id == by_user_id)
        async with write_transaction(self._engine) as conn:
            result = await conn.execute(
                update(break_glass_grants)
                .where(and_(*conditions))
                .values(revoked_at=now, revoked_by=by_user_id)
            )
            if result.rowcount != 1:
                raise GrantNotFound("no such grant")  # rolls back: nothing changed
            await bump_in(conn)
        self._generation.changed()
        await self._events.record(
            SecurityEvent(
                event="break_glass_revoked",
                outcome="success",
                user_id=by_user_id,
                client_id=client_id,
                source_address=source_address,
                request_id=request_id,
                details={"grant_id": grant_id},
            )
        )

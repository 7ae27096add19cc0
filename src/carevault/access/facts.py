"""The facts the decision point needs, read from the stored records and cached safely.

Who the requester is in clinical terms (their account's practitioner, organization and patient
links; the labels granted to them; the patients whose active CareTeams list them; their
break-glass grants) and what a record concerns (its Patient compartment, each patient's
managing organization and Consent deny rules). Relationships are derived from the stored FHIR
resources (CareTeam, PractitionerRole, Patient.managingOrganization, Consent), never from a
second copy of them.

Everything cached here is dropped whenever the access generation moves (`generation.py`),
which every write of such a fact bumps in its own transaction: a change takes effect on the
next request. Break-glass grants are cached with their expiry and re-checked against the clock
on every use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from sqlalchemy import and_, select

from carevault.access.consent import DenyRule, deny_rules
from carevault.access.decision import PatientFacts, Requester
from carevault.access.generation import AccessGeneration
from carevault.access.label_grants import labels_of_user
from carevault.access.labels import sensitive_labels
from carevault.access.scopes import parse_scopes
from carevault.db.engine import read_connection
from carevault.db.tables import fhir_compartments, fhir_index_keys, fhir_resources
from carevault.fhir.search_params import parse_date_search
from carevault.fhir.store import ResourceStore
from carevault.identity.accounts import User, UserStore
from carevault.identity.principal import Principal

# (account, label grants, care patients, organization) of one user
Profile = tuple[User | None, frozenset[str], frozenset[str], str | None]
MAX_CACHED = 10_000  # entries per cache before it is emptied (bounded memory)


class GrantSource(Protocol):
    async def active_grants(self, user_id: str, now: float) -> list[tuple[str, float]]:
        """(patient id, expires_at) of the user's unexpired, unrevoked break-glass grants."""
        ...


class AccessFacts:
    def __init__(
        self,
        engine: Any,
        store: ResourceStore,
        users: UserStore,
        generation: AccessGeneration,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._store = store
        self._users = users
        self._generation = generation
        self._clock = clock
        self._seen: tuple[int, int] | None = None
        self._profiles: dict[str, tuple[float, Profile]] = {}  # (valid until, profile)
        self._patients: dict[str, PatientFacts] = {}
        self._grants: dict[str, list[tuple[str, float]]] = {}
        self._all_consents: dict[str, tuple[DenyRule, ...]] | None = None
        self.grant_source: GrantSource | None = None  # set once break-glass is built
        self.organizations_needed = True  # False when the policy has no organization boundary

    async def refresh(self) -> None:
        """Once per request, before any other call: forget everything if the facts moved."""
        current = await self._generation.current()
        if current != self._seen:
            self._profiles.clear()
            self._patients.clear()
            self._grants.clear()
            self._all_consents = None
            self._seen = current

    # --- the requester --------------------------------------------------------------------

    async def requester(self, principal: Principal, purpose: str) -> Requester:
        user, labels, care, organization = await self._profile(principal.user_id)
        now = self._clock()
        grants = await self._active_grants(principal.user_id, now)
        return Requester(
            user_id=principal.user_id,
            roles=principal.roles,
            scopes=parse_scopes(principal.scopes),
            purpose=purpose,
            practitioner_id=user.practitioner_id if user else None,
            organization_id=organization,
            # A patient's own record; for anyone else the SMART launch patient, if any.
            patient_id=(user.patient_id if user else None) or principal.patient,
            label_grants=labels,
            care_patients=care,
            break_glass_patients=frozenset(p for p, expires in grants if expires > now),
        )

    async def _profile(self, user_id: str) -> Profile:
        """Cached until the access generation moves or the next start or end of a period
        (CareTeam, participant, PractitionerRole) that it was derived from, whichever first."""
        cached = self._profiles.get(user_id)
        if cached is not None and self._clock() < cached[0]:
            return cached[1]
        boundaries: list[float] = []
        user = await self._users.by_id(user_id)
        labels: frozenset[str] = frozenset()
        care: frozenset[str] = frozenset()
        organization = user.organization_id if user else None
        if user is not None:
            labels = frozenset(await labels_of_user(self._engine, user_id))
            if user.practitioner_id:
                roles = await self._practitioner_roles(user.practitioner_id, boundaries)
                care = await self._care_patients(user.practitioner_id, roles, boundaries)
                if organization is None:
                    organization = next(
                        (org for org in (_organization_of_role(r) for r in roles) if org), None
                    )
        profile = (user, labels, care, organization)
        now = self._clock()
        valid_until = min((b for b in boundaries if b > now), default=float("inf"))
        _bounded(self._profiles)[user_id] = (valid_until, profile)
        return profile

    async def _practitioner_roles(
        self, practitioner_id: str, boundaries: list[float]
    ) -> list[dict[str, Any]]:
        ids = await self._ids_with_key(
            "PractitionerRole", "practitioner", f"Practitioner/{practitioner_id}"
        )
        found = await self._store.read_many("PractitionerRole", ids)
        now = self._clock()
        for role in found.values():
            boundaries.extend(_period_bounds(role.body or {}))
        return [
            r.body
            for r in found.values()
            if r.body and r.body.get("active", True) is not False and _in_period(r.body, now)
        ]

    async def _care_patients(
        self, practitioner_id: str, roles: list[dict[str, Any]], boundaries: list[float]
    ) -> frozenset[str]:
        """Patients of every active CareTeam that lists the practitioner (or one of their
        active PractitionerRoles) as a participant whose period covers now."""
        members = {f"Practitioner/{practitioner_id}"}
        members.update(f"PractitionerRole/{r['id']}" for r in roles if r.get("id"))
        ids: set[str] = set()
        for member in members:
            ids.update(await self._ids_with_key("CareTeam", "participant", member))
        teams = await self._store.read_many("CareTeam", sorted(ids))
        now = self._clock()
        patients: set[str] = set()
        for team in teams.values():
            body = team.body or {}
            boundaries.extend(_period_bounds(body))
            for participant in body.get("participant") or []:
                if isinstance(participant, Mapping):
                    boundaries.extend(_period_bounds(participant))
            if body.get("status", "active") != "active" or not _in_period(body, now):
                continue
            listed = any(
                isinstance(p, Mapping)
                and _reference(p.get("member")) in members
                and _in_period(p, now)
                for p in body.get("participant") or []
            )
            if listed:
                patients.update(self._store.patients_of(body))
        return frozenset(patients)

    async def _active_grants(self, user_id: str, now: float) -> list[tuple[str, float]]:
        if self.grant_source is None:
            return []
        cached = self._grants.get(user_id)
        if cached is None:
            cached = await self.grant_source.active_grants(user_id, now)
            _bounded(self._grants)[user_id] = cached
        return cached

    # --- the patients a record concerns ---------------------------------------------------

    def patients_of(self, body: Mapping[str, Any]) -> list[str]:
        return self._store.patients_of(body)

    async def patient_facts(self, patient_ids: Iterable[str]) -> tuple[PatientFacts, ...]:
        """Facts of each patient, loaded in one go for those not cached: a page of search
        results costs at most one query, not one per patient. Consent rules come from the
        per-generation map of every active Consent (which searches load anyway); managing
        organizations are read only when the policy's organization boundary needs them."""
        wanted = sorted(set(patient_ids))
        missing = [p for p in wanted if p not in self._patients]
        if missing:
            consents = await self.all_consent_rules()
            organizations = await self._organizations(missing) if self.organizations_needed else {}
            cache = _bounded(self._patients)
            for patient_id in missing:
                cache[patient_id] = PatientFacts(
                    patient_id, organizations.get(patient_id), consents.get(patient_id, ())
                )
        return tuple(self._patients[p] for p in wanted)

    async def _organizations(self, patient_ids: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        async with read_connection(self._engine) as conn:
            for start in range(0, len(patient_ids), 500):
                rows = await conn.execute(
                    select(fhir_index_keys.c.id, fhir_index_keys.c.key).where(
                        and_(
                            fhir_index_keys.c.resource_type == "Patient",
                            fhir_index_keys.c.param == "organization",
                            fhir_index_keys.c.id.in_(patient_ids[start : start + 500]),
                        )
                    )
                )
                for patient_id, key in rows:
                    if key.startswith("Organization/"):
                        found.setdefault(patient_id, key.split("/", 1)[1])
        return found

    async def all_consent_rules(self) -> Mapping[str, tuple[DenyRule, ...]]:
        """Deny rules of every patient that has any: a search can reach any patient."""
        if self._all_consents is None:
            ids = await self._ids_with_key("Consent", "status", "active")
            consents = await self._store.read_many("Consent", ids)
            by_patient: dict[str, list[DenyRule]] = {}
            for consent in consents.values():
                rules = deny_rules(consent.body or {})
                if not rules:
                    continue
                for patient_id in self._store.patients_of(consent.body or {}):
                    by_patient.setdefault(patient_id, []).extend(rules)
            self._all_consents = {p: tuple(r) for p, r in by_patient.items()}
        return self._all_consents

    async def compartment_of(self, resource_type: str, resource_id: str) -> list[str]:
        """The patients of a stored record from its compartment rows (kept when it is deleted,
        so a deleted record without a body still has them)."""
        async with read_connection(self._engine) as conn:
            rows = await conn.execute(
                select(fhir_compartments.c.patient_id).where(
                    and_(
                        fhir_compartments.c.resource_type == resource_type,
                        fhir_compartments.c.id == resource_id,
                    )
                )
            )
            return sorted(rows.scalars())

    # --- index lookups --------------------------------------------------------------------

    async def _ids_with_key(self, resource_type: str, param: str, key: str) -> list[str]:
        async with read_connection(self._engine) as conn:
            rows = await conn.execute(
                select(fhir_index_keys.c.id)
                .join(
                    fhir_resources,
                    and_(
                        fhir_resources.c.resource_type == fhir_index_keys.c.resource_type,
                        fhir_resources.c.id == fhir_index_keys.c.id,
                    ),
                )
                .where(
                    and_(
                        fhir_index_keys.c.resource_type == resource_type,
                        fhir_index_keys.c.param == param,
                        fhir_index_keys.c.key == key,
                        fhir_resources.c.deleted.is_(False),
                    )
                )
            )
            return sorted(set(rows.scalars()))


def labels_of(body: Mapping[str, Any] | None) -> frozenset[str]:
    return sensitive_labels(body) if body else frozenset()


def _reference(value: Any) -> str | None:
    if isinstance(value, Mapping) and isinstance(value.get("reference"), str):
        return value["reference"]
    return None


def _organization_of_role(role: Mapping[str, Any]) -> str | None:
    ref = _reference(role.get("organization"))
    if ref and ref.startswith("Organization/"):
        return ref.split("/", 1)[1]
    return None


def _in_period(element: Mapping[str, Any], now: float) -> bool:
    """Whether `element.period` covers now (no period: always)."""
    period = element.get("period")
    if not isinstance(period, Mapping):
        return True
    for bound, low in (("start", True), ("end", False)):
        value = period.get(bound)
        if not isinstance(value, str):
            continue
        try:
            _prefix, lo, hi = parse_date_search(value)
        except ValueError:
            return False  # an unreadable period grants nothing
        if (low and now < lo) or (not low and now >= hi):
            return False
    return True


def _period_bounds(element: Mapping[str, Any]) -> list[float]:
    """The instants at which `element.period` starts and stops covering now."""
    period = element.get("period")
    if not isinstance(period, Mapping):
        return []
    bounds = []
    for bound, low in (("start", True), ("end", False)):
        value = period.get(bound)
        if isinstance(value, str):
            try:
                _prefix, lo, hi = parse_date_search(value)
            except ValueError:
                continue
            bounds.append(lo if low else hi)
    return bounds


def _bounded(cache: dict[str, Any]) -> dict[str, Any]:
    if len(cache) >= MAX_CACHED:
        cache.clear()
    return cache

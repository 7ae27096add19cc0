"""The policy decision point: `decide(requester, action, target) -> Decision`.

Pure and synchronous: every fact it needs (who asks, under which purpose and scopes, whom they
care for, which break-glass grants they hold; which patients a record concerns, their managing
organization, their Consent deny rules, the record's security labels) is handed to it by
`access/facts.py`. Default deny: a permit needs, for at least one of the requester's roles,

1. a rule for the role, and the purpose of use among the role's purposes;
2. the role's permission for the action on the resource type or its class;
3. a SMART scope of the token for the action on the type (a scope only narrows);
4. every sensitive label of the record allowed to the role or granted to the user;
5. every patient the record concerns within the role's patients mode (care relationship,
   organization, own record, any), or under the requester's break-glass grant for them;
6. no active Consent deny rule of those patients matching the request (break-glass overrides).

`visibility` is the same policy for a whole type at once: what a search may return. The tests
check that it agrees with `decide` record by record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from carevault.access.consent import DenyRule
from carevault.access.policy import NEVER_BREAK_GLASS, Policy, RolePolicy, resource_class
from carevault.access.scopes import Scopes


class Action(StrEnum):
    read = "read"  # read, vread, history, $everything, search results, _include
    search = "search"  # running a search of a type
    create = "create"
    update = "update"
    delete = "delete"


class Reason(StrEnum):
    permitted = "permitted"
    no_role = "no-role"
    purpose = "purpose-of-use"
    role_permission = "role-permission"
    scope = "scope"
    label = "security-label"
    relationship = "relationship"
    consent = "consent"


BREAK_GLASS = "break-glass"  # obligation: the access is an emergency one; audit and alert
REDACT = "redact"  # obligation: show only `Decision.redact_to` (plus id and meta)


@dataclass(frozen=True, slots=True)
class PatientFacts:
    id: str
    organization: str | None = None  # managingOrganization id
    consent: tuple[DenyRule, ...] = ()


@dataclass(frozen=True, slots=True)
class Requester:
    user_id: str
    roles: tuple[str, ...]
    scopes: Scopes
    purpose: str
    practitioner_id: str | None = None
    organization_id: str | None = None
    patient_id: str | None = None
    label_grants: frozenset[str] = frozenset()
    care_patients: frozenset[str] = frozenset()
    break_glass_patients: frozenset[str] = frozenset()

    @property
    def actor_refs(self) -> frozenset[str]:
        refs = set()
        if self.practitioner_id:
            refs.add(f"Practitioner/{self.practitioner_id}")
        if self.organization_id:
            refs.add(f"Organization/{self.organization_id}")
        return frozenset(refs)


@dataclass(frozen=True, slots=True)
class Target:
    resource_type: str
    patients: tuple[PatientFacts, ...] = ()  # the record's Patient compartment
    labels: frozenset[str] = frozenset()  # sensitive labels (access/labels.py)


@dataclass(frozen=True, slots=True)
class Decision:
    permit: bool
    reason: Reason
    obligations: frozenset[str] = frozenset()
    redact_to: frozenset[str] | None = None  # elements shown under the REDACT obligation
    role: str | None = None  # the role that permitted

    @property
    def break_glass(self) -> bool:
        return BREAK_GLASS in self.obligations


def decide(
    policy: Policy, requester: Requester, action: Action, target: Target, now: float
) -> Decision:
    denial: Decision | None = None
    emergency: Decision | None = None
    for role in requester.roles:
        decision = _decide_for_role(policy, role, requester, action, target, now)
        if decision.permit and not decision.break_glass:
            return decision
        if decision.permit:
            emergency = emergency or decision
        elif denial is None or _rank(decision.reason) > _rank(denial.reason):
            denial = decision
    return emergency or denial or Decision(False, Reason.no_role)


def _rank(reason: Reason) -> int:
    # Reported reason when every role denies: the one that got furthest through the checks.
    return list(Reason).index(reason)


def _decide_for_role(
    policy: Policy, role: str, requester: Requester, action: Action, target: Target, now: float
) -> Decision:
    rules = policy.for_role(role)
    if rules is None:
        return Decision(False, Reason.no_role)
    if requester.purpose not in rules.purposes:
        return Decision(False, Reason.purpose)
    resource_type = target.resource_type
    if not rules.allows(action.value, resource_type, resource_class(resource_type)):
        return Decision(False, Reason.role_permission)
    contexts = requester.scopes.granting_contexts(action.value, resource_type)
    if not contexts:
        return Decision(False, Reason.scope)
    if contexts == {"patient"} and not _only_own(requester, target):
        return Decision(False, Reason.scope)  # patient/ scopes reach the launch patient only
    obligations: set[str] = set()
    if target.labels - visible_labels(rules, requester):
        grants_cover = target.patients and all(
            _may_break_glass(role, rules, requester, p.id) for p in target.patients
        )
        if not (policy.break_glass_overrides_labels and grants_cover):
            return Decision(False, Reason.label)
        obligations.add(BREAK_GLASS)
    for patient in target.patients:
        if not _related(policy, rules, requester, patient):
            if not _may_break_glass(role, rules, requester, patient.id):
                return Decision(False, Reason.relationship)
            obligations.add(BREAK_GLASS)
    for patient in target.patients:
        if _consent_denies(rules, requester, patient, resource_type, target.labels, now):
            if not _may_break_glass(role, rules, requester, patient.id):
                return Decision(False, Reason.consent)
            obligations.add(BREAK_GLASS)
    if any(_may_break_glass(role, rules, requester, p.id) for p in target.patients):
        obligations.add(BREAK_GLASS)  # every decision under a grant, needed or not, is flagged
    redact_to = rules.redact.get(resource_type)
    if redact_to is not None:
        obligations.add(REDACT)
    return Decision(True, Reason.permitted, frozenset(obligations), redact_to, role)


def visible_labels(rules: RolePolicy, requester: Requester) -> frozenset[str]:
    if rules.label_grants:
        return rules.labels | requester.label_grants
    return rules.labels


def _only_own(requester: Requester, target: Target) -> bool:
    if requester.patient_id is None:
        return False
    return all(p.id == requester.patient_id for p in target.patients)


def _related(
    policy: Policy, rules: RolePolicy, requester: Requester, patient: PatientFacts
) -> bool:
    mode = rules.patients
    if mode == "any":
        return True
    if mode == "own":
        return requester.patient_id is not None and patient.id == requester.patient_id
    if mode == "none":
        return False
    same_org = (
        policy.organization_boundary
        and requester.organization_id is not None
        and patient.organization == requester.organization_id
    )
    if mode == "organization":
        return same_org or not policy.organization_boundary or patient.id in requester.care_patients
    return patient.id in requester.care_patients or same_org  # care


def _may_break_glass(role: str, rules: RolePolicy, requester: Requester, patient_id: str) -> bool:
    return (
        rules.break_glass
        and role not in NEVER_BREAK_GLASS
        and patient_id in requester.break_glass_patients
    )


def _consent_denies(
    rules: RolePolicy,
    requester: Requester,
    patient: PatientFacts,
    resource_type: str,
    labels: frozenset[str],
    now: float,
) -> bool:
    if rules.patients == "own" and requester.patient_id == patient.id:
        return False  # a patient's consent governs others' access, not their own
    return any(
        rule.matches(
            actor_refs=requester.actor_refs,
            purpose=requester.purpose,
            resource_type=resource_type,
            labels=labels,
            now=now,
        )
        for rule in patient.consent
    )


# --- a whole type at once: what a search may return ------------------------------------------


@dataclass(frozen=True, slots=True)
class Visibility:
    """Which records of one type a search by this requester may return (the SQL filter is
    built from this in `access/filters.py`). A record outside every Patient compartment is
    visible; one in compartments is visible when each of its patients is in `patients`, or
    managed by `organization`, or any patient at all when `all_patients` - and, with
    `only_patient` (patient/ scopes), is that patient - and no consent exclusion or hidden
    label applies."""

    resource_type: str
    permitted: bool
    all_patients: bool = False
    patients: frozenset[str] = frozenset()
    organization: str | None = None  # also every patient managed by this organization
    # patients reachable under a break-glass grant (already in `patients`); whether a record
    # needed the grant, and so carries the obligation, is `decide`'s answer for that record
    break_glass_patients: frozenset[str] = frozenset()
    hidden_labels: frozenset[str] = frozenset()
    # records all of whose patients are here show hidden labels too (break_glass_overrides_labels)
    label_exempt_patients: frozenset[str] = frozenset()
    # (patient, labels): hide that patient's records (carrying one of `labels`, if not empty)
    consent_exclusions: tuple[tuple[str, frozenset[str]], ...] = ()
    only_patient: str | None = None
    redact_to: frozenset[str] | None = None
    role: str | None = None


def visibility(
    policy: Policy,
    requester: Requester,
    resource_type: str,
    consents: Mapping[str, tuple[DenyRule, ...]],
    now: float,
) -> Visibility:
    """The records of `resource_type` a search may return (the read permission, for a type).

    `consents`: the deny rules of every patient that has any (the caller loads them all: a
    search can reach any patient). With several roles, the first role that may read the type
    decides; a requester whose roles disagree gets the more generous one only in `decide`
    (search stays with the first, which never shows more than `decide` permits)."""
    from carevault.access.labels import ALL_LABELS

    for role in requester.roles:
        rules = policy.for_role(role)
        if rules is None or requester.purpose not in rules.purposes:
            continue
        if not rules.allows("read", resource_type, resource_class(resource_type)):
            continue
        contexts = requester.scopes.granting_contexts("read", resource_type)
        if not contexts:
            continue
        patient_only = contexts == {"patient"}
        if patient_only and requester.patient_id is None:
            continue
        mode = rules.patients
        patients: frozenset[str] = frozenset()
        organization = None
        all_patients = False
        if mode == "own":
            # no linked patient: only records outside every compartment (as in decide)
            patients = frozenset({requester.patient_id} if requester.patient_id else ())
        elif mode == "any" or (mode == "organization" and not policy.organization_boundary):
            all_patients = True
        elif mode in ("care", "organization"):
            patients = requester.care_patients
            if policy.organization_boundary and requester.organization_id is not None:
                organization = requester.organization_id
        may_break_glass = rules.break_glass and role not in NEVER_BREAK_GLASS
        grants = requester.break_glass_patients if may_break_glass else frozenset()
        exclusions = []
        for patient_id, rules_of_patient in consents.items():
            if (mode == "own" and patient_id == requester.patient_id) or patient_id in grants:
                continue
            for rule in rules_of_patient:
                if rule.matches(
                    actor_refs=requester.actor_refs,
                    purpose=requester.purpose,
                    resource_type=resource_type,
                    labels=rule.labels,  # the labels the rule names: checked per record in SQL
                    now=now,
                ):
                    exclusions.append((patient_id, rule.labels))
        return Visibility(
            resource_type=resource_type,
            permitted=True,
            all_patients=all_patients,
            patients=patients | grants,
            organization=organization,
            only_patient=requester.patient_id if patient_only else None,
            break_glass_patients=grants,
            hidden_labels=ALL_LABELS - visible_labels(rules, requester),
            label_exempt_patients=grants if policy.break_glass_overrides_labels else frozenset(),
            consent_exclusions=tuple(exclusions),
            redact_to=rules.redact.get(resource_type),
            role=role,
        )
    return Visibility(resource_type=resource_type, permitted=False)

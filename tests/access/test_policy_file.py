"""The access policy file (access/policy.py, default_policy.toml): the default loads and says
what the issue asks; a policy naming an unknown role, class, type, purpose or label, or granting
a write without the read of it, is refused with an error naming the culprit."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from carevault.access.decision import Action, PatientFacts, Reason, Requester, Target, decide
from carevault.access.policy import (
    ACTIONS,
    DEFAULT_POLICY,
    PURPOSES,
    Policy,
    RolePolicy,
    load_policy,
    resource_class,
)
from carevault.access.scopes import parse_scopes
from carevault.identity.roles import Role
from tests.access.support import NOW


def default_data() -> dict[str, Any]:
    with DEFAULT_POLICY.open("rb") as handle:
        return tomllib.load(handle)


def refused(data: dict[str, Any], *needles: str) -> str:
    with pytest.raises(ValidationError) as excinfo:
        Policy.model_validate(data)
    message = str(excinfo.value)
    for needle in needles:
        assert needle in message, message
    return message


# --- the default policy -----------------------------------------------------------------------


def test_default_policy_loads() -> None:
    policy = load_policy()
    assert set(policy.roles) == set(Role)
    assert policy.organization_boundary is False
    assert policy.denied_status == 404
    assert load_policy(DEFAULT_POLICY) == policy


def test_default_policy_intent() -> None:
    roles = load_policy().roles
    # who may break the glass, and whose users may hold label grants
    assert {r for r, rules in roles.items() if rules.break_glass} == {Role.physician, Role.nurse}
    assert {r for r, rules in roles.items() if rules.label_grants} == {Role.physician}
    assert all(not rules.labels for rules in roles.values())  # no role sees labels by default
    # nobody but physicians, nurses, patients and services touches clinical data
    for role in (Role.admin, Role.auditor, Role.billing):
        for action in ACTIONS:
            assert not roles[role].allows(action, "Observation", "clinical"), (role, action)
    # the auditor has nothing at all in FHIR
    assert roles[Role.auditor] == RolePolicy()
    # admin: administrative only
    for action in ACTIONS:
        assert roles[Role.admin].allows(action, "Practitioner", "administrative")
        assert not roles[Role.admin].allows(action, "Patient", "demographics")
    # nurse writes Observation and Immunization only
    nurse = roles[Role.nurse]
    for resource_type in ("Observation", "Immunization"):
        assert nurse.allows("create", resource_type, "clinical")
        assert nurse.allows("update", resource_type, "clinical")
    assert not nurse.allows("create", "Condition", "clinical")
    assert not nurse.allows("delete", "Observation", "clinical")
    # billing: Patient (redacted to identifiers) and Encounter, read only
    billing = roles[Role.billing]
    assert billing.redact == {"Patient": frozenset({"identifier"})}
    assert billing.allows("read", "Encounter", "clinical")
    assert not billing.allows("read", "Observation", "clinical")
    assert not any(billing.allows(a, "Patient", "demographics") for a in ("create", "update"))
    # patient: own records, no writes by default
    patient = roles[Role.patient]
    assert patient.patients == "own"
    assert not patient.create and not patient.update and not patient.delete
    # service: scopes decide
    assert roles[Role.service].patients == "any"
    assert roles[Role.service].purposes == PURPOSES


def test_missing_role_is_a_deny() -> None:
    data = default_data()
    del data["roles"]["nurse"]
    policy = Policy.model_validate(data)
    assert policy.for_role("nurse") is None
    requester = Requester(
        "u", ("nurse",), parse_scopes(["user/*.cruds"]), "TREAT", practitioner_id="p"
    )
    decision = decide(policy, requester, Action.read, Target("Practitioner"), NOW)
    assert (decision.permit, decision.reason) == (False, Reason.no_role)


def test_for_role() -> None:
    policy = load_policy()
    assert policy.for_role("physician") is policy.roles[Role.physician]
    assert policy.for_role("janitor") is None
    assert policy.for_role("") is None
    assert policy.for_role("Physician") is None


def test_load_policy_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        'organization_boundary = true\ndenied_status = 403\n[roles.nurse]\nread = ["clinical"]\n'
        'purposes = ["TREAT"]\npatients = "care"\n'
    )
    policy = load_policy(path)
    assert policy.organization_boundary is True
    assert policy.denied_status == 403
    assert set(policy.roles) == {Role.nurse}
    assert policy.roles[Role.nurse].patients == "care"


def test_load_policy_refuses_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[roles.janitor]\nread = ["clinical"]\n')
    with pytest.raises(ValidationError, match="janitor"):
        load_policy(path)
    path.write_text("[roles.nurse\n")
    with pytest.raises(tomllib.TOMLDecodeError):
        load_policy(path)


# --- refusals -------------------------------------------------------------------------------


def test_unknown_role_is_refused() -> None:
    data = default_data()
    data["roles"]["janitor"] = {"read": ["reference"]}
    refused(data, "janitor")


@pytest.mark.parametrize("action", ACTIONS)
def test_unknown_class_or_type_is_refused(action: str) -> None:
    data = default_data()
    data["roles"]["service"][action] = ["*", "clinicl"]
    refused(data, "clinicl", "neither a resource class nor a resource type")
    data["roles"]["service"][action] = ["Observatoin"]
    refused(data, "Observatoin")
    data["roles"]["service"][action] = ["observation"]
    refused(data, "observation")


def test_unknown_purpose_is_refused() -> None:
    data = default_data()
    data["roles"]["nurse"]["purposes"] = ["TREAT", "RESEARCH"]
    refused(data, "unknown purposes of use", "RESEARCH")
    data["roles"]["nurse"]["purposes"] = ["treat"]
    refused(data, "treat")


def test_unknown_label_is_refused() -> None:
    data = default_data()
    data["roles"]["physician"]["labels"] = ["PSY", "PSYCH"]
    refused(data, "unknown security labels", "PSYCH")
    data["roles"]["physician"]["labels"] = ["N"]  # normal confidentiality is not a sensitive label
    refused(data, "'N'")


def test_unknown_redaction_type_is_refused() -> None:
    data = default_data()
    data["roles"]["billing"]["redact"] = {"Patients": ["identifier"]}
    refused(data, "Patients")


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("patients", "everyone", "patients"),
        ("patients", "organisation", "patients"),
        ("break_glass", "maybe", "break_glass"),
        ("reed", ["clinical"], "reed"),  # a typo must not silently grant nothing
        ("purpose", ["TREAT"], "purpose"),
    ],
)
def test_bad_role_fields_are_refused(key: str, value: Any, needle: str) -> None:
    data = default_data()
    data["roles"]["nurse"][key] = value
    refused(data, needle)


@pytest.mark.parametrize(
    ("key", "value"),
    [("denied_status", 401), ("denied_status", 200), ("organisation_boundary", True)],
)
def test_bad_top_level_fields_are_refused(key: str, value: Any) -> None:
    data = default_data()
    data[key] = value
    refused(data, key)


@pytest.mark.parametrize(
    ("read", "write", "culprit"),
    [
        ([], ["Observation"], "Observation"),
        (["Observation"], ["Condition"], "Condition"),
        (["Observation"], ["clinical"], "clinical"),  # a type's read is not its class's
        (["clinical"], ["*"], "*"),
        (["clinical"], ["Patient"], "Patient"),
        (["administrative"], ["Consent"], "Consent"),
    ],
)
@pytest.mark.parametrize("action", ["create", "update", "delete"])
def test_write_without_read_is_refused(
    action: str, read: list[str], write: list[str], culprit: str
) -> None:
    data = default_data()
    data["roles"]["nurse"]["read"] = read
    data["roles"]["nurse"][action] = write
    for other in {"create", "update", "delete"} - {action}:
        data["roles"]["nurse"][other] = []
    refused(data, "nurse", action, repr(culprit), "without read")


@pytest.mark.parametrize(
    ("read", "write"),
    [
        (["clinical"], ["Observation"]),  # read of the class covers its types
        (["Observation"], ["Observation"]),
        (["*"], ["clinical", "Patient", "*"]),
        (["demographics"], ["Patient", "demographics"]),
    ],
)
def test_write_with_read_is_accepted(read: list[str], write: list[str]) -> None:
    data = default_data()
    data["roles"]["nurse"]["read"] = read
    data["roles"]["nurse"]["create"] = write
    data["roles"]["nurse"]["update"] = []
    Policy.model_validate(data)


def test_patient_writes_can_be_enabled() -> None:
    data = default_data()
    data["roles"]["patient"]["create"] = ["Observation"]
    policy = Policy.model_validate(data)
    requester = Requester(
        "u",
        ("patient",),
        parse_scopes(["patient/Observation.cruds"]),
        "TREAT",
        patient_id="pat-1",
    )
    own = Target("Observation", (PatientFacts("pat-1"),))
    other = Target("Observation", (PatientFacts("pat-2"),))
    assert decide(policy, requester, Action.create, own, NOW).permit
    assert not decide(policy, requester, Action.create, other, NOW).permit
    assert not decide(policy, requester, Action.update, own, NOW).permit


@pytest.mark.parametrize("role", ["admin", "billing"])
def test_break_glass_for_admin_or_billing_is_refused(role: str) -> None:
    data = default_data()
    data["roles"][role]["break_glass"] = True
    refused(data, role, "break")


# --- resource classes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource_type", "expected"),
    [
        ("Patient", "demographics"),
        ("RelatedPerson", "demographics"),
        ("Person", "demographics"),
        ("Practitioner", "administrative"),
        ("PractitionerRole", "administrative"),
        ("Organization", "administrative"),
        ("Location", "administrative"),
        ("Claim", "financial"),
        ("Coverage", "financial"),
        ("ExplanationOfBenefit", "financial"),
        ("Consent", "consent"),
        ("Observation", "clinical"),
        ("Condition", "clinical"),
        ("Encounter", "clinical"),
        ("Immunization", "clinical"),
        ("MedicationRequest", "clinical"),
        ("DiagnosticReport", "clinical"),
        ("Medication", "reference"),
        ("ValueSet", "reference"),
        ("Questionnaire", "reference"),
    ],
)
def test_resource_class(resource_type: str, expected: str) -> None:
    assert resource_class(resource_type) == expected


def test_allows() -> None:
    rules = RolePolicy(read=frozenset({"clinical", "Patient"}), purposes=frozenset({"TREAT"}))
    assert rules.allows("read", "Observation", "clinical")
    assert rules.allows("read", "Patient", "demographics")
    assert not rules.allows("read", "RelatedPerson", "demographics")
    assert not rules.allows("search", "Observation", "clinical")
    assert RolePolicy(delete=frozenset({"*"}), read=frozenset({"*"})).allows(
        "delete", "Anything", "reference"
    )


def test_decide_never_lets_admin_break_the_glass() -> None:
    """Even a policy that got past validation (built directly) cannot open the glass for
    admin: decide checks the role itself."""
    data = default_data()
    data["roles"]["admin"].update(read=["administrative", "clinical"], break_glass=True)
    validated = Policy.model_validate({**data, "roles": {"physician": data["roles"]["physician"]}})
    roles = {role: RolePolicy.model_validate(rules) for role, rules in data["roles"].items()}
    policy = validated.model_copy(update={"roles": roles})
    requester = Requester(
        "u",
        ("admin",),
        parse_scopes(["user/*.cruds"]),
        "TREAT",
        organization_id="org-1",
        break_glass_patients=frozenset({"pat-1"}),
    )
    target = Target("Observation", (PatientFacts("pat-1"),))
    assert not decide(policy, requester, Action.read, target, NOW).permit

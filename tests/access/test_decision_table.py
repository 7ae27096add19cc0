"""The decision table: one row of `decision_table.tsv` = one call of `decide`.

The expected values in the table were written from the issue text and the documented intent of
`default_policy.toml`, not by running the code. How a row becomes a call:

* roles: ``+``-separated (``(none)`` = no roles). Physicians and nurses are Practitioner
  ``prac-1`` with CareTeam relationships to ``pat-care`` and ``pat-care2``; every staff role
  belongs to Organization ``org-1``; a patient-role user is Patient ``pat-self``.
* relationship: the patients of the record (``+``-separated; ``none`` = outside every
  compartment): ``care`` / ``care2`` (in the requester's CareTeams, managed by org-9), ``own``
  (pat-self), ``other-patient`` (pat-other, org-9), ``org-same`` (managed by org-1),
  ``org-other`` (managed by org-2).
* linked: the requester's ``patient_id`` (``-``: pat-self for the patient role, else none;
  ``care``: pat-care, e.g. a SMART launch patient).
* consent: a FHIR Consent JSON given to every patient of the record, turned into deny rules by
  `consent.deny_rules`: ``deny-all``, ``deny-actor:<ref>``, ``deny-purpose:<code>``,
  ``deny-class:<type>``, ``deny-label:<code>``, ``inactive``, ``expired``, ``future``,
  ``current`` (periods around NOW), ``nested-class:<type>`` (a deny nested under a permit).
* break_glass ``yes``: the requester holds a break-glass grant for every patient of the record.
* scope: space-separated scopes (``(none)`` = no scopes).
* xfail: ``-``, or the reason the code diverges from the issue (the row is a strict xfail).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from carevault.access.consent import deny_rules
from carevault.access.decision import Action, PatientFacts, Reason, Requester, Target, decide
from carevault.access.labels import ACT_CODE, CONFIDENTIALITY
from carevault.access.policy import ACTIONS, Policy
from carevault.access.scopes import parse_scopes
from carevault.identity.roles import Role
from tests.access.support import NOW, policy_for

TABLE = Path(__file__).with_name("decision_table.tsv")
COLUMNS = [
    "id",
    "roles",
    "action",
    "resource_type",
    "relationship",
    "labels",
    "user_labels",
    "linked",
    "consent",
    "purpose",
    "break_glass",
    "scope",
    "org_boundary",
    "expected",
    "reason",
    "obligations",
    "why",
    "xfail",
]

PATIENTS = {
    "care": PatientFacts("pat-care", "org-9"),
    "care2": PatientFacts("pat-care2", "org-9"),
    "own": PatientFacts("pat-self", "org-9"),
    "other-patient": PatientFacts("pat-other", "org-9"),
    "org-same": PatientFacts("pat-org1", "org-1"),
    "org-other": PatientFacts("pat-org2", "org-2"),
}
LINKED = {"care": "pat-care", "own": "pat-self", "none": None}
CLINICIANS = {"physician", "nurse"}
STAFF = {"physician", "nurse", "registrar", "billing", "admin", "auditor"}


def load_rows() -> list[dict[str, str]]:
    with TABLE.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        assert reader.fieldnames == COLUMNS, reader.fieldnames
        rows = list(reader)
    for row in rows:
        assert None not in row and all(v is not None and v != "" for v in row.values()), row
    return rows


ROWS = load_rows()


def _label_codings(code: str) -> dict[str, str]:
    system = CONFIDENTIALITY if code in {"R", "V"} else ACT_CODE
    return {"system": system, "code": code}


def consent_json(spec: str) -> dict[str, Any] | None:
    """The Consent resource a row's `consent` cell describes."""
    if spec == "none":
        return None
    kind, _, arg = spec.partition(":")
    status = "active"
    provision: dict[str, Any] = {"type": "deny"}
    if kind == "deny-all":
        pass
    elif kind == "deny-actor":
        role = {"coding": [{"code": "PRCP"}]}
        provision["actor"] = [{"role": role, "reference": {"reference": arg}}]
    elif kind == "deny-purpose":
        system = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
        provision["purpose"] = [{"system": system, "code": arg}]
    elif kind == "deny-class":
        provision["class"] = [{"system": "http://hl7.org/fhir/resource-types", "code": arg}]
    elif kind == "deny-label":
        provision["securityLabel"] = [_label_codings(arg)]
    elif kind == "inactive":
        status = "inactive"
    elif kind == "expired":
        provision["period"] = {"start": "2020-01-01", "end": "2021-01-01"}
    elif kind == "future":
        provision["period"] = {"start": "2099-01-01"}
    elif kind == "current":
        provision["period"] = {"start": "2020-01-01", "end": "2099-01-01"}
    elif kind == "nested-class":
        nested = {"type": "deny", "class": [{"code": arg}]}
        provision = {"type": "permit", "provision": [nested]}
    else:
        raise AssertionError(f"unknown consent spec {spec!r}")
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": {"coding": [{"code": "patient-privacy"}]},
        "category": [{"coding": [{"code": "59284-0"}]}],
        "provision": provision,
    }


def _split(cell: str, sep: str) -> list[str]:
    return [] if cell in ("-", "(none)", "none") else [p for p in cell.split(sep) if p]


@dataclass(frozen=True)
class Case:
    policy: Policy
    requester: Requester
    action: Action
    target: Target


def build(row: dict[str, str]) -> Case:
    roles = tuple(_split(row["roles"], "+"))
    consent = consent_json(row["consent"])
    rules = deny_rules(consent) if consent is not None else ()
    if consent is not None and row["consent"] not in ("inactive",):
        assert rules, f"{row['consent']} should yield deny rules"
    patients = tuple(
        PatientFacts(PATIENTS[r].id, PATIENTS[r].organization, rules)
        for r in _split(row["relationship"], "+")
    )
    labels = frozenset(_split(row["labels"], ","))
    target = Target(row["resource_type"], patients, labels)
    clinician = bool(CLINICIANS & set(roles))
    linked = row["linked"]
    if linked == "-":
        patient_id = "pat-self" if "patient" in roles else None
    else:
        patient_id = LINKED[linked]
    if row["break_glass"] == "yes":
        grants = frozenset(p.id for p in patients) or frozenset({"pat-other"})
    else:
        assert row["break_glass"] == "no"
        grants = frozenset()
    requester = Requester(
        user_id="user-1",
        roles=roles,
        scopes=parse_scopes(_split(row["scope"], " ")),
        purpose=row["purpose"],
        practitioner_id="prac-1" if clinician else None,
        organization_id="org-1" if STAFF & set(roles) else None,
        patient_id=patient_id,
        label_grants=frozenset(_split(row["user_labels"], ",")),
        care_patients=frozenset({"pat-care", "pat-care2"}) if clinician else frozenset(),
        break_glass_patients=grants,
    )
    assert row["org_boundary"] in ("on", "off")
    policy = policy_for(row["org_boundary"] == "on")
    return Case(policy, requester, Action(row["action"]), target)


def _params() -> list[Any]:
    params = []
    for row in ROWS:
        marks = []
        if row["xfail"] != "-":
            marks.append(pytest.mark.xfail(strict=True, reason=row["xfail"]))
        params.append(pytest.param(row, id=row["id"], marks=marks))
    return params


def test_table_is_big_enough() -> None:
    assert len(ROWS) >= 150
    assert len({row["id"] for row in ROWS}) == len(ROWS)


def test_table_covers_every_role_action_and_reason() -> None:
    roles = {r for row in ROWS for r in _split(row["roles"], "+")}
    assert {role.value for role in Role} <= roles
    assert {row["action"] for row in ROWS} == set(ACTIONS)
    assert {row["reason"] for row in ROWS} == {reason.value for reason in Reason}
    for role in Role:
        actions = {row["action"] for row in ROWS if row["roles"] == role.value}
        assert actions == set(ACTIONS), (role, actions)
    relationships = {r for row in ROWS for r in _split(row["relationship"], "+")}
    assert relationships == set(PATIENTS)
    consents = {row["consent"].partition(":")[0] for row in ROWS}
    assert consents >= {"none", "deny-all", "deny-actor", "deny-purpose", "deny-class"}
    assert consents >= {"deny-label", "inactive", "expired", "future", "nested-class"}
    assert {row["org_boundary"] for row in ROWS} == {"on", "off"}
    assert {row["purpose"] for row in ROWS} >= {"TREAT", "ETREAT", "HPAYMT", "HOPERAT", "PUBHLTH"}


def test_expected_values_are_consistent() -> None:
    for row in ROWS:
        assert row["expected"] in ("permit", "deny"), row["id"]
        assert (row["expected"] == "permit") == (row["reason"] == "permitted"), row["id"]
        if row["expected"] == "deny":
            assert row["obligations"] == "-", row["id"]


@pytest.mark.parametrize("row", _params())
def test_decision(row: dict[str, str]) -> None:
    case = build(row)
    decision = decide(case.policy, case.requester, case.action, case.target, NOW)
    expected_obligations = frozenset(_split(row["obligations"], ","))
    got = (decision.permit, decision.reason.value, decision.obligations)
    want = (row["expected"] == "permit", row["reason"], expected_obligations)
    assert got == want, f"{row['id']}: {row['why']}"
    if "redact" in expected_obligations:
        assert decision.redact_to == frozenset({"identifier"})
    else:
        assert decision.redact_to is None
    if decision.permit:
        assert decision.role in case.requester.roles

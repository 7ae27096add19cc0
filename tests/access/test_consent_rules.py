"""Consent deny rules (access/consent.py): only active Consents, deny provisions at any depth,
actors by Practitioner/Organization reference, purpose, class, label, period."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from carevault.access.consent import MAX_DEPTH, DenyRule, deny_rules
from tests.access.support import NOW

INF = float("inf")
PRAC = frozenset({"Practitioner/prac-1"})
ORG = frozenset({"Organization/org-1"})


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def consent(provision: Any, status: str = "active", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Consent", "status": status, "provision": provision, **extra}


def matches(rule: DenyRule, **kw: Any) -> bool:
    args: dict[str, Any] = {
        "actor_refs": PRAC | ORG,
        "purpose": "TREAT",
        "resource_type": "Observation",
        "labels": frozenset(),
        "now": NOW,
    }
    args.update(kw)
    return rule.matches(**args)


def test_bare_deny_is_a_rule_matching_everything() -> None:
    (rule,) = deny_rules(consent({"type": "deny"}))
    assert rule == DenyRule()
    assert matches(rule)
    assert matches(rule, actor_refs=frozenset(), purpose="HPAYMT", resource_type="Patient")


@pytest.mark.parametrize(
    "status", ["inactive", "draft", "proposed", "rejected", "entered-in-error", "ACTIVE", None]
)
def test_only_active_consents_count(status: str | None) -> None:
    assert deny_rules(consent({"type": "deny"}, status=status)) == ()


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Provenance", "status": "active", "provision": {"type": "deny"}},
        {"status": "active", "provision": {"type": "deny"}},
        consent(None),
        consent([{"type": "deny"}]),  # provision is a single element in R4
        consent("deny"),
        consent({}),
        consent({"type": "permit"}),
        consent({"type": "DENY"}),
    ],
)
def test_no_rules(resource: dict[str, Any]) -> None:
    assert deny_rules(resource) == ()


def test_criteria_are_read() -> None:
    provision = {
        "type": "deny",
        "actor": [
            {"role": {"text": "performer"}, "reference": {"reference": "Practitioner/prac-1"}},
            {"role": {"text": "custodian"}, "reference": {"reference": "Organization/org-1"}},
        ],
        "purpose": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HPAYMT"}
        ],
        "class": [
            {"system": "http://hl7.org/fhir/resource-types", "code": "Observation"},
            {"system": "http://hl7.org/fhir/resource-types", "code": "Condition"},
        ],
        "securityLabel": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}
        ],
        "period": {"start": "2020-01-01", "end": "2030-12-31"},
    }
    (rule,) = deny_rules(consent(provision))
    assert rule.actors == PRAC | ORG
    assert rule.purposes == {"HPAYMT"}
    assert rule.resource_types == {"Observation", "Condition"}
    assert rule.labels == {"PSY"}
    assert rule.start == ts("2020-01-01T00:00:00")
    assert rule.end == ts("2031-01-01T00:00:00")  # the whole end day is inside


def test_matches_each_criterion() -> None:
    rule = DenyRule(
        actors=PRAC,
        purposes=frozenset({"TREAT"}),
        resource_types=frozenset({"Observation"}),
        labels=frozenset({"PSY", "HIV"}),
    )
    psy = frozenset({"PSY"})
    assert matches(rule, labels=psy)
    assert matches(rule, labels=frozenset({"HIV", "R"}))
    assert not matches(rule, labels=frozenset())
    assert not matches(rule, labels=frozenset({"R"}))
    assert not matches(rule, labels=psy, actor_refs=ORG)
    assert not matches(rule, labels=psy, actor_refs=frozenset())
    assert not matches(rule, labels=psy, purpose="HOPERAT")
    assert not matches(rule, labels=psy, resource_type="Condition")


def test_actor_by_organization() -> None:
    provision = {"type": "deny", "actor": [{"reference": {"reference": "Organization/org-1"}}]}
    (rule,) = deny_rules(consent(provision))
    assert matches(rule, actor_refs=ORG)
    assert matches(rule, actor_refs=PRAC | ORG)
    assert not matches(rule, actor_refs=PRAC)
    assert not matches(rule, actor_refs=frozenset({"Organization/org-2"}))
    assert not matches(rule, actor_refs=frozenset())


@pytest.mark.parametrize(
    "actor",
    [
        {"reference": {"display": "Dr. Who"}},
        {"reference": {"identifier": {"value": "123"}}},  # logical reference
        {"reference": {"reference": "#contained-1"}},
        {"reference": {"reference": "prac-1"}},
        {"reference": "Practitioner/prac-1"},  # not a Reference object
        {"role": {"text": "x"}},
        "Practitioner/prac-1",
    ],
)
def test_unreadable_actor_matches_none_of_ours(actor: Any) -> None:
    (rule,) = deny_rules(consent({"type": "deny", "actor": [actor]}))
    assert rule.actors  # not a bare deny
    assert not matches(rule)
    assert not matches(rule, actor_refs=frozenset())


def test_unreadable_actor_next_to_a_readable_one() -> None:
    actors = [{"reference": {"display": "x"}}, {"reference": {"reference": "Practitioner/prac-1"}}]
    (rule,) = deny_rules(consent({"type": "deny", "actor": actors}))
    assert rule.actors == PRAC
    assert matches(rule, actor_refs=PRAC)


def test_versioned_actor_reference() -> None:
    actor = {"reference": {"reference": "Practitioner/prac-1/_history/2"}}
    (rule,) = deny_rules(consent({"type": "deny", "actor": [actor]}))
    assert matches(rule, actor_refs=PRAC)


def test_absolute_actor_reference() -> None:
    actor = {"reference": {"reference": "https://ehr.example.org/fhir/Practitioner/prac-1"}}
    (rule,) = deny_rules(consent({"type": "deny", "actor": [actor]}))
    assert matches(rule, actor_refs=PRAC)


def test_nested_deny_under_permit() -> None:
    provision = {
        "type": "permit",
        "actor": [{"reference": {"reference": "Organization/org-1"}}],
        "provision": [
            {"type": "deny", "class": [{"code": "Observation"}]},
            {"type": "permit", "class": [{"code": "Condition"}]},
        ],
    }
    (rule,) = deny_rules(consent(provision))
    # the nested deny is a rule of its own: it does not inherit the parent's actor
    assert rule == DenyRule(resource_types=frozenset({"Observation"}))
    assert matches(rule, actor_refs=frozenset())
    assert not matches(rule, resource_type="Condition")


def test_nested_permit_under_deny_does_not_open_the_door() -> None:
    provision = {
        "type": "deny",
        "provision": [
            {"type": "permit", "actor": [{"reference": {"reference": "Practitioner/prac-1"}}]}
        ],
    }
    assert deny_rules(consent(provision)) == (DenyRule(),)


def test_deny_at_every_level_is_collected() -> None:
    provision = {
        "type": "deny",
        "purpose": [{"code": "HPAYMT"}],
        "provision": [
            {
                "type": "permit",
                "provision": [
                    {"type": "deny", "securityLabel": [{"code": "HIV"}]},
                    {"type": "deny", "class": [{"code": "Patient"}]},
                ],
            },
            "garbage",
            {"type": "deny", "actor": [{"reference": {"reference": "Practitioner/prac-1"}}]},
        ],
    }
    rules = deny_rules(consent(provision))
    assert set(rules) == {
        DenyRule(purposes=frozenset({"HPAYMT"})),
        DenyRule(labels=frozenset({"HIV"})),
        DenyRule(resource_types=frozenset({"Patient"})),
        DenyRule(actors=PRAC),
    }
    assert len(rules) == 4


def nest(depth: int, leaf: dict[str, Any]) -> dict[str, Any]:
    provision = leaf
    for _ in range(depth):
        provision = {"type": "permit", "provision": [provision]}
    return provision


def test_nesting_within_the_limit() -> None:
    leaf = {"type": "deny", "class": [{"code": "Observation"}]}
    rules = deny_rules(consent(nest(MAX_DEPTH - 1, leaf)))
    assert rules == (DenyRule(resource_types=frozenset({"Observation"})),)


def test_too_deep_nesting_is_a_bare_deny() -> None:
    # deeper than MAX_DEPTH: whatever it says, it is read as a bare deny (door stays shut)
    leaf = {"type": "permit", "class": [{"code": "Observation"}]}
    assert deny_rules(consent(nest(MAX_DEPTH, leaf))) == (DenyRule(),)
    assert deny_rules(consent(nest(MAX_DEPTH + 30, leaf))) == (DenyRule(),)


def test_period_bounds() -> None:
    def rule_for(period: Any) -> DenyRule:
        (rule,) = deny_rules(consent({"type": "deny", "period": period}))
        return rule

    expired = rule_for({"start": "2020-01-01", "end": "2021-01-01"})
    assert not matches(expired)
    assert matches(expired, now=ts("2020-06-01T00:00:00"))
    future = rule_for({"start": "2099-01-01"})
    assert future.end == INF
    assert not matches(future)
    assert matches(future, now=ts("2099-01-01T00:00:00"))
    open_start = rule_for({"end": "2099-01-01T10:00:00Z"})
    assert open_start.start == -INF
    assert matches(open_start)
    # a bound covers its whole precision: the end second itself is still inside
    assert matches(open_start, now=ts("2099-01-01T10:00:00"))
    assert not matches(open_start, now=ts("2099-01-01T10:00:01"))
    precise = rule_for({"start": "2026-06-01T11:59:59+00:00", "end": "2026-06-01T12:00:01Z"})
    assert matches(precise)
    assert not matches(precise, now=NOW + 2)
    assert rule_for(None) == DenyRule()
    assert rule_for("2020") == DenyRule()


def test_unreadable_period_is_the_widest_deny() -> None:
    (rule,) = deny_rules(consent({"type": "deny", "period": {"start": "soon", "end": 17}}))
    assert (rule.start, rule.end) == (-INF, INF)
    assert matches(rule)


@pytest.mark.parametrize(
    "codes",
    [
        [{"code": 5}],
        [{"display": "payment"}],
        ["HPAYMT"],
        {"code": "HPAYMT"},  # not a list
    ],
)
def test_unreadable_codes_leave_the_criterion_open(codes: Any) -> None:
    (rule,) = deny_rules(consent({"type": "deny", "purpose": codes}))
    assert rule.purposes == frozenset()
    assert matches(rule)

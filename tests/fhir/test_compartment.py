"""PatientCompartment: which patients a resource belongs to, from the official definitions."""

from __future__ import annotations

import dataclasses

import pytest

from carevault.fhir import fhirpath
from carevault.fhir.compartment import (
    PatientCompartment,
    parse_relative_reference,
    reference_target,
    split_absolute_reference,
)
from carevault.fhir.definitions import compartment_params, search_parameters, split_union
from carevault.fhir.fhirpath import FhirPathError, compile_path, parse_steps, walk

from .samples import ALL, PATIENT_ID, PRACTITIONER_ID, sample

PC = PatientCompartment()


def test_params_come_from_the_compartment_definition() -> None:
    assert PC.params_for("Observation") == ("subject", "performer")
    assert PC.params_for("Claim") == ("patient", "payee")
    assert PC.params_for("AllergyIntolerance") == ("patient", "recorder", "asserter")
    assert PC.params_for("Patient") == ("link",)
    assert PC.params_for("Practitioner") == ()
    assert PC.params_for("NoSuchType") == ()


def test_params_resolve_to_official_expressions() -> None:
    assert PC.expressions_for("Account") == ("Account.subject",)
    assert PC.expressions_for("Observation") == ("Observation.subject", "Observation.performer")
    assert PC.expressions_for("Basic") == (
        "Basic.subject.where(resolve() is Patient)",
        "Basic.author",
    )
    assert PC.expressions_for("AuditEvent") == (
        "AuditEvent.agent.who.where(resolve() is Patient)",
        "AuditEvent.entity.what.where(resolve() is Patient)",
    )
    assert PC.expressions_for("CareTeam") == (
        "CareTeam.subject.where(resolve() is Patient)",
        "CareTeam.participant.member",
    )


def test_in_compartment_types() -> None:
    types = PC.in_compartment_types()
    for name in (
        "Patient",
        "Observation",
        "Encounter",
        "Claim",
        "ExplanationOfBenefit",
        "CareTeam",
        "Consent",
        "DocumentReference",
        "Group",
    ):
        assert name in types
    for name in ("Practitioner", "Organization", "Medication", "Location", "Bundle"):
        assert name not in types
    assert types == set(compartment_params()) | {"Patient"}


def test_every_compartment_expression_compiles_with_fhirpathpy() -> None:
    for resource_type in compartment_params():
        for expression in PC.expressions_for(resource_type):
            path = compile_path(expression, resource_type)
            assert not path.uses_fallback, expression
            assert parse_steps(path.path) is not None, expression  # the walker could too


# --- membership ----------------------------------------------------------------------------


def test_observation_subject() -> None:
    assert PC.patient_ids(ALL["Observation"]) == {PATIENT_ID}
    assert PC.patient_references(ALL["Observation"]) == set()


def test_encounter() -> None:
    assert PC.patient_ids(ALL["Encounter"]) == {PATIENT_ID}


def test_patient_itself() -> None:
    assert PC.patient_ids(ALL["Patient"]) == {PATIENT_ID}
    assert PC.patient_ids(sample("Patient", id=None)) == set()


def test_patient_link_is_not_followed() -> None:
    linked = sample("Patient", link=[{"other": {"reference": "Patient/other"}, "type": "seealso"}])
    assert PC.patient_ids(linked) == {PATIENT_ID}


def test_claim_patient_and_eob() -> None:
    assert PC.patient_ids(ALL["Claim"]) == {PATIENT_ID}
    assert PC.patient_ids(ALL["ExplanationOfBenefit"]) == {PATIENT_ID}
    payee = sample(
        "Claim", payee={"type": {"text": "subscriber"}, "party": {"reference": "Patient/p2"}}
    )
    assert PC.patient_ids(payee) == {PATIENT_ID, "p2"}


def test_reference_to_group_is_no_patient() -> None:
    body = sample("Observation", subject={"reference": "Group/g1"})
    assert PC.patient_ids(body) == set()
    assert PC.patient_references(body) == set()
    encounter = sample("Encounter", subject={"reference": "Group/g1"})
    assert PC.patient_ids(encounter) == set()


def test_allergy_intolerance_patient_and_asserter() -> None:
    assert PC.patient_ids(ALL["AllergyIntolerance"]) == {PATIENT_ID}
    body = sample("AllergyIntolerance", asserter={"reference": "Patient/p2"})
    assert PC.patient_ids(body) == {PATIENT_ID, "p2"}
    body = sample("AllergyIntolerance", recorder={"reference": f"Practitioner/{PRACTITIONER_ID}"})
    assert PC.patient_ids(body) == {PATIENT_ID}


def test_care_team_participant_member_patient() -> None:
    body = sample("CareTeam", subject=None)
    assert PC.patient_ids(body) == {PATIENT_ID}  # through participant.member
    body["participant"] = body["participant"][1:]  # only the practitioner is left
    assert PC.patient_ids(body) == set()


def test_other_clinical_samples() -> None:
    for resource_type in (
        "Condition",
        "MedicationRequest",
        "Procedure",
        "Immunization",
        "DiagnosticReport",
        "DocumentReference",
        "CarePlan",
        "Consent",
    ):
        assert PC.patient_ids(ALL[resource_type]) == {PATIENT_ID}, resource_type
    for resource_type in ("Practitioner", "PractitionerRole", "Organization"):
        assert PC.patient_ids(ALL[resource_type]) == set()


def test_observation_performer_and_several_patients() -> None:
    body = sample(
        "Observation", performer=[{"reference": "Patient/p2"}, {"reference": "Practitioner/x"}]
    )
    assert PC.patient_ids(body) == {PATIENT_ID, "p2"}


def test_reference_forms() -> None:
    def ids(subject: dict) -> set[str]:
        return PC.patient_ids(sample("Observation", subject=subject))

    assert ids({"reference": "Patient/p1/_history/3"}) == {"p1"}
    assert ids({"reference": "https://ehr.example/fhir/Patient/p1"}) == {"p1"}
    assert ids({"reference": "https://ehr.example/fhir/Patient/p1/_history/2"}) == {"p1"}
    assert ids({"reference": "p1", "type": "Patient"}) == {"p1"}
    assert ids({"reference": "p1"}) == set()  # an untyped bare id points nowhere
    assert ids({"reference": "Observation/p1", "type": "Patient"}) == set()
    assert ids({"reference": "#contained"}) == set()
    assert ids({"identifier": {"system": "urn:x", "value": "p1"}}) == set()  # logical only
    assert ids({"display": "Anna"}) == set()
    assert ids({"reference": "Patient/not an id"}) == set()
    assert ids({"reference": "Patient/p1\n"}) == set()
    assert ids({"reference": "https://ehr.example/fhir/Patient/"}) == set()
    assert ids({"reference": "ftp://ehr.example/fhir/Patient/p1"}) == set()


def test_local_bases_restrict_absolute_references() -> None:
    local = PatientCompartment(local_bases=["https://ehr.example/fhir/"])
    ours = sample("Observation", subject={"reference": "https://ehr.example/fhir/Patient/p1"})
    theirs = sample("Observation", subject={"reference": "https://other.example/fhir/Patient/p1"})
    assert local.patient_ids(ours) == {"p1"}
    assert local.patient_ids(theirs) == set()
    assert PC.patient_ids(theirs) == {"p1"}  # the default accepts any base (documented)


def test_urn_references_are_returned_unresolved() -> None:
    urn = "urn:uuid:8f3c2a9e-5b1d-4c6e-9f7a-2d4b6c8e0a13"
    body = sample("Observation", subject={"reference": urn})
    assert PC.patient_ids(body) == set()
    assert PC.patient_references(body) == {urn}
    typed = sample("Observation", subject={"reference": urn, "type": "Patient"})
    assert PC.patient_references(typed) == {urn}
    other = sample("Observation", subject={"reference": urn, "type": "Group"})
    assert PC.patient_references(other) == set()
    # a transaction rewrites the urn to the assigned id and asks again
    body["subject"]["reference"] = "Patient/new-id"
    assert PC.patient_ids(body) == {"new-id"}
    assert PC.patient_references(body) == set()


def test_resources_outside_the_compartment_or_malformed() -> None:
    assert PC.patient_ids({"resourceType": "Medication"}) == set()
    assert (
        PC.patient_ids({"resourceType": "NoSuchType", "subject": {"reference": "Patient/1"}})
        == set()
    )
    assert PC.patient_ids({"subject": {"reference": "Patient/1"}}) == set()
    assert PC.patient_ids({"resourceType": ["Observation"]}) == set()
    assert PC.patient_ids({"resourceType": "Observation", "subject": "Patient/1"}) == set()


def test_task_and_audit_event_links() -> None:
    task = {
        "resourceType": "Task",
        "status": "draft",
        "intent": "order",
        "for": {"reference": "Patient/p1"},
        "focus": {"reference": "Patient/p2"},
    }
    assert PC.patient_ids(task) == {"p1", "p2"}
    audit = {
        "resourceType": "AuditEvent",
        "agent": [{"who": {"reference": "Patient/p1"}}, {"who": {"reference": "Device/d"}}],
        "entity": [{"what": {"reference": "Patient/p2"}}],
    }
    assert PC.patient_ids(audit) == {"p1", "p2"}


def test_reference_helpers() -> None:
    assert parse_relative_reference("Patient/abc") == ("Patient", "abc")
    assert parse_relative_reference("Patient/abc/_history/1") == ("Patient", "abc")
    assert parse_relative_reference("patient/abc") is None
    assert parse_relative_reference("Patient/abc/def") is None
    assert split_absolute_reference("https://h/fhir/Patient/1") == (
        "https://h/fhir",
        "Patient",
        "1",
    )
    assert split_absolute_reference("https://h/Patient/1/_history/2") == (
        "https://h",
        "Patient",
        "1",
    )
    assert split_absolute_reference("https://h/Patient") is None
    assert reference_target({"reference": "urn:oid:1.2.3"}).placeholder == "urn:oid:1.2.3"


def test_absolute_reference_parsing_is_linear() -> None:
    # a regex with an unanchored base would backtrack quadratically on this
    hostile = "https://" + "A/" * 200_000 + "!"
    assert split_absolute_reference(hostile) is None
    assert PC.patient_ids(sample("Observation", subject={"reference": hostile})) == set()


# --- the fallback walker -------------------------------------------------------------------


def _all_expressions() -> list[tuple[str, str]]:
    pairs = []
    for resource_type in compartment_params():
        pairs += [(resource_type, e) for e in PC.expressions_for(resource_type)]
    from carevault.fhir.search_params import search_params_for

    for resource_type in ALL:
        for param in search_params_for(resource_type).values():
            pairs += [(resource_type, e) for e in param.expressions]
    return pairs


@pytest.mark.parametrize("resource_type", sorted(ALL))
def test_walker_agrees_with_fhirpathpy(resource_type: str) -> None:
    resource = ALL[resource_type]
    for rt, expression in _all_expressions():
        if rt != resource_type:
            continue
        path = compile_path(expression, rt)
        steps = parse_steps(path.path)
        assert steps is not None, expression
        expected = [node.value for node in path.evaluate(resource)]
        assert [node.value for node in walk(steps, resource)] == expected, expression


def test_walker_choice_elements_and_filters() -> None:
    obs = ALL["Observation"]
    nodes = walk(parse_steps("Observation.effective"), obs)
    assert nodes == [fhirpath.Node("dateTime", obs["effectiveDateTime"])]
    nodes = walk(parse_steps("Observation.value.ofType(Quantity)"), obs)
    assert nodes == [fhirpath.Node("Quantity", obs["valueQuantity"])]
    assert walk(parse_steps("Observation.value.ofType(string)"), obs) == []
    phones = walk(parse_steps("Patient.telecom.where(system='phone')"), ALL["Patient"])
    assert [n.value["value"] for n in phones] == ["555-301-8842"]
    assert walk(parse_steps("Patient.name"), obs) == []  # wrong root type selects nothing


def test_walker_refuses_what_it_does_not_understand() -> None:
    for expression in (
        "Observation.subject.resolve()",
        "Observation.value > 5",
        "Observation.component.where(code.coding.code = '1')",
        "Observation..code",
        "",
        "%resource.id",
    ):
        assert parse_steps(expression) is None, expression


def test_compartment_uses_walker_when_fhirpathpy_fails(monkeypatch) -> None:
    fallback = PatientCompartment()

    def broken(*args, **kwargs):
        raise RuntimeError("engine failure")

    for resource_type, paths in fallback._paths.items():
        fallback._paths[resource_type] = tuple(
            dataclasses.replace(p, _compiled=broken) for p in paths
        )
    for resource_type, resource in ALL.items():
        assert fallback.patient_ids(resource) == PC.patient_ids(resource), resource_type
    payee = sample("Claim", payee={"type": {"text": "x"}, "party": {"reference": "Patient/p2"}})
    assert fallback.patient_ids(payee) == {PATIENT_ID, "p2"}


def test_compile_path_without_fhirpathpy_uses_walker(monkeypatch) -> None:
    def cannot_compile(*args, **kwargs):
        raise ValueError("parse error")

    monkeypatch.setattr(fhirpath.fhirpathpy, "compile", cannot_compile)
    compile_path.cache_clear()
    try:
        path = compile_path("Condition.subject.where(resolve() is Patient)", "Condition")
        assert path.uses_fallback
        assert path.resolve_is == "Patient"
        assert [n.value for n in path.evaluate(ALL["Condition"])] == [ALL["Condition"]["subject"]]
        with pytest.raises(FhirPathError):
            compile_path("Observation.value > 5", "Observation")
    finally:
        compile_path.cache_clear()


def test_unevaluable_expression_fails_closed() -> None:
    path = compile_path("Observation.subject", "Observation")
    broken = dataclasses.replace(path, _compiled=None, _steps=None)
    with pytest.raises(FhirPathError):
        broken.evaluate(ALL["Observation"])


def test_abstract_roots_are_rooted_at_the_concrete_type() -> None:
    path = compile_path("Resource.id", "Patient")
    assert path.path == "Patient.id"
    assert [n.value for n in path.evaluate(ALL["Patient"])] == [PATIENT_ID]


def test_split_union() -> None:
    assert split_union("A.b | (C.d.ofType(E)) | F.g.where(h='|')") == [
        "A.b",
        "C.d.ofType(E)",
        "F.g.where(h='|')",
    ]
    definition = search_parameters()[("Observation", "code")]
    assert definition.expressions_for("Observation") == ("Observation.code",)
    assert search_parameters()[("MedicationRequest", "code")].expressions_for(
        "MedicationRequest"
    ) == ("MedicationRequest.medication.ofType(CodeableConcept)",)

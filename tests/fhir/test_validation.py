"""validate_resource: accepts realistic resources, rejects bad ones with FHIR issues that never
echo the input, and never raises anything but FhirValidationError."""

from __future__ import annotations

import copy
import json
import random
import sys

import orjson
import pytest

from carevault.fhir import validation
from carevault.fhir.outcome import (
    conflict,
    forbidden_as_not_found,
    gone,
    invalid_request,
    not_found,
    not_supported,
    operation_outcome,
    precondition_failed,
    processing_error,
    validation_failed,
)
from carevault.fhir.validation import (
    FhirValidationError,
    Issue,
    is_supported_type,
    model_class,
    supported_types,
    validate_resource,
)

from .samples import ALL, PHI_FAMILY, sample


def _issues(body: object, expected_type: str | None = None) -> list[Issue]:
    with pytest.raises(FhirValidationError) as info:
        validate_resource(body, expected_type)
    assert info.value.issues, "a validation error always carries at least one issue"
    return info.value.issues


def _codes(issues: list[Issue]) -> set[tuple[str, str | None]]:
    return {(i.code, i.expression) for i in issues}


# --- accepts -------------------------------------------------------------------------------


@pytest.mark.parametrize("resource_type", sorted(ALL))
def test_accepts_realistic_samples(resource_type: str) -> None:
    body = sample(resource_type)
    out = validate_resource(body, resource_type)
    assert out["resourceType"] == resource_type
    assert out["id"] == body["id"]
    # idempotent: what we store validates again to itself
    assert validate_resource(out) == out
    # the export we use is the library's JSON export
    model = model_class(resource_type).model_validate(body)
    assert out == orjson.loads(model.model_dump_json())
    # the input is not modified
    assert body == ALL[resource_type]


def test_round_trip_keeps_primitive_extensions_contained_and_base64() -> None:
    patient = validate_resource(sample("Patient"))
    assert patient["_birthDate"] == ALL["Patient"]["_birthDate"]
    assert patient["contained"] == ALL["Patient"]["contained"]
    assert patient["generalPractitioner"] == [{"reference": "#gp"}]
    doc = validate_resource(sample("DocumentReference"))
    attachment = doc["content"][0]["attachment"]
    assert attachment["data"] == ALL["DocumentReference"]["content"][0]["attachment"]["data"]
    eob = validate_resource(sample("ExplanationOfBenefit"))
    assert eob["contained"][0]["resourceType"] == "Coverage"


def test_primitive_array_extensions_round_trip() -> None:
    body = sample(
        "Patient",
        name=[
            {
                "family": "Doe",
                "given": ["Jo", None],
                "_given": [None, {"extension": [{"url": "http://x.org/e", "valueString": "n"}]}],
            }
        ],
    )
    out = validate_resource(body)
    assert out["name"][0]["_given"][1]["extension"][0]["valueString"] == "n"
    assert validate_resource(out) == out


def test_normalizes_what_the_library_coerces() -> None:
    # stored form is the validated form: nulls and empty arrays are dropped
    out = validate_resource({"resourceType": "Patient", "active": True, "gender": None, "name": []})
    assert out == {"resourceType": "Patient", "active": True}


def test_transaction_bundle_with_nested_resources() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:8f3c2a9e-5b1d-4c6e-9f7a-2d4b6c8e0a13",
                "resource": sample("Patient", id=None),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:3c5c6a4e-1f2d-4b8e-9a1d-2f0c2b7e9f10",
                "resource": sample(
                    "Observation",
                    id=None,
                    subject={"reference": "urn:uuid:8f3c2a9e-5b1d-4c6e-9f7a-2d4b6c8e0a13"},
                ),
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    out = validate_resource(bundle, "Bundle")
    assert out["entry"][1]["resource"]["subject"]["reference"].startswith("urn:uuid:")
    bad = copy.deepcopy(bundle)
    bad["entry"][1]["resource"]["bogus"] = 1
    assert ("structure", "Bundle.entry[1].resource.bogus") in _codes(_issues(bad))


# --- supported types -----------------------------------------------------------------------


def test_supported_types_derived_from_the_package() -> None:
    types = supported_types()
    assert validation.SUPPORTED_TYPES is types
    # the constant list is exactly what the installed models define
    assert types == validation.derive_resource_types()
    assert len(types) > 140
    for name in (
        "Patient",
        "Observation",
        "Bundle",
        "Binary",
        "Parameters",
        "Claim",
        "ExplanationOfBenefit",
        "Citation",
    ):
        assert name in types
    for name in (
        "Resource",
        "DomainResource",
        "HumanName",
        "Coding",
        "BackboneElement",
        "Element",
        "Extension",
        "PatientContact",
        "FHIRPrimitiveExtension",
    ):
        assert name not in types
    # the per-type check used on the request path agrees with the full derivation
    assert all(is_supported_type(name) for name in types)


@pytest.mark.parametrize(
    "name",
    [
        "Resource",
        "DomainResource",
        "HumanName",
        "Coding",
        "PatientContact",
        "patient",
        "Foo",
        "",
        "Patient ",
        "Patient\x00",
        "A" * 500,
        "__class__",
        "Type",
    ],
)
def test_not_supported_types(name: str) -> None:
    assert not is_supported_type(name)
    assert _codes(_issues({"resourceType": name})) == {("not-supported", "resourceType")}


# --- rejects -------------------------------------------------------------------------------


def test_rejects_unknown_element() -> None:
    issues = _issues(sample("Patient", favouriteColour="green"))
    assert _codes(issues) == {("structure", "Patient.favouriteColour")}
    assert issues[0].diagnostics == "Unknown element"
    assert issues[0].severity == "error"


def test_rejects_unknown_nested_element_and_library_only_keys() -> None:
    body = sample("Patient")
    body["name"][0]["nickname"] = "Annie"
    assert _codes(_issues(body)) == {("structure", "Patient.name[0].nickname")}
    # keys fhir.resources would silently accept or drop are refused too
    body = sample("Patient", fhir_comments="not FHIR")
    body["address"][0]["resource_type"] = "Address"
    assert _codes(_issues(body)) == {
        ("structure", "Patient.fhir_comments"),
        ("structure", "Patient.address[0].resource_type"),
    }


def test_rejects_wrong_type() -> None:
    issues = _issues(sample("Patient", name=[{"family": [PHI_FAMILY]}]))
    assert _codes(issues) == {("structure", "Patient.name[0].family")}
    issues = _issues(sample("Observation", status=["final"]))
    assert ("structure", "Observation.status") in _codes(issues)
    issues = _issues(sample("Patient", name={"family": "X"}))
    assert ("structure", "Patient.name") in _codes(issues)


@pytest.mark.parametrize("bad", ["2020-13-45", "2020-02-30", "20-01-01", "2020/01/01", "yesterday"])
def test_rejects_bad_date(bad: str) -> None:
    assert _codes(_issues(sample("Patient", birthDate=bad))) == {("value", "Patient.birthDate")}


def test_rejects_bad_datetime_and_instant() -> None:
    # a dateTime with a time needs a timezone; an instant needs seconds and a timezone
    issues = _issues(sample("Observation", effectiveDateTime="2019-06-12T09:00:00"))
    assert _codes(issues) == {("value", "Observation.effectiveDateTime")}
    issues = _issues(sample("Observation", issued="2019-06-12"))
    assert _codes(issues) == {("value", "Observation.issued")}


def test_rejects_missing_required() -> None:
    issues = _issues(sample("Observation", status=None, code=None))
    assert ("required", "Observation.code") in _codes(issues)
    issues = _issues(sample("Observation", status=None))
    assert _codes(issues) == {("required", "Observation.status")}
    issues = _issues(sample("Encounter", **{"class": None}))
    assert _codes(issues) == {("required", "Encounter.class")}
    issues = _issues(sample("Immunization", occurrenceDateTime=None))
    assert _codes(issues) == {("required", "Immunization")}


def test_rejects_two_types_for_one_choice_element() -> None:
    issues = _issues(sample("Observation", valueString="tall"))
    assert _codes(issues) == {("invariant", "Observation")}


def test_rejects_resource_type_mismatch() -> None:
    assert _codes(_issues(sample("Patient"), "Observation")) == {("invalid", "resourceType")}


def test_rejects_missing_or_non_string_resource_type() -> None:
    assert _codes(_issues({"id": "x"})) == {("required", "resourceType")}
    assert _codes(_issues({"resourceType": ["Patient"]})) == {("structure", "resourceType")}
    assert _codes(_issues({"resourceType": None})) == {("structure", "resourceType")}


@pytest.mark.parametrize("body", [[], [ALL["Patient"]], 1, 1.5, "Patient", None, True, b"{}"])
def test_rejects_non_object_json(body: object) -> None:
    assert _codes(_issues(body)) == {("structure", None)}


def test_rejects_contained_of_unknown_or_non_resource_type() -> None:
    # the library would raise KeyError / TypeError for these; we report them as issues
    for contained in (
        {"resourceType": "Foo"},
        {"resourceType": ["x"]},
        {"resourceType": "HumanName"},
    ):
        body = sample("Patient", contained=[contained])
        assert _codes(_issues(body)) == {("not-supported", "Patient.contained[0].resourceType")}


def test_rejects_null_in_array_and_empty_objects() -> None:
    assert ("structure", "Patient.name") in _codes(_issues(sample("Patient", name=[None])))
    assert _codes(_issues(sample("Patient", name=[{}]))) == {("invariant", "Patient.name[0]")}


def test_rejects_nan_and_infinity() -> None:
    for number in (float("nan"), float("inf"), float("-inf")):
        body = sample("Observation")
        body["valueQuantity"]["value"] = number
        assert _codes(_issues(body)) == {("value", "Observation.valueQuantity.value")}


def test_rejects_non_json_values() -> None:
    body = sample("Patient", active={1, 2})
    assert ("structure", "Patient.active") in _codes(_issues(body))
    body = sample("Patient")
    body["name"][0][1] = "x"  # a non-string key cannot come from JSON
    assert ("structure", "Patient.name[0]") in _codes(_issues(body))


def test_rejects_bad_base64_and_long_id() -> None:
    body = sample("DocumentReference")
    body["content"][0]["attachment"]["data"] = "not base64!"
    issues = _issues(body)
    assert _codes(issues) == {("value", "DocumentReference.content[0].attachment.data")}
    assert issues[0].diagnostics == "Invalid base64 content"
    assert _codes(_issues(sample("Patient", id="a" * 65))) == {("value", "Patient.id")}


def test_rejects_deep_nesting() -> None:
    body: dict = {"resourceType": "Patient"}
    node = body
    for _ in range(10_000):
        node["extension"] = [{"url": "http://x.org/e"}]
        node = node["extension"][0]
    assert _codes(_issues(body)) == {("structure", None)}
    nested_lists: list = []
    for _ in range(10_000):
        nested_lists = [nested_lists]
    assert _codes(_issues({"resourceType": "Patient", "name": nested_lists})) == {
        ("structure", None)
    }


def test_recursion_error_in_the_models_is_a_validation_error(monkeypatch) -> None:
    # Without the pre-scan depth limit the models would recurse until RecursionError.
    monkeypatch.setattr(validation, "MAX_DEPTH", 10**9)
    item: dict = {"linkId": "0", "type": "group"}
    body = {"resourceType": "Questionnaire", "status": "active", "item": [item]}
    for level in range(1, sys.getrecursionlimit()):
        child = {"linkId": str(level), "type": "group"}
        item["item"] = [child]
        item = child
    assert _codes(_issues(body)) == {("structure", None)}


def test_accepts_legitimately_deep_questionnaire() -> None:
    item: dict = {"linkId": "0", "type": "group"}
    body = {"resourceType": "Questionnaire", "status": "active", "item": [item]}
    for level in range(1, 40):
        child = {"linkId": str(level), "type": "group"}
        item["item"] = [child]
        item = child
    validate_resource(body)


def test_huge_strings_do_not_crash() -> None:
    big = "x" * 2_000_000
    out = validate_resource(sample("Patient", name=[{"family": big}]))
    assert out["name"][0]["family"] == big
    issues = _issues({"resourceType": "Patient", big: 1})
    assert _codes(issues) == {("structure", "Patient." + big[:64])}
    issues = _issues({"resourceType": big})
    assert _codes(issues) == {("not-supported", "resourceType")}


def test_library_failures_become_validation_errors(monkeypatch) -> None:
    class Exploding:
        @staticmethod
        def model_validate(body):
            raise KeyError(PHI_FAMILY)

    monkeypatch.setattr(validation, "model_class", lambda name: Exploding)
    issues = _issues(sample("Patient"))
    assert _codes(issues) == {("invalid", None)}
    assert PHI_FAMILY not in repr(issues)


def test_random_json_never_raises_anything_else() -> None:
    rng = random.Random(20240517)
    keys = [
        "resourceType",
        "id",
        "name",
        "family",
        "given",
        "status",
        "code",
        "coding",
        "extension",
        "url",
        "valueString",
        "contained",
        "birthDate",
        "_birthDate",
        "x",
        "meta",
        "subject",
        "reference",
        "value",
        "text",
    ]
    types = ["Patient", "Observation", "Bundle", "Foo", "Resource", None, 3]

    def value(depth: int):
        roll = rng.random()
        if depth > 4 or roll < 0.3:
            return rng.choice(
                [
                    None,
                    True,
                    0,
                    -1,
                    2**40,
                    1.5,
                    float("nan"),
                    "",
                    "x",
                    "2020-13-45",
                    "Patient/1",
                    PHI_FAMILY,
                    "\x00",
                ]
            )
        if roll < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        obj = {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 4))}
        if rng.random() < 0.5:
            obj["resourceType"] = rng.choice(types)
        return obj

    for _ in range(400):
        body = value(0)
        if isinstance(body, dict) and rng.random() < 0.7:
            body["resourceType"] = rng.choice(types)
        try:
            validate_resource(body)
        except FhirValidationError as exc:
            assert exc.issues
            assert PHI_FAMILY not in repr(exc.issues)


# --- no PHI in errors ----------------------------------------------------------------------

PHI_CASES = [
    sample("Patient", name=[{"family": [PHI_FAMILY]}]),
    sample("Patient", name=[{"family": {"value": PHI_FAMILY}}]),
    sample("Patient", name=[{"family": PHI_FAMILY, "given": PHI_FAMILY}]),
    sample("Patient", birthDate=PHI_FAMILY),
    sample("Patient", birthDate=f"1984-02-29 {PHI_FAMILY}"),
    sample("Patient", id=f"{PHI_FAMILY} !"),
    sample("Patient", id=PHI_FAMILY * 10),
    sample("Patient", active=PHI_FAMILY),
    sample("Patient", telecom=[{"system": "phone", "value": 5553018842, "use": PHI_FAMILY}]),
    sample("Patient", multipleBirthInteger=PHI_FAMILY),
    sample("Patient", deceasedBoolean=False, deceasedDateTime=PHI_FAMILY),
    sample("Patient", identifier=[{"system": "urn:x", "value": [PHI_FAMILY]}]),
    sample("Patient", contained=[{"resourceType": PHI_FAMILY}]),
    sample(
        "Patient",
        contained=[{"resourceType": "Patient", "name": [{"family": 1}], "text": PHI_FAMILY}],
    ),
    sample("Patient", unknownElement=PHI_FAMILY),
    sample("Patient", extension=[{"url": "http://x.org/e", "valueInteger": PHI_FAMILY}]),
    sample("Patient", extension=[{"url": "http://x.org/e", "valueDate": PHI_FAMILY}]),
    sample("Observation", valueQuantity={"value": PHI_FAMILY}),
    sample("Observation", subject=PHI_FAMILY),
    {"resourceType": PHI_FAMILY},
    {"resourceType": "Patient", f"{PHI_FAMILY} (secret)": 1},
]


@pytest.mark.parametrize("body", PHI_CASES)
def test_errors_never_contain_input_values(body: dict) -> None:
    with pytest.raises(FhirValidationError) as info:
        validate_resource(body)
    exc = info.value
    rendered = json.dumps(operation_outcome(exc.issues)) + repr(exc.issues) + str(exc)
    assert PHI_FAMILY.lower() not in rendered.lower()
    # the pydantic error (which holds the input) is neither the cause nor shown as context
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def test_unknown_keys_are_reported_by_name_only_when_name_shaped() -> None:
    # an unknown element is reported by its name (the client needs it; it is not a value),
    # but only when it looks like a FHIR element name
    issues = _issues({"resourceType": "Patient", f"{PHI_FAMILY} (secret)": 1})
    assert _codes(issues) == {("structure", "Patient.<invalid-name>")}
    issues = _issues({"resourceType": "Patient", "middleName\n": 1})
    assert _codes(issues) == {("structure", "Patient.<invalid-name>")}
    issues = _issues({"resourceType": "Patient", "middleName": PHI_FAMILY})
    assert _codes(issues) == {("structure", "Patient.middleName")}


# --- outcomes -------------------------------------------------------------------------------


def test_operation_outcomes_are_valid_fhir() -> None:
    err_issues = _issues(sample("Observation", status=None, valueString="x"))
    outcomes = [
        operation_outcome(err_issues),
        operation_outcome([]),
        operation_outcome([{"severity": "warning", "code": "informational"}]),
        validation_failed(FhirValidationError(err_issues)),
        not_found(),
        forbidden_as_not_found(),
        gone(),
        conflict(),
        precondition_failed(),
        processing_error(),
        invalid_request(),
        not_supported(),
    ]
    for outcome in outcomes:
        assert validate_resource(outcome, "OperationOutcome") == outcome
    first = outcomes[0]["issue"][0]
    assert first["expression"] == [err_issues[0].expression]
    assert first["diagnostics"] == err_issues[0].diagnostics


def test_forbidden_looks_exactly_like_not_found() -> None:
    assert json.dumps(forbidden_as_not_found()) == json.dumps(not_found())
    assert not_found()["issue"][0]["code"] == "not-found"
    assert gone()["issue"][0]["code"] == "deleted"
    assert conflict()["issue"][0]["code"] == "conflict"
    assert processing_error()["issue"][0]["code"] == "exception"

"""Search parameters: the supported table, index extraction and search value parsing."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime

import pytest

from carevault.fhir.definitions import search_parameters, split_union
from carevault.fhir.search_params import (
    COMMON,
    COMMON_PARAMS,
    SENSITIVITY,
    SUPPORTED_PARAMS,
    IndexEntry,
    SearchParameterError,
    date_range,
    extract_index,
    parse_date_search,
    parse_token_search,
    phi_date_search_key,
    search_param,
    search_params_for,
    split_search_values,
    token_keys,
    token_search_key,
)

from .samples import ALL, ENCOUNTER_ID, ORGANIZATION_ID, PATIENT_ID, PRACTITIONER_ID, sample


def ts(text: str) -> float:
    """Epoch seconds of an ISO timestamp, computed independently with datetime."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


# --- the table -----------------------------------------------------------------------------

REQUIRED = {
    COMMON: {"_id", "_lastUpdated"},
    "Patient": {"identifier", "name", "family", "given", "birthdate", "gender"},
    "Practitioner": {"identifier", "name", "family", "given"},
    "PractitionerRole": {"practitioner", "organization", "role"},
    "Organization": {"identifier", "name"},
    "CareTeam": {"participant", "status"},
}
CLINICAL = [
    "Encounter",
    "Observation",
    "Condition",
    "AllergyIntolerance",
    "MedicationRequest",
    "Procedure",
    "Immunization",
    "DiagnosticReport",
    "DocumentReference",
    "CarePlan",
    "CareTeam",
    "Consent",
]


def test_required_params_are_supported() -> None:
    for resource_type, codes in REQUIRED.items():
        supported = set(
            COMMON_PARAMS if resource_type == COMMON else SUPPORTED_PARAMS[resource_type]
        )
        assert codes <= supported, resource_type
    for resource_type in CLINICAL:
        codes = set(SUPPORTED_PARAMS[resource_type])
        assert "patient" in codes, resource_type
        assert "status" in codes or "clinical-status" in codes, resource_type
        assert codes & {"date", "onset-date", "recorded-date"}, resource_type
        if resource_type not in (
            "Encounter",
            "CarePlan",
            "CareTeam",
            "Consent",
            "DocumentReference",
            "Immunization",
        ):
            assert "code" in codes, resource_type


def test_every_supported_param_has_an_official_definition() -> None:
    for (resource_type, code), sensitivity in SENSITIVITY.items():
        param = search_param(resource_type, code)
        assert param is not None
        assert param.sensitivity == sensitivity
        assert param.kind in ("token", "string", "date", "reference")
        base = "Resource" if resource_type == COMMON else resource_type
        official = search_parameters()[(base, code)]
        assert param.kind == official.type
        assert param.url == official.url
        assert param.expressions and all(e.startswith(base + ".") for e in param.expressions)
        assert set(param.expressions) <= set(split_union(official.expression)), (
            "expressions are parts of the official one, not retyped"
        )


def test_official_per_type_expressions() -> None:
    assert search_param("Observation", "date").expressions == ("Observation.effective",)
    assert search_param("Condition", "onset-date").expressions == (
        "Condition.onset.ofType(dateTime)",
        "Condition.onset.ofType(Period)",
    )
    assert search_param("Condition", "recorded-date").expressions == ("Condition.recordedDate",)
    assert search_param("Encounter", "patient").expressions == (
        "Encounter.subject.where(resolve() is Patient)",
    )
    assert search_param("DocumentReference", "encounter").expressions == (
        "DocumentReference.context.encounter",
    )
    assert search_param("Organization", "name").expressions == (
        "Organization.name",
        "Organization.alias",
    )
    assert search_param("Patient", "_id").expressions == ("Resource.id",)
    assert search_param("Patient", "nope") is None
    assert search_param("Medication", "code") is None
    assert set(search_params_for("Medication")) == {"_id", "_lastUpdated", "_security"}


def test_sensitivity_table() -> None:
    phi = {pair for pair, s in SENSITIVITY.items() if s == "phi"}
    assert phi == {
        ("Patient", code)
        for code in (
            "identifier",
            "name",
            "family",
            "given",
            "birthdate",
            "gender",
            "telecom",
            "phone",
            "email",
            "address",
            "address-city",
            "address-postalcode",
        )
    } | {("Practitioner", c) for c in ("identifier", "name", "family", "given")} | {
        ("Organization", "identifier"),
        ("Organization", "name"),
    }
    for resource_type in CLINICAL:
        for code in SUPPORTED_PARAMS[resource_type]:
            assert SENSITIVITY[(resource_type, code)] == "plain", (resource_type, code)


# --- extraction: every supported (type, param) ----------------------------------------------

LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
PAT = ("Patient", PATIENT_ID)
ENC = ("Encounter", ENCOUNTER_ID)
DAY_2019_06_12 = (ts("2019-06-12T00:00:00+00:00"), ts("2019-06-13T00:00:00+00:00"))
AT_0900 = (ts("2019-06-12T09:00:00-04:00"), ts("2019-06-12T09:00:01-04:00"))
PERIOD_0900_0930 = (ts("2019-06-12T09:00:00-04:00"), ts("2019-06-12T09:30:01-04:00"))
OPEN_FROM_0900 = (ts("2019-06-12T09:00:00-04:00"), math.inf)

EXPECTED: dict[tuple[str, str], set[tuple]] = {
    ("Patient", "identifier"): {
        ("https://github.com/synthetichealth/synthea", PATIENT_ID),
        ("http://hospital.smarthealthit.org", "MRN-4471-2209"),
        ("http://hl7.org/fhir/sid/us-ssn", "999-41-7733"),
    },
    ("Patient", "name"): {("Zyxwvutsrqp",), ("Anna",), ("Maria",), ("Mrs.",)},
    ("Patient", "family"): {("Zyxwvutsrqp",)},
    ("Patient", "organization"): set(),  # the sample has no managingOrganization: see below
    ("Patient", "given"): {("Anna",), ("Maria",)},
    ("Patient", "birthdate"): {("1984", "1984-02", "1984-02-29")},
    ("Patient", "gender"): {(None, "female")},
    ("Patient", "telecom"): {("phone", "555-301-8842")},
    ("Patient", "phone"): {("phone", "555-301-8842")},
    ("Patient", "email"): set(),
    ("Patient", "address"): {
        ("742 Koelpin Knoll Suite 12",),
        ("Springfield",),
        ("MA",),
        ("01104",),
        ("US",),
    },
    ("Patient", "address-city"): {("Springfield",)},
    ("Patient", "address-postalcode"): {("01104",)},
    ("Practitioner", "identifier"): {("http://hl7.org/fhir/sid/us-npi", "9999919034")},
    ("Practitioner", "name"): {("Ortiz",), ("Jerome",), ("Dr.",)},
    ("Practitioner", "family"): {("Ortiz",)},
    ("Practitioner", "given"): {("Jerome",)},
    ("PractitionerRole", "practitioner"): {("Practitioner", PRACTITIONER_ID)},
    ("PractitionerRole", "organization"): {("Organization", ORGANIZATION_ID)},
    ("PractitionerRole", "role"): {("http://nucc.org/provider-taxonomy", "208D00000X")},
    ("Organization", "identifier"): {("https://github.com/synthetichealth/synthea", "d672f853")},
    ("Organization", "name"): {("SPRINGFIELD FAMILY PRACTICE",), ("Springfield FP",)},
    ("Encounter", "patient"): {PAT},
    ("Encounter", "subject"): {PAT},
    ("Encounter", "date"): {PERIOD_0900_0930},
    ("Encounter", "status"): {(None, "finished")},
    ("Encounter", "class"): {("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB")},
    ("Encounter", "type"): {(SCT, "162673000")},
    ("Observation", "patient"): {PAT},
    ("Observation", "subject"): {PAT},
    ("Observation", "code"): {(LOINC, "8302-2")},
    ("Observation", "date"): {AT_0900},
    ("Observation", "category"): {
        ("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")
    },
    ("Observation", "status"): {(None, "final")},
    ("Observation", "encounter"): {ENC},
    ("Condition", "patient"): {PAT},
    ("Condition", "subject"): {PAT},
    ("Condition", "code"): {(SCT, "44054006")},
    ("Condition", "onset-date"): {AT_0900},
    ("Condition", "recorded-date"): {AT_0900},
    ("Condition", "category"): {
        ("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis")
    },
    ("Condition", "clinical-status"): {
        ("http://terminology.hl7.org/CodeSystem/condition-clinical", "active")
    },
    ("Condition", "encounter"): {ENC},
    ("AllergyIntolerance", "patient"): {PAT},
    ("AllergyIntolerance", "code"): {(SCT, "91935009")},
    ("AllergyIntolerance", "date"): {
        (ts("2001-05-07T00:00:00+00:00"), ts("2001-05-08T00:00:00+00:00"))
    },
    ("AllergyIntolerance", "category"): {(None, "food")},
    ("AllergyIntolerance", "clinical-status"): {
        ("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active")
    },
    ("MedicationRequest", "patient"): {PAT},
    ("MedicationRequest", "subject"): {PAT},
    ("MedicationRequest", "code"): {("http://www.nlm.nih.gov/research/umls/rxnorm", "860975")},
    ("MedicationRequest", "date"): {
        (ts("2019-06-13T00:00:00+00:00"), ts("2019-06-14T00:00:00+00:00"))
    },
    ("MedicationRequest", "authoredon"): {
        (ts("2019-06-12T09:30:00-04:00"), ts("2019-06-12T09:30:01-04:00"))
    },
    ("MedicationRequest", "category"): {
        ("http://terminology.hl7.org/CodeSystem/medicationrequest-category", "community")
    },
    ("MedicationRequest", "status"): {(None, "active")},
    ("MedicationRequest", "intent"): {(None, "order")},
    ("MedicationRequest", "encounter"): {ENC},
    ("Procedure", "patient"): {PAT},
    ("Procedure", "subject"): {PAT},
    ("Procedure", "code"): {(SCT, "430193006")},
    ("Procedure", "date"): {(ts("2019-06-12T09:00:00-04:00"), ts("2019-06-12T09:15:01-04:00"))},
    ("Procedure", "category"): {(SCT, "387713003")},
    ("Procedure", "status"): {(None, "completed")},
    ("Procedure", "encounter"): {ENC},
    ("Immunization", "patient"): {PAT},
    ("Immunization", "vaccine-code"): {("http://hl7.org/fhir/sid/cvx", "140")},
    ("Immunization", "date"): {(ts("2019-10-01T10:00:00-04:00"), ts("2019-10-01T10:00:01-04:00"))},
    ("Immunization", "status"): {(None, "completed")},
    ("DiagnosticReport", "patient"): {PAT},
    ("DiagnosticReport", "subject"): {PAT},
    ("DiagnosticReport", "code"): {(LOINC, "51990-0")},
    ("DiagnosticReport", "date"): {DAY_2019_06_12},
    ("DiagnosticReport", "category"): {("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB")},
    ("DiagnosticReport", "status"): {(None, "final")},
    ("DiagnosticReport", "encounter"): {ENC},
    ("DocumentReference", "patient"): {PAT},
    ("DocumentReference", "subject"): {PAT},
    ("DocumentReference", "type"): {(LOINC, "34117-2")},
    ("DocumentReference", "date"): {
        (ts("2019-06-12T09:30:00.000-04:00"), ts("2019-06-12T09:30:00.001-04:00"))
    },
    ("DocumentReference", "category"): {
        (
            "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
            "clinical-note",
        )
    },
    ("DocumentReference", "status"): {(None, "current")},
    ("DocumentReference", "encounter"): {ENC},
    ("CarePlan", "patient"): {PAT},
    ("CarePlan", "subject"): {PAT},
    ("CarePlan", "date"): {OPEN_FROM_0900},
    ("CarePlan", "category"): {(SCT, "698360004")},
    ("CarePlan", "status"): {(None, "active")},
    ("CarePlan", "intent"): {(None, "order")},
    ("CarePlan", "encounter"): {ENC},
    ("CareTeam", "patient"): {PAT},
    ("CareTeam", "subject"): {PAT},
    ("CareTeam", "date"): {OPEN_FROM_0900},
    ("CareTeam", "category"): {(LOINC, "LA27976-2")},
    ("CareTeam", "status"): {(None, "active")},
    ("CareTeam", "encounter"): {ENC},
    ("CareTeam", "participant"): {PAT, ("Practitioner", PRACTITIONER_ID)},
    ("Consent", "patient"): {PAT},
    ("Consent", "date"): {(ts("2020-01-15T11:00:00+00:00"), ts("2020-01-15T11:00:01+00:00"))},
    ("Consent", "category"): {(LOINC, "59284-0")},
    ("Consent", "status"): {(None, "active")},
}


def test_expectations_cover_every_supported_param() -> None:
    supported = {pair for pair in SENSITIVITY if pair[0] != COMMON}
    assert set(EXPECTED) == supported


@pytest.mark.parametrize("pair", sorted(EXPECTED), ids=lambda p: f"{p[0]}.{p[1]}")
def test_extract_each_supported_param(pair: tuple[str, str]) -> None:
    resource_type, code = pair
    entries = [e for e in extract_index(ALL[resource_type]) if e.param == code]
    param = search_param(resource_type, code)
    assert all(e.kind == param.kind and e.phi == param.phi for e in entries)
    got = {e.values for e in entries}
    if param.kind == "date" and not param.phi:
        assert len(got) == len(EXPECTED[pair])
        for (low, high), (exp_low, exp_high) in zip(sorted(got), sorted(EXPECTED[pair])):
            assert low == pytest.approx(exp_low, abs=1e-6)
            assert high == pytest.approx(exp_high, abs=1e-6) or high == exp_high == math.inf
    else:
        assert got == EXPECTED[pair]


@pytest.mark.parametrize("resource_type", sorted(ALL))
def test_common_params(resource_type: str) -> None:
    resource = ALL[resource_type]
    entries = extract_index(resource)
    assert IndexEntry("_id", "token", (None, resource["id"]), False) in entries
    updated = [e for e in entries if e.param == "_lastUpdated"]
    if "meta" in resource:
        low = ts(resource["meta"]["lastUpdated"].replace("Z", "+00:00"))
        assert [e.values for e in updated] == [(low, low + 1)]
    else:
        assert updated == []


def test_entries_have_no_duplicates_and_are_hashable() -> None:
    entries = extract_index(ALL["Patient"])
    assert len(entries) == len(set(entries))
    assert extract_index({"resourceType": "Medication", "id": "m"}) == [
        IndexEntry("_id", "token", (None, "m"), False)
    ]
    assert extract_index({"resourceType": None}) == []
    assert extract_index({"resourceType": "NoSuchType", "id": "x"})[0].param == "_id"


def test_access_control_index_entries() -> None:
    """managingOrganization (organization boundary) and meta.security (sensitive labels) are
    indexed in the clear: opaque ids and label codes, no PHI."""
    entries = extract_index(
        {
            "resourceType": "Patient",
            "managingOrganization": {"reference": "Organization/org-1"},
            "meta": {"security": [{"system": "http://x.example/labels", "code": "R"}]},
        }
    )
    by_param = {e.param: e for e in entries}
    assert by_param["organization"].values == ("Organization", "org-1")
    assert by_param["_security"].values == ("http://x.example/labels", "R")
    assert not by_param["organization"].phi and not by_param["_security"].phi


def test_phi_entries_are_marked() -> None:
    for entry in extract_index(ALL["Patient"]):
        assert entry.phi == (entry.param not in ("_id", "_lastUpdated")), entry.param


def test_patient_param_filters_to_patient_references() -> None:
    group = sample("Observation", subject={"reference": "Group/g1"})
    entries = extract_index(group)
    assert [e.values for e in entries if e.param == "subject"] == [("Group", "g1")]
    assert [e for e in entries if e.param == "patient"] == []
    for ref, kept in [
        ("https://ehr.example/fhir/Patient/p1", True),
        ("https://ehr.example/fhir/Group/g1", False),
        ("urn:uuid:0b9a", True),
    ]:
        entries = extract_index(sample("Observation", subject={"reference": ref}))
        patient = [e.values for e in entries if e.param == "patient"]
        assert patient == ([(None, ref)] if kept else []), ref
        assert [e.values for e in entries if e.param == "subject"] == [(None, ref)]
    typed_group = sample("Observation", subject={"reference": "urn:uuid:0b9a", "type": "Group"})
    assert [e for e in extract_index(typed_group) if e.param == "patient"] == []
    contained = sample("Observation", subject={"reference": "#p"})
    assert [e for e in extract_index(contained) if e.param in ("patient", "subject")] == []


def test_reference_keys() -> None:
    entry = IndexEntry("subject", "reference", ("Patient", "p1"), False)
    assert entry.keys == ("Patient/p1",)
    assert IndexEntry("subject", "reference", (None, "urn:uuid:1"), False).keys == ("urn:uuid:1",)


def test_condition_onset_period_and_missing_dates() -> None:
    body = sample("Condition", onsetDateTime=None, onsetPeriod={"start": "2018", "end": "2019-03"})
    (entry,) = [e for e in extract_index(body) if e.param == "onset-date"]
    assert entry.values == (ts("2018-01-01T00:00:00"), ts("2019-04-01T00:00:00"))
    body = sample("Condition", onsetDateTime=None, onsetAge={"value": 40, "unit": "a"})
    assert [e for e in extract_index(body) if e.param == "onset-date"] == []
    body = sample("Condition", onsetDateTime=None, onsetPeriod={"end": "2019"})
    (entry,) = [e for e in extract_index(body) if e.param == "onset-date"]
    assert entry.values == (-math.inf, ts("2020-01-01T00:00:00"))


def test_phi_date_period_start_and_time_precision() -> None:
    body = sample("Patient", birthDate="1984")
    (entry,) = [e for e in extract_index(body) if e.param == "birthdate"]
    assert entry.values == ("1984",) == entry.keys


def test_token_forms() -> None:
    assert IndexEntry("_id", "token", (None, "p1"), False).keys == ("|p1", "p1")
    coded = IndexEntry("code", "token", (LOINC, "8302-2"), False)
    assert coded.keys == ("http://loinc.org|8302-2", "http://loinc.org|", "8302-2")
    active = sample("Patient", active=True)
    # booleans index as "true"/"false" (Patient.active is not a supported param: check helper)
    from carevault.fhir.search_params import _tokens

    assert _tokens(True) == [(None, "true")]
    assert _tokens({"coding": [{"system": "s"}, {"display": "only text"}]}) == [("s", None)]
    assert active["active"] is True
    # `|` and `\` in parts are escaped: different pairs never share a key
    assert set(token_keys("a|b", "c")).isdisjoint(token_keys("a", "b|c"))
    assert token_keys("s", None) == ("s|",)
    assert token_keys(None, None) == ()


# --- token search ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed", "key"),
    [
        ("8302-2", (None, "8302-2"), "8302-2"),
        ("http://loinc.org|8302-2", ("http://loinc.org", "8302-2"), "http://loinc.org|8302-2"),
        ("|final", ("", "final"), "|final"),
        ("http://loinc.org|", ("http://loinc.org", None), "http://loinc.org|"),
        (r"a\|b|c", ("a|b", "c"), r"a\|b|c"),
        (r"a|b\|c", ("a", "b|c"), r"a|b\|c"),
        (r"x\,y", (None, "x,y"), "x,y"),
        (r"back\\slash", (None, "back\\slash"), r"back\\slash"),
        (
            "urn:oid:2.16.840.1.113883.6.1|8302-2",
            ("urn:oid:2.16.840.1.113883.6.1", "8302-2"),
            "urn:oid:2.16.840.1.113883.6.1|8302-2",
        ),
    ],
)
def test_parse_token_search(value: str, parsed: tuple, key: str) -> None:
    assert parse_token_search(value) == parsed
    assert token_search_key(*parsed) == key


def test_token_search_keys_match_index_keys() -> None:
    cases = [("http://loinc.org", "8302-2"), (None, "final"), ("a|b", "c\\d")]
    for system, code in cases:
        keys = token_keys(system, code)
        if system:
            assert token_search_key(system, code) in keys
            assert token_search_key(system, None) in keys
            assert token_search_key("", code) not in keys  # has a system
        else:
            assert token_search_key("", code) in keys
        assert token_search_key(None, code) in keys


@pytest.mark.parametrize("value", ["", "|", "a|b|c", "a\\", "x\x00y", "x" * 5000, "\n"])
def test_parse_token_search_rejects(value: str) -> None:
    with pytest.raises(SearchParameterError) as info:
        parse_token_search(value)
    assert str(info.value) == "Invalid search parameter value"


def test_split_search_values() -> None:
    assert split_search_values("a,b") == ["a", "b"]
    assert split_search_values(r"a\,b,c") == [r"a\,b", "c"]
    assert split_search_values("http://loinc.org|1,http://loinc.org|2") == [
        "http://loinc.org|1",
        "http://loinc.org|2",
    ]
    with pytest.raises(SearchParameterError):
        split_search_values("")


# --- date search -----------------------------------------------------------------------------

Y2020 = (ts("2020-01-01T00:00:00"), ts("2021-01-01T00:00:00"))

DATE_CASES = [
    ("2020", ("eq", *Y2020)),
    ("eq2020", ("eq", *Y2020)),
    ("ne2020", ("ne", *Y2020)),
    ("2020-02", ("eq", ts("2020-02-01T00:00:00"), ts("2020-03-01T00:00:00"))),
    ("2020-12", ("eq", ts("2020-12-01T00:00:00"), ts("2021-01-01T00:00:00"))),
    ("2020-02-29", ("eq", ts("2020-02-29T00:00:00"), ts("2020-03-01T00:00:00"))),
    ("lt2020-03-01", ("lt", ts("2020-03-01T00:00:00"), ts("2020-03-02T00:00:00"))),
    ("gt2020-03-01", ("gt", ts("2020-03-01T00:00:00"), ts("2020-03-02T00:00:00"))),
    ("le2020-03-01", ("le", ts("2020-03-01T00:00:00"), ts("2020-03-02T00:00:00"))),
    ("ge2020-03-01", ("ge", ts("2020-03-01T00:00:00"), ts("2020-03-02T00:00:00"))),
    ("sa2020-03-01", ("sa", ts("2020-03-01T00:00:00"), ts("2020-03-02T00:00:00"))),
    ("eb2020-03-01", ("eb", ts("2020-03-01T00:00:00"), ts("2020-03-02T00:00:00"))),
    ("ap2020-03-01", ("ap", ts("2020-03-01T00:00:00"), ts("2020-03-02T00:00:00"))),
    ("2020-03-01T10:00", ("eq", ts("2020-03-01T10:00:00"), ts("2020-03-01T10:01:00"))),
    ("2020-03-01T10:00:05Z", ("eq", ts("2020-03-01T10:00:05"), ts("2020-03-01T10:00:06"))),
    ("ge2020-03-01T10:00:05+02:00", ("ge", ts("2020-03-01T08:00:05"), ts("2020-03-01T08:00:06"))),
    ("2020-03-01T10:00:05-05:30", ("eq", ts("2020-03-01T15:30:05"), ts("2020-03-01T15:30:06"))),
    # an unencoded "+" arrives as a space: accepted as "+"
    ("2020-03-01T10:00:05 02:00", ("eq", ts("2020-03-01T08:00:05"), ts("2020-03-01T08:00:06"))),
    ("2020-03-01T10:00:05.25Z", ("eq", ts("2020-03-01T10:00:05.25"), ts("2020-03-01T10:00:05.26"))),
    (
        "2020-03-01T10:00:05.123Z",
        ("eq", ts("2020-03-01T10:00:05.123"), ts("2020-03-01T10:00:05.124")),
    ),
    ("2020-03-01T10:00:05", ("eq", ts("2020-03-01T10:00:05"), ts("2020-03-01T10:00:06"))),
    ("1970", ("eq", 0.0, ts("1971-01-01T00:00:00"))),
    ("0001", ("eq", ts("0001-01-01T00:00:00"), ts("0002-01-01T00:00:00"))),
    ("9999", ("eq", ts("9999-01-01T00:00:00"), ts("9999-12-31T00:00:00") + 86400)),
    ("1969-12-31T23:59:59Z", ("eq", -1.0, 0.0)),
]


@pytest.mark.parametrize(("value", "expected"), DATE_CASES)
def test_parse_date_search(value: str, expected: tuple) -> None:
    prefix, low, high = parse_date_search(value)
    assert prefix == expected[0]
    assert low == pytest.approx(expected[1], abs=1e-6)
    assert high == pytest.approx(expected[2], abs=1e-6)
    assert low < high


BAD_DATES = [
    "",
    "ge",
    "eq",
    "2020-1",
    "2020-13",
    "2020-00",
    "gt2020-13",
    "2020-02-30",
    "2021-02-29",
    "2020-04-31",
    "2020-01-01T24:00",
    "2020-01-01T10:60",
    "2020-01-01T10",
    "2020-01-01T10:00:61",
    "2020-01-01T10:00:00+15:00",
    "2020-01-01T10:00:00+02",
    "2020-01-01T10:00:00.Z",
    "2020-01-01 10:00:00",
    "20200101",
    "0000",
    "+2020",
    "-2020",
    "2020-01-01T10:00:00ZZ",
    "2020' OR '1'='1",
    "2020;DROP TABLE resources",
    "xx2020",
    "GE2020",
    "ge 2020",
    "2020\n",
    "٢٠٢٠",
    "2020-01-01T10:00:00.1234567890Z",
    "x" * 5000,
    "now",
    "today",
]


@pytest.mark.parametrize("value", BAD_DATES)
def test_parse_date_search_rejects(value: str) -> None:
    with pytest.raises(SearchParameterError) as info:
        parse_date_search(value)
    assert str(info.value) == "Invalid search parameter value"  # generic: no echo


def test_date_range_and_phi_date_key() -> None:
    assert date_range("2020") == Y2020
    with pytest.raises(SearchParameterError):
        date_range("2020-13")
    assert phi_date_search_key("1984-02-29") == "1984-02-29"
    assert phi_date_search_key("eq1984-02") == "1984-02"
    assert phi_date_search_key("1984") == "1984"
    for bad in ("ge1984", "1984-02-29T10:00:00Z", "1984-02-30", "84", "1984-2"):
        with pytest.raises(SearchParameterError):
            phi_date_search_key(bad)


def test_index_and_search_bounds_agree() -> None:
    # an Observation at 09:00:00-04:00 is found by a day search on 2019-06-12 (UTC)
    (entry,) = [e for e in extract_index(ALL["Observation"]) if e.param == "date"]
    _, low, high = parse_date_search("eq2019-06-12")
    assert low <= entry.values[0] and entry.values[1] <= high


@pytest.mark.parametrize("resource_type", sorted(ALL))
def test_extraction_is_the_same_with_the_fallback_walker(resource_type, monkeypatch) -> None:
    from carevault.fhir import search_params

    expected = extract_index(ALL[resource_type])
    original = search_params._compiled

    def walker_only(rt: str):
        return tuple(
            (param, tuple(dataclasses.replace(p, _compiled=None) for p in paths))
            for param, paths in original(rt)
        )

    monkeypatch.setattr(search_params, "_compiled", walker_only)
    assert extract_index(ALL[resource_type]) == expected

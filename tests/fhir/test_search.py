"""FHIR search through HTTP: parameters, prefixes, blind-index string matching, paging cursors,
_include, POST _search, refusals, on both stores."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest

from carevault.identity.roles import Role

FHIR = "application/fhir+json"
FORM = "application/x-www-form-urlencoded"
LOINC = "http://loinc.org"
MRN = "http://hospital.example/mrn"
SNOMED = "http://snomed.info/sct"
VITALS = "http://terminology.hl7.org/CodeSystem/observation-category"


@pytest.fixture
async def clinician(harness):
    # search mechanics, not who may search: a service account may search every type and patient
    await harness.add_user("dr.search", Role.service)
    token = (await harness.login("dr.search"))["access_token"]
    harness.client.headers["Authorization"] = f"Bearer {token}"
    return harness


async def _create(h, body: dict) -> dict:
    response = await h.client.post(
        f"/fhir/{body['resourceType']}", json=body, headers={"content-type": FHIR}
    )
    assert response.status_code == 201, response.text
    return response.json()


def _patient(family: str, given: list[str], mrn: str, gender: str, birth: str) -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": family, "given": given}],
        "gender": gender,
        "birthDate": birth,
    }


def _observation(
    patient: str,
    code: tuple[str | None, str],
    when: str,
    status: str = "final",
    category: str = "vital-signs",
    encounter: str | None = None,
) -> dict:
    coding = {"code": code[1]} if code[0] is None else {"system": code[0], "code": code[1]}
    body = {
        "resourceType": "Observation",
        "status": status,
        "category": [{"coding": [{"system": VITALS, "code": category}]}],
        "code": {"coding": [coding]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": 72, "unit": "1"},
    }
    if encounter:
        body["encounter"] = {"reference": f"Encounter/{encounter}"}
    return body


@dataclass
class Seed:
    p: dict[str, str] = field(default_factory=dict)
    o: dict[str, str] = field(default_factory=dict)
    bodies: dict[str, dict] = field(default_factory=dict)
    c1: str = ""
    e1: str = ""


@pytest.fixture
async def seeded(clinician) -> Seed:
    h = clinician
    seed = Seed()
    for key, body in {
        "quill": _patient("Quillfeatherstonehaugh", ["Zebulonia"], "MRN-1", "female", "1937-04-19"),
        "jose": _patient("García", ["José"], "MRN-2", "male", "1980-02-03"),
        "anna": _patient("Smith", ["Anna Maria"], "MRN-3", "male", "1980-07-10"),
    }.items():
        seed.p[key] = (await _create(h, body))["id"]
    quill = seed.p["quill"]
    seed.e1 = (
        await _create(
            h,
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "AMB",
                },
                "subject": {"reference": f"Patient/{quill}"},
                "period": {"start": "2024-05-01T09:00:00Z", "end": "2024-05-01T12:00:00Z"},
            },
        )
    )["id"]
    observations = {
        "o1": _observation(quill, (LOINC, "8867-4"), "2024-05-01T10:30:00Z", encounter=seed.e1),
        "o2": _observation(quill, (LOINC, "29463-7"), "2024-05-20"),
        "o3": _observation(
            quill, (None, "local-1"), "2023-12-31", status="preliminary", category="laboratory"
        ),
        "o4": _observation(seed.p["jose"], (LOINC, "8867-4"), "2024-06-15", status="amended"),
    }
    for key, body in observations.items():
        created = await _create(h, body)
        seed.o[key] = created["id"]
        seed.bodies[key] = created
    seed.c1 = (
        await _create(
            h,
            {
                "resourceType": "Condition",
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active",
                        }
                    ]
                },
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                "code": "problem-list-item",
                            }
                        ]
                    }
                ],
                "code": {"coding": [{"system": SNOMED, "code": "44054006"}]},
                "subject": {"reference": f"Patient/{quill}"},
                "onsetDateTime": "2020-01",
            },
        )
    )["id"]
    return seed


async def _search(h, path: str, params: dict | list | None = None, status: int = 200) -> dict:
    response = await h.client.get(path, params=params)
    assert response.status_code == status, (params, response.text)
    body = response.json()
    if status == 200:
        assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
        assert response.headers["cache-control"] == "no-store"
    else:
        assert body["resourceType"] == "OperationOutcome"
    return body


def _ids(bundle: dict, mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


async def _match(h, path: str, params, expected: set[str]) -> None:
    bundle = await _search(h, path, params)
    assert _ids(bundle) == expected, params
    assert bundle["total"] == len(expected), params


async def test_patient_demographics(seeded, clinician):
    h, p = clinician, seeded.p
    cases = [
        ({"identifier": f"{MRN}|MRN-1"}, {p["quill"]}),
        ({"identifier": "MRN-2"}, {p["jose"]}),
        ({"identifier": "|MRN-2"}, set()),  # it has a system
        ({"identifier": f"{MRN}|"}, set(p.values())),
        ({"identifier": "MRN-1,MRN-3"}, {p["quill"], p["anna"]}),
        ({"gender": "male"}, {p["jose"], p["anna"]}),
        ({"gender": "female"}, {p["quill"]}),
        ({"birthdate": "1980"}, {p["jose"], p["anna"]}),
        ({"birthdate": "1980-02"}, {p["jose"]}),
        ({"birthdate": "1980-02-03"}, {p["jose"]}),
        ({"birthdate": "eq1937-04-19"}, {p["quill"]}),
        ({"birthdate": "1980-02-04"}, set()),
        ({"name": "Quil"}, {p["quill"]}),
        ({"name": "Quillfeatherstonehaugh"}, {p["quill"]}),
        ({"family": "qUILLfeather"}, {p["quill"]}),
        ({"given": "Zeb"}, {p["quill"]}),
        ({"family": "Zeb"}, set()),  # a given name, not a family name
        ({"name": "Jose"}, {p["jose"]}),  # accent-insensitive
        ({"given": "JOSÉ"}, {p["jose"]}),
        ({"name": "garcia"}, {p["jose"]}),
        ({"name": "Mar"}, {p["anna"]}),  # a later word of "Anna Maria"
        ({"name": "uill"}, set()),  # starts-with, not contains
        ({"name": "Quil,Smi"}, {p["quill"], p["anna"]}),
        ([("name", "Smith"), ("gender", "male")], {p["anna"]}),
        ([("name", "Smith"), ("gender", "female")], set()),
        ({"_id": p["jose"]}, {p["jose"]}),
        ({"_id": f"{p['jose']},{p['quill']}"}, {p["jose"], p["quill"]}),
    ]
    for params, expected in cases:
        await _match(h, "/fhir/Patient", params, expected)
    everything = await _search(h, "/fhir/Patient")
    assert everything["total"] == 3 and _ids(everything) == set(p.values())
    entry = everything["entry"][0]
    assert entry["fullUrl"] == f"Patient/{entry['resource']['id']}"


async def test_clinical_parameters_and_date_prefixes(seeded, clinician):
    h, o, quill = clinician, seeded.o, seeded.p["quill"]
    cases = [
        ({"code": f"{LOINC}|8867-4"}, {o["o1"], o["o4"]}),
        ({"code": "8867-4"}, {o["o1"], o["o4"]}),
        ({"code": "|8867-4"}, set()),
        ({"code": "|local-1"}, {o["o3"]}),
        ({"code": f"{LOINC}|"}, {o["o1"], o["o2"], o["o4"]}),
        ({"code": "8867-4,29463-7"}, {o["o1"], o["o2"], o["o4"]}),
        ({"code": f"{SNOMED}|8867-4"}, set()),
        ({"patient": quill}, {o["o1"], o["o2"], o["o3"]}),
        ({"subject": f"Patient/{quill}"}, {o["o1"], o["o2"], o["o3"]}),
        ({"subject": quill}, {o["o1"], o["o2"], o["o3"]}),
        ({"subject:Patient": quill}, {o["o1"], o["o2"], o["o3"]}),
        ({"patient": f"Patient/{seeded.p['jose']}"}, {o["o4"]}),
        ({"encounter": f"Encounter/{seeded.e1}"}, {o["o1"]}),
        ({"category": "vital-signs"}, {o["o1"], o["o2"], o["o4"]}),
        ({"category": f"{VITALS}|laboratory"}, {o["o3"]}),
        ({"status": "final"}, {o["o1"], o["o2"]}),
        ({"status": "amended,preliminary"}, {o["o3"], o["o4"]}),
        ({"date": "2024"}, {o["o1"], o["o2"], o["o4"]}),
        ({"date": "2024-05"}, {o["o1"], o["o2"]}),
        ({"date": "2024-05-01"}, {o["o1"]}),
        ({"date": "eq2024-05-01"}, {o["o1"]}),
        ({"date": "2024-05-01T10:30:00Z"}, {o["o1"]}),
        ({"date": "ge2024-05-20"}, {o["o2"], o["o4"]}),
        ({"date": "gt2024-05-20"}, {o["o4"]}),
        ({"date": "lt2024-05-01"}, {o["o3"]}),
        ({"date": "le2024-05-01"}, {o["o1"], o["o3"]}),
        ({"date": "ne2024-05"}, {o["o3"], o["o4"]}),
        ({"date": "sa2024-05-20"}, {o["o4"]}),
        ({"date": "eb2024-01-01"}, {o["o3"]}),
        ({"date": "2023,2024-06"}, {o["o3"], o["o4"]}),
        ([("date", "ge2024"), ("date", "lt2024-06")], {o["o1"], o["o2"]}),
        ([("code", "8867-4"), ("date", "2024-05")], {o["o1"]}),
        ([("code", "8867-4"), ("patient", quill), ("status", "final")], {o["o1"]}),
    ]
    for params, expected in cases:
        await _match(h, "/fhir/Observation", params, expected)
    await _match(h, "/fhir/Condition", {"clinical-status": "active"}, {seeded.c1})
    await _match(
        h, "/fhir/Condition", {"code": f"{SNOMED}|44054006", "patient": quill}, {seeded.c1}
    )
    await _match(h, "/fhir/Condition", {"onset-date": "2020"}, {seeded.c1})
    await _match(h, "/fhir/Condition", {"onset-date": "2020-02"}, set())
    await _match(h, "/fhir/Condition", {"category": "problem-list-item"}, {seeded.c1})
    await _match(h, "/fhir/Encounter", {"date": "2024-05-01", "patient": quill}, {seeded.e1})
    await _match(h, "/fhir/Encounter", {"status": "finished", "date": "2024-05-02"}, set())
    await _match(h, "/fhir/Observation", {"_lastUpdated": "gt2000-01-01"}, set(o.values()))
    await _match(h, "/fhir/Observation", {"_lastUpdated": "lt2000"}, set())


async def test_refusals_are_400_operation_outcomes(seeded, clinician):
    h = clinician
    refused = [
        ("/fhir/Patient", {"name:contains": "uill"}),
        ("/fhir/Patient", {"name:exact": "Smith"}),
        ("/fhir/Patient", {"family:text": "Smith"}),
        ("/fhir/Patient", {"gender:not": "male"}),
        ("/fhir/Observation", {"code:below": "8867"}),
        ("/fhir/Observation", {"date:missing": "true"}),
        ("/fhir/Patient", {"foo": "bar"}),
        ("/fhir/Observation", {"name": "Smith"}),  # not an Observation parameter
        ("/fhir/Patient", {"_summary": "count"}),
        ("/fhir/Patient", {"_has:Observation:patient:code": "8867-4"}),
        ("/fhir/Patient", {"_revinclude": "Observation:patient"}),
        ("/fhir/Observation", {"_include": "Observation:code"}),
        ("/fhir/Observation", {"_include": "*"}),
        ("/fhir/Observation", {"_include:iterate": "Observation:patient"}),
        ("/fhir/Observation", {"date": "2024-13"}),
        ("/fhir/Observation", {"date": "yesterday"}),
        ("/fhir/Observation", {"date": "ap2024"}),
        ("/fhir/Observation", {"_lastUpdated": "2024-02-30"}),
        ("/fhir/Patient", {"birthdate": "ge1980"}),  # no ranges over blind indexes
        ("/fhir/Patient", {"birthdate": "1980-02-03T10:00:00Z"}),
        ("/fhir/Patient", {"name": ""}),
        ("/fhir/Patient", {"name": "a,"}),
        ("/fhir/Observation", {"code": "a|b|c"}),
        ("/fhir/Observation", {"_count": "-1"}),
        ("/fhir/Observation", {"_count": "ten"}),
        ("/fhir/Observation", [("_count", "1"), ("_count", "2")]),
        ("/fhir/Observation", {"_total": "sometimes"}),
        ("/fhir/Observation", {"_sort": "code"}),
        ("/fhir/Patient", {"_sort": "birthdate"}),
        ("/fhir/Patient", {"_format": "xml"}),
    ]
    for path, params in refused:
        body = await _search(h, path, params, status=400)
        assert body["issue"][0]["code"] in ("invalid", "not-supported"), params
    contains = await _search(h, "/fhir/Patient", {"name:contains": "uill"}, status=400)
    assert contains["issue"][0]["code"] == "not-supported"
    assert ":contains" in contains["issue"][0]["diagnostics"]
    # nothing is echoed back
    body = await _search(h, "/fhir/Patient", {"Quillfeatherstonehaugh": "x"}, status=400)
    assert "Quill" not in str(body)
    assert (await h.client.get("/fhir/NoSuchType", params={"_id": "x"})).status_code == 404


async def test_sql_and_fhirpath_fragments_match_nothing_and_change_nothing(seeded, clinician):
    h = clinician
    no_match = [
        ("/fhir/Patient", {"name": "' OR '1'='1"}),
        ("/fhir/Patient", {"family": "x'); DROP TABLE fhir_resources; --"}),
        ("/fhir/Patient", {"identifier": "MRN-1' OR 1=1 --"}),
        ("/fhir/Patient", {"name": "Patient.name.where(family.startsWith('Q'))"}),
        ("/fhir/Observation", {"code": "8867-4' OR '1'='1"}),
        ("/fhir/Observation", {"patient": "x' UNION SELECT id FROM fhir_resources --"}),
        ("/fhir/Observation", {"subject": "Patient/1 OR 1=1"}),
    ]
    for path, params in no_match:
        bundle = await _search(h, path, params)
        assert bundle["total"] == 0 and not bundle.get("entry"), params
    bad = [
        ("/fhir/Patient", {"_id": "1' OR '1'='1"}),
        ("/fhir/Observation", {"date": "2024'; DELETE FROM fhir_resources; --"}),
        ("/fhir/Observation", {"_count": "1; DROP TABLE fhir_versions"}),
        ("/fhir/Observation", {"_sort": "id; DROP TABLE x"}),
        ("/fhir/Observation", {"code:exists(true)": "x"}),
    ]
    for path, params in bad:
        await _search(h, path, params, status=400)
    assert (await _search(h, "/fhir/Patient"))["total"] == 3
    assert (await _search(h, "/fhir/Observation"))["total"] == 4


async def test_paging_with_next_links_and_total(seeded, clinician):
    h = clinician
    first = await _search(h, "/fhir/Observation", {"_count": "3"})
    assert first["total"] == 4 and len(first["entry"]) == 3
    seen: list[str] = []
    page = first
    pages = 0
    while True:
        pages += 1
        assert page["total"] == 4
        seen += [e["resource"]["id"] for e in page["entry"]]
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert "self" in links
        if "next" not in links:
            break
        page = await _search(h, links["next"])
    assert pages == 2
    assert sorted(seen) == sorted(seeded.o.values())  # every result exactly once
    # one at a time, with a filter: the cursor carries the filter
    seen = []
    page = await _search(h, "/fhir/Observation", {"_count": "1", "code": "8867-4"})
    while True:
        seen += [e["resource"]["id"] for e in page["entry"]]
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        page = await _search(h, nxt[0])
    assert sorted(seen) == sorted([seeded.o["o1"], seeded.o["o4"]])
    # search values are not readable in the links
    named = await _search(h, "/fhir/Patient", {"name": "Quil", "_count": "1"})
    assert "Quil" not in str(named["link"])

    big = await _search(h, "/fhir/Observation", {"_count": "2000"})  # clamped to 1000
    assert len(big["entry"]) == 4
    zero = await _search(h, "/fhir/Observation", {"_count": "0"})
    assert zero["total"] == 4 and not zero["entry"]
    none = await _search(h, "/fhir/Observation", {"_total": "none", "_count": "1"})
    assert "total" not in none and len(none["entry"]) == 1
    assert (await _search(h, "/fhir/Observation", {"_total": "estimate"}))["total"] == 4


async def test_paging_is_keyset_robust_to_changes_between_pages(seeded, clinician):
    h, o = clinician, seeded.o
    for sort in ("-date", "_lastUpdated", None):
        sorting = {"_sort": sort} if sort else {}
        first = await _search(h, "/fhir/Observation", {"_count": "2"} | sorting)
        page1 = [e["resource"]["id"] for e in first["entry"]]
        full = await _search(h, "/fhir/Observation", {"_count": "100"} | sorting)
        every = [e["resource"]["id"] for e in full["entry"]]
        # a row of the first page disappears before the next page is read: nothing is skipped
        victim = page1[0]
        assert (await h.client.delete(f"/fhir/Observation/{victim}")).status_code == 204
        seen = list(page1)
        page = first
        while nxt := [link["url"] for link in page["link"] if link["relation"] == "next"]:
            page = await _search(h, nxt[0])
            seen += [e["resource"]["id"] for e in page["entry"]]
        assert seen == every, sort
        # put it back for the next round (a new id)
        body = {
            k: v
            for k, v in seeded.bodies[next(k for k, i in o.items() if i == victim)].items()
            if k not in ("id", "meta")
        }
        o[next(k for k, i in o.items() if i == victim)] = (await _create(h, body))["id"]


async def test_cursors_cannot_be_tampered_or_reused(seeded, clinician):
    h = clinician
    first = await _search(h, "/fhir/Observation", {"_count": "1", "code": "8867-4"})
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    cursor = parse_qs(urlsplit(nxt).query)["_cursor"][0]
    ok = await _search(h, nxt)
    assert len(ok["entry"]) == 1

    def flip(text: str, i: int) -> str:
        return text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]

    for i in (0, len(cursor) // 2, len(cursor) - 1):
        await _search(h, "/fhir/Observation", {"_cursor": flip(cursor, i)}, status=400)
    for forged in ("", "x", "eyJ0IjoiUGF0aWVudCJ9", cursor + "A", cursor[:-2]):
        await _search(h, "/fhir/Observation", {"_cursor": forged}, status=400)
    # another type, or extra parameters alongside the cursor
    await _search(h, "/fhir/Patient", {"_cursor": cursor}, status=400)
    await _search(h, "/fhir/Observation", [("_cursor", cursor), ("code", "29463-7")], status=400)
    await _search(h, "/fhir/Observation", [("_cursor", cursor), ("_count", "100")], status=400)
    # another user (who may search the same records) cannot replay it
    await h.add_user("dr.other", Role.service)
    other = (await h.login("dr.other"))["access_token"]
    response = await h.client.get(
        "/fhir/Observation",
        params={"_cursor": cursor},
        headers={"Authorization": f"Bearer {other}"},
    )
    assert response.status_code == 400


async def test_sort(seeded, clinician):
    h, o = clinician, seeded.o
    by_date = await _search(h, "/fhir/Observation", {"_sort": "date"})
    assert [e["resource"]["id"] for e in by_date["entry"]] == [o["o3"], o["o1"], o["o2"], o["o4"]]
    desc = await _search(h, "/fhir/Observation", {"_sort": "-date"})
    assert [e["resource"]["id"] for e in desc["entry"]] == [o["o4"], o["o2"], o["o1"], o["o3"]]
    # touch o2: it becomes the most recently updated
    body = dict(seeded.bodies["o2"])
    body["status"] = "amended"
    response = await h.client.put(
        f"/fhir/Observation/{o['o2']}", json=body, headers={"content-type": FHIR}
    )
    assert response.status_code == 200
    newest = await _search(h, "/fhir/Observation", {"_sort": "-_lastUpdated"})
    ids = [e["resource"]["id"] for e in newest["entry"]]
    assert ids[0] == o["o2"]
    stamps = [e["resource"]["meta"]["lastUpdated"] for e in newest["entry"]]
    assert stamps == sorted(stamps, reverse=True)
    oldest = await _search(h, "/fhir/Observation", {"_sort": "_lastUpdated"})
    assert [e["resource"]["id"] for e in oldest["entry"]][-1] == o["o2"]
    # paging over a sort returns every result once, in order
    seen: list[str] = []
    page = await _search(h, "/fhir/Observation", {"_sort": "-date", "_count": "3"})
    while True:
        seen += [e["resource"]["id"] for e in page["entry"]]
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        page = await _search(h, nxt[0])
    assert seen == [o["o4"], o["o2"], o["o1"], o["o3"]]


async def test_include_patient(seeded, clinician):
    h = clinician
    bundle = await _search(
        h, "/fhir/Observation", {"code": "29463-7", "_include": "Observation:patient"}
    )
    assert _ids(bundle) == {seeded.o["o2"]}
    assert _ids(bundle, "include") == {seeded.p["quill"]}
    assert bundle["total"] == 1
    included = [e for e in bundle["entry"] if e["search"]["mode"] == "include"][0]
    assert included["fullUrl"] == f"Patient/{seeded.p['quill']}"
    assert included["resource"]["name"][0]["family"] == "Quillfeatherstonehaugh"
    both = await _search(
        h, "/fhir/Observation", {"code": "8867-4", "_include": "Observation:subject:Patient"}
    )
    assert _ids(both, "include") == {seeded.p["quill"], seeded.p["jose"]}
    assert len(both["entry"]) == 4  # each included Patient once
    cond = await _search(h, "/fhir/Condition", {"_include": "Condition:patient"})
    assert _ids(cond, "include") == {seeded.p["quill"]}


async def test_post_search_equals_get(seeded, clinician):
    h = clinician
    query = [("code", "8867-4,29463-7"), ("date", "ge2024-05"), ("_sort", "date")]
    got = await _search(h, "/fhir/Observation", query)
    posted = await h.client.post(
        "/fhir/Observation/_search",
        content="code=8867-4%2C29463-7&date=ge2024-05&_sort=date",
        headers={"content-type": FORM},
    )
    assert posted.status_code == 200, posted.text
    assert [e["resource"]["id"] for e in posted.json()["entry"]] == [
        e["resource"]["id"] for e in got["entry"]
    ]
    assert posted.json()["total"] == got["total"] == 3
    empty = await h.client.post("/fhir/Patient/_search")
    assert empty.status_code == 200 and empty.json()["total"] == 3
    as_json = await h.client.post("/fhir/Observation/_search", json={"code": "8867-4"})
    assert as_json.status_code == 415
    bad = await h.client.post(
        "/fhir/Patient/_search", content="name%3Acontains=uill", headers={"content-type": FORM}
    )
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    # form bodies are accepted only for _search: creates still need JSON
    create = await h.client.post(
        "/fhir/Patient", content="gender=male", headers={"content-type": FORM}
    )
    assert create.status_code == 415


async def test_deleted_and_updated_resources(seeded, clinician):
    h, o = clinician, seeded.o
    assert (await h.client.delete(f"/fhir/Observation/{o['o4']}")).status_code == 204
    await _match(h, "/fhir/Observation", {"code": "8867-4"}, {o["o1"]})
    await _match(h, "/fhir/Observation", {"_id": o["o4"]}, set())
    body = dict(seeded.bodies["o2"])
    body["code"] = {"coding": [{"system": LOINC, "code": "8302-2"}]}
    response = await h.client.put(
        f"/fhir/Observation/{o['o2']}", json=body, headers={"content-type": FHIR}
    )
    assert response.status_code == 200
    await _match(h, "/fhir/Observation", {"code": "29463-7"}, set())
    await _match(h, "/fhir/Observation", {"code": f"{LOINC}|8302-2"}, {o["o2"]})
    assert (await h.client.delete(f"/fhir/Patient/{seeded.p['jose']}")).status_code == 204
    await _match(h, "/fhir/Patient", {"name": "Jose"}, set())
    await _match(h, "/fhir/Patient", {"gender": "male"}, {seeded.p["anna"]})
    # an _include of a deleted Patient is left out
    bundle = await _search(h, "/fhir/Observation", {"_include": "Observation:patient"})
    assert _ids(bundle, "include") == {seeded.p["quill"]}


async def test_capability_statement_lists_search_params(clinician):
    body = (await clinician.client.get("/fhir/metadata")).json()
    resources = {r["type"]: r for r in body["rest"][0]["resource"]}
    patient = resources["Patient"]
    assert {"code": "search-type"} in patient["interaction"]
    params = {p["name"]: p for p in patient["searchParam"]}
    assert {
        "name",
        "family",
        "given",
        "identifier",
        "birthdate",
        "gender",
        "_id",
        "_lastUpdated",
    } <= set(params)
    assert params["name"]["type"] == "string"
    assert "blind index" in params["name"]["documentation"]
    assert ":contains" in params["name"]["documentation"]
    assert "Observation:patient" in resources["Observation"]["searchInclude"]
    observation = {p["name"]: p for p in resources["Observation"]["searchParam"]}
    assert {"code", "date", "patient", "subject", "category", "status", "encounter"} <= set(
        observation
    )


async def test_search_requires_clinical_staff(harness):
    assert (await harness.client.get("/fhir/Patient")).status_code == 401
    assert (await harness.client.post("/fhir/Patient/_search")).status_code == 401


def test_count_defaults_and_is_clamped():
    import tink
    from tink import prf

    from carevault.crypto.blind_index import BlindIndex
    from carevault.fhir.search import DEFAULT_COUNT, MAX_COUNT, parse_search

    prf.register()
    handle = tink.new_keyset_handle(prf.prf_key_templates.HMAC_SHA256)
    blind = BlindIndex(handle.primitive(prf.PrfSet).primary())
    assert parse_search("Observation", [], blind).count == DEFAULT_COUNT == 50
    assert parse_search("Observation", [("_count", "2000")], blind).count == MAX_COUNT == 1000
    assert parse_search("Observation", [("_count", "7")], blind).count == 7


async def test_open_periods_and_undated_resources_sort_and_page(seeded, clinician):
    h, quill = clinician, seeded.p["quill"]

    def encounter(period: dict | None) -> dict:
        body = {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{quill}"},
        }
        if period is not None:
            body["period"] = period
        return body

    open_start = (await _create(h, encounter({"end": "2020-01-01"})))["id"]  # low = -inf
    open_end = (await _create(h, encounter({"start": "2025-01-01"})))["id"]  # high = +inf
    undated = [(await _create(h, encounter(None)))["id"] for _ in range(2)]
    expected = [open_start, seeded.e1, open_end] + sorted(undated)
    for count in ("1", "2", "10"):
        seen: list[str] = []
        page = await _search(h, "/fhir/Encounter", {"_sort": "date", "_count": count})
        while True:
            seen += [e["resource"]["id"] for e in page["entry"]]
            nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
            if not nxt:
                break
            page = await _search(h, nxt[0])
        assert seen == expected, count
    await _match(h, "/fhir/Encounter", {"date": "lt2019"}, {open_start})
    await _match(h, "/fhir/Encounter", {"date": "gt2030"}, {open_end})
    await _match(h, "/fhir/Encounter", {"date": "2024"}, {seeded.e1})


def test_searches_of_one_shape_share_one_statement():
    """What makes a search cheap to run again (fhir/search.py `_plan`): other values, one
    statement; another shape (more values, another date prefix, page size or visibility),
    another statement. That each search still answers its own values is what the tests
    above check through HTTP."""
    import tink
    from tink import prf

    from carevault.crypto.blind_index import BlindIndex
    from carevault.db.tables import fhir_resources
    from carevault.fhir.search import _params, _plan, parse_search

    prf.register()
    handle = tink.new_keyset_handle(prf.prf_key_templates.HMAC_SHA256)
    blind = BlindIndex(handle.primitive(prf.PrfSet).primary())
    visible = fhir_resources.c.version > 0

    def plan(*pairs: tuple[str, str], seen=visible):  # type: ignore[no-untyped-def]
        return _plan(parse_search("Observation", list(pairs), blind), seen)

    first = plan(("code", "8867-4"), ("date", "ge2024-01-01"))
    assert plan(("code", "29463-7"), ("date", "ge2019-05")) is first
    assert plan(("code", "8867-4,29463-7"), ("date", "ge2024-01-01")) is not first
    assert plan(("code", "8867-4"), ("date", "lt2024-01-01")) is not first
    assert plan(("code", "8867-4"), ("date", "ge2024-01-01"), ("_count", "7")) is not first
    another = fhir_resources.c.version > 0  # the same condition, another caller's object
    assert plan(("code", "8867-4"), ("date", "ge2024-01-01"), seen=another) is not first
    values = _params(parse_search("Observation", [("code", "8867-4")], blind))
    assert list(values) == ["b0"] and values["b0"].endswith("8867-4")


class _Statements:
    """The SQL the data database runs, watched where it runs: SQLAlchemy's `before_cursor_execute`
    on the engines (writes, and reads through SQLAlchemy), and the driver calls of reads by key
    and searches (db/key_reads.py: psycopg's fetch on PostgreSQL, the SQLite cursor step), which
    bypass SQLAlchemy's events. A statement counts once it has returned its rows: a read on the
    loop interrupted over its budget runs again on a thread, and only that run counts."""

    def __init__(self, engine, monkeypatch: pytest.MonkeyPatch) -> None:
        from sqlalchemy import event

        from carevault.db import key_reads
        from carevault.db.engine import read_engines

        self.sql: list[str] = []
        self._engines = (engine.sync_engine, *read_engines(engine))
        self._event = event
        for watched in self._engines:
            event.listen(watched, "after_cursor_execute", self._executed)
        fetch, sqlite_rows = key_reads._fetch, key_reads._sqlite_rows

        async def watched_fetch(conn, sql, params):  # type: ignore[no-untyped-def]
            rows = await fetch(conn, sql, params)
            self.sql.append(sql)
            return rows

        def watched_rows(dbapi_connection, sql, values):  # type: ignore[no-untyped-def]
            rows = sqlite_rows(dbapi_connection, sql, values)
            self.sql.append(sql)
            return rows

        monkeypatch.setattr(key_reads, "_fetch", watched_fetch)
        monkeypatch.setattr(key_reads, "_sqlite_rows", watched_rows)

    def _executed(self, conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        self.sql.append(statement)

    def close(self) -> None:
        for watched in self._engines:
            self._event.remove(watched, "after_cursor_execute", self._executed)


async def test_a_search_reads_its_page_and_bodies_in_one_statement(seeded, clinician, monkeypatch):
    """A search's page and its matches' current versions are one statement (fhir/search.py
    `_plan`): one round trip, and the bodies of the page's own snapshot."""
    h = clinician
    await _match(h, "/fhir/Patient", {"name": "Smi"}, {seeded.p["anna"]})  # caches warm
    watched = _Statements(h.services.engine, monkeypatch)
    try:
        bundle = await _search(h, "/fhir/Patient", {"name": "garcia"})
    finally:
        watched.close()
    # the page (the matches and their total: one page holds them all) and the match's body
    searched = [s for s in watched.sql if "fhir_resources" in s or "fhir_versions" in s]
    assert len(searched) == 1, searched
    assert "fhir_versions" in searched[0]
    jose = seeded.p["jose"]
    assert [e["resource"]["id"] for e in bundle["entry"]] == [jose] and bundle["total"] == 1
    read = await h.client.get(f"/fhir/Patient/{jose}")
    assert bundle["entry"][0]["resource"] == read.json()

"""A patient-role user of A trying every FHIR interaction on B's records: read, vread, search on
every supported parameter, _include, history, $everything, transaction/batch entries, paging
cursors, Idempotency-Key replays and If-None-Exist. Each denial must look exactly like a
request for a record that does not exist; no response may be a 5xx (fhir_world.NoServerErrors).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from carevault.fhir.search_params import search_params_for
from tests.access.fhir_world import (
    B_FAMILY,
    B_LABEL,
    LOINC,
    MISSING,
    MRN,
    SNOMED,
    World,
    assert_like_missing,
    build_world,
    comparable,
    entry_ids,
    next_link,
    observation_body,
)


@pytest.fixture
async def world(harness) -> World:
    return await build_world(harness)


B_RECORDS = ["B", "encB", "obsB", "condB"]
TYPE_OF = {"B": "Patient", "encB": "Encounter", "obsB": "Observation", "condB": "Condition"}


# --- read, vread, history, $everything ---------------------------------------------------------


@pytest.mark.parametrize("name", B_RECORDS)
async def test_read_vread_history_of_b_look_missing(world: World, name: str) -> None:
    w = world
    rtype, rid = TYPE_OF[name], w.ids[name]
    for suffix in ("", "/_history/1", "/_history"):
        denied = await w.get("patA", f"/fhir/{rtype}/{rid}{suffix}")
        missing = await w.get("patA", f"/fhir/{rtype}/{MISSING}{suffix}")
        assert_like_missing(denied, missing)
        # the service sees it: the denial is not an accident of the URL
        assert (await w.get("svc", f"/fhir/{rtype}/{rid}{suffix}")).status_code == 200


async def test_deleted_record_of_b_looks_missing_not_gone(world: World) -> None:
    w = world
    gone = w.ids["obsBGone"]
    assert (await w.get("svc", f"/fhir/Observation/{gone}")).status_code == 410
    for suffix in ("", "/_history/1", "/_history/2", "/_history"):
        denied = await w.get("patA", f"/fhir/Observation/{gone}{suffix}")
        missing = await w.get("patA", f"/fhir/Observation/{MISSING}{suffix}")
        assert_like_missing(denied, missing)


async def test_everything_of_b_looks_missing(world: World) -> None:
    w = world
    # a patient is never asked to step up: another's record is as missing as no record
    denied = await w.get("patA", f"/fhir/Patient/{w.ids['B']}/$everything")
    missing = await w.get("patA", f"/fhir/Patient/{MISSING}/$everything")
    assert_like_missing(denied, missing)


async def test_own_everything_holds_nothing_of_b(world: World) -> None:
    w = world
    own = await w.search("patA", f"/fhir/Patient/{w.ids['A']}/$everything")
    assert B_FAMILY not in str(own) and w.ids["B"] not in str(own)
    assert w.ids["encB"] in str(own)  # only as the reference written in A's obsCross
    refs = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in own["entry"]}
    assert w.refs["encB"] not in refs and w.refs["obsB"] not in refs
    assert own["total"] == len(own["entry"])


async def test_type_history_holds_nothing_of_b(world: World) -> None:
    w = world
    for rtype in ("Patient", "Encounter", "Observation", "Condition"):
        bundle = await w.search("patA", f"/fhir/{rtype}/_history")
        for name in B_RECORDS + ["obsBGone"]:
            assert w.ids[name] not in entry_ids(bundle)
            assert all(e.get("fullUrl") != f"{rtype}/{w.ids[name]}" for e in bundle["entry"]), (
                "a deletion entry of B's record"
            )
        assert B_FAMILY not in str(bundle)
        assert bundle["total"] == len(bundle["entry"])


# --- search on every supported parameter ----------------------------------------------------


def _b_values(w: World) -> dict[str, dict[str, str]]:
    """Per type, per supported parameter: a value that matches B's record of that type."""
    b = w.ids["B"]
    enc = w.ids["encB"]
    common = {
        "_security": f"{B_LABEL['system']}|{B_LABEL['code']}",
        "_lastUpdated": "ge2000-01-01",
    }
    return {
        "Patient": {
            **common,
            "_id": b,
            "identifier": f"{MRN}|MRN-B-2002",
            "name": "Betaworld",
            "family": B_FAMILY,
            "given": "Bertrand",
            "organization": f"Organization/{w.ids['orgY']}",
            "birthdate": "1988-09-10",
            "gender": "male",
            "telecom": "phone|+15550002222",
            "phone": "+15550002222",
            "email": "b@beta.example",
            "address": "Betatown",
            "address-city": "Betatown",
            "address-postalcode": "22222",
        },
        "Observation": {
            **common,
            "_id": w.ids["obsB"],
            "patient": f"Patient/{b}",
            "subject": f"Patient/{b}",
            "code": f"{LOINC}|2339-0",
            "date": "2019-03-04",
            "category": "laboratory",
            "status": "amended",
            "encounter": f"Encounter/{enc}",
        },
        "Condition": {
            **common,
            "_id": w.ids["condB"],
            "patient": f"Patient/{b}",
            "subject": f"Patient/{b}",
            "code": f"{SNOMED}|44054006",
            "onset-date": "2018-01-15",
            "recorded-date": "2018-06-01",
            "category": "encounter-diagnosis",
            "clinical-status": "resolved",
            "encounter": f"Encounter/{enc}",
        },
        "Encounter": {
            **common,
            "_id": enc,
            "patient": f"Patient/{b}",
            "subject": f"Patient/{b}",
            "date": "lt2020-01-01",
            "status": "finished",
            "class": "IMP",
            "type": f"{SNOMED}|32485007",
        },
    }


@pytest.mark.parametrize("rtype", ["Patient", "Observation", "Condition", "Encounter"])
async def test_search_on_every_parameter_never_returns_b(world: World, rtype: str) -> None:
    w = world
    values = _b_values(w)[rtype]
    params = search_params_for(rtype)
    assert set(params) == set(values), "a supported parameter without a test value"
    b_name = {"Patient": "B", "Observation": "obsB", "Condition": "condB", "Encounter": "encB"}
    b_id = w.ids[b_name[rtype]]
    problems: list[str] = []
    for code in params:
        query = f"/fhir/{rtype}?{code}={quote(values[code], safe='|/')}&_total=accurate"
        as_service = await w.search("svc", query)
        if b_id not in entry_ids(as_service):
            problems.append(f"{code}: the test value does not match B (as service)")
            continue
        only_b = set(entry_ids(as_service)) <= {w.ids[n] for n in B_RECORDS}
        response = await w.get("patA", query)
        if response.status_code != 200:
            problems.append(f"{code}: {response.status_code} {response.text[:200]}")
            continue
        bundle = response.json()
        if b_id in response.text or B_FAMILY in response.text:
            problems.append(f"{code}: B's record in the result")
        if bundle.get("total") != len(bundle["entry"]):
            problems.append(f"{code}: total {bundle.get('total')} != {len(bundle['entry'])}")
        if only_b and (bundle.get("total"), bundle["entry"]) != (0, []):
            problems.append(f"{code}: a value matching only B found {entry_ids(bundle)}")
        for e in bundle["entry"]:
            text = str(e["resource"])
            if f"Patient/{w.ids['A']}" not in text and e["resource"]["id"] != w.ids["A"]:
                problems.append(f"{code}: a record not of A: {e['fullUrl']}")
    assert problems == []


@pytest.mark.parametrize("rtype", ["Observation", "Condition", "Encounter"])
async def test_search_by_b_equals_search_by_nobody(world: World, rtype: str) -> None:
    w = world
    b = await w.get("patA", f"/fhir/{rtype}?patient=Patient/{w.ids['B']}&_total=accurate")
    nobody = await w.get("patA", f"/fhir/{rtype}?patient=Patient/{MISSING}&_total=accurate")
    assert b.status_code == nobody.status_code == 200
    bb, nb = b.json(), nobody.json()
    assert (bb["total"], bb["entry"]) == (nb["total"], nb["entry"]) == (0, [])


# --- _include ------------------------------------------------------------------------------


@pytest.mark.parametrize("rtype", ["Observation", "Condition"])
async def test_include_leaves_out_b(world: World, rtype: str) -> None:
    w = world
    # A's obsCross points at B's encounter; the service sees the include, A must not
    cross = {"Observation": w.ids["obsCross"], "Condition": None}[rtype]
    if cross is None:
        body = {
            "resourceType": "Condition",
            "code": {"text": "cross"},
            "subject": {"reference": f"Patient/{w.ids['A']}"},
            "encounter": {"reference": f"Encounter/{w.ids['encB']}"},
        }
        cross = await w.create(body)
    base = f"/fhir/{rtype}?_id={cross}&_total=accurate"
    for include in (f"{rtype}:encounter", f"{rtype}:encounter:Encounter", f"{rtype}:patient"):
        url = f"{base}&_include={include}"
        as_service = await w.search("svc", url)
        shown = await w.search("patA", url)
        assert entry_ids(shown)[0] == cross
        assert w.ids["encB"] not in entry_ids(shown)
        assert all(
            e["resource"]["resourceType"] != "Patient" or e["resource"]["id"] == w.ids["A"]
            for e in shown["entry"]
        )
        if include.startswith(f"{rtype}:encounter"):
            assert w.ids["encB"] in entry_ids(as_service)
        # the same shape as an include of an Encounter that does not exist
        assert shown["total"] == 1
    # and B's patient include through B's own record: nothing at all
    shown = await w.search(
        "patA", f"/fhir/{rtype}?patient=Patient/{w.ids['B']}&_include={rtype}:patient"
    )
    assert shown["entry"] == [] and shown["total"] == 0


# --- bundles ---------------------------------------------------------------------------------


def _entry_pairs(w: World, method: str, name: str) -> list[dict[str, Any]]:
    rtype, rid = TYPE_OF[name], w.ids[name]
    entries = []
    for target in (rid, MISSING):
        request = {"method": method, "url": f"{rtype}/{target}"}
        entry: dict[str, Any] = {"request": request}
        if method == "PUT":
            body = {"resourceType": rtype, "id": target}
            if rtype == "Observation":
                body = {**observation_body("B", w.ids["B"]), "id": target}
            entry["resource"] = body
        entries.append(entry)
    return entries


async def _bundle(w: World, who: str, kind: str, entries: list[dict[str, Any]]) -> Any:
    return await w.post(who, "/fhir", {"resourceType": "Bundle", "type": kind, "entry": entries})


@pytest.mark.parametrize("name", B_RECORDS)
@pytest.mark.parametrize(
    "method",
    [
        "GET",
        "DELETE",
    ],
)
async def test_batch_entries_on_b_look_like_missing(world: World, name: str, method: str) -> None:
    w = world
    response = await _bundle(w, "patA", "batch", _entry_pairs(w, method, name))
    assert response.status_code == 200, response.text
    denied, missing = (e["response"] for e in response.json()["entry"])
    assert missing["status"].startswith("404")
    assert denied == missing
    assert B_FAMILY not in response.text


async def test_batch_put_on_b_looks_like_missing(world: World) -> None:
    w = world
    response = await _bundle(w, "patA", "batch", _entry_pairs(w, "PUT", "obsB"))
    assert response.status_code == 200, response.text
    denied, missing = (e["response"] for e in response.json()["entry"])
    assert denied == missing


@pytest.mark.parametrize("name", B_RECORDS)
async def test_transaction_get_on_b_looks_like_missing(world: World, name: str) -> None:
    w = world
    response = await _bundle(w, "patA", "transaction", _entry_pairs(w, "GET", name))
    assert response.status_code == 200, response.text
    denied, missing = (e["response"] for e in response.json()["entry"])
    assert missing["status"].startswith("404") and denied == missing
    assert "resource" not in response.json()["entry"][0]


@pytest.mark.parametrize(
    "method",
    [
        "PUT",
        "DELETE",
    ],
)
async def test_transaction_write_on_b_looks_like_missing(world: World, method: str) -> None:
    w = world
    denied_entry, missing_entry = _entry_pairs(w, method, "obsB")
    denied = await _bundle(w, "patA", "transaction", [denied_entry])
    missing = await _bundle(w, "patA", "transaction", [missing_entry])
    assert comparable(denied) == comparable(missing)
    assert denied.status_code in (403, 404)
    still = await w.get("svc", f"/fhir/Observation/{w.ids['obsB']}")
    assert still.status_code == 200 and still.json()["meta"]["versionId"] == "1"


async def test_rest_put_and_delete_on_b_look_like_missing(world: World) -> None:
    w = world
    pairs = _entry_pairs(w, "PUT", "obsB")
    put_b = await w.put("patA", f"/fhir/Observation/{w.ids['obsB']}", pairs[0]["resource"])
    put_missing = await w.put("patA", f"/fhir/Observation/{MISSING}", pairs[1]["resource"])
    assert_like_missing(put_b, put_missing)
    del_b = await w.delete("patA", f"/fhir/Observation/{w.ids['obsB']}")
    del_missing = await w.delete("patA", f"/fhir/Observation/{MISSING}")
    assert_like_missing(del_b, del_missing)
    assert (await w.get("svc", f"/fhir/Observation/{w.ids['obsB']}")).status_code == 200


# --- paging cursors ------------------------------------------------------------------------


async def test_next_link_of_one_user_is_refused_to_another(world: World) -> None:
    w = world
    first = await w.search("patA", "/fhir/Observation?_count=1")
    link = next_link(first)
    assert link is not None
    assert (await w.get("patA", link)).status_code == 200  # the owner may follow it
    for thief in ("patB", "drOther"):
        stolen = await w.get(thief, link)
        forged = await w.get(thief, "/fhir/Observation?_cursor=" + "A" * 60)
        assert stolen.status_code == 400
        assert comparable(stolen)[:2] == comparable(forged)[:2]
        assert w.ids["A"] not in stolen.text
        for name in ("obsA", "obsCross", "obsToPsy"):
            assert w.ids[name] not in stolen.text


async def test_next_link_after_losing_access_shows_nothing_more(world: World) -> None:
    w = world
    # dr-a pages through A's observations, then leaves A's care team
    first = await w.search("drA", f"/fhir/Observation?patient=Patient/{w.ids['A']}&_count=1")
    link = next_link(first)
    assert link is not None and first["total"] >= 2
    await w.replace("teamA", {"resourceType": "CareTeam", **_team_without_a(w)})
    after = await w.get("drA", link)
    assert after.status_code in (200, 400)
    if after.status_code == 200:
        assert after.json()["entry"] == [] and after.json().get("total", 0) == 0
    for name in ("obsA", "obsCross", "obsToPsy"):
        assert w.ids[name] not in after.text


def _team_without_a(w: World) -> dict[str, Any]:
    return {
        "status": "active",
        "subject": {"reference": f"Patient/{w.ids['A']}"},
        "participant": [{"member": {"reference": f"Practitioner/{w.ids['pracC']}"}}],
    }


# --- Idempotency-Key -----------------------------------------------------------------------


async def test_idempotency_key_of_one_user_never_replays_to_another(world: World) -> None:
    w = world
    body = observation_body("A", w.ids["A"])
    key = {"Idempotency-Key": "same-key-0001"}
    first = await w.post("drA", "/fhir/Observation", body, key)
    assert first.status_code == 201, first.text
    created = first.json()["id"]
    for who in ("drOther", "patB", "patA"):
        other = await w.post(who, "/fhir/Observation", body, key)
        assert other.status_code == 403, (who, other.text)
        assert created not in other.text and "location" not in other.headers
    again = await w.post("drA", "/fhir/Observation", body, key)
    assert again.status_code == 201 and again.json()["id"] == created  # the owner's replay


async def test_idempotency_replay_after_losing_access_shows_nothing(world: World) -> None:
    w = world
    body = observation_body("A", w.ids["A"])
    key = {"Idempotency-Key": "same-key-0002"}
    first = await w.post("drA", "/fhir/Observation", body, key)
    assert first.status_code == 201, first.text
    created = first.json()["id"]
    await w.replace("teamA", {"resourceType": "CareTeam", **_team_without_a(w)})
    replay = await w.post("drA", "/fhir/Observation", body, key)
    assert replay.status_code in (403, 404), replay.text
    assert created not in replay.text and "location" not in replay.headers
    assert "etag" not in replay.headers


async def test_bundle_idempotency_key_of_one_user_never_replays_to_another(world: World) -> None:
    w = world
    entries = [{"request": {"method": "GET", "url": f"Observation/{w.ids['obsB']}"}}]
    key = {"Idempotency-Key": "bundle-key-0001"}
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
    first = await w.post("patB", "/fhir", bundle, key)
    assert first.status_code == 200 and first.json()["entry"][0]["response"]["status"] == "200 OK"
    stolen = await w.post("patA", "/fhir", bundle, key)
    assert stolen.status_code == 200
    assert stolen.json()["entry"][0]["response"]["status"].startswith("404")
    assert "resource" not in stolen.json()["entry"][0]
    assert B_FAMILY not in stolen.text and first.json()["id"] != stolen.json()["id"]


# --- If-None-Exist -------------------------------------------------------------------------


async def test_if_none_exist_does_not_match_invisible_records(world: World) -> None:
    w = world
    body = observation_body("A", w.ids["A"])
    # dr-a may create for A; the condition names B's record, which dr-a cannot see
    hidden = await w.post(
        "drA", "/fhir/Observation", body, {"If-None-Exist": f"_id={w.ids['obsB']}"}
    )
    nothing = await w.post("drA", "/fhir/Observation", body, {"If-None-Exist": f"_id={MISSING}"})
    assert hidden.status_code == nothing.status_code == 201, hidden.text
    assert (
        hidden.json()["id"] not in (w.ids["obsB"],) and hidden.json()["subject"] == body["subject"]
    )
    by_code = await w.post(
        "drA", "/fhir/Observation", body, {"If-None-Exist": f"code={LOINC}|2339-0"}
    )
    assert by_code.status_code == 201 and by_code.json()["id"] != w.ids["obsB"]
    # a patient may not create at all: the same 403 whatever the condition names
    pat_hidden = await w.post(
        "patA", "/fhir/Observation", body, {"If-None-Exist": f"_id={w.ids['obsB']}"}
    )
    pat_nothing = await w.post(
        "patA", "/fhir/Observation", body, {"If-None-Exist": f"_id={MISSING}"}
    )
    assert pat_hidden.status_code == 403
    assert comparable(pat_hidden) == comparable(pat_nothing)


async def test_if_none_exist_with_two_invisible_matches_is_not_412(world: World) -> None:
    w = world
    second = await w.create(observation_body("B", w.ids["B"]))
    body = observation_body("A", w.ids["A"])
    response = await w.post("drA", "/fhir/Observation", body, {"If-None-Exist": "status=amended"})
    assert response.status_code == 201, response.text
    assert response.json()["id"] not in (w.ids["obsB"], second)


# --- totals and full pages -----------------------------------------------------------------


@pytest.mark.parametrize("who", ["patA", "drA"])
async def test_totals_count_only_permitted_and_pages_are_full(world: World, who: str) -> None:
    w = world
    for _ in range(3):  # more of B's records than of A's, interleaved in id order
        await w.create(observation_body("B", w.ids["B"]))
    whole = await w.search("svc", "/fhir/Observation?_total=accurate&_count=1000")
    first = await w.search(who, "/fhir/Observation?_total=accurate&_count=1")
    expected = {w.ids[n] for n in ("obsA", "obsCross", "obsToPsy")}
    assert first["total"] == len(expected) < whole["total"]
    seen: list[str] = []
    page: dict[str, Any] | None = first
    while page is not None:
        assert len(page["entry"]) == 1, "a short page: records dropped after the query"
        seen += entry_ids(page)
        link = next_link(page)
        page = await w.search(who, link) if link else None
    assert sorted(seen) == sorted(expected)

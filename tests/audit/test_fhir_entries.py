"""What the trail records for FHIR requests and logins, through HTTP, on SQLite and PostgreSQL:
one entry per record read (type, id, version, patient, purpose), denials recorded like the 404
the caller saw, a search's keyed query hash plus one entry per returned record, creates with
their new id and version, break-glass flags, unauthenticated requests, request ids (a client's
UUID kept, anything else replaced), and logins that worked or failed.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from carevault.identity.roles import Role
from tests.access.fhir_world import mfa_login
from tests.audit.conftest import MRN, P_FAMILY, P_MRN, Clinic, bearer, observation_body
from tests.audit.trail import audit_documents
from tests.conftest import STRONG_PASSWORD

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HASH = re.compile(r"[0-9a-f]{32}")
REASON = "Unconscious in ED, no relatives reachable, allergy history needed now"


async def entries_of(c: Clinic, response: httpx.Response) -> list[dict[str, Any]]:
    """The entries recorded for one request (by the request id it answered with), in order;
    without the `.start` entry a write records before it runs (see test_write_is_recorded_as_
    started_first)."""
    rid = response.headers["x-request-id"]
    return [
        d
        for d in await audit_documents(c.h.services.engine)
        if d.get("request_id") == rid and not d["action"].endswith(".start")
    ]


def ids_in(bundle: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in bundle.get("entry", [])
        if "resource" in e
    ]


async def test_read_records_type_id_version_patient_and_purpose(clinic: Clinic) -> None:
    c = clinic
    p = c.ids["P"]
    response = await c.get("drA", f"/fhir/Patient/{p}", **{"User-Agent": "curl/8.1 Zyx"})
    assert response.status_code == 200
    (entry,) = await entries_of(c, response)
    assert {k: entry.get(k) for k in ("action", "outcome", "status", "type", "id")} == {
        "action": "fhir.read",
        "outcome": "permit",
        "status": 200,
        "type": "Patient",
        "id": p,
    }
    assert entry["version"] == response.json()["meta"]["versionId"] == "1"
    assert entry["patient"] == p and entry["purpose"] == "TREAT"
    assert entry["user"] == c.users["drA"].id and entry["roles"] == ["physician"]
    assert entry["source"] and HASH.fullmatch(entry["ua"])  # the User-Agent as a keyed hash
    assert "curl" not in orjson.dumps(entry).decode()
    assert "break_glass" not in entry

    # a record of the patient: its patient is the compartment's; an explicit purpose is kept
    obs = await c.get(
        "drA", f"/fhir/Observation/{c.ids['obsP']}", **{"X-Purpose-Of-Use": "HOPERAT"}
    )
    assert obs.status_code == 200, obs.text
    (entry,) = await entries_of(c, obs)
    assert (entry["action"], entry["type"], entry["id"], entry["patient"]) == (
        "fhir.read",
        "Observation",
        c.ids["obsP"],
        p,
    )
    assert entry["purpose"] == "HOPERAT" and entry["version"] == "1"

    vread = await c.get("drA", f"/fhir/Patient/{p}/_history/1")
    assert vread.status_code == 200
    (entry,) = await entries_of(c, vread)
    assert (entry["action"], entry["id"], entry["version"], entry["patient"]) == (
        "fhir.vread",
        p,
        "1",
        p,
    )


async def test_denied_read_is_recorded_as_deny_with_the_404_it_answered(clinic: Clinic) -> None:
    c = clinic
    q = c.ids["Q"]  # dr-b's patient, not dr-a's
    denied = await c.get("drA", f"/fhir/Patient/{q}")
    missing = await c.get("drA", "/fhir/Patient/no-such-patient-4711")
    assert denied.status_code == missing.status_code == 404
    assert denied.content == missing.content  # indistinguishable to the caller

    (entry,) = await entries_of(c, denied)
    assert (entry["action"], entry["outcome"], entry["status"]) == ("fhir.read", "deny", 404)
    assert (entry["type"], entry["id"], entry["patient"]) == ("Patient", q, q)
    assert entry["user"] == c.users["drA"].id

    (entry,) = await entries_of(c, missing)
    assert entry["action"] == "fhir.read" and entry["status"] == 404
    assert entry["outcome"] != "permit" and entry["id"] == "no-such-patient-4711"
    assert "patient" not in entry

    # a denied record inside an otherwise allowed search is simply not returned nor recorded
    search = await c.get("drA", "/fhir/Observation")
    assert search.status_code == 200
    recorded = {(d.get("type"), d.get("id")) for d in await entries_of(c, search)}
    assert ("Observation", c.ids["obsQ"]) not in recorded


async def test_search_records_a_keyed_query_hash_and_each_returned_record(clinic: Clinic) -> None:
    c = clinic
    p, q = c.ids["P"], c.ids["Q"]
    by_name = await c.get("drA", f"/fhir/Patient?name={P_FAMILY}&_count=10")
    assert by_name.status_code == 200
    assert ids_in(by_name.json()) == [("Patient", p)]
    first, *records = await entries_of(c, by_name)
    assert (first["action"], first["outcome"], first["status"]) == ("fhir.search", "permit", 200)
    assert first["type"] == "Patient" and "id" not in first and "patient" not in first
    assert HASH.fullmatch(first["query"])
    assert [(r["action"], r["type"], r["id"], r["version"], r["patient"]) for r in records] == [
        ("fhir.search", "Patient", p, "1", p)
    ]
    text = orjson.dumps([first, *records]).decode()
    assert P_FAMILY not in text and P_FAMILY.lower() not in text
    # not a plain digest of the query: a keyed one
    for plain in (f"name={P_FAMILY}&_count=10", f"_count=10&name={P_FAMILY}"):
        assert hashlib.sha256(plain.encode()).hexdigest()[:32] != first["query"]
        assert hashlib.md5(plain.encode()).hexdigest() != first["query"]  # noqa: S324

    # the same search, parameters in another order: the same hash; another value: another
    reordered = await c.get("drA", f"/fhir/Patient?_count=10&name={P_FAMILY}")
    other = await c.get("drA", "/fhir/Patient?name=Someoneelse&_count=10")
    assert (await entries_of(c, reordered))[0]["query"] == first["query"]
    (other_entry,) = await entries_of(c, other)  # nothing returned: the request entry only
    assert other_entry["query"] != first["query"] and HASH.fullmatch(other_entry["query"])

    by_identifier = await c.get("drA", f"/fhir/Patient?identifier={quote(MRN + '|' + P_MRN)}")
    assert ids_in(by_identifier.json()) == [("Patient", p)]
    entries = await entries_of(c, by_identifier)
    assert P_MRN not in orjson.dumps(entries).decode()
    assert [e.get("id") for e in entries] == [None, p]

    # records of two patients: one entry each, with its own patient
    everything = await c.get("svc", "/fhir/Observation?_count=50")
    returned = ids_in(everything.json())
    assert ("Observation", c.ids["obsP"]) in returned and ("Observation", c.ids["obsQ"]) in returned
    first, *records = await entries_of(c, everything)
    assert first["action"] == "fhir.search" and "id" not in first
    assert [(r["type"], r["id"]) for r in records] == returned
    patients = {r["id"]: r["patient"] for r in records}
    assert patients[c.ids["obsP"]] == p and patients[c.ids["obsQ"]] == q
    assert all(r["action"] == "fhir.search" and r["version"] for r in records)


async def test_create_and_update_record_the_new_id_and_version(clinic: Clinic) -> None:
    c = clinic
    p = c.ids["P"]
    created = await c.post("svc", "/fhir/Observation", observation_body(p, 88))
    assert created.status_code == 201
    new_id = created.json()["id"]
    (entry,) = await entries_of(c, created)
    assert (entry["action"], entry["outcome"], entry["status"]) == ("fhir.create", "permit", 201)
    assert (entry["type"], entry["id"], entry["version"], entry["patient"]) == (
        "Observation",
        new_id,
        "1",
        p,
    )
    assert entry["user"] == c.users["svc"].id

    body = {**created.json(), "valueQuantity": {"value": 89, "unit": "/min"}}
    updated = await c.put("svc", f"/fhir/Observation/{new_id}", body)
    assert updated.status_code == 200
    entries = await entries_of(c, updated)
    writes = [e for e in entries if e["action"] == "fhir.update"]
    assert writes and all(
        (e["id"], e["version"], e["patient"], e["outcome"], e["status"])
        == (new_id, "2", p, "permit", 200)
        for e in writes
    )
    assert all(e["id"] == new_id for e in entries)


async def test_update_and_delete_are_one_entry_each(clinic: Clinic) -> None:
    c = clinic
    p = c.ids["P"]
    created = await c.post("svc", "/fhir/Observation", observation_body(p, 88))
    new_id = created.json()["id"]
    body = {**created.json(), "valueQuantity": {"value": 89, "unit": "/min"}}
    updated = await c.put("svc", f"/fhir/Observation/{new_id}", body)
    deleted = await c.client.delete(f"/fhir/Observation/{new_id}", headers=bearer(c.tokens["svc"]))
    assert (updated.status_code, deleted.status_code) == (200, 204)
    assert [(e["action"], e["version"]) for e in await entries_of(c, updated)] == [
        ("fhir.update", "2")
    ]
    assert [e["action"] for e in await entries_of(c, deleted)] == ["fhir.delete"]


async def test_write_is_recorded_as_started_first(clinic: Clinic) -> None:
    """A write's `.start` entry is committed before the write runs (so an audit outage refuses
    the write before it changes anything: tests/audit/test_fail_closed.py)."""
    c = clinic
    created = await c.post("svc", "/fhir/Observation", observation_body(c.ids["P"], 77))
    rid = created.headers["x-request-id"]
    mine = [d for d in await audit_documents(c.h.services.engine) if d.get("request_id") == rid]
    assert [d["action"] for d in mine] == ["fhir.create.start", "fhir.create"]
    assert mine[0]["seq"] < mine[1]["seq"] and mine[1]["id"] == created.json()["id"]


async def test_break_glass_access_is_flagged(clinic: Clinic) -> None:
    c = clinic
    p = c.ids["P"]
    before = await c.get("drOther", f"/fhir/Patient/{p}")
    assert before.status_code == 404
    (entry,) = await entries_of(c, before)
    assert entry["outcome"] == "deny" and "break_glass" not in entry

    token = (await mfa_login(c.h, "drOther"))["access_token"]  # a fresh MFA login opens it
    c.tokens["drOther"] = token
    grant = await c.client.post(
        "/access/break-glass", json={"patient": p, "reason": REASON}, headers=bearer(token)
    )
    assert grant.status_code == 201, grant.text

    read = await c.get("drOther", f"/fhir/Patient/{p}")
    assert read.status_code == 200
    entries = await entries_of(c, read)
    reads = [e for e in entries if e["action"] == "fhir.read"]
    assert len(reads) == 1 and reads[0]["break_glass"] is True and reads[0]["patient"] == p
    assert reads[0]["outcome"] == "permit" and reads[0]["user"] == c.users["drOther"].id
    access = [e for e in entries if e["action"] == "security.break_glass_access"]
    assert len(access) == 1 and access[0]["break_glass"] is True
    assert access[0]["patient"] == p and access[0]["user"] == c.users["drOther"].id

    search = await c.get("drOther", f"/fhir/Observation?patient=Patient/{p}")
    records = [e for e in await entries_of(c, search) if e.get("id")]
    assert [e["id"] for e in records] == [i for _, i in ids_in(search.json())]
    assert records and all(e["break_glass"] is True for e in records)

    # the reason given never reaches the trail; ordinary access is not flagged
    assert REASON not in orjson.dumps(await audit_documents(c.h.services.engine)).decode()
    normal = await c.get("drA", f"/fhir/Patient/{p}")
    assert "break_glass" not in (await entries_of(c, normal))[0]


async def test_unauthenticated_requests_are_recorded_as_denied(clinic: Clinic) -> None:
    c = clinic
    p = c.ids["P"]
    for headers in ({}, bearer("not-a-token"), bearer(c.tokens["drA"] + "x")):
        response = await c.client.get(f"/fhir/Patient/{p}", headers=headers)
        assert response.status_code == 401
        (entry,) = await entries_of(c, response)
        assert (entry["action"], entry["outcome"], entry["status"]) == ("fhir.read", "deny", 401)
        assert "user" not in entry and "patient" not in entry
    search = await c.client.get(f"/fhir/Patient?name={P_FAMILY}")
    assert search.status_code == 401
    (entry,) = await entries_of(c, search)
    assert (entry["action"], entry["outcome"], entry["status"]) == ("fhir.search", "deny", 401)


async def test_request_ids_uuid_kept_anything_else_replaced(clinic: Clinic) -> None:
    c = clinic
    p = c.ids["P"]
    mine = str(uuid.uuid4())
    kept = await c.get("drA", f"/fhir/Patient/{p}", **{"X-Request-ID": mine})
    assert kept.headers["x-request-id"] == mine
    assert [e["request_id"] for e in await entries_of(c, kept)] == [mine]
    search = await c.get(
        "drA", "/fhir/Observation", **{"X-Request-ID": (mine2 := str(uuid.uuid4()))}
    )
    assert search.headers["x-request-id"] == mine2 and len(await entries_of(c, search)) >= 2

    for sent in (f"{P_FAMILY}-visit-1", "x" * 300, mine + "-suffix", "<script>"):
        replaced = await c.get("drA", f"/fhir/Patient/{p}", **{"X-Request-ID": sent})
        answered = replaced.headers["x-request-id"]
        assert answered != sent and UUID.fullmatch(answered), sent
        assert [e["request_id"] for e in await entries_of(c, replaced)] == [answered]
    # the same for a security event (a login)
    login = await c.client.post(
        "/auth/login",
        json={"username": "drB", "password": STRONG_PASSWORD},
        headers={"X-Request-ID": f"{P_FAMILY}-login"},
    )
    assert login.status_code == 200 and UUID.fullmatch(login.headers["x-request-id"])
    assert [e["action"] for e in await entries_of(c, login)] == ["security.login"]
    trail = orjson.dumps(await audit_documents(c.h.services.engine)).decode()
    assert P_FAMILY not in trail and "<script>" not in trail and mine + "-suffix" not in trail


async def test_logins_ok_and_failed_are_recorded(clinic: Clinic) -> None:
    c = clinic
    await c.h.add_user("nurse.audit", Role.nurse)
    ok = await c.client.post(
        "/auth/login", json={"username": "nurse.audit", "password": STRONG_PASSWORD}
    )
    assert ok.status_code == 200
    (entry,) = await entries_of(c, ok)
    assert (entry["action"], entry["outcome"]) == ("security.login", "permit")
    user = await c.h.services.users.by_username("nurse.audit")
    assert entry["user"] == user.id and HASH.fullmatch(entry["detail"]["subject"][:32])

    wrong = await c.client.post(
        "/auth/login", json={"username": "drB", "password": "Wrong-password-Zyx-991"}
    )
    unknown = await c.client.post(
        "/auth/login", json={"username": "zyxwardenfeld.nobody", "password": "Another-wrong-77"}
    )
    assert wrong.status_code == unknown.status_code == 401
    (bad,) = await entries_of(c, wrong)
    assert (bad["action"], bad["outcome"], bad["user"]) == (
        "security.login",
        "deny",
        c.users["drB"].id,
    )
    (nobody,) = await entries_of(c, unknown)
    assert (nobody["action"], nobody["outcome"]) == ("security.login", "deny")
    assert "user" not in nobody and nobody["detail"]["subject"] != bad["detail"]["subject"]
    trail = orjson.dumps(await audit_documents(c.h.services.engine)).decode()
    for secret in (
        "zyxwardenfeld.nobody",
        "Wrong-password-Zyx-991",
        "Another-wrong-77",
        STRONG_PASSWORD,
    ):
        assert secret not in trail
    for token in (ok.json()["access_token"], ok.json()["refresh_token"]):
        assert token not in trail

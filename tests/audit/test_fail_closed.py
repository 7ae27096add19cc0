"""Fail closed: while the audit trail cannot be written (a trigger that refuses every INSERT
into audit_entries, on SQLite and on PostgreSQL), record-server requests answer 503 with an
OperationOutcome and nothing of the records they would have shown: no names, identifiers,
birth dates, record ids, versions or validators. Once the obstacle is gone the same requests
work again and are audited; nothing of the refused requests reached the trail and the chain
has no gap.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from carevault.config import Settings
from carevault.identity.roles import Role
from tests.access.fhir_world import mfa_login
from tests.audit.conftest import (
    P_BIRTH,
    P_FAMILY,
    P_GIVEN,
    P_MRN,
    P_PHONE,
    Q_BIRTH,
    Q_FAMILY,
    Q_MRN,
    Clinic,
    observation_body,
    sql,
    verify_db,
)
from tests.audit.trail import audit_documents
from tests.conftest import STRONG_PASSWORD

_PG_BLOCK = (
    "CREATE OR REPLACE FUNCTION cv_test_audit_blocked() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'audit storage unavailable'; END $$ LANGUAGE plpgsql",
    "CREATE TRIGGER audit_blocked BEFORE INSERT ON audit_entries "
    "FOR EACH ROW EXECUTE FUNCTION cv_test_audit_blocked()",
)
_SQLITE_BLOCK = (
    "CREATE TRIGGER audit_blocked BEFORE INSERT ON audit_entries "
    "BEGIN SELECT RAISE(ABORT, 'audit storage unavailable'); END",
)


def block_audit(settings: Settings) -> None:
    for statement in _PG_BLOCK if settings.database_url else _SQLITE_BLOCK:
        sql(settings, statement)


def unblock_audit(settings: Settings) -> None:
    on = " ON audit_entries" if settings.database_url else ""
    sql(settings, f"DROP TRIGGER audit_blocked{on}")


def _requests(c: Clinic) -> list[tuple[str, str]]:
    p, q = c.ids["P"], c.ids["Q"]
    return [
        ("drA", f"/fhir/Patient/{p}"),
        ("drA", f"/fhir/Patient/{p}/_history/1"),
        ("drA", f"/fhir/Patient/{p}/_history"),
        ("drA", f"/fhir/Patient?name={P_FAMILY}"),
        ("drA", f"/fhir/Patient?identifier={P_MRN}"),
        ("drA", f"/fhir/Observation?patient=Patient/{p}"),
        ("drA", f"/fhir/Observation/{c.ids['obsP']}"),
        ("drA", f"/fhir/Patient/{p}/$everything"),
        ("drA", f"/fhir/Patient/{q}"),  # denied: its deny entry cannot be written either
        ("svc", "/fhir/Patient"),  # a search returning both patients
        ("svc", f"/fhir/Patient/{q}"),
        ("auditor", f"/fhir/Patient/{p}/$access-report"),
        ("auditor", f"/audit?patient={p}"),
        ("auditor", f"/audit/AuditEvent?patient={p}"),
    ]


def _secrets(c: Clinic) -> list[str]:
    ids = [c.ids[k] for k in ("P", "Q", "obsP", "obsQ", "condP", "condQ", "teamP", "teamQ")]
    return [P_FAMILY, P_GIVEN, P_BIRTH, P_MRN, P_PHONE, Q_FAMILY, Q_BIRTH, Q_MRN, *ids]


def assert_unavailable(c: Clinic, response: httpx.Response, url: str) -> None:
    assert response.status_code == 503, (url, response.status_code, response.text[:300])
    body = response.json()
    if url.startswith("/fhir"):
        assert response.headers["content-type"].startswith("application/fhir+json"), url
        assert body["resourceType"] == "OperationOutcome", url
        assert [i["code"] for i in body["issue"]] == ["transient"], url
    else:
        assert response.headers["content-type"].startswith("application/problem+json"), url
        assert body["status"] == 503 and set(body) == {"type", "title", "status", "detail"}
    for header in ("etag", "last-modified", "location", "content-location", "set-cookie"):
        assert header not in response.headers, (url, header)
    assert response.headers["cache-control"] == "no-store"
    assert response.headers.get("x-request-id"), url
    text = response.text + "".join(f"{k}: {v}\n" for k, v in response.headers.items())
    for secret in _secrets(c):
        assert secret not in text, (url, secret)


async def test_reads_and_searches_fail_closed_then_recover(
    clinic: Clinic, settings: Settings
) -> None:
    c = clinic
    await c.user("auditor", Role.auditor)
    c.tokens["drA"] = (await mfa_login(c.h, "drA"))["access_token"]  # $everything: step-up
    # each request works (and shows the data) while the trail can be written
    for who, url in _requests(c):
        response = await c.get(who, url)
        assert response.status_code in (200, 404), (url, response.text)
    shown = (await c.get("drA", f"/fhir/Patient/{c.ids['P']}")).text
    assert P_FAMILY in shown and P_BIRTH in shown
    before = await audit_documents(c.h.services.engine)

    block_audit(settings)
    refused: list[str] = []
    for who, url in _requests(c):
        response = await c.get(who, url)
        assert_unavailable(c, response, url)
        refused.append(response.headers["x-request-id"])
    # a caller without a token is not told "401" either: its deny entry cannot be written
    anonymous = await c.client.get(f"/fhir/Patient/{c.ids['P']}")
    assert_unavailable(c, anonymous, f"/fhir/Patient/{c.ids['P']} (anonymous)")
    refused.append(anonymous.headers["x-request-id"])
    # nothing was written meanwhile
    assert await audit_documents(c.h.services.engine) == before

    unblock_audit(settings)
    again = await c.get("drA", f"/fhir/Patient/{c.ids['P']}")
    assert again.status_code == 200 and P_FAMILY in again.text
    rid = again.headers["x-request-id"]
    after = await audit_documents(c.h.services.engine)
    new = after[len(before) :]
    assert [(d["action"], d["id"], d["request_id"]) for d in new] == [
        ("fhir.read", c.ids["P"], rid)
    ]
    assert not {d.get("request_id") for d in after} & set(refused)
    assert [d["seq"] for d in after] == list(range(1, len(after) + 1))
    # every refused request can be repeated now, and is audited
    for who, url in _requests(c):
        response = await c.get(who, url)
        assert response.status_code in (200, 404), (url, response.text)
        entries = [
            d
            for d in await audit_documents(c.h.services.engine)
            if d.get("request_id") == response.headers["x-request-id"]
        ]
        assert entries, url
    assert verify_db(settings).ok


async def test_search_bundle_never_leaves_when_its_entries_cannot_be_written(
    clinic: Clinic, settings: Settings
) -> None:
    """A search whose request entry and per-record entries are one batch: refused whole."""
    c = clinic
    block_audit(settings)
    try:
        response = await c.get("svc", "/fhir/Observation?_count=50")
        assert_unavailable(c, response, "/fhir/Observation?_count=50")
        assert "Bundle" not in response.text and "searchset" not in response.text
    finally:
        unblock_audit(settings)
    response = await c.get("svc", "/fhir/Observation?_count=50")
    assert response.status_code == 200 and response.json()["resourceType"] == "Bundle"


def _unraising_client(c: Clinic) -> httpx.AsyncClient:
    """A client that gets the server's answer to an unhandled error (a real server's 500)
    instead of the exception itself."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=c.h.app, raise_app_exceptions=False),
        base_url="http://testserver",
    )


async def test_login_while_audit_is_down_answers_503_without_tokens(
    clinic: Clinic, settings: Settings
) -> None:
    """A login's security event is an audit entry too: unrecordable, no session starts."""
    c = clinic
    block_audit(settings)
    async with _unraising_client(c) as client:
        ok = await client.post("/auth/login", json={"username": "drA", "password": STRONG_PASSWORD})
        wrong = await client.post(
            "/auth/login", json={"username": "drB", "password": "not-the-password-4711"}
        )
    unblock_audit(settings)
    for response in (ok, wrong):
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "access_token" not in response.text and "refresh_token" not in response.text
        assert "set-cookie" not in response.headers
    assert (await c.h.login("drA"))["access_token"]  # and it works again afterwards
    logins = await audit_documents(c.h.services.engine, "security.login")
    assert logins[-1]["outcome"] == "permit" and logins[-1]["user"] == c.users["drA"].id


async def _observations_of(c: Clinic, patient: str) -> dict[str, Any]:
    bundle = (await c.get("svc", f"/fhir/Observation?patient=Patient/{patient}")).json()
    return {e["resource"]["id"]: e["resource"] for e in bundle.get("entry", [])}


async def test_writes_refused_for_lack_of_audit_leave_no_unaudited_change(
    clinic: Clinic, settings: Settings
) -> None:
    c = clinic
    p = c.ids["P"]
    existing = await _observations_of(c, p)
    observation = existing[c.ids["obsP"]]
    block_audit(settings)
    created = await c.post("svc", "/fhir/Observation", observation_body(p, 123))
    changed = {**observation, "valueQuantity": {"value": 124, "unit": "/min"}}
    updated = await c.put("svc", f"/fhir/Observation/{observation['id']}", changed)
    unblock_audit(settings)
    assert created.status_code == 503 and updated.status_code == 503

    now = await _observations_of(c, p)
    audited = {
        (d["action"], d.get("id"), d.get("version"))
        for d in await audit_documents(c.h.services.engine)
    }
    for rid in set(now) - set(existing):  # created: only with an audit entry of its creation
        assert ("fhir.create", rid, now[rid]["meta"]["versionId"]) in audited, orjson.dumps(
            now[rid]
        )
    version = now[observation["id"]]["meta"]["versionId"]
    if version != observation["meta"]["versionId"]:  # changed: only with an audit entry
        assert ("fhir.update", observation["id"], version) in audited

"""Request ids (edge/request_context.py): a client's UUID is kept, anything else replaced by a
fresh one; every answer carries exactly one `X-Request-ID`, including those made before any
route runs (413, 415, 429, a CORS preflight, a 404 of an unknown path); the audit entry and
the log lines of a request carry the same id."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.edge.log_capture import LogCapture, captured_logs

__all__ = ["captured_logs"]

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
FHIR = "application/fhir+json"
ORIGIN = "https://portal.example"


def the_id(response: Any) -> str:
    """The response's one X-Request-ID, checked to be a lower-case UUID."""
    values = response.headers.get_list("x-request-id")
    assert len(values) == 1, values
    assert UUID.fullmatch(values[0]), values[0]
    return str(values[0])


async def test_a_clients_uuid_is_echoed(harness: Any) -> None:
    mine = str(uuid.uuid4())
    response = await harness.client.get("/healthz", headers={"X-Request-ID": mine})
    assert response.status_code == 200
    assert the_id(response) == mine
    upper = str(uuid.uuid4()).upper()
    answered = await harness.client.get("/healthz", headers={"X-Request-ID": upper})
    assert the_id(answered) == upper.lower()


async def test_without_one_each_request_gets_a_new_id(harness: Any) -> None:
    first = the_id(await harness.client.get("/healthz"))
    second = the_id(await harness.client.get("/healthz"))
    assert first != second


FIXED_UUID = "3f1c9a52-7d4e-4b8a-9c61-2e5f0d7a8b94"


@pytest.mark.parametrize(
    "sent",
    [
        "Zyxwardenfeld-Quillonia-1937-11-23",  # a name and a birth date
        "not-a-uuid",
        # Fixed values: xdist workers must collect the same test ids.
        FIXED_UUID + "0",  # one character too many
        "{" + FIXED_UUID + "}",
        " " + FIXED_UUID,
        FIXED_UUID.replace("-", ""),
        "a" * 5000,
        "",
    ],
)
async def test_anything_but_a_uuid_is_replaced(
    harness: Any, captured_logs: LogCapture, sent: str
) -> None:
    response = await harness.client.get("/healthz", headers={"X-Request-ID": sent})
    answered = the_id(response)
    assert answered != sent.strip().lower()
    (line,) = [a for a in captured_logs.access() if a["route"] == "/healthz"]
    assert line["request_id"] == answered
    if sent:
        assert sent not in captured_logs.text


async def test_refusals_made_before_routing_carry_the_id(settings_factory: Any, harness_factory):
    settings = settings_factory(
        max_body_bytes=1024, cors_origins=[ORIGIN], rate_limit_auth_per_address="2/minute"
    )
    h = await harness_factory(settings)
    mine = str(uuid.uuid4())
    cases = {
        413: await h.client.post(
            "/fhir/Patient",
            content=b"{" + b" " * 4096 + b"}",
            headers={"Content-Type": FHIR, "X-Request-ID": mine},
        ),
        415: await h.client.post(
            "/auth/login", content=b"x", headers={"Content-Type": "text/plain"}
        ),
        404: await h.client.get("/no/such/path"),
        200: await h.client.options(
            "/fhir/Patient",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
        ),
    }
    for status, response in cases.items():
        assert response.status_code == status, (status, response.text)
        the_id(response)
    assert the_id(cases[413]) == mine
    assert "access-control-allow-origin" in cases[200].headers  # a real preflight answer

    statuses = []
    for _ in range(4):
        login = await h.client.post("/auth/login", json={"username": "nobody", "password": "x"})
        statuses.append(login.status_code)
        the_id(login)
    assert 429 in statuses, statuses


async def test_audit_entry_and_log_lines_carry_the_same_id(
    harness: Any, captured_logs: LogCapture
) -> None:
    await harness.add_user("svc", Role.service)
    token = (await harness.login("svc"))["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    created = await harness.client.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "gender": "female"},
        headers={**auth, "Content-Type": FHIR},
    )
    assert created.status_code == 201, created.text
    patient = created.json()["id"]

    mine = str(uuid.uuid4())
    read = await harness.client.get(
        f"/fhir/Patient/{patient}", headers={**auth, "X-Request-ID": mine}
    )
    assert read.status_code == 200 and the_id(read) == mine
    entries = [
        d for d in await audit_documents(harness.services.engine) if d.get("request_id") == mine
    ]
    assert [(e["action"], e["id"]) for e in entries] == [("fhir.read", patient)]
    lines = [line for line in captured_logs.lines() if line.get("request_id") == mine]
    assert [(a["route"], a["status"]) for a in lines if a["logger"] == "carevault.access"] == [
        ("/fhir/{resource_type}/{resource_id}", 200)
    ]

    # A line logged deep inside the request (the bearer check) carries its id too.
    other = str(uuid.uuid4())
    refused = await harness.client.get(
        f"/fhir/Patient/{patient}",
        headers={"Authorization": "Bearer not.a.token", "X-Request-ID": other},
    )
    assert refused.status_code == 401 and the_id(refused) == other
    rejected = [line for line in captured_logs.lines() if line["event"] == "token_rejected"]
    assert rejected and all(line.get("request_id") == other for line in rejected)

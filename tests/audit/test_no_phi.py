"""No PHI in the audit trail: after a scripted session over patients with distinctive names,
identifiers, birth dates, phone numbers and addresses (creates, a conditional create,
reads, vread, history, searches by name, identifier, birth date and phone, a POSTed search,
updates, $everything, break-glass with a reason, logins that work and fail, hostile request
ids and user agents, searches that fail on their values), neither the audit tables (every
column of every audit table, as stored) nor an export file contain any of those values, nor
an unkeyed digest of them, nor the passwords or tokens used. Both stores.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import inspect, text

from carevault.audit import archive
from carevault.config import Settings
from carevault.db.tables import AUDIT_TABLES
from carevault.identity.roles import Role
from tests.access.fhir_world import mfa_login
from tests.audit.conftest import (
    MRN,
    P_BIRTH,
    P_FAMILY,
    P_GIVEN,
    P_MRN,
    P_PHONE,
    Q_BIRTH,
    Q_FAMILY,
    Q_GIVEN,
    Q_MRN,
    Q_PHONE,
    Clinic,
    arun_cli,
    bearer,
    cli_env,
    patient_body,
    verify_db,
)
from tests.audit.trail import audit_documents
from tests.conftest import STRONG_PASSWORD

R_FAMILY, R_GIVEN, R_BIRTH, R_MRN = "Kwaddlesnoot", "Persimmonia", "1929-02-14", "MRN-KW-909182"
R_PHONE = "+15559164402"
NEW_ADDRESS, NEW_PHONE, R_NEW_CITY = "12 Fernwhistle Court", "+15550199876", "Glimmerquay"
LOGIN_NAME = "dr.quillfeather"
UNKNOWN_NAME = "zyx.wrongname.hunter"
WRONG_PASSWORDS = ("Wrong-Horse-Zyx-4471", "Kwaddlesnoot-1929-pass")
REASON = "Patient Zyxwardenfeld found unconscious, allergy history needed immediately"
AGENT = "ChartBrowser/2.0 (for Quillonia Zyxwardenfeld)"
ODD_REQUEST_ID = "Kwaddlesnoot-visit-0214"

PHI = (
    P_FAMILY,
    P_GIVEN,
    P_BIRTH,
    P_MRN,
    P_PHONE,
    Q_FAMILY,
    Q_GIVEN,
    Q_BIRTH,
    Q_MRN,
    Q_PHONE,
    R_FAMILY,
    R_GIVEN,
    R_BIRTH,
    R_MRN,
    R_PHONE,
    NEW_ADDRESS,
    NEW_PHONE,
    R_NEW_CITY,
)


async def _session(c: Clinic) -> list[str]:
    """The scripted session; returns the tokens it was given (never to be recorded)."""
    p = c.ids["P"]
    svc, dr = "svc", "drA"
    ok = {200, 201}

    async def expect(response: Any, statuses: set[int]) -> Any:
        assert response.status_code in statuses, (response.request.url, response.text[:300])
        return response

    # creates, a conditional create (the search value in a header), an update
    r_body = patient_body(R_FAMILY, R_GIVEN, R_BIRTH, R_MRN, R_PHONE)
    created = await expect(await c.post(svc, "/fhir/Patient", r_body), ok)
    r = created.json()["id"]
    await expect(
        await c.post(svc, "/fhir/Patient", r_body, **{"If-None-Exist": f"identifier={R_MRN}"}),
        {200, 201},
    )
    moved = {**r_body, "id": r, "address": [{"city": R_NEW_CITY}]}
    await expect(await c.put(svc, f"/fhir/Patient/{r}", moved), ok)
    await expect(
        await c.post(
            svc,
            "/fhir/CareTeam",
            {
                "resourceType": "CareTeam",
                "status": "active",
                "subject": {"reference": f"Patient/{r}"},
                "participant": [{"member": {"reference": f"Practitioner/{c.ids['pracA']}"}}],
            },
        ),
        ok,
    )

    # reads (with a hostile user agent and request id), vread, history
    await expect(
        await c.get(
            dr, f"/fhir/Patient/{p}", **{"User-Agent": AGENT, "X-Request-ID": ODD_REQUEST_ID}
        ),
        ok,
    )
    await expect(await c.get(dr, f"/fhir/Patient/{r}"), ok)
    await expect(await c.get(dr, f"/fhir/Patient/{p}/_history/1"), ok)
    await expect(await c.get(dr, f"/fhir/Patient/{p}/_history"), ok)

    # searches by every kind of value
    for query in (
        f"family={P_FAMILY}",
        f"name={P_GIVEN}",
        f"name={R_FAMILY.lower()}",
        f"given={R_GIVEN}&family={R_FAMILY}",
        f"birthdate={P_BIRTH}",
        f"birthdate=eq{R_BIRTH}",
        f"identifier={quote(MRN + '|' + P_MRN)}",
        f"identifier={R_MRN}",
        f"phone={quote(P_PHONE)}",
        f"telecom={quote(R_PHONE)}",
        f"address-city={R_NEW_CITY}",
    ):
        bundle = (await expect(await c.get(dr, f"/fhir/Patient?{query}"), ok)).json()
        assert bundle.get("entry"), query  # the search really found the patient
    await expect(
        await c.client.post(
            "/fhir/Patient/_search",
            content=f"family={Q_FAMILY}&birthdate={Q_BIRTH}",
            headers=bearer(c.tokens[dr], **{"Content-Type": "application/x-www-form-urlencoded"}),
        ),
        ok,
    )
    await expect(await c.get(svc, f"/fhir/Patient?name={Q_GIVEN}&identifier={Q_MRN}"), ok)
    # values the server refuses are not recorded either
    await expect(await c.get(dr, f"/fhir/Patient?birthdate={R_FAMILY}"), {400})
    await expect(await c.get(dr, f"/fhir/Patient?{R_GIVEN}={R_FAMILY}"), {400})

    # an update with new contact details, and $everything
    current = (await c.get(svc, f"/fhir/Patient/{p}")).json()
    current["telecom"] = [{"system": "phone", "value": NEW_PHONE}]
    current["address"] = [{"line": [NEW_ADDRESS]}]
    await expect(await c.put(svc, f"/fhir/Patient/{p}", current), ok)
    c.tokens[dr] = (await mfa_login(c.h, dr))["access_token"]  # $everything: step-up
    await expect(await c.get(dr, f"/fhir/Patient/{p}/$everything"), ok)
    await expect(await c.get(dr, f"/fhir/Patient/{c.ids['Q']}"), {404})  # denied

    # logins: ok, wrong password, unknown name; break-glass with a reason naming the patient
    await c.h.add_user(LOGIN_NAME, Role.physician, practitioner_id=c.ids["pracOther"])
    grant = await mfa_login(c.h, LOGIN_NAME)  # break-glass needs step-up
    tokens = [grant["access_token"], grant["refresh_token"], *c.tokens.values()]
    await c.h.login(LOGIN_NAME, WRONG_PASSWORDS[0], expect=401)
    await c.h.login(UNKNOWN_NAME, WRONG_PASSWORDS[1], expect=401)
    opened = await c.client.post(
        "/access/break-glass",
        json={"patient": p, "reason": REASON},
        headers=bearer(grant["access_token"]),
    )
    assert opened.status_code == 201, opened.text
    await expect(
        await c.client.get(f"/fhir/Patient/{p}", headers=bearer(grant["access_token"])), ok
    )
    refreshed = await c.h.refresh(grant["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    tokens += [refreshed.json()["access_token"], refreshed.json()["refresh_token"]]
    return tokens


def _forbidden(tokens: list[str]) -> dict[str, bytes]:
    """Every value that must not be found, as the bytes to look for: each PHI value as it is,
    lower-cased, and as unkeyed digests (a dictionary attack would undo those)."""
    found: dict[str, bytes] = {}
    for value in (*PHI, REASON, AGENT, ODD_REQUEST_ID, LOGIN_NAME, UNKNOWN_NAME):
        for form in (value, value.lower(), value.upper(), quote(value), value.replace("-", "")):
            found[form] = form.encode()
        for digest in (hashlib.sha256, hashlib.md5, hashlib.sha1):
            hexed = digest(value.encode()).hexdigest()
            found[f"{digest().name}({value})"] = hexed[:32].encode()
    for secret in (STRONG_PASSWORD, *WRONG_PASSWORDS, *tokens):
        found[secret[:40]] = secret.encode()
    found["'Quillonia Zyx'"] = b"Quillonia Zyx"
    return found


def _audit_dump(settings: Settings) -> dict[str, list[bytes]]:
    """Every value of every column of every audit table (the known ones and any other whose
    name says audit), as stored: text as UTF-8, binary as is."""
    with archive.connect(settings.sqlalchemy_url) as conn:
        names = set(AUDIT_TABLES) | {
            t for t in inspect(conn).get_table_names() if "audit" in t.lower()
        }
        dump: dict[str, list[bytes]] = {}
        for table in sorted(names):
            values: list[bytes] = []
            for row in conn.execute(text(f"SELECT * FROM {table}")):  # names from the schema
                for value in row:
                    if isinstance(value, bytes | bytearray | memoryview):
                        values.append(bytes(value))
                    else:
                        values.append(b"" if value is None else str(value).encode())
            dump[table] = values
    return dump


def _hits(blobs: list[bytes], forbidden: dict[str, bytes]) -> list[str]:
    return sorted({name for name, needle in forbidden.items() for b in blobs if needle in b})


async def test_session_leaves_no_phi_in_audit_tables_or_export(
    clinic: Clinic, settings: Settings, tmp_path: Path
) -> None:
    c = clinic
    before = len(await audit_documents(c.h.services.engine))
    tokens = await _session(c)

    # the session was recorded (a trail of nothing would hold no PHI either)
    documents = await audit_documents(c.h.services.engine)
    actions = {d["action"] for d in documents[before:]}
    for action in (
        "fhir.create",
        "fhir.read",
        "fhir.vread",
        "fhir.history",
        "fhir.search",
        "fhir.update",
        "fhir.everything",
        "security.login",
        "security.break_glass_opened",
        "security.break_glass_access",
    ):
        assert action in actions, action
    assert sum(1 for d in documents if d.get("query")) >= 12

    forbidden = _forbidden(tokens)
    dump = _audit_dump(settings)
    assert len(dump["audit_entries"]) == 9 * len(documents)  # every column of every row
    for table, blobs in dump.items():
        assert _hits(blobs, forbidden) == [], table

    out = tmp_path / "export.jsonl"
    exported = await arun_cli(cli_env(settings), "audit", "export", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    data = out.read_bytes()
    assert data.count(b'"seq"') >= len(documents)
    assert _hits([data], forbidden) == []
    assert _hits([exported.output.encode()], forbidden) == []
    assert verify_db(settings).ok

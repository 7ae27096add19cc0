"""The auditors' API over HTTP: filtered, paged listings (`GET /audit`), the same as FHIR
AuditEvent resources (`GET /audit/AuditEvent`, validated with fhir.resources), signed
checkpoints, and Merkle proofs checked by the independent RFC 9162 verifier of
`tests/audit/rfc9162.py` with nothing but the published key (`GET /audit/public-key`) and
the entries the listing returns. Auditor role only: every other role gets 403.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from carevault.audit.entry import AuditEntry, Outcome
from carevault.identity.roles import Role
from tests.access.fhir_world import World, bearer, build_world
from tests.audit import rfc9162

REASON = "Unconscious in ED, no relatives reachable, allergy history needed now"
PROBLEM = "application/problem+json"


@pytest.fixture
async def world(harness) -> World:
    w = await build_world(harness)
    await w.user("aud", Role.auditor)
    await activity(w)
    return w


async def activity(w: World) -> None:
    """drA reads A's record (CareTeam), drOther is refused it, then opens break-glass on A and
    reads it under the grant; patA reads their own record; billing is refused a search."""
    a = w.ids["A"]
    assert (await w.get("drA", f"/fhir/Patient/{a}")).status_code == 200
    assert (await w.get("drA", f"/fhir/Observation/{w.ids['obsA']}")).status_code == 200
    assert (await w.get("drOther", f"/fhir/Observation/{w.ids['obsA']}")).status_code == 404
    token = await w.relogin("drOther")
    grant = await w.client.post(
        "/access/break-glass", json={"patient": a, "reason": REASON}, headers=bearer(token)
    )
    assert grant.status_code == 201, grant.text
    assert (await w.get("drOther", f"/fhir/Observation/{w.ids['obsA']}")).status_code == 200
    assert (await w.get("patA", f"/fhir/Patient/{a}")).status_code == 200


@pytest.fixture
async def light(harness) -> World:
    """No records: one user of each role, for the tests of who may and of bad requests."""
    w = World(harness)
    harness.client.event_hooks["response"].append(w.hook)
    for name, role in ROLE_USERS.items():
        await w.user(name, role)
    return w


ROLE_USERS = {
    "aud": Role.auditor,
    "drA": Role.physician,
    "admin": Role.admin,
    "patA": Role.patient,
    "registrar": Role.registrar,
    "billing": Role.billing,
    "svc": Role.service,
}


async def listing(w: World, query: str = "", who: str = "aud") -> dict[str, Any]:
    response = await w.get(who, f"/audit?{query}" if query else "/audit")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    return response.json()  # type: ignore[no-any-return]


async def everything(w: World, query: str = "") -> list[dict[str, Any]]:
    """Every entry matching `query`, through all pages."""
    entries: list[dict[str, Any]] = []
    before = None
    while True:
        parts = [query] if query else []
        if before is not None:
            parts.append(f"before={before}")
        page = await listing(w, "&".join(parts))
        entries.extend(page["entries"])
        if page["next"] is None:
            return entries
        before = page["next"]


# --- listing and filters -----------------------------------------------------------------------


async def test_newest_first_and_the_mac_beside_each_entry(world: World) -> None:
    page = await listing(world, "limit=500")
    seqs = [e["seq"] for e in page["entries"]]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs)
    assert page["next"] is None
    for entry in page["entries"]:
        assert len(bytes.fromhex(entry["mac"])) == 32
        assert {"seq", "at", "action", "outcome"} <= entry.keys()
    # the listing is itself on the record (the request before this one)
    assert any(e["action"] == "fhir.read" for e in page["entries"])


async def test_filter_by_patient_actor_action_outcome(world: World) -> None:
    w = world
    a = w.ids["A"]
    by_patient = await everything(w, f"patient={a}")
    assert by_patient and all(e["patient"] == a for e in by_patient)
    dr_a = w.users["drA"].id
    reads = [e for e in by_patient if e.get("user") == dr_a and e["action"] == "fhir.read"]
    assert {(e["type"], e["id"]) for e in reads} >= {
        ("Patient", a),
        ("Observation", w.ids["obsA"]),
    }

    by_actor = await everything(w, f"actor={dr_a}")
    assert by_actor and all(e["user"] == dr_a for e in by_actor)
    assert {e["seq"] for e in reads} <= {e["seq"] for e in by_actor}

    exact = await everything(w, "action=fhir.read")
    assert exact and all(e["action"] == "fhir.read" for e in exact)
    prefix = await everything(w, "action=security.*")
    assert {e["action"] for e in prefix} >= {"security.login", "security.break_glass_opened"}
    assert all(e["action"].startswith("security.") for e in prefix)
    # "_" in an action is no wildcard: security.break_glass_* matches only its own kind
    glass = await everything(w, "action=" + quote("security.break_glass_*"))
    assert glass and all(e["action"].startswith("security.break_glass_") for e in glass)
    assert await everything(w, "action=fhir.rea") == []

    denied = await everything(w, "outcome=deny")
    assert denied and all(e["outcome"] == "deny" for e in denied)
    dr_other = w.users["drOther"].id
    assert any(
        e.get("user") == dr_other and e.get("patient") == a and e["action"] == "fhir.read"
        for e in denied
    )
    combined = await everything(w, f"patient={a}&actor={dr_other}&outcome=permit")
    assert combined and all(
        e["patient"] == a and e["user"] == dr_other and e["outcome"] == "permit" for e in combined
    )


async def test_filter_by_break_glass(world: World) -> None:
    w = world
    whole = {e["seq"] for e in await everything(w)}
    glass = await everything(w, "break_glass=true")
    assert glass and all(e.get("break_glass") is True for e in glass)
    dr_other = w.users["drOther"].id
    assert any(
        e["action"] == "fhir.read" and e["user"] == dr_other and e["patient"] == w.ids["A"]
        for e in glass
    )
    assert any(e["action"] == "security.break_glass_opened" for e in glass)
    plain = await everything(w, "break_glass=false")
    assert plain and all("break_glass" not in e for e in plain)
    # every entry is one or the other (the listings since add entries of their own)
    assert {e["seq"] for e in glass} | {e["seq"] for e in plain if e["seq"] in whole} == whole


async def test_filter_by_time(world: World) -> None:
    w = world
    entries = (await listing(w, "limit=500"))["entries"]
    times = sorted({e["at"] for e in entries})
    assert len(times) > 3
    middle = times[len(times) // 2]
    since = await everything(w, f"since={middle}")
    assert since and all(e["at"] >= middle for e in since)
    assert min(e["at"] for e in since) == middle  # inclusive
    until = await everything(w, f"until={middle}")
    assert until and all(e["at"] < middle for e in until)  # exclusive
    old = {e["seq"] for e in entries}
    assert {e["seq"] for e in since if e["seq"] in old} | {e["seq"] for e in until} == old

    # an offset is converted to UTC; a date is midnight UTC
    instant = dt.datetime.strptime(middle, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    shifted = instant.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
    assert [e["seq"] for e in await everything(w, "since=" + quote(shifted))][-1] == min(
        e["seq"] for e in since
    )
    today = instant.date()
    tomorrow = today + dt.timedelta(days=1)
    window = await everything(w, f"since={today.isoformat()}&until={tomorrow.isoformat()}")
    assert {e["seq"] for e in window} >= {e["seq"] for e in entries if e["at"][:10] == str(today)}
    assert await everything(w, f"since={tomorrow.isoformat()}") == []
    assert await everything(w, f"since={tomorrow.isoformat()}&until={today.isoformat()}") == []


async def test_paging_walks_every_entry_once(world: World) -> None:
    w = world
    a = w.ids["A"]
    whole = (await listing(w, f"patient={a}&limit=500"))["entries"]
    assert len(whole) > 5
    seen: list[int] = []
    url = f"patient={a}&limit=2"
    page = await listing(w, url)
    while True:
        assert len(page["entries"]) <= 2
        seen.extend(e["seq"] for e in page["entries"])
        if page["next"] is None:
            break
        assert page["next"] == page["entries"][-1]["seq"]
        page = await listing(w, f"{url}&before={page['next']}")
    # the pages' own entries name no patient, so the selection did not move under us
    assert seen == [e["seq"] for e in whole]
    await w.h.services.audit.append(
        [AuditEntry(action="test.filler", outcome=Outcome.permit) for _ in range(120)]
    )
    default = await listing(w)
    assert len(default["entries"]) == 100 and default["next"] == default["entries"][-1]["seq"]


# --- who may ---------------------------------------------------------------------------------


AUDITOR_URLS = [
    "/audit",
    "/audit?patient=x",
    "/audit/AuditEvent",
    "/audit/checkpoint",
    "/audit/proof/inclusion?seq=1&size=1",
    "/audit/proof/consistency?from=1&to=1",
]


async def test_only_auditors(light: World) -> None:
    world = light
    for who in ("drA", "admin", "patA", "registrar", "billing", "svc"):
        for url in AUDITOR_URLS:
            response = await world.get(who, url)
            assert response.status_code == 403, (who, url, response.text)
            assert response.headers["content-type"].startswith(PROBLEM)
            assert "entries" not in response.text and "proof" not in response.text
        # the refusals are on the record, with who was refused
        denied = await everything(world, f"actor={world.users[who].id}&action=audit.*")
        assert len(denied) == len(AUDITOR_URLS)
        assert all(e["outcome"] == "deny" and e["status"] == 403 for e in denied)
    assert (await world.get("aud", "/audit")).status_code == 200


async def test_without_a_token_401_but_the_public_key_is_public(light: World) -> None:
    world = light
    for url in AUDITOR_URLS:
        response = await world.client.get(url)
        assert response.status_code == 401
        assert response.headers["content-type"].startswith(PROBLEM)
    response = await world.client.get("/audit/public-key")
    assert response.status_code == 200
    jwks = response.json()
    (key,) = jwks["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519"
    assert key["use"] == "sig" and key["alg"] == "EdDSA"
    assert key["kid"] == world.h.services.custody.audit_keys().key_id
    assert "d" not in key
    raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
    assert raw == world.h.services.custody.audit_keys().public_key


# --- bad requests ------------------------------------------------------------------------------


BAD_LISTING_QUERIES = [
    "limit=0",
    "limit=501",
    "limit=-1",
    "limit=ten",
    "limit=1.5",
    "limit=",
    "before=0",
    "before=abc",
    "before=99999999999999999999999999",
    "before=9223372036854775807",
    "since=yesterday",
    "since=2026-13-01",
    "since=2026-02-30",
    "until=2026-02-30T00:00:00Z",
    "since=2026-01-01T00:00:00",  # no zone
    "since=2026-01-01T25:00:00Z",
    "since=2026-01-01T10:00:00%2B24:00",
    "since=0000-01-01",
    "since=9999-12-31T23:59:59-23:59",
    "outcome=maybe",
    "outcome=",
    "break_glass=yes",
    "break_glass=1",
    "patient=" + quote("a b"),
    "patient=" + quote("x" * 65),
    "patient=%00",
    "patient=",
    "actor=" + quote("o'brien"),
    "actor=%00",
    "action=FHIR.READ",
    "action=*x",
    "action=fhir.%25",
    "action=" + quote("fhir.read;drop"),
    "action=" + "a" * 49,
    "foo=1",
    "patient=a&patient=b",
    "limit=1&limit=2",
]


async def test_bad_listing_parameters_are_400(light: World) -> None:
    world = light
    for query in BAD_LISTING_QUERIES:
        for path in ("/audit", "/audit/AuditEvent"):
            response = await world.get("aud", f"{path}?{query}")
            assert response.status_code == 400, (path, query, response.text)
            assert response.headers["content-type"].startswith(PROBLEM)
            body = response.json()
            assert body["status"] == 400 and "Traceback" not in response.text
            assert "drop" not in response.text and "o'brien" not in response.text


BAD_PROOF_URLS = [
    "/audit/proof/inclusion",
    "/audit/proof/inclusion?seq=1",
    "/audit/proof/inclusion?size=1",
    "/audit/proof/inclusion?seq=0&size=1",
    "/audit/proof/inclusion?seq=2&size=1",
    "/audit/proof/inclusion?seq=x&size=1",
    "/audit/proof/inclusion?seq=1&size=-1",
    "/audit/proof/inclusion?seq=1&size=99999999999999999999999",
    "/audit/proof/inclusion?seq=1&size=1&extra=1",
    "/audit/proof/consistency",
    "/audit/proof/consistency?from=1",
    "/audit/proof/consistency?from=0&to=1",
    "/audit/proof/consistency?from=3&to=2",
    "/audit/proof/consistency?from=a&to=b",
    "/audit/proof/consistency?from=1&to=1&to=2",
    "/audit/checkpoint?size=1",
]


async def test_bad_proof_parameters_are_400(light: World) -> None:
    world = light
    for url in BAD_PROOF_URLS:
        response = await world.get("aud", url)
        assert response.status_code == 400, (url, response.text)
        assert response.headers["content-type"].startswith(PROBLEM)


async def test_sizes_that_are_not_checkpoints_are_404(world: World) -> None:
    w = world
    services = w.h.services
    await services.audit_writer.drain()
    checkpoint = await services.audit.checkpoint()
    assert checkpoint is not None
    size = checkpoint.size
    signed = {c.size for c in await services.audit.checkpoints()}
    unsigned = max(s for s in range(2, size) if s not in signed)
    bodies = set()
    for url in (
        f"/audit/proof/inclusion?seq=1&size={unsigned}",
        f"/audit/proof/inclusion?seq=1&size={size + 10_000}",
        f"/audit/proof/consistency?from={unsigned}&to={size}",
        f"/audit/proof/consistency?from={size}&to={size + 10_000}",
    ):
        response = await w.get("aud", url)
        assert response.status_code == 404, (url, response.text)
        assert response.headers["content-type"].startswith(PROBLEM)
        bodies.add(response.content)
    assert len(bodies) == 1  # one generic answer, whatever was missing


# --- AuditEvent --------------------------------------------------------------------------------


def validate_bundle(body: dict[str, Any]) -> list[dict[str, Any]]:
    Bundle.model_validate(body)
    events = [e["resource"] for e in body.get("entry", [])]
    for event in events:
        AuditEvent.model_validate(event)
    return events


def subtype_codes(event: dict[str, Any]) -> dict[str, str]:
    return {c["system"]: c["code"] for c in event["subtype"]}


async def test_audit_event_bundle(world: World) -> None:
    w = world
    a = w.ids["A"]
    response = await w.get("aud", f"/audit/AuditEvent?patient={a}&limit=500")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    events = validate_bundle(body)
    listed = (await listing(w, f"patient={a}&limit=500"))["entries"]
    assert [e["id"] for e in events] == [str(e["seq"]) for e in listed]

    dr_a = w.users["drA"]
    read = next(
        e
        for e in events
        if subtype_codes(e).get("urn:carevault:audit-action") == "fhir.read"
        and any(x.get("what", {}).get("reference") == f"Patient/{a}" for x in e["entity"])
        and e["agent"][0].get("who", {}).get("identifier", {}).get("value") == dr_a.id
    )
    assert read["type"]["code"] == "rest"
    assert subtype_codes(read)["http://hl7.org/fhir/restful-interaction"] == "read"
    assert read["action"] == "R" and read["outcome"] == "0"
    user = read["agent"][0]
    assert user["requestor"] is True
    assert user["who"]["reference"] == f"Practitioner/{dr_a.practitioner_id}"
    assert user["role"][0]["coding"][0]["code"] == "physician"
    assert read["purposeOfEvent"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
        "code": "TREAT",
        "display": "treatment",
    }
    roles = {x["role"]["code"] for x in read["entity"] if "role" in x}
    assert {"1", "4"} <= roles
    assert read["source"]["observer"]["display"]
    (app,) = [x for x in read["agent"] if x["type"]["coding"][0]["code"] == "110150"]
    assert app["requestor"] is False and app["who"]["identifier"]["value"]

    glass = [e for e in events if "extension" in e]
    assert glass
    for event in glass:
        codes = [c["code"] for p in event["purposeOfEvent"] for c in p["coding"]]
        assert "BTG" in codes
    denied = [e for e in events if e["outcome"] == "4"]
    assert denied and all(e["outcomeDesc"].startswith("deny") for e in denied)


async def test_audit_event_paging_and_security_events(world: World) -> None:
    w = world
    response = await w.get("aud", "/audit/AuditEvent?action=security.*&limit=2")
    body = response.json()
    events = validate_bundle(body)
    assert len(events) == 2
    (link,) = [x["url"] for x in body["link"] if x["relation"] == "next"]
    assert link.startswith("/audit/AuditEvent?") and "before=" in link
    following = validate_bundle((await w.get("aud", link)).json())
    assert following and int(following[0]["id"]) < int(events[-1]["id"])
    logins = validate_bundle(
        (await w.get("aud", "/audit/AuditEvent?action=security.login&limit=3")).json()
    )
    assert logins and all(e["type"]["code"] == "110114" for e in logins)
    opened = validate_bundle(
        (await w.get("aud", "/audit/AuditEvent?action=security.break_glass_opened")).json()
    )
    assert opened and subtype_codes(opened[0])["http://dicom.nema.org/resources/ontology/DCM"] == (
        "110127"
    )


# --- checkpoints and proofs, verified independently ------------------------------------------


def b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


async def published_keys(w: World) -> dict[str, Ed25519PublicKey]:
    response = await w.client.get("/audit/public-key")  # no token: anyone may verify
    assert response.status_code == 200
    keys = {}
    for jwk in response.json()["keys"]:
        assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519"
        raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
        keys[jwk["kid"]] = Ed25519PublicKey.from_public_bytes(raw)
    return keys


def verified(checkpoint: dict[str, Any], keys: dict[str, Ed25519PublicKey]) -> tuple[int, bytes]:
    """(size, root) of a checkpoint whose signature holds; the signed bytes re-created here
    from their definition: origin, size, base64 root, timestamp, one per line."""
    size, root = checkpoint["size"], b64(checkpoint["root"])
    note = f"carevault audit trail\n{size}\n{checkpoint['root']}\n{checkpoint['timestamp']}\n"
    keys[checkpoint["key_id"]].verify(b64(checkpoint["signature"]), note.encode())
    return size, root


def leaf_of(entry: dict[str, Any]) -> bytes:
    """The leaf hash of an entry as GET /audit lists it: canonical JSON of the document (the
    listing's `mac` taken out) followed by the MAC bytes."""
    document = {k: v for k, v in entry.items() if k != "mac"}
    canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    return rfc9162.leaf_hash(canonical + bytes.fromhex(entry["mac"]))


async def signed_head(w: World) -> dict[str, Any]:
    """Sign a tree head over everything so far, then fetch it as an auditor would."""
    await w.h.services.audit_writer.drain()
    await w.h.services.audit.checkpoint()
    response = await w.get("aud", "/audit/checkpoint")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def inclusion(w: World, seq: int, size: int) -> dict[str, Any]:
    response = await w.get("aud", f"/audit/proof/inclusion?seq={seq}&size={size}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_inclusion_and_consistency_proofs_verify_independently(world: World) -> None:
    w = world
    keys = await published_keys(w)
    first = await signed_head(w)
    size1, root1 = verified(first, keys)
    entries = {e["seq"]: e for e in await everything(w)}
    assert set(range(1, size1 + 1)) <= entries.keys()

    for seq in sorted({1, 2, size1 // 2, size1 - 1, size1}):
        proof = await inclusion(w, seq, size1)
        assert proof["seq"] == seq and proof["size"] == size1
        assert proof["leaf_index"] == seq - 1
        assert proof["checkpoint"] == first
        leaf = leaf_of(entries[seq])
        assert b64(proof["leaf_hash"]) == leaf
        path = [b64(p) for p in proof["proof"]]
        assert rfc9162.verify_inclusion(seq - 1, size1, leaf, path, root1)
        # any change to the entry breaks it
        forged = {
            **entries[seq],
            "outcome": "deny" if entries[seq]["outcome"] != "deny" else "permit",
        }
        assert not rfc9162.verify_inclusion(seq - 1, size1, leaf_of(forged), path, root1)

    for name in ("drA", "drOther"):  # more entries after the first head
        assert (await w.get(name, f"/fhir/Observation/{w.ids['obsA']}")).status_code == 200
    second = await signed_head(w)
    size2, root2 = verified(second, keys)
    assert size2 > size1
    response = await w.get("aud", f"/audit/proof/consistency?from={size1}&to={size2}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["from"] == size1 and body["to"] == size2
    assert body["checkpoints"] == [first, second]
    proof = [b64(p) for p in body["proof"]]
    assert rfc9162.verify_consistency(size1, size2, root1, root2, proof)
    assert not rfc9162.verify_consistency(size1, size2, root1, root1, proof)

    # an old entry is in the new tree too; the same size both ways is the empty proof
    old = await inclusion(w, 2, size2)
    assert rfc9162.verify_inclusion(
        1, size2, leaf_of(entries[2]), [b64(p) for p in old["proof"]], root2
    )
    same = (await w.get("aud", f"/audit/proof/consistency?from={size2}&to={size2}")).json()
    assert same["proof"] == []


async def test_a_bad_signature_does_not_verify(world: World) -> None:
    w = world
    keys = await published_keys(w)
    head = await signed_head(w)
    verified(head, keys)
    tampered = {**head, "size": head["size"] + 1}
    with pytest.raises(InvalidSignature):
        verified(tampered, keys)


async def test_proofs_across_stored_blocks(harness) -> None:
    """More than one block of 1,024 leaves: the server's stored subtree hashes must give the
    same proofs as the RFC's definitions over every leaf."""
    h = harness
    await h.add_user("aud.blocks", Role.auditor)
    token = (await h.login("aud.blocks"))["access_token"]
    trail = h.services.audit
    await h.services.audit_writer.drain()
    await trail.append(
        [AuditEntry(action="test.filler", outcome=Outcome.permit, status=200) for _ in range(1500)]
    )
    early = await trail.checkpoint()
    await trail.append(
        [AuditEntry(action="test.filler", outcome=Outcome.permit, status=200) for _ in range(700)]
    )
    late = await trail.checkpoint()
    assert early is not None and late is not None and late.size > 2048 > early.size > 1024

    entries: list[dict[str, Any]] = []
    before = None
    while True:
        query = "limit=500" + (f"&before={before}" if before else "")
        page = (await h.client.get(f"/audit?{query}", headers=bearer(token))).json()
        entries.extend(page["entries"])
        if page["next"] is None:
            break
        before = page["next"]
    leaves = {e["seq"]: leaf_of(e) for e in entries}
    ordered = [leaves[seq] for seq in range(1, late.size + 1)]
    assert rfc9162.root_hash(ordered) == late.root
    assert rfc9162.root_hash(ordered[: early.size]) == early.root

    response = await h.client.get("/audit/public-key")
    (jwk,) = response.json()["keys"]
    key = Ed25519PublicKey.from_public_bytes(
        base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    )
    for seq in (1, 1024, 1025, 1500, early.size, 2048, 2049, late.size):
        if seq > late.size:
            continue
        got = (
            await h.client.get(
                f"/audit/proof/inclusion?seq={seq}&size={late.size}", headers=bearer(token)
            )
        ).json()
        head = got["checkpoint"]
        verified(head, {jwk["kid"]: key})
        path = [b64(p) for p in got["proof"]]
        assert path == rfc9162.inclusion_proof(seq - 1, ordered)
        assert rfc9162.verify_inclusion(seq - 1, late.size, leaves[seq], path, late.root)
    got = (
        await h.client.get(
            f"/audit/proof/consistency?from={early.size}&to={late.size}", headers=bearer(token)
        )
    ).json()
    path = [b64(p) for p in got["proof"]]
    assert path == rfc9162.consistency_proof(early.size, ordered)
    assert rfc9162.verify_consistency(early.size, late.size, early.root, late.root, path)

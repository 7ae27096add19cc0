"""Structured logs without PHI or secrets (carevault/logs.py, edge/request_context.py).

The main test runs a scripted session through HTTP against the real app, with every log line
of the process (carevault's and every library's, at DEBUG) captured as the server writes
them, and looks for the seeded patients' names, identifiers, birth dates, phone numbers and
addresses, and for every password, token, code and secret the session used: none may be
there. It first checks that the capture really holds the session (an access line for each
request), so it cannot pass on an empty log.

The others pin the pieces: the scrubber on nested structures and value patterns, exceptions
rendered by type and frames only, standard-library loggers and warnings routed through the
same formatter, and uvicorn's log configuration in a fresh process (a worker's).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from carevault import logs
from carevault.identity.roles import Role
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
    bearer,
    build_clinic,
    patient_body,
)
from tests.conftest import STRONG_PASSWORD
from tests.edge.log_capture import LogCapture, captured_logs

__all__ = ["captured_logs"]

R_FAMILY, R_GIVEN, R_BIRTH, R_MRN = "Throckmundle", "Elspethine", "1951-08-29", "MRN-TH-330517"
R_PHONE, R_CITY, R_STREET = "+15557720348", "Vexborough", "88 Pumbleward Lane"
R_EMAIL = "elspethine.throckmundle@example.org"
S_FAMILY, S_BIRTH = "Gruntlewhisk", "1966-01-30"  # only ever sent in refused requests
LOGIN_NAME = "dr.wobblethorne"
WRONG_PASSWORD = "Wrong-Horse-Zyx-4471"
CODE, VERIFIER = "code-Hq7ZtLp2Wm9Xv4Rk8Ns3Bd6Fy1Jc", "verifier-Kp3Ws8Lq2Zm7Xt4Vn9Rb6Hd1Jf5Gc0Ya"
CLIENT_SECRET = "secret-Tn5Qw8Zr2Lk7Vm4Xp9Hb3Jd6Fs1Gc0Ya"
ODD_REQUEST_ID = f"{R_FAMILY}-{R_BIRTH}"
FHIR = "application/fhir+json"

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
    R_CITY,
    R_STREET,
    R_EMAIL,
    S_FAMILY,
    S_BIRTH,
    LOGIN_NAME,
)


async def _session(h: Any) -> list[str]:
    """The scripted session; returns the secrets it used (tokens, passwords, codes)."""
    c = await build_clinic(h)  # users log in over HTTP; patients P and Q created over HTTP
    secrets = [STRONG_PASSWORD, WRONG_PASSWORD, CODE, VERIFIER, CLIENT_SECRET]
    secrets += list(c.tokens.values())
    p = c.ids["P"]

    async def expect(response: Any, *statuses: int) -> Any:
        assert response.status_code in statuses, (response.request.url, response.text[:300])
        return response

    # create, read, update a patient with distinctive details
    body = patient_body(R_FAMILY, R_GIVEN, R_BIRTH, R_MRN, R_PHONE)
    body["telecom"].append({"system": "email", "value": R_EMAIL})
    r = (await expect(await c.post("svc", "/fhir/Patient", body), 201)).json()["id"]
    await expect(await c.get("drA", f"/fhir/Patient/{p}"), 200)
    await expect(await c.get("svc", f"/fhir/Patient/{r}"), 200)
    moved = {**body, "id": r, "address": [{"line": [R_STREET], "city": R_CITY}]}
    await expect(await c.put("svc", f"/fhir/Patient/{r}", moved), 200)
    await expect(await c.get("svc", f"/fhir/Patient/{r}/_history"), 200)

    # searches: the values are in the query string
    for query in (
        f"family={P_FAMILY}",
        f"name={P_GIVEN}",
        f"birthdate={P_BIRTH}",
        f"identifier={quote(MRN + '|' + P_MRN)}",
        f"phone={quote(P_PHONE)}",
        f"family={R_FAMILY}&address-city={R_CITY}",
        f"email={quote(R_EMAIL)}",
    ):
        await expect(await c.get("svc", f"/fhir/Patient?{query}"), 200)
    await expect(
        await c.client.post(
            "/fhir/Patient/_search",
            content=f"family={Q_FAMILY}&birthdate={Q_BIRTH}&given={Q_GIVEN}",
            headers=bearer(
                c.tokens["svc"], **{"Content-Type": "application/x-www-form-urlencoded"}
            ),
        ),
        200,
    )

    # refused requests carrying personal details: a bad body, bad JSON, a bad search value,
    # unknown ids and paths, a request id that is a name
    invalid = {
        "resourceType": "Patient",
        "name": [{"family": S_FAMILY}],
        "birthDate": "x" + S_BIRTH,
    }
    await expect(await c.post("svc", "/fhir/Patient", invalid), 400, 422)
    broken = f'{{"resourceType": "Patient", "name": [{{"family": "{S_FAMILY}"'.encode()
    await expect(
        await c.client.post(
            "/fhir/Patient",
            content=broken,
            headers=bearer(c.tokens["svc"], **{"Content-Type": FHIR}),
        ),
        400,
    )
    await expect(await c.get("svc", f"/fhir/Patient?birthdate={S_FAMILY}"), 400)
    await expect(await c.get("svc", f"/fhir/Patient/{S_FAMILY}-{S_BIRTH}"), 404)
    await expect(await c.client.get(f"/no/such/{S_FAMILY}?dob={S_BIRTH}"), 404)
    await expect(await c.get("drA", f"/fhir/Patient/{r}", **{"X-Request-ID": ODD_REQUEST_ID}), 404)

    # logins: a right one, a wrong password, an unknown name, refreshes, a logout
    await h.add_user(LOGIN_NAME, Role.physician)
    grant = await h.login(LOGIN_NAME)
    await h.login(LOGIN_NAME, WRONG_PASSWORD, expect=401)
    await h.login(f"{R_GIVEN}.{R_FAMILY}", STRONG_PASSWORD, expect=401)
    secrets += [grant["access_token"], grant["refresh_token"]]
    refreshed = await expect(await h.refresh(grant["refresh_token"]), 200)
    secrets += [refreshed.json()["access_token"], refreshed.json()["refresh_token"]]
    # the same refresh token again: within the grace period of a retry, else reuse
    again = await expect(await h.refresh(grant["refresh_token"]), 200, 400, 401)
    if again.status_code == 200:
        secrets += [again.json()["access_token"], again.json()["refresh_token"]]
    await expect(await h.me(grant["access_token"]), 200, 401)
    await expect(
        await h.client.post("/auth/logout", headers=bearer(refreshed.json()["access_token"])),
        204,
        401,
    )

    # OAuth (over https, as OAuth must be): a token request with a code, a verifier and a
    # client secret; an authorization request naming the patient in its query
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=h.app), base_url="https://testserver"
    ) as tls:
        await expect(
            await tls.post(
                "/oauth/token",
                data={
                    "grant_type": "authorization_code",
                    "code": CODE,
                    "code_verifier": VERIFIER,
                    "client_id": "cv-unknown-client",
                    "client_secret": CLIENT_SECRET,
                    "redirect_uri": f"https://app.example/cb?patient={R_FAMILY}",
                },
            ),
            400,
            401,
        )
        await expect(
            await tls.get(
                "/oauth/authorize",
                params={
                    "client_id": "cv-unknown-client",
                    "response_type": "code",
                    "login_hint": f"{R_GIVEN} {R_FAMILY}",
                    "state": CODE,
                    "redirect_uri": "https://app.example/cb",
                },
            ),
            400,
        )
    return secrets


def _forbidden(secrets: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for value in PHI:
        for form in (
            value,
            value.lower(),
            quote(value),
            quote(value, safe=""),
            value.replace("-", ""),
        ):
            found[form] = form
    for secret in secrets:
        found[secret[:24]] = secret
    return found


async def test_scripted_session_leaves_no_phi_or_secret_in_the_logs(
    captured_logs: LogCapture, settings_factory: Any, harness_factory: Any
) -> None:
    # OAuth refuses to work for an http issuer (authlib: "OAuth 2 MUST utilize https")
    h = await harness_factory(settings_factory(issuer_url="https://testserver"))
    secrets = await _session(h)

    # The capture holds the session: an access line for each request, with its template.
    lines = captured_logs.lines()
    access = captured_logs.access()
    assert len(access) >= 40, len(access)
    seen = {(a["method"], a["route"], a["status"]) for a in access}
    for expected in (
        ("POST", "/fhir/{resource_type}", 201),
        ("GET", "/fhir/{resource_type}/{resource_id}", 200),
        ("PUT", "/fhir/{resource_type}/{resource_id}", 200),
        ("GET", "/fhir/{resource_type}", 200),
        ("POST", "/fhir/{resource_type}/_search", 200),
        ("GET", "/fhir/{resource_type}/{resource_id}", 404),
        ("GET", "<unmatched>", 404),
        ("POST", "/auth/login", 200),
        ("POST", "/auth/login", 401),
        ("POST", "/auth/refresh", 200),
    ):
        assert expected in seen, expected
    assert all(a["request_id"] and a["duration_ms"] >= 0 for a in access)
    assert len(lines) > len(access)  # other lines too (the app's, the libraries')

    text = captured_logs.text
    lowered = text.lower()
    leaks = sorted(
        name
        for name, needle in _forbidden(secrets).items()
        if needle in text or needle.lower() in lowered
    )
    assert leaks == [], leaks
    # nor a raw path or a query string of the session anywhere
    assert "?" not in "".join(str(a.get("route")) for a in access)
    assert "/fhir/Patient" not in text


# --- the scrubber -----------------------------------------------------------------------------

JWT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ1c2VyLTEiLCJleHAiOjE3MDB9."
    "c2lnbmF0dXJlLWJ5dGVzLWhlcmU"
)
OPAQUE = "q3Vt8Zk1Lw9XpR2mN7bYc4Hd6Fs0Gj5Ta_UeWo-Ai"  # secrets.token_urlsafe(32)-like


def test_scrubber_redacts_sensitive_keys_at_any_depth() -> None:
    event = {
        "event": "something_happened",
        "request_id": "0b6c2a4e-5f1d-4c3b-9a8e-7d6f5e4c3b2a",
        "status": 200,
        "password": "hunter2-Zyx",
        "headers": {"Authorization": "Bearer abc", "Cookie": "sid=abc", "X-Other": "kept"},
        "resource": {
            "resourceType": "Patient",
            "name": [{"family": P_FAMILY, "given": [P_GIVEN]}],
            "birthDate": P_BIRTH,
            "identifier": [{"value": P_MRN}],
            "telecom": [{"value": P_PHONE}],
            "contact": [{"address": {"city": R_CITY}, "Birth-Date": R_BIRTH}],
        },
        "batch": [{"refresh_token": OPAQUE}, ({"client_secret": "s3cr3t-Value"},)],
        "SSN": "123-45-6789",
        "mrn": R_MRN,
        "e_mail": "kept-key-but-value-masked@example.org",
    }
    out = logs.scrub(None, "info", event)
    rendered = json.dumps(out)
    for value in (
        "hunter2-Zyx",
        "Bearer abc",
        "sid=abc",
        P_FAMILY,
        P_GIVEN,
        P_BIRTH,
        P_MRN,
        P_PHONE,
        R_CITY,
        R_BIRTH,
        OPAQUE,
        "s3cr3t-Value",
        "123-45-6789",
        R_MRN,
        "kept-key-but-value-masked@example.org",
    ):
        assert value not in rendered, value
    # what is not sensitive stays readable
    assert out["event"] == "something_happened"
    assert out["request_id"] == "0b6c2a4e-5f1d-4c3b-9a8e-7d6f5e4c3b2a"
    assert out["status"] == 200
    assert out["headers"]["X-Other"] == "kept"
    assert out["resource"]["resourceType"] == "Patient"
    assert out["password"] == logs.REDACTED


def test_scrubber_masks_value_patterns_in_any_string() -> None:
    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    event = {
        "event": f"GET /fhir/Patient?family={P_FAMILY}&birthdate={P_BIRTH} HTTP/1.1",
        "note": f"token was {JWT} and then Bearer {OPAQUE}",
        "header": "DPoP eyJ0eXAiOiJkcG9wK2p3dCJ9.e30.sig",
        "form": "ignored-key-anyway",
        "message": f"grant_type=refresh_token&refresh_token={OPAQUE}&client_secret=abc123",
        "plain": f"opaque {OPAQUE} inside",
        "mail": f"write to {R_EMAIL} please",
        "nested": [[{"deep": [f"Bearer {OPAQUE}"]}]],
        "digest": digest,
        "family_hash": digest,
        "error_type": "ReplayCacheUnavailable",
        "user_id": "0b6c2a4e-5f1d-4c3b-9a8e-7d6f5e4c3b2a",
    }
    out = logs.scrub(None, "info", event)
    rendered = json.dumps(out)
    for value in (P_FAMILY, P_BIRTH, JWT, OPAQUE, "eyJ0eXAiOiJkcG9wK2p3dCJ9", "abc123", R_EMAIL):
        assert value not in rendered, value
    assert out["event"].startswith("GET /fhir/Patient?[redacted]")
    assert out["digest"] == digest and out["error_type"] == "ReplayCacheUnavailable"
    assert out["user_id"] == "0b6c2a4e-5f1d-4c3b-9a8e-7d6f5e4c3b2a"


def test_scrubber_fast_path_still_scrubs_what_is_not_a_plain_string() -> None:
    class Label(str):  # a str subclass (an enum's value, say) takes the long way
        pass

    class Opaque:
        def __str__(self) -> str:
            return f"Bearer {OPAQUE}"

    event = {
        "label": Label(f"Bearer {OPAQUE}"),
        "thing": Opaque(),
        "count": 3,
        "flag": True,
        "ratio": 0.5,
        "none": None,
        "raw": b"secret bytes",
    }
    out = logs.scrub(None, "info", event)
    assert OPAQUE not in json.dumps(out)
    assert out["raw"] == logs.REDACTED
    assert (out["count"], out["flag"], out["ratio"], out["none"]) == (3, True, 0.5, None)


def test_rendering_keeps_every_value_orjson_refuses() -> None:
    big = 2**70  # beyond orjson's 64-bit integers: rendered by `json` instead
    line = logs.render_json({"event": "big", "n": big, 1: "int key", "where": "Malmö"})
    assert json.loads(line) == {"event": "big", "n": big, "1": "int key", "where": "Malmö"}
    assert json.loads(logs.render_json({"event": "small", 2: "x"})) == {"event": "small", "2": "x"}


def _raise_with_phi() -> None:
    patient = {"name": P_FAMILY, "birthDate": P_BIRTH}  # a local the traceback must not show
    raise ValueError(f"cannot store {patient['name']} born {patient['birthDate']}")


def test_exceptions_are_rendered_by_type_and_frames_only(captured_logs: LogCapture) -> None:
    log = structlog.get_logger("carevault.test")
    try:
        _raise_with_phi()
    except ValueError:
        log.exception("store_failed")
    try:
        try:
            _raise_with_phi()
        except ValueError as err:
            raise RuntimeError(f"wrapped: {err}") from err
    except RuntimeError:
        logging.getLogger("sqlalchemy.some.module").error("flush_failed", exc_info=True)

    first, second = captured_logs.lines()
    assert first["event"] == "store_failed"
    (error,) = first["exception"]
    assert error["type"] == "builtins.ValueError"
    assert any("_raise_with_phi" in frame for frame in error["frames"])
    assert [e["type"] for e in second["exception"]] == [
        "builtins.RuntimeError",
        "builtins.ValueError",
    ]
    assert second["event"] == "flush_failed" and second["logger"] == "sqlalchemy.some.module"
    for value in (P_FAMILY, P_BIRTH, "cannot store", "wrapped"):
        assert value not in captured_logs.text, value


def test_library_loggers_and_warnings_go_through_the_same_formatter(
    captured_logs: LogCapture,
) -> None:
    logging.getLogger("httpcore.connection").warning(
        "HTTP Request: GET https://ehr.example/fhir/Patient?name=%s", P_FAMILY
    )
    logging.getLogger("authlib.oauth2").warning("Authorization: Bearer %s", OPAQUE)
    logging.getLogger("some.library").debug("debug lines are kept at DEBUG, scrubbed: %s", JWT)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"odd value token={OPAQUE}", UserWarning, stacklevel=1)
    # held at WARNING whatever the level: SQL with its parameters, bodies, URLs
    logging.getLogger("sqlalchemy.engine.Engine").info("INSERT ... ('%s',)", P_MRN)
    logging.getLogger("multipart.multipart").debug("field data %s", P_BIRTH)

    lines = captured_logs.lines()
    assert [line["logger"] for line in lines] == [
        "httpcore.connection",
        "authlib.oauth2",
        "some.library",
        "py.warnings",
    ]
    assert all(line["timestamp"] and line["level"] for line in lines)
    for value in (P_FAMILY, OPAQUE, JWT, P_MRN, P_BIRTH):
        assert value not in captured_logs.text, value


def test_a_plain_name_in_a_message_is_the_callers_fault_and_not_guessed() -> None:
    """The scrubber is a backstop: it cannot tell a name in free text (so callers never put
    one there); this pins that it does not pretend to."""
    out = logs.scrub(None, "info", {"event": f"patient {P_FAMILY} seen"})
    assert P_FAMILY in out["event"]


_WORKER = """
import logging, logging.config, sys
import structlog
from carevault.logs import uvicorn_log_config
logging.config.dictConfig(uvicorn_log_config("INFO"))
logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
access = logging.getLogger("uvicorn.access")
access.info('1.2.3.4 - "GET /fhir/Patient?name=%s HTTP/1.1" 200', sys.argv[1])
structlog.get_logger("carevault.x").info("evt", password=sys.argv[1], route="/healthz")
structlog.get_logger("carevault.x").debug("below the level")
"""


def test_uvicorn_log_config_sets_up_a_fresh_worker_process() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, P_FAMILY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line["event"]) for line in lines] == [
        ("uvicorn.error", "Started server process [42]"),
        ("carevault.x", "evt"),
    ]
    assert lines[1]["password"] == logs.REDACTED and lines[1]["route"] == "/healthz"
    assert P_FAMILY not in done.stderr and done.stdout == ""

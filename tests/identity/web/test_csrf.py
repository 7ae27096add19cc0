"""CSRF: every state-changing request that carries a live session cookie needs the session's
token (header or form field); bearer requests are untouched. On SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from carevault.edge.metrics import REQUESTS
from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.identity.web.conftest import assert_problem, with_cookie

FHIR = "application/fhir+json"
FORM = "application/x-www-form-urlencoded"
FAMILY = "Zwartkopfenwick"


def _patient(family: str = FAMILY) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "name": [{"family": family, "given": ["Ottoline"]}],
        "gender": "female",
        "birthDate": "1951-02-03",
    }


async def _rejections(services: Any) -> list[dict[str, Any]]:
    return [e["detail"] for e in await audit_documents(services.engine, "security.csrf_rejected")]


async def test_logout_needs_the_session_csrf_token(web: Any, browsers: Any) -> None:
    await web.add_user("pat.csrf", Role.patient)
    browser = await browsers(web.app)
    other = await browsers(web.app)
    await browser.login("pat.csrf")
    await other.login("pat.csrf")  # the same user's other session has its own token
    assert other.csrf != browser.csrf
    logout = "/auth/session/logout"
    for headers in (
        {},
        {"X-CSRF-Token": ""},
        {"X-CSRF-Token": "wrong"},
        {"X-CSRF-Token": other.csrf},
        {"X-CSRF-Token": browser.csrf + "x"},  # type: ignore[operator]
        {"X-CSRF-Token": "\u00e9t\u00e9".encode("latin-1")},  # not ASCII: no 500
    ):
        response = await browser.client.post(logout, headers=headers)
        body = assert_problem(response, 403)
        assert body["detail"] == "Missing or invalid CSRF token."
        assert response.headers.get("set-cookie") is None
    # nothing happened: the session is alive
    assert (await browser.info()).status_code == 200
    reasons = [d["reason"] for d in await _rejections(web.services)]
    assert reasons == ["missing", "missing", "mismatch", "mismatch", "mismatch", "mismatch"]
    out = await browser.logout()
    assert out.status_code == 204, out.text
    assert_problem(await browser.info(), 401)
    assert (await other.info()).status_code == 200


async def test_a_fhir_write_with_the_cookie_needs_the_token(web: Any, browsers: Any) -> None:
    await web.add_user("svc.portal", Role.service)
    browser = await browsers(web.app)
    await browser.login("svc.portal")
    fhir = {"content-type": FHIR}

    refused = await browser.client.post("/fhir/Patient", json=_patient(), headers=fhir)
    assert_problem(refused, 403)
    rejected = await _rejections(web.services)
    assert rejected[0]["reason"] == "missing" and rejected[0]["area"] == "fhir"
    # the audit trail shows the refused write as refused
    creates = await audit_documents(web.services.engine, "fhir.create")
    assert [(e["status"], e["outcome"]) for e in creates] == [(403, "deny")]

    created = await browser.client.post(
        "/fhir/Patient", json=_patient(), headers=browser.guarded(**fhir)
    )
    assert created.status_code == 201, created.text
    patient = created.json()
    # reads need no token
    read = await browser.client.get(f"/fhir/Patient/{patient['id']}")
    assert read.status_code == 200 and read.json()["name"][0]["family"] == FAMILY
    # every other unsafe method needs it too
    patient["gender"] = "other"
    put = await browser.client.put(f"/fhir/Patient/{patient['id']}", json=patient, headers=fhir)
    assert_problem(put, 403)
    assert_problem(await browser.client.delete(f"/fhir/Patient/{patient['id']}"), 403)
    unchanged = await browser.client.get(f"/fhir/Patient/{patient['id']}")
    assert unchanged.json()["gender"] == "female"
    deleted = await browser.client.delete(
        f"/fhir/Patient/{patient['id']}", headers=browser.guarded()
    )
    assert deleted.status_code in (200, 204), deleted.text


async def test_bearer_requests_are_not_subject_to_csrf(web: Any) -> None:
    await web.add_user("svc.api", Role.service)
    token = (await web.login("svc.api"))["access_token"]
    bearer = {"Authorization": f"Bearer {token}", "content-type": FHIR}
    created = await web.client.post("/fhir/Patient", json=_patient(), headers=bearer)
    assert created.status_code == 201, created.text
    search = await web.client.post(
        "/fhir/Patient/_search",
        content=f"family={FAMILY}".encode(),
        headers={**bearer, "content-type": FORM},
    )
    assert search.status_code == 200 and search.json()["total"] == 1
    deleted = await web.client.delete(
        f"/fhir/Patient/{created.json()['id']}", headers={"Authorization": bearer["Authorization"]}
    )
    assert deleted.status_code in (200, 204)
    out = await web.client.post("/auth/logout", headers={"Authorization": f"Bearer {token}"})
    assert out.status_code == 204
    assert await _rejections(web.services) == []


async def test_the_token_as_a_form_field_of_a_fhir_search(web: Any, browsers: Any) -> None:
    await web.add_user("svc.search", Role.service)
    browser = await browsers(web.app)
    await browser.login("svc.search")
    created = await browser.client.post(
        "/fhir/Patient", json=_patient(), headers=browser.guarded(**{"content-type": FHIR})
    )
    assert created.status_code == 201
    form = {"content-type": FORM}
    searches = REQUESTS.labels("POST", "/fhir/{resource_type}/_search", "200")
    before = searches._value.get()
    # the field is taken out before the search sees it (which refuses unknown parameters)
    found = await browser.client.post(
        "/fhir/Patient/_search",
        content=f"family={FAMILY}&csrf_token={browser.csrf}".encode(),
        headers=form,
    )
    assert found.status_code == 200, found.text
    # The body handed on is rewritten in the request's own scope: the matched route still
    # reaches the metrics and the access log outside (a copy made it `<unmatched>`).
    assert searches._value.get() == before + 1
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [created.json()["id"]]
    for body in (
        f"family={FAMILY}",
        f"family={FAMILY}&csrf_token=nope",
        f"csrf_token={browser.csrf}&csrf_token={browser.csrf}",  # one token, not two
        "%ff%fe=\xff",
    ):
        response = await browser.client.post(
            "/fhir/Patient/_search", content=body.encode("latin-1"), headers=form
        )
        assert_problem(response, 403)


async def test_a_dead_cookie_is_no_session_to_guard(web: Any, browsers: Any) -> None:
    """A request whose cookie authenticates nothing is judged on its other credentials."""
    await web.add_user("svc.mixed", Role.service)
    browser = await browsers(web.app)
    await browser.login("svc.mixed")
    dead = browser.cookie
    assert (await browser.logout()).status_code == 204
    token = (await web.login("svc.mixed"))["access_token"]
    response = await with_cookie(
        web.app,
        dead,  # type: ignore[arg-type]
        "POST",
        "/fhir/Patient",
        json=_patient(),
        headers={"Authorization": f"Bearer {token}", "content-type": FHIR},
    )
    assert response.status_code == 201, response.text
    # ... and a live one is guarded even next to a bearer token
    await browser.login("svc.mixed")
    live = await with_cookie(
        web.app,
        browser.cookie,  # type: ignore[arg-type]
        "POST",
        "/fhir/Patient",
        json=_patient(),
        headers={"Authorization": f"Bearer {token}", "content-type": FHIR},
    )
    assert_problem(live, 403)

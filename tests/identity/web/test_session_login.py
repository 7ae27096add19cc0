"""Browser session login, the cookie, session fixation, forged cookies and logout, on SQLite and
PostgreSQL."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import select

from carevault.db.tables import browser_sessions
from carevault.identity.roles import Role
from carevault.identity.web.sessions import COOKIE
from tests.audit.trail import audit_documents
from tests.identity.web.conftest import assert_problem, set_cookies, with_cookie


async def _rows(services: Any) -> list[Any]:
    async with services.engine.connect() as conn:
        return list((await conn.execute(select(browser_sessions))).all())


async def test_cookie_attributes_and_only_its_hash_is_stored(web: Any, browsers: Any) -> None:
    await web.add_user("pat.one", Role.patient)
    browser = await browsers(web.app)
    response = await browser.login("pat.one")
    assert response.json() == {"authenticated": True, "csrf_token": browser.csrf}
    assert response.headers["cache-control"] == "no-store"
    [cookie] = set_cookies(response)
    attributes = [part.strip() for part in cookie.split(";")]
    name, _, value = attributes[0].partition("=")
    assert name == COOKIE and len(value) == 43
    lowered = {a.lower() for a in attributes[1:]}
    assert {"httponly", "secure", "path=/", "samesite=strict"} <= lowered
    assert not any(a.startswith(("domain", "max-age", "expires")) for a in lowered)

    [row] = await _rows(web.services)
    assert row.token_hash == hashlib.sha256(value.encode()).hexdigest()
    assert value not in {str(v) for v in row}  # the cookie value itself is nowhere in the row
    assert row.state == "active" and row.amr == ["pwd"] and row.acr == "urn:carevault:pwd"
    assert row.csrf_token == browser.csrf and row.csrf_token != value

    info = await browser.info()
    assert info.status_code == 200, info.text
    body = info.json()
    assert body["id"] == row.id and body["state"] == "active"
    assert body["user"]["username"] == "pat.one" and body["user"]["roles"] == ["patient"]
    assert body["amr"] == ["pwd"] and body["acr"] == "urn:carevault:pwd"
    assert body["csrf_token"] == browser.csrf
    assert body["idle_expires_at"] == body["auth_time"] + 900
    assert body["absolute_expires_at"] == body["auth_time"] + 43200
    # the cookie authenticates the API like a token does
    me = await browser.client.get("/auth/me")
    assert me.status_code == 200 and me.json()["client_id"] == "carevault-web"
    started = await audit_documents(web.services.engine, "security.session_started")
    assert [e["detail"]["session"] for e in started] == [row.id]


async def test_wrong_password_is_the_generic_login_failure(web: Any, browsers: Any) -> None:
    await web.add_user("pat.two", Role.patient)
    browser = await browsers(web.app)
    refused = await browser.login("pat.two", "wrong-password-123", expect=401)
    api = await web.client.post(
        "/auth/login", json={"username": "pat.two", "password": "wrong-password-123"}
    )
    unknown = await browser.login("nobody.here", "wrong-password-123", expect=401)
    assert assert_problem(refused, 401) == api.json() == assert_problem(unknown, 401)
    assert set_cookies(refused) == [] and browser.cookie is None
    assert await _rows(web.services) == []
    assert_problem(await browser.info(), 401)


async def test_a_form_login_is_parsed_like_json(web: Any, browsers: Any) -> None:
    # The edge lets form bodies through to the session's login forms (and FHIR _search) only.
    await web.add_user("pat.form", Role.patient)
    browser = await browsers(web.app)
    form = {"content-type": "application/x-www-form-urlencoded"}
    ok = await browser.client.post(
        "/auth/session/login",
        content=b"username=pat.form&password=correct-Horse-battery-staple-91",
        headers=form,
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["authenticated"] is True and browser.cookie
    # this browser now has a session: its next POSTs carry the CSRF token (as a login form would)
    form = {**form, "X-CSRF-Token": ok.json()["csrf_token"]}
    assert_problem(
        await browser.client.post(
            "/auth/session/login", content=b"username=pat.form", headers=form
        ),
        422,
    )
    assert_problem(
        await browser.client.post(
            "/auth/session/login", content=b"username=%ff&password=x\xff", headers=form
        ),
        400,
    )
    guard = {"X-CSRF-Token": form["X-CSRF-Token"]}
    assert_problem(await browser.client.post("/auth/session/login", json=["x"], headers=guard), 422)
    # elsewhere a form body is still refused before any parsing
    assert_problem(await browser.client.post("/auth/logout-all", content=b"a=b", headers=form), 415)
    bad_json = await browser.client.post(
        "/auth/session/login",
        content=b'{"username": ',
        headers={"content-type": "application/json", **guard},
    )
    assert_problem(bad_json, 400)


async def test_an_account_that_must_enroll_gets_no_browser_session(
    web_mfa: Any, browsers: Any
) -> None:
    await web_mfa.add_user("dr.noenroll", Role.physician)
    browser = await browsers(web_mfa.app)
    body = assert_problem(await browser.login("dr.noenroll", expect=403), 403)
    assert "second factor" in body["detail"]
    assert browser.cookie is None and await _rows(web_mfa.services) == []
    refused = await audit_documents(web_mfa.services.engine, "security.session_refused")
    assert refused[0]["detail"]["reason"] == "enrollment_required"


async def test_a_cross_site_login_is_refused(web: Any, browsers: Any) -> None:
    await web.add_user("pat.csl", Role.patient)
    browser = await browsers(web.app)
    response = await browser.client.post(
        "/auth/session/login",
        json={"username": "pat.csl", "password": "correct-Horse-battery-staple-91"},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert_problem(response, 403)
    assert browser.cookie is None
    events = await audit_documents(web.services.engine, "security.csrf_rejected")
    assert events[0]["detail"]["reason"] == "cross_site_login"
    same_origin = await browser.client.post(
        "/auth/session/login",
        json={"username": "pat.csl", "password": "correct-Horse-battery-staple-91"},
        headers={"Sec-Fetch-Site": "same-origin"},
    )
    assert same_origin.status_code == 200


async def test_a_session_id_from_before_login_is_dead_after_it(web: Any, browsers: Any) -> None:
    """Session fixation: the attacker's own session id, planted in the victim's browser, is
    ended by the victim's login; the victim gets a new id the attacker never saw."""
    await web.add_user("mallory", Role.patient)
    await web.add_user("victim", Role.patient)
    attacker = await browsers(web.app)
    await attacker.login("mallory")
    planted, planted_csrf = attacker.cookie, attacker.csrf
    assert planted

    # the victim's browser carries the planted cookie (and the page its CSRF token)
    login = await with_cookie(
        web.app,
        planted,
        "POST",
        "/auth/session/login",
        json={"username": "victim", "password": "correct-Horse-battery-staple-91"},
        headers={"X-CSRF-Token": planted_csrf},
    )
    assert login.status_code == 200, login.text
    fresh = login.cookies.get(COOKIE)
    assert fresh and fresh != planted and login.json()["csrf_token"] != planted_csrf

    for path in ("/auth/session", "/auth/me", "/auth/sessions"):
        assert_problem(await with_cookie(web.app, planted, "GET", path), 401)
    assert_problem(await attacker.info(), 401)
    me = await with_cookie(web.app, fresh, "GET", "/auth/me")
    assert me.status_code == 200 and me.json()["username"] == "victim"
    [ended] = [r for r in await _rows(web.services) if r.state == "ended"]
    assert ended.ended_reason == "rotated" and ended.user_id != me.json()["id"]


async def test_forged_cookie_values_never_authenticate(web: Any, browsers: Any) -> None:
    await web.add_user("pat.forge", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.forge")
    [row] = await _rows(web.services)
    forged = [
        secrets.token_urlsafe(32),  # well-formed, unknown
        row.token_hash,  # what a database reader sees
        row.id,  # the public id
        row.csrf_token,  # the CSRF token
        browser.cookie + "A",  # type: ignore[operator]
        "",
        "x" * 5000,
        "%00%ff",
    ]
    for value in forged:
        for path in ("/auth/me", "/auth/session", "/fhir/Patient"):
            response = await with_cookie(web.app, value, "GET", path)
            assert_problem(response, 401)
        # no live session: nothing for CSRF to guard, and the route still refuses
        assert_problem(await with_cookie(web.app, value, "POST", "/auth/session/logout"), 401)
    assert (await browser.info()).status_code == 200  # the real one still works


async def test_logout_ends_the_session_and_clears_the_cookie(web: Any, browsers: Any) -> None:
    await web.add_user("pat.out", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.out")
    value = browser.cookie
    assert value
    out = await browser.logout()
    assert out.status_code == 204, out.text
    [cleared] = set_cookies(out)
    assert cleared.startswith(f'{COOKIE}="";') or cleared.startswith(f"{COOKIE}=;")
    assert "max-age=0" in cleared.lower()
    assert browser.cookie is None
    for path in ("/auth/me", "/auth/session"):
        assert_problem(await with_cookie(web.app, value, "GET", path), 401)
    [row] = await _rows(web.services)
    assert row.state == "ended" and row.ended_reason == "logout"
    ended = await audit_documents(web.services.engine, "security.session_ended")
    assert ended[0]["detail"] == {"session": row.id, "kind": "browser", "reason": "logout"}
    assert_problem(await browser.logout(), 401)  # nothing left to log out


async def test_a_disabled_user_loses_the_browser_session(web: Any, browsers: Any) -> None:
    user = await web.add_user("pat.dis", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.dis")
    await web.services.users.set_enabled(user.id, False)  # the row alone, no session revoked
    assert_problem(await browser.client.get("/auth/me"), 401)
    await web.services.users.set_enabled(user.id, True)
    assert_problem(await browser.client.get("/auth/me"), 401)  # it was ended, not paused

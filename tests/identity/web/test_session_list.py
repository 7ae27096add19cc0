"""`GET /auth/sessions` and `DELETE /auth/sessions/{id}`: a user's browser sessions and token
logins, listed with where they come from, and ended one at a time. On SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.identity.web.conftest import BROWSER_AGENT, assert_problem

CLI_AGENT = "carevault-cli/2.1"


async def _token_login(web: Any, username: str) -> dict[str, Any]:
    response = await web.client.post(
        "/auth/login",
        json={"username": username, "password": "correct-Horse-battery-staple-91"},
        headers={"User-Agent": CLI_AGENT},
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_list_shows_browser_sessions_and_token_logins(
    web: Any, browsers: Any, web_clock: Any
) -> None:
    await web.add_user("pat.list", Role.patient)
    await web.add_user("pat.else", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.list")
    web_clock.advance(120)
    tokens = await _token_login(web, "pat.list")
    await _token_login(web, "pat.else")  # someone else's: never listed
    other = await browsers(web.app)
    await other.login("pat.else")

    by_cookie = await browser.client.get("/auth/sessions")
    assert by_cookie.status_code == 200, by_cookie.text
    listed = by_cookie.json()["sessions"]
    assert [s["kind"] for s in listed] == ["token", "browser"]  # most recently seen first
    token, web_session = listed
    assert set(token) == {
        "id",
        "kind",
        "device",
        "created_at",
        "last_seen_at",
        "address",
        "acr",
        "current",
    }
    assert token["device"] == CLI_AGENT and web_session["device"] == BROWSER_AGENT
    assert token["address"] == web_session["address"] == "127.0.0.1"
    assert token["acr"] == web_session["acr"] == "urn:carevault:pwd"
    assert web_session["current"] is True and token["current"] is False
    assert web_session["id"] == (await browser.info()).json()["id"]
    assert token["created_at"] == web_session["created_at"] + 120

    by_token = await web.client.get("/auth/sessions", headers=_bearer(tokens["access_token"]))
    assert by_token.status_code == 200
    flags = {s["kind"]: s["current"] for s in by_token.json()["sessions"]}
    assert flags == {"token": True, "browser": False}
    assert_problem(await web.client.get("/auth/sessions"), 401)


async def test_ending_a_token_login_kills_its_access_token(web: Any, browsers: Any) -> None:
    await web.add_user("pat.kill", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.kill")
    tokens = await _token_login(web, "pat.kill")
    assert (await web.me(tokens["access_token"])).status_code == 200
    listed = (await browser.client.get("/auth/sessions")).json()["sessions"]
    [family] = [s["id"] for s in listed if s["kind"] == "token"]

    refused = await browser.client.delete(f"/auth/sessions/{family}")  # no CSRF token
    assert_problem(refused, 403)
    assert (await web.me(tokens["access_token"])).status_code == 200

    ended = await browser.client.delete(f"/auth/sessions/{family}", headers=browser.guarded())
    assert ended.status_code == 204, ended.text
    assert_problem(await web.me(tokens["access_token"]), 401)
    assert_problem(await web.refresh(tokens["refresh_token"]), 401)
    assert [s["kind"] for s in (await browser.client.get("/auth/sessions")).json()["sessions"]] == [
        "browser"
    ]
    assert_problem(
        await browser.client.delete(f"/auth/sessions/{family}", headers=browser.guarded()), 404
    )
    [event] = await audit_documents(web.services.engine, "security.session_ended")
    assert event["detail"]["kind"] == "token" and event["detail"]["session"] == family


async def test_ending_a_browser_session_from_a_token_login(web: Any, browsers: Any) -> None:
    await web.add_user("pat.remote", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.remote")
    session_id = (await browser.info()).json()["id"]
    tokens = await _token_login(web, "pat.remote")
    ended = await web.client.delete(
        f"/auth/sessions/{session_id}", headers=_bearer(tokens["access_token"])
    )
    assert ended.status_code == 204, ended.text
    assert_problem(await browser.client.get("/auth/me"), 401)
    assert_problem(await browser.info(), 401)
    assert (await web.me(tokens["access_token"])).status_code == 200  # only that one ended


async def test_ending_the_current_browser_session_clears_its_cookie(
    web: Any, browsers: Any
) -> None:
    await web.add_user("pat.self", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.self")
    session_id = (await browser.info()).json()["id"]
    ended = await browser.client.delete(f"/auth/sessions/{session_id}", headers=browser.guarded())
    assert ended.status_code == 204
    assert "max-age=0" in ended.headers["set-cookie"].lower() and browser.cookie is None


async def test_another_users_sessions_are_not_found(web: Any, browsers: Any) -> None:
    await web.add_user("pat.mine", Role.patient)
    await web.add_user("pat.theirs", Role.patient)
    mine = await browsers(web.app)
    await mine.login("pat.mine")
    theirs = await browsers(web.app)
    await theirs.login("pat.theirs")
    their_browser = (await theirs.info()).json()["id"]
    their_tokens = await _token_login(web, "pat.theirs")
    their_family = [
        s["id"]
        for s in (await theirs.client.get("/auth/sessions")).json()["sessions"]
        if s["kind"] == "token"
    ][0]
    for target in (their_browser, their_family, str(uuid.uuid4()), "not-a-uuid", "x" * 300):
        response = await mine.client.delete(f"/auth/sessions/{target}", headers=mine.guarded())
        assert_problem(response, 404)
    # theirs are untouched
    assert (await theirs.info()).status_code == 200
    assert (await web.me(their_tokens["access_token"])).status_code == 200
    assert await audit_documents(web.services.engine, "security.session_ended") == []

"""A browser login with TOTP: the password step leaves the session waiting for the factor, the
factor activates it, and each step gives a new session id. On SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.identity.mfa.conftest import code_at, enroll_totp
from tests.identity.web.conftest import assert_problem, with_cookie


async def test_totp_login_through_the_session_rotates_the_id_twice(
    web_mfa: Any, browsers: Any, web_clock: Any
) -> None:
    await web_mfa.add_user("dr.web", Role.physician)
    secret = (await enroll_totp(web_mfa, "dr.web", web_clock))["secret"]
    web_clock.advance(30)  # the enrollment used this step's code
    browser = await browsers(web_mfa.app)

    # an abandoned attempt left a waiting session in this browser: the next login replaces it
    await browser.login("dr.web")
    abandoned = browser.cookie
    first = await browser.login("dr.web")
    assert set(first.json()) == {"mfa_required", "methods", "csrf_token"}  # no mfa_token
    assert first.json()["mfa_required"] is True and "totp" in first.json()["methods"]
    pending = browser.cookie
    assert abandoned and pending and pending != abandoned
    assert_problem(await with_cookie(web_mfa.app, abandoned, "GET", "/auth/session"), 401)

    waiting = (await browser.info()).json()
    assert waiting["state"] == "mfa_pending" and waiting["user"] is None
    assert waiting["absolute_expires_at"] == int(web_clock()) + 300  # the mfa_token's life
    # a waiting session authenticates nothing
    assert_problem(await browser.client.get("/auth/me"), 401)
    assert_problem(await browser.client.get("/fhir/Patient"), 401)

    code = code_at(secret, web_clock())
    no_csrf = await browser.client.post("/auth/session/mfa", json={"method": "totp", "code": code})
    assert_problem(no_csrf, 403)
    wrong = "000000" if code != "000000" else "111111"
    assert_problem(await browser.mfa(wrong, expect=401), 401)
    assert browser.cookie == pending  # a wrong code changes nothing

    web_clock.advance(30)  # past the account's back-off after a failure
    done = await browser.mfa(code_at(secret, web_clock()))
    assert done.json() == {"authenticated": True, "csrf_token": browser.csrf}
    active = browser.cookie
    assert active and len({abandoned, pending, active}) == 3
    info = (await browser.info()).json()
    assert info["state"] == "active" and info["id"] != waiting["id"]
    assert info["amr"] == ["pwd", "otp"] and info["acr"] == "urn:carevault:mfa"
    assert info["auth_time"] == int(web_clock())
    assert info["user"]["username"] == "dr.web" and info["csrf_token"] != waiting["csrf_token"]
    me = await browser.client.get("/auth/me")
    assert me.status_code == 200 and me.json()["roles"] == ["physician"]

    # the ids from before the login completed are dead, for reading and for finishing it again
    web_clock.advance(30)  # a fresh code: the one used is spent
    for old in (abandoned, pending):
        assert_problem(await with_cookie(web_mfa.app, old, "GET", "/auth/session"), 401)
        again = await with_cookie(
            web_mfa.app,
            old,
            "POST",
            "/auth/session/mfa",
            json={"method": "totp", "code": code_at(secret, web_clock())},
            headers={"X-CSRF-Token": first.json()["csrf_token"]},
        )
        assert_problem(again, 401)
    started = await audit_documents(web_mfa.services.engine, "security.session_started")
    assert [(e["detail"]["amr"], e["detail"]["method"]) for e in started] == [
        (["pwd", "otp"], "totp")
    ]


async def test_a_waiting_session_expires_with_its_login_attempt(
    web_mfa: Any, browsers: Any, web_clock: Any
) -> None:
    await web_mfa.add_user("dr.slow", Role.physician)
    secret = (await enroll_totp(web_mfa, "dr.slow", web_clock))["secret"]
    browser = await browsers(web_mfa.app)
    await browser.login("dr.slow")
    web_clock.advance(301)
    late = await browser.mfa(code_at(secret, web_clock()), expect=401)
    assert_problem(late, 401)
    assert_problem(await browser.info(), 401)


async def test_a_recovery_code_finishes_a_session_login(
    web_mfa: Any, browsers: Any, web_clock: Any
) -> None:
    await web_mfa.add_user("dr.lost", Role.physician)
    codes = (await enroll_totp(web_mfa, "dr.lost", web_clock))["recovery_codes"]
    browser = await browsers(web_mfa.app)
    await browser.login("dr.lost")
    await browser.mfa(codes[0], method="recovery_code")
    info = (await browser.info()).json()
    assert info["state"] == "active" and info["acr"] == "urn:carevault:mfa"


async def test_a_security_key_finishes_a_session_login(
    web_mfa: Any, browsers: Any, web_clock: Any
) -> None:
    from tests.identity.mfa.authenticator import SoftAuthenticator
    from tests.identity.mfa.test_webauthn import enroll_key

    await web_mfa.add_user("dr.key", Role.physician)
    device = SoftAuthenticator()
    await enroll_key(web_mfa, "dr.key", device)
    web_clock.advance(60)
    browser = await browsers(web_mfa.app)
    first = await browser.login("dr.key")
    assert "webauthn" in first.json()["methods"]
    pending = browser.cookie
    # the options are a POST of the session: CSRF applies
    assert_problem(await browser.client.post("/auth/session/webauthn/options"), 403)
    options = await browser.client.post("/auth/session/webauthn/options", headers=browser.guarded())
    assert options.status_code == 200, options.text
    assertion = device.get(options.json())
    done = await browser.client.post(
        "/auth/session/mfa",
        json={"method": "webauthn", "credential": assertion},
        headers=browser.guarded(),
    )
    assert done.status_code == 200, done.text
    assert browser.cookie != pending
    info = (await browser.info()).json()
    assert info["state"] == "active" and info["acr"] == "urn:carevault:mfa:phr"
    assert set(info["amr"]) & {"hwk", "swk"}
    # the challenge was used up: the same assertion cannot finish another login
    second = await browsers(web_mfa.app)
    await second.login("dr.key")
    replay = await second.client.post(
        "/auth/session/mfa",
        json={"method": "webauthn", "credential": assertion},
        headers=second.guarded(),
    )
    assert_problem(replay, 401)


async def test_step_up_inside_a_session_rotates_it_and_keeps_its_deadline(
    web_mfa: Any, browsers: Any, web_clock: Any
) -> None:
    await web_mfa.add_user("dr.up", Role.physician)
    secret = (await enroll_totp(web_mfa, "dr.up", web_clock))["secret"]
    web_clock.advance(30)
    browser = await browsers(web_mfa.app)
    await browser.login("dr.up")
    await browser.mfa(code_at(secret, web_clock()))
    before = (await browser.info()).json()
    everything = "/fhir/Patient/no-such-patient/$everything"
    web_clock.advance(301)  # the login's second factor is too old for a high-risk read
    stale = await browser.client.get(everything)
    assert stale.status_code == 401
    assert 'error="insufficient_user_authentication"' in stale.headers["www-authenticate"]

    old_cookie = browser.cookie
    step = {"method": "totp", "code": code_at(secret, web_clock())}
    assert_problem(await browser.client.post("/auth/session/step-up", json=step), 403)  # CSRF
    wrong = {"method": "totp", "code": "000000" if step["code"] != "000000" else "111111"}
    refused = await browser.client.post(
        "/auth/session/step-up", json=wrong, headers=browser.guarded()
    )
    assert_problem(refused, 401)
    assert browser.cookie == old_cookie
    web_clock.advance(30)  # past the back-off, a new step
    step["code"] = code_at(secret, web_clock())
    done = await browser.client.post("/auth/session/step-up", json=step, headers=browser.guarded())
    assert done.status_code == 200, done.text
    browser.csrf = done.json()["csrf_token"]
    assert browser.cookie and browser.cookie != old_cookie
    assert_problem(await with_cookie(web_mfa.app, old_cookie, "GET", "/auth/session"), 401)
    after = (await browser.info()).json()
    assert after["auth_time"] == int(web_clock()) and after["id"] != before["id"]
    assert after["absolute_expires_at"] == before["absolute_expires_at"]  # no longer life
    assert (await browser.client.get(everything)).status_code == 404  # stepped up: decided
    events = await audit_documents(web_mfa.services.engine, "security.step_up")
    assert [e["outcome"] for e in events] == ["deny", "permit"]

"""Bad authorization and token requests: each gets its RFC error, nothing is issued, and the
browser is never sent to a redirect URI that is not registered."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.oauth.support import (
    AUTHORIZE_URL,
    BASE,
    FHIR_BASE,
    REDIRECT,
    OAuthWorld,
    pkce_pair,
    query_of,
)
from tests.oauth.test_grants import authorization_url, code_for, exchange


def _params(world: OAuthWorld, **changes: str | None) -> str:
    _, challenge = pkce_pair()
    params: dict[str, str] = {
        "response_type": "code",
        "client_id": world.clients["patient-app"].id,
        "redirect_uri": REDIRECT,
        "scope": "patient/Observation.rs",
        "state": "xyz",
        "aud": FHIR_BASE,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    for name, value in changes.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = value
    return AUTHORIZE_URL + "?" + str(httpx.QueryParams(params))


@pytest.mark.parametrize(
    "changes",
    [
        {"client_id": "cv_unknown"},
        {"client_id": None},
        {"redirect_uri": "https://evil.example/callback"},
        {"redirect_uri": REDIRECT + "/extra"},
        {"redirect_uri": REDIRECT.upper()},
    ],
    ids=["unknown-client", "no-client", "foreign-uri", "longer-uri", "case-changed-uri"],
)
async def test_untrusted_client_or_redirect_gets_a_page_never_a_redirect(
    world: OAuthWorld, changes: dict[str, str | None]
) -> None:
    response = await world.http.get(_params(world, **changes))
    assert response.status_code == 400
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert "evil.example" not in response.text
    assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),  # RFC 7636 §4.3: means plain
        ({"scope": "patient/Observation.rs system/Patient.r"}, "invalid_scope"),
        ({"scope": "user/*.cruds"}, "invalid_scope"),
        ({"scope": "nonsense"}, "invalid_scope"),
        ({"aud": "https://other.example/fhir"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
    ],
    ids=[
        "no-pkce",
        "plain",
        "no-method",
        "system-scope",
        "wider-scope",
        "unknown-scope",
        "aud",
        "implicit",
    ],
)
async def test_bad_request_of_a_known_client_is_redirected_with_its_error(
    world: OAuthWorld, changes: dict[str, str | None], error: str
) -> None:
    response = await world.http.get(_params(world, **changes))
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    params = query_of(location)
    assert params["error"] == error and params["state"] == "xyz" and params["iss"] == BASE
    assert "code" not in params


async def test_denied_consent_returns_access_denied(world: OAuthWorld) -> None:
    _, challenge = pkce_pair()
    async with world.browser() as browser:
        back = await world.authorize(
            browser,
            authorization_url(world.clients["patient-app"].id, "patient/Observation.rs", challenge),
            "patA",
            approve=False,
        )
    params = query_of(back.headers["location"])
    assert (
        params["error"] == "access_denied" and params["state"] == "st-123" and "code" not in params
    )


async def test_wrong_password_on_the_sign_in_page(world: OAuthWorld) -> None:
    async with world.browser() as browser:
        page = await browser.get(_params(world))
        from tests.oauth.support import hidden

        response = await browser.post(
            "/oauth/authorize/login",
            data={"request": hidden(page.text, "request"), "username": "patA", "password": "wrong"},
        )
        assert response.status_code == 401 and "Invalid username or password" in response.text
        assert "set-cookie" not in response.headers


async def test_token_request_errors(world: OAuthWorld) -> None:
    client_id = world.clients["patient-app"].id
    code, verifier = await code_for(world, "patient-app", "patA", "patient/Observation.rs")

    async def token(**changes: str | None) -> httpx.Response:
        data: dict[str, str] = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": client_id,
            "code_verifier": verifier,
        }
        for name, value in changes.items():
            if value is None:
                data.pop(name)
            else:
                data[name] = value
        return await world.http.post("/oauth/token", data=data)

    def error(response: httpx.Response, expected: str, status: int = 400) -> None:
        assert response.status_code == status, response.text
        assert response.json()["error"] == expected and "access_token" not in response.json()
        assert response.headers["cache-control"] == "no-store"

    error(await token(client_id="cv_unknown"), "invalid_client")
    error(await token(code_verifier=None), "invalid_request")
    error(await token(code_verifier="x" * 50), "invalid_grant")
    # the failed attempts burned the code: single use, whatever went wrong
    error(await token(), "invalid_grant")
    code, verifier = await code_for(world, "patient-app", "patA", "patient/Observation.rs")
    error(await token(redirect_uri=REDIRECT + "/other"), "invalid_grant")
    code, verifier = await code_for(world, "patient-app", "patA", "patient/Observation.rs")
    error(await token(grant_type="password"), "unsupported_grant_type")
    response = await world.http.post(
        "/oauth/token",
        content=b'{"grant_type": "authorization_code"}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code in (400, 415) and "access_token" not in response.text
    dup = await world.http.post(
        "/oauth/token",
        content=f"grant_type=authorization_code&code={code}&code={code}&client_id={client_id}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    error(dup, "invalid_request")


async def test_expired_code(world: OAuthWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    code, verifier = await code_for(world, "patient-app", "patA", "patient/Observation.rs")
    codes = world.app.state.oauth.server.codes
    real = codes._clock
    monkeypatch.setattr(codes, "_clock", lambda: real() + 61)
    response = await exchange(world, "patient-app", code, verifier)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


async def test_disabled_client_cannot_start_or_finish(world: OAuthWorld) -> None:
    code, verifier = await code_for(world, "patient-app", "patA", "patient/Observation.rs")
    await world.services.clients.disable(world.clients["patient-app"].id)
    response = await exchange(world, "patient-app", code, verifier)
    assert response.status_code in (400, 401) and response.json()["error"] == "invalid_client"
    page = await world.http.get(_params(world))
    assert page.status_code == 400 and "location" not in page.headers


async def test_second_factor_on_the_sign_in_pages(world: OAuthWorld) -> None:
    """An account with a factor signs in with it on the OAuth pages (the step needs the
    session's CSRF token), and the token's amr and acr say how the user signed in. (A wrong
    code counts on the account's login throttle: tests/identity/mfa/ covers that.)"""
    import pyotp

    from tests.oauth.support import hidden

    services = world.services
    user = await services.users.by_username("drA")
    enrollment = await services.mfa.totp.enroll(user.id, user.username)
    authenticator = pyotp.parse_uri(enrollment.otpauth_uri)
    now = services.clock()
    await services.mfa.totp.confirm(user.id, authenticator.at(now))
    verifier, challenge = pkce_pair()
    url = authorization_url(world.clients["clinic-app"].id, "openid user/Observation.rs", challenge)
    async with world.browser() as browser:
        page = await browser.get(url)
        from tests.conftest import STRONG_PASSWORD

        mfa = await browser.post(
            "/oauth/authorize/login",
            data={
                "request": hidden(page.text, "request"),
                "username": "drA",
                "password": STRONG_PASSWORD,
            },
        )
        assert mfa.status_code == 200 and 'action="/oauth/authorize/mfa"' in mfa.text
        fields = {
            "request": hidden(mfa.text, "request"),
            "csrf_token": hidden(mfa.text, "csrf_token"),
            "method": "totp",
        }
        # without the session's CSRF token the step is refused outright
        no_csrf = {k: v for k, v in fields.items() if k != "csrf_token"}
        forged = await browser.post(
            "/oauth/authorize/mfa", data={**no_csrf, "code": authenticator.at(now + 30)}
        )
        assert forged.status_code == 403
        ok = await browser.post(
            "/oauth/authorize/mfa", data={**fields, "code": authenticator.at(now + 30)}
        )
        assert ok.status_code == 303, ok.text
        consent = await browser.get(ok.headers["location"])
        back = await browser.post(
            "/oauth/authorize/consent",
            data={
                "request": hidden(consent.text, "request"),
                "csrf_token": hidden(consent.text, "csrf_token"),
                "decision": "approve",
            },
        )
    code = query_of(back.headers["location"])["code"]
    token = (await exchange(world, "clinic-app", code, verifier)).json()
    from tests.oauth.support import decode_json_segment

    claims = decode_json_segment(token["access_token"])
    assert set(claims["amr"]) == {"pwd", "otp"} and claims["acr"] == "urn:carevault:mfa"


async def test_account_that_must_enroll_gets_no_code(settings_factory: Any) -> None:
    import contextlib

    from tests.conftest import STRONG_PASSWORD
    from tests.oauth.support import build_oauth_world, hidden

    settings = settings_factory(issuer_url=BASE, mfa_required_roles=["physician"])
    async with contextlib.AsyncExitStack() as stack:
        world = await build_oauth_world(stack, settings)
        url = _params(world, client_id=world.clients["clinic-app"].id, scope="user/Observation.rs")
        async with world.browser() as browser:
            page = await browser.get(url)
            refused = await browser.post(
                "/oauth/authorize/login",
                data={
                    "request": hidden(page.text, "request"),
                    "username": "drA",
                    "password": STRONG_PASSWORD,
                },
            )
    assert refused.status_code == 403 and "enroll" in refused.text
    assert "location" not in refused.headers and "set-cookie" not in refused.headers


async def test_sign_in_with_a_portal_session_the_redirect_did_not_carry(world: OAuthWorld) -> None:
    """A user signed in to the portal follows an app's cross-site redirect: the browser keeps
    the SameSite=Strict cookie back, so the sign-in page knows no CSRF token; the sign-in post
    (same-origin, cookie attached) still works, replaces the session, and the new cookie is
    Strict again."""
    from tests.conftest import STRONG_PASSWORD
    from tests.oauth.support import hidden

    async with world.browser() as portal, world.browser() as navigation:
        signed_in = await portal.post(
            "/auth/session/login", json={"username": "patA", "password": STRONG_PASSWORD}
        )
        assert signed_in.status_code == 200
        page = await navigation.get(_params(world))  # the cross-site redirect: no cookie
        login = await portal.post(
            "/oauth/authorize/login",
            data={
                "request": hidden(page.text, "request"),
                "username": "patA",
                "password": STRONG_PASSWORD,
            },
        )
        assert login.status_code == 303, login.text
        assert "samesite=strict" in login.headers["set-cookie"].lower()
        # the old portal session ended with that login
        assert (
            await navigation.get("/auth/session", cookies=dict(signed_in.cookies))
        ).status_code == 401
        # a cross-site sign-in post is refused before any password check
        forged = await navigation.post(
            "/oauth/authorize/login",
            data={
                "request": hidden(page.text, "request"),
                "username": "patA",
                "password": STRONG_PASSWORD,
            },
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        assert forged.status_code == 403 and "set-cookie" not in forged.headers

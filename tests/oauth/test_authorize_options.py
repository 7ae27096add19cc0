"""Authorization request options: OpenID Connect `prompt` and `max_age`, request objects,
omitted and loopback redirect URIs, `online_access`, `system/` scopes in a user flow, and
when a remembered approval is used without asking."""

from __future__ import annotations

import httpx

from carevault.oauth.client_assertion import ASSERTION_TYPE
from tests.conftest import STRONG_PASSWORD
from tests.oauth.support import (
    AUTHORIZE_URL,
    BASE,
    FHIR_BASE,
    REDIRECT,
    OAuthWorld,
    ServiceKey,
    hidden,
    pkce_pair,
    query_of,
)
from tests.oauth.test_grants import authorization_url, code_for, exchange


async def sign_in(browser: httpx.AsyncClient, url: str, user: str = "patA") -> httpx.Response:
    """Sign in on the page `url` shows; the response is where the sign-in leads."""
    page = await browser.get(url)
    assert 'action="/oauth/authorize/login"' in page.text, page.text[:300]
    signed_in = await browser.post(
        "/oauth/authorize/login",
        data={
            "request": hidden(page.text, "request"),
            "username": user,
            "password": STRONG_PASSWORD,
        },
    )
    assert signed_in.status_code == 303, signed_in.text
    return await browser.get(signed_in.headers["location"])


async def test_prompt_none_login_and_consent(world: OAuthWorld) -> None:
    client_id = world.clients["patient-app"].id
    _, challenge = pkce_pair()
    scope = "patient/Observation.rs"
    async with world.browser() as browser:
        # not signed in: prompt=none answers login_required, with no page
        silent = await browser.get(authorization_url(client_id, scope, challenge, prompt="none"))
        assert (
            silent.status_code == 302
            and query_of(silent.headers["location"])["error"] == "login_required"
        )
        consent = await sign_in(browser, authorization_url(client_id, scope, challenge))
        assert "consent" in consent.text
        # signed in but never approved: consent_required
        silent = await browser.get(authorization_url(client_id, scope, challenge, prompt="none"))
        assert query_of(silent.headers["location"])["error"] == "consent_required"
        approved = await browser.post(
            "/oauth/authorize/consent",
            data={
                "request": hidden(consent.text, "request"),
                "csrf_token": hidden(consent.text, "csrf_token"),
                "decision": "approve",
            },
        )
        assert "code" in query_of(approved.headers["location"])
        # signed in and approved: prompt=none gets a code at once
        silent = await browser.get(authorization_url(client_id, scope, challenge, prompt="none"))
        assert "code" in query_of(silent.headers["location"])
        # prompt=consent asks again; prompt=login signs in again first, once
        again = await browser.get(authorization_url(client_id, scope, challenge, prompt="consent"))
        assert again.status_code == 200 and "consent" in again.text
        after_login = await sign_in(
            browser, authorization_url(client_id, scope, challenge, prompt="login")
        )
        assert after_login.status_code == 302 and "code" in query_of(
            after_login.headers["location"]
        )
        # max_age: a sign-in older than that signs in again
        clock = world.services.clock
        world.services.browser_sessions._clock = lambda: clock() + 120  # the session ages
        world.services.clock = lambda: clock() + 120
        page = await browser.get(authorization_url(client_id, scope, challenge, max_age="60"))
        assert 'action="/oauth/authorize/login"' in page.text


async def test_request_objects_are_refused(world: OAuthWorld) -> None:
    _, challenge = pkce_pair()
    url = authorization_url(
        world.clients["patient-app"].id, "patient/Observation.rs", challenge, request="e30.e30."
    )
    response = await world.http.get(url)
    assert query_of(response.headers["location"])["error"] == "request_not_supported"


async def test_redirect_uri_omitted_at_both_ends(world: OAuthWorld) -> None:
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": world.clients["patient-app"].id,
        "scope": "patient/Observation.rs",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "aud": FHIR_BASE,
    }
    async with world.browser() as browser:
        back = await world.authorize(
            browser, AUTHORIZE_URL + "?" + str(httpx.QueryParams(params)), "patA"
        )
    assert back.headers["location"].startswith(REDIRECT + "?")  # the one registered
    code = query_of(back.headers["location"])["code"]
    response = await world.http.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": params["client_id"],
            "code_verifier": verifier,
        },
    )
    assert response.status_code == 200, response.text


async def test_loopback_redirect_any_port_and_always_asked(world: OAuthWorld) -> None:
    """RFC 8252: a native app's loopback redirect may use any port, and since any local program
    could claim it, the user is asked every time (a remembered approval is not used)."""
    client, _ = await world.register(
        "native",
        auth_method="none",
        redirect_uris=["http://127.0.0.1/callback"],
        scope="patient/*.rs",
    )
    _, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client.id,
        "redirect_uri": "http://127.0.0.1:53211/callback",
        "scope": "patient/Observation.rs",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "aud": FHIR_BASE,
    }
    url = AUTHORIZE_URL + "?" + str(httpx.QueryParams(params))
    async with world.browser() as browser:
        back = await world.authorize(browser, url, "patA")
        assert back.headers["location"].startswith("http://127.0.0.1:53211/callback?code=")
        asked = await browser.get(url)
        assert asked.status_code == 200 and "consent" in asked.text
    other_host = (
        AUTHORIZE_URL
        + "?"
        + str(httpx.QueryParams({**params, "redirect_uri": "http://localhost:53211/callback"}))
    )
    assert (await world.http.get(other_host)).status_code == 400  # a page: never redirected


async def test_online_access_gets_no_refresh_token(world: OAuthWorld) -> None:
    code, verifier = await code_for(world, "clinic-app", "drA", "user/Observation.rs online_access")
    token = (await exchange(world, "clinic-app", code, verifier)).json()
    assert token["access_token"] and "refresh_token" not in token


async def test_system_scopes_only_through_client_credentials(world: OAuthWorld) -> None:
    key = ServiceKey()
    client, _ = await world.register(
        "both",
        auth_method="private_key_jwt",
        redirect_uris=[REDIRECT],
        grant_types=["authorization_code", "client_credentials"],
        scope="openid system/*.rs",
        jwks=key.jwks,
    )
    _, challenge = pkce_pair()
    response = await world.http.get(
        authorization_url(client.id, "openid system/Observation.rs", challenge)
    )
    assert query_of(response.headers["location"])["error"] == "invalid_scope"
    service = await world.http.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/Observation.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": key.assertion(client.id),
        },
    )
    assert service.status_code == 200, service.text
    assert BASE

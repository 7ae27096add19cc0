"""The grants end to end: a practitioner's launch with the patient picker, DPoP-bound tokens,
client credentials with private_key_jwt, refresh narrowing, code replay, revocation and
introspection. Every request goes over HTTP as a client would send it."""

from __future__ import annotations

import time
from typing import Any

import httpx

from carevault.oauth.client_assertion import ASSERTION_TYPE
from tests.oauth.support import (
    AUTHORIZE_URL,
    BASE,
    FHIR_BASE,
    REDIRECT,
    TOKEN_URL,
    DpopKey,
    OAuthWorld,
    ServiceKey,
    hidden,
    pkce_pair,
    query_of,
)


def authorization_url(client_id: str, scope: str, challenge: str, **extra: str) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "scope": scope,
        "state": "st-123",
        "aud": FHIR_BASE,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }
    return AUTHORIZE_URL + "?" + str(httpx.QueryParams(params))


async def code_for(
    world: OAuthWorld, client: str, user: str, scope: str, **extra: str
) -> tuple[str, str]:
    verifier, challenge = pkce_pair()
    async with world.browser() as browser:
        back = await world.authorize(
            browser, authorization_url(world.clients[client].id, scope, challenge, **extra), user
        )
    assert back.status_code == 302, back.text
    return query_of(back.headers["location"])["code"], verifier


async def exchange(
    world: OAuthWorld, client: str, code: str, verifier: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await world.http.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": world.clients[client].id,
            "code_verifier": verifier,
        },
        headers=headers or {},
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_practitioner_picks_a_patient_in_their_care(world: OAuthWorld) -> None:
    scope = "launch/patient patient/Observation.rs openid fhirUser"
    verifier, challenge = pkce_pair()
    url = authorization_url(world.clients["clinic-app"].id, scope, challenge)
    async with world.browser() as browser:
        page = await browser.get(url)
        form = {"request": hidden(page.text, "request"), "username": "drA", "password": ""}
        from tests.conftest import STRONG_PASSWORD

        form["password"] = STRONG_PASSWORD
        signed_in = await browser.post("/oauth/authorize/login", data=form)
        consent = await browser.get(signed_in.headers["location"])
        # the picker offers the patient in the practitioner's care team, and only them
        assert world.ids["A"] in consent.text and world.ids["B"] not in consent.text
        assert "PatientA" in consent.text
        fields = {
            "request": hidden(consent.text, "request"),
            "csrf_token": hidden(consent.text, "csrf_token"),
            "decision": "approve",
        }
        # a patient outside their care is refused, even typed in by hand
        refused = await browser.post(
            "/oauth/authorize/consent", data={**fields, "patient": world.ids["B"]}
        )
        assert refused.status_code == 200 and "Choose a patient" in refused.text
        back = await browser.post(
            "/oauth/authorize/consent", data={**fields, "patient": world.ids["A"]}
        )
    code = query_of(back.headers["location"])["code"]
    token = (await exchange(world, "clinic-app", code, verifier)).json()
    assert token["patient"] == world.ids["A"]
    assert "refresh_token" not in token  # neither offline_access nor online_access asked
    headers = bearer(token["access_token"])
    assert (
        await world.http.get(f"/fhir/Observation/{world.ids['obsA']}", headers=headers)
    ).status_code == 200
    # patient/ scopes reach the chosen patient only, whatever the role could see
    assert (
        await world.http.get(f"/fhir/Observation/{world.ids['obsB']}", headers=headers)
    ).status_code == 404


async def test_dpop_bound_tokens(world: OAuthWorld) -> None:
    scope = "launch/patient patient/Observation.rs offline_access"
    code, verifier = await code_for(world, "patient-app", "patA", scope)
    key = DpopKey()
    response = await exchange(
        world, "patient-app", code, verifier, {"DPoP": key.proof("POST", TOKEN_URL)}
    )
    assert response.status_code == 200, response.text
    token = response.json()
    assert token["token_type"] == "DPoP" and response.headers["DPoP-Nonce"]
    access = token["access_token"]
    url = f"{FHIR_BASE}/Observation/{world.ids['obsA']}"

    ok = await world.http.get(
        url,
        headers={
            "Authorization": f"DPoP {access}",
            "DPoP": key.proof("GET", url, access_token=access),
        },
    )
    assert ok.status_code == 200, ok.text

    def refused(response: httpx.Response, error: str) -> None:
        assert response.status_code == 401, response.text
        assert f'error="{error}"' in response.headers["www-authenticate"]

    # a stolen bound token alone is useless: as a bearer token, or with another key's proof
    refused(await world.http.get(url, headers=bearer(access)), "invalid_token")
    thief = DpopKey()
    refused(
        await world.http.get(
            url,
            headers={
                "Authorization": f"DPoP {access}",
                "DPoP": thief.proof("GET", url, access_token=access),
            },
        ),
        "invalid_dpop_proof",
    )
    # a proof replayed, made for another method or URL, or without ath
    proof = key.proof("GET", url, access_token=access)
    assert (
        await world.http.get(url, headers={"Authorization": f"DPoP {access}", "DPoP": proof})
    ).status_code == 200
    refused(
        await world.http.get(url, headers={"Authorization": f"DPoP {access}", "DPoP": proof}),
        "invalid_dpop_proof",
    )
    refused(
        await world.http.get(
            url,
            headers={
                "Authorization": f"DPoP {access}",
                "DPoP": key.proof("POST", url, access_token=access),
            },
        ),
        "invalid_dpop_proof",
    )
    refused(
        await world.http.get(
            url,
            headers={
                "Authorization": f"DPoP {access}",
                "DPoP": key.proof("GET", f"{FHIR_BASE}/Patient", access_token=access),
            },
        ),
        "invalid_dpop_proof",
    )
    refused(
        await world.http.get(
            url, headers={"Authorization": f"DPoP {access}", "DPoP": key.proof("GET", url)}
        ),
        "invalid_dpop_proof",
    )
    # the public client's refresh token is bound to its key too (RFC 9449 §5)
    refresh = {
        "grant_type": "refresh_token",
        "refresh_token": token["refresh_token"],
        "client_id": world.clients["patient-app"].id,
    }
    stolen = await world.http.post(
        "/oauth/token", data=refresh, headers={"DPoP": thief.proof("POST", TOKEN_URL)}
    )
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    renewed = await world.http.post(
        "/oauth/token", data=refresh, headers={"DPoP": key.proof("POST", TOKEN_URL)}
    )
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["token_type"] == "DPoP"


async def test_dpop_proof_errors_at_the_token_endpoint(
    world: OAuthWorld, settings_factory: Any
) -> None:
    key = DpopKey()
    for proof in (
        key.proof("GET", TOKEN_URL),  # wrong method
        key.proof("POST", f"{BASE}/oauth/revoke"),  # wrong URL
        key.proof("POST", TOKEN_URL, iat=int(time.time()) - 3600),  # stale
        "not-a-jwt",
    ):
        code, verifier = await code_for(world, "patient-app", "patA", "patient/Observation.rs")
        response = await exchange(world, "patient-app", code, verifier, {"DPoP": proof})
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_dpop_proof"
        # nothing was issued: the code is still good for a proper request
        assert (await exchange(world, "patient-app", code, verifier)).status_code == 200
    # a replayed proof
    code, verifier = await code_for(world, "patient-app", "patA", "patient/Observation.rs")
    proof = key.proof("POST", TOKEN_URL)
    assert (
        await exchange(world, "patient-app", code, verifier, {"DPoP": proof})
    ).status_code == 200
    code, verifier = await code_for(world, "patient-app", "patA", "patient/Observation.rs")
    replay = await exchange(world, "patient-app", code, verifier, {"DPoP": proof})
    assert replay.json()["error"] == "invalid_dpop_proof"


async def test_client_that_requires_dpop(world: OAuthWorld) -> None:
    client, _ = await world.register(
        "dpop-app",
        auth_method="none",
        redirect_uris=[REDIRECT],
        scope="patient/*.rs",
        require_dpop=True,
    )
    code, verifier = await code_for(world, "dpop-app", "patA", "patient/Observation.rs")
    plain = await exchange(world, "dpop-app", code, verifier)
    assert plain.status_code == 400 and plain.json()["error"] == "invalid_dpop_proof"
    assert "access_token" not in plain.json()


async def test_client_credentials_with_private_key_jwt(world: OAuthWorld) -> None:
    key = ServiceKey()
    client, secret = await world.register(
        "lab-feed",
        auth_method="private_key_jwt",
        redirect_uris=[],
        scope="system/Observation.rs system/Patient.r",
        jwks=key.jwks,
    )
    assert secret is None

    def request(assertion: str, scope: str = "system/Observation.rs") -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }

    good = key.assertion(client.id)
    response = await world.http.post("/oauth/token", data=request(good))
    assert response.status_code == 200, response.text
    token = response.json()
    assert token["scope"] == "system/Observation.rs" and "refresh_token" not in token
    read = await world.http.get(
        f"/fhir/Observation/{world.ids['obsB']}", headers=bearer(token["access_token"])
    )
    assert read.status_code == 200, read.text
    # system/Observation.rs does not reach Condition
    assert (
        await world.http.get("/fhir/Condition", headers=bearer(token["access_token"]))
    ).status_code == 403

    def invalid_client(response: httpx.Response) -> None:
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "invalid_client"
        assert "access_token" not in response.json()

    invalid_client(await world.http.post("/oauth/token", data=request(good)))  # replayed jti
    invalid_client(
        await world.http.post(
            "/oauth/token", data=request(key.assertion(client.id, aud=f"{BASE}/other"))
        )
    )
    invalid_client(
        await world.http.post(
            "/oauth/token", data=request(key.assertion(client.id, exp=int(time.time()) - 60))
        )
    )
    invalid_client(
        await world.http.post(
            "/oauth/token", data=request(key.assertion(client.id, exp=int(time.time()) + 3600))
        )
    )
    invalid_client(
        await world.http.post("/oauth/token", data=request(ServiceKey().assertion(client.id)))
    )  # another key
    invalid_client(
        await world.http.post("/oauth/token", data=request(key.assertion(client.id, sub="someone")))
    )
    scoped = await world.http.post(
        "/oauth/token", data=request(key.assertion(client.id), "system/Condition.rs")
    )
    assert scoped.status_code == 400 and scoped.json()["error"] == "invalid_scope"
    # a public client may not use client credentials at all
    public = await world.http.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": world.clients["patient-app"].id,
            "scope": "system/Observation.rs",
        },
    )
    assert public.status_code in (400, 401) and "access_token" not in public.json()


async def test_client_secret_basic_only_when_registered(world: OAuthWorld) -> None:
    client, secret = await world.register(
        "legacy", auth_method="client_secret_basic", redirect_uris=[], scope="system/Patient.r"
    )
    assert secret
    data = {"grant_type": "client_credentials", "scope": "system/Patient.r"}
    ok = await world.http.post("/oauth/token", data=data, auth=(client.id, secret))
    assert ok.status_code == 200, ok.text
    wrong = await world.http.post("/oauth/token", data=data, auth=(client.id, secret + "x"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    # the private_key_jwt client cannot fall back to a secret
    key = ServiceKey()
    jwt_client, _ = await world.register(
        "jwt-only",
        auth_method="private_key_jwt",
        redirect_uris=[],
        scope="system/Patient.r",
        jwks=key.jwks,
    )
    assert (
        await world.http.post("/oauth/token", data=data, auth=(jwt_client.id, "guess"))
    ).status_code == 401


async def test_refresh_narrows_never_widens(world: OAuthWorld) -> None:
    scope = "launch/patient patient/Observation.rs offline_access"
    code, verifier = await code_for(world, "patient-app", "patA", scope)
    token = (await exchange(world, "patient-app", code, verifier)).json()
    client_id = world.clients["patient-app"].id

    def refresh(token_value: str, scope: str | None = None) -> dict[str, str]:
        data = {"grant_type": "refresh_token", "refresh_token": token_value, "client_id": client_id}
        if scope is not None:
            data["scope"] = scope
        return data

    wider = await world.http.post(
        "/oauth/token", data=refresh(token["refresh_token"], "patient/Observation.cruds")
    )
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    other_type = await world.http.post(
        "/oauth/token", data=refresh(token["refresh_token"], "patient/Condition.rs")
    )
    assert other_type.json()["error"] == "invalid_scope"
    # the refused requests did not burn the refresh token; a narrower one is granted
    narrower = await world.http.post(
        "/oauth/token", data=refresh(token["refresh_token"], "patient/Observation.read")
    )
    assert narrower.status_code == 200, narrower.text
    body = narrower.json()
    assert body["scope"] == "patient/Observation.rs"  # the v1 name, as its v2 equivalent
    search = await world.http.get("/fhir/Observation", headers=bearer(body["access_token"]))
    assert search.status_code == 200
    # rotation: the old refresh token is dead, and presenting it again ends the session
    replay = await world.http.post("/oauth/token", data=refresh(token["refresh_token"]))
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    after = await world.http.post("/oauth/token", data=refresh(body["refresh_token"]))
    assert after.status_code == 400
    assert (
        await world.http.get("/fhir/Observation", headers=bearer(body["access_token"]))
    ).status_code == 401


async def test_code_is_single_use_and_its_reuse_revokes_the_tokens(world: OAuthWorld) -> None:
    code, verifier = await code_for(
        world, "patient-app", "patA", "patient/Observation.rs offline_access"
    )
    first = await exchange(world, "patient-app", code, verifier)
    assert first.status_code == 200
    access = first.json()["access_token"]
    url = f"/fhir/Observation/{world.ids['obsA']}"
    assert (await world.http.get(url, headers=bearer(access))).status_code == 200
    again = await exchange(world, "patient-app", code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert (await world.http.get(url, headers=bearer(access))).status_code == 401
    refresh = await world.http.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": first.json()["refresh_token"],
            "client_id": world.clients["patient-app"].id,
        },
    )
    assert refresh.status_code == 400


async def test_revocation_and_introspection(world: OAuthWorld) -> None:
    key = ServiceKey()
    client, _ = await world.register(
        "portal",
        auth_method="private_key_jwt",
        redirect_uris=[REDIRECT],
        scope="openid user/*.rs offline_access",
        jwks=key.jwks,
    )
    verifier, challenge = pkce_pair()
    async with world.browser() as browser:
        back = await world.authorize(
            browser,
            authorization_url(client.id, "openid user/Observation.rs offline_access", challenge),
            "drA",
        )
    code = query_of(back.headers["location"])["code"]

    def authenticated(**data: str) -> dict[str, str]:
        return {
            **data,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": key.assertion(client.id),
        }

    token = (
        await world.http.post(
            "/oauth/token",
            data=authenticated(
                grant_type="authorization_code",
                code=code,
                redirect_uri=REDIRECT,
                code_verifier=verifier,
            ),
        )
    ).json()
    active = (
        await world.http.post("/oauth/introspect", data=authenticated(token=token["access_token"]))
    ).json()
    assert active["active"] is True and active["client_id"] == client.id and active["scope"]
    # a public client may not introspect; another client learns nothing about this token
    public = await world.http.post(
        "/oauth/introspect",
        data={"token": token["access_token"], "client_id": world.clients["patient-app"].id},
    )
    assert public.status_code == 401 or public.json().get("active") is not True
    assert (
        await world.http.post("/oauth/revoke", data=authenticated(token=token["refresh_token"]))
    ).status_code == 200
    for value in (token["access_token"], token["refresh_token"]):
        assert (
            await world.http.post("/oauth/introspect", data=authenticated(token=value))
        ).json() == {"active": False}
    assert (
        await world.http.get("/fhir/Observation", headers=bearer(token["access_token"]))
    ).status_code == 401
    # another client cannot revoke the token, and is told nothing about it
    victim_code, victim_verifier = await code_for(
        world, "patient-app", "patA", "patient/Observation.rs offline_access"
    )
    victim = (await exchange(world, "patient-app", victim_code, victim_verifier)).json()
    foreign = await world.http.post(
        "/oauth/revoke", data=authenticated(token=victim["refresh_token"])
    )
    assert foreign.status_code == 200
    assert (
        await world.http.get("/fhir/Observation", headers=bearer(victim["access_token"]))
    ).status_code == 200
    # an unknown token: 200 for revocation, inactive for introspection
    assert (
        await world.http.post("/oauth/revoke", data=authenticated(token="nonsense"))
    ).status_code == 200
    assert (
        await world.http.post("/oauth/introspect", data=authenticated(token="nonsense"))
    ).json() == {"active": False}


async def test_withdrawing_consent_revokes_the_apps_tokens(world: OAuthWorld) -> None:
    scope = "launch/patient patient/Observation.rs offline_access"
    code, verifier = await code_for(world, "patient-app", "patA", scope)
    token = (await exchange(world, "patient-app", code, verifier)).json()
    app_headers = bearer(token["access_token"])
    url = f"/fhir/Observation/{world.ids['obsA']}"
    assert (await world.http.get(url, headers=app_headers)).status_code == 200
    from tests.conftest import STRONG_PASSWORD

    # the remembered approval: the next authorization skips the consent page
    _, challenge = pkce_pair()
    async with world.browser() as browser:
        page = await browser.get(
            authorization_url(world.clients["patient-app"].id, scope, challenge)
        )
        signed_in = await browser.post(
            "/oauth/authorize/login",
            data={
                "request": hidden(page.text, "request"),
                "username": "patA",
                "password": STRONG_PASSWORD,
            },
        )
        straight = await browser.get(signed_in.headers["location"])
    assert straight.status_code == 302 and "code" in query_of(straight.headers["location"])

    own = (
        await world.http.post("/auth/login", json={"username": "patA", "password": STRONG_PASSWORD})
    ).json()
    listed = (await world.http.get("/oauth/consents", headers=bearer(own["access_token"]))).json()
    assert [c["client_name"] for c in listed] == ["patient-app"]
    client_id = world.clients["patient-app"].id
    # the app's own token cannot withdraw approvals
    assert (
        await world.http.delete(f"/oauth/consents/{client_id}", headers=app_headers)
    ).status_code == 403
    gone = await world.http.delete(
        f"/oauth/consents/{client_id}", headers=bearer(own["access_token"])
    )
    assert gone.status_code == 204
    assert (await world.http.get(url, headers=app_headers)).status_code == 401
    refreshed = await world.http.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token["refresh_token"],
            "client_id": client_id,
        },
    )
    assert refreshed.status_code == 400
    assert (
        await world.http.get("/oauth/consents", headers=bearer(own["access_token"]))
    ).json() == []
    again = await world.http.delete(
        f"/oauth/consents/{client_id}", headers=bearer(own["access_token"])
    )
    assert again.status_code == 404


async def test_server_nonce_required(settings_factory: Any) -> None:
    """CAREVAULT_DPOP_NONCE_REQUIRED: a proof without the server's nonce gets use_dpop_nonce
    and the nonce to use (RFC 9449 §8 at the token endpoint, §9 at the resource server)."""
    import contextlib

    from tests.oauth.support import build_oauth_world

    settings = settings_factory(issuer_url=BASE, refresh_grace_seconds=0, dpop_nonce_required=True)
    async with contextlib.AsyncExitStack() as stack:
        world = await build_oauth_world(stack, settings)
        key = DpopKey()
        code, verifier = await code_for(world, "patient-app", "patA", "patient/Observation.rs")
        first = await exchange(
            world, "patient-app", code, verifier, {"DPoP": key.proof("POST", TOKEN_URL)}
        )
        assert first.status_code == 400 and first.json()["error"] == "use_dpop_nonce"
        nonce = first.headers["DPoP-Nonce"]
        forged = await exchange(
            world,
            "patient-app",
            code,
            verifier,
            {"DPoP": key.proof("POST", TOKEN_URL, nonce="forged-nonce-value")},
        )
        assert forged.json()["error"] == "use_dpop_nonce"
        ok = await exchange(
            world,
            "patient-app",
            code,
            verifier,
            {"DPoP": key.proof("POST", TOKEN_URL, nonce=nonce)},
        )
        assert ok.status_code == 200, ok.text
        access = ok.json()["access_token"]
        url = f"{FHIR_BASE}/Observation/{world.ids['obsA']}"
        auth = {"Authorization": f"DPoP {access}"}
        refused = await world.http.get(
            url, headers={**auth, "DPoP": key.proof("GET", url, access_token=access)}
        )
        assert refused.status_code == 401
        assert 'error="use_dpop_nonce"' in refused.headers["www-authenticate"]
        nonce = refused.headers["DPoP-Nonce"]
        read = await world.http.get(
            url, headers={**auth, "DPoP": key.proof("GET", url, access_token=access, nonce=nonce)}
        )
        assert read.status_code == 200, read.text

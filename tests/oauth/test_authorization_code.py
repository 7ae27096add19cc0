"""The authorization code flow with PKCE, driven by authlib's OAuth client (an independent
implementation of the client side), then a FHIR read with the token it got."""

from __future__ import annotations

import jwt as pyjwt
from authlib.integrations.httpx_client import AsyncOAuth2Client

from tests.oauth.support import (
    AUTHORIZE_URL,
    BASE,
    FHIR_BASE,
    REDIRECT,
    TOKEN_URL,
    OAuthWorld,
    pkce_pair,
    query_of,
)


def oauth_client(world: OAuthWorld, client_id: str, scope: str) -> AsyncOAuth2Client:
    return AsyncOAuth2Client(
        client_id=client_id,
        redirect_uri=REDIRECT,
        scope=scope,
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
        transport=world.transport(),
        base_url=BASE,
    )


async def test_patient_app_full_flow_then_fhir_read(world: OAuthWorld) -> None:
    client_id = world.clients["patient-app"].id
    scope = "openid fhirUser launch/patient offline_access patient/Observation.rs patient/Patient.r"
    verifier, _ = pkce_pair()
    async with oauth_client(world, client_id, scope) as app, world.browser() as browser:
        url, state = app.create_authorization_url(
            AUTHORIZE_URL, code_verifier=verifier, aud=FHIR_BASE, nonce="n-0S6_WzA2Mj"
        )
        back = await world.authorize(browser, url, "patA")
        assert back.status_code == 302, back.text
        location = back.headers["location"]
        assert location.startswith(REDIRECT + "?")
        params = query_of(location)
        assert params["state"] == state and params["iss"] == BASE  # RFC 9207
        token = await app.fetch_token(
            TOKEN_URL, authorization_response=location, code_verifier=verifier
        )
        assert token["token_type"] == "Bearer"
        assert token["patient"] == world.ids["A"]
        assert set(token["scope"].split()) == {
            "openid",
            "fhirUser",
            "launch/patient",
            "offline_access",
            "patient/Observation.rs",
            "patient/Patient.r",
        }
        assert token["refresh_token"] and token["id_token"]

        # the token reads the patient's own records through FHIR, and nothing else
        own = await app.get(f"/fhir/Observation/{world.ids['obsA']}")
        assert own.status_code == 200, own.text
        other = await app.get(f"/fhir/Observation/{world.ids['obsB']}")
        assert other.status_code == 404
        # patient/Patient.r grants no search, and no Condition at all
        assert (await app.get("/fhir/Condition")).status_code == 403

    # the id_token, verified by PyJWT against the published JWKS
    jwks = (await world.http.get("/.well-known/jwks.json")).json()
    header = pyjwt.get_unverified_header(token["id_token"])
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    claims = pyjwt.decode(
        token["id_token"],
        key=pyjwt.PyJWK(key).key,
        algorithms=[header["alg"]],
        audience=client_id,
        issuer=BASE,
    )
    assert claims["nonce"] == "n-0S6_WzA2Mj"
    assert claims["fhirUser"] == f"{FHIR_BASE}/Patient/{world.ids['A']}"
    assert claims["amr"] == ["pwd"] and claims["acr"] and claims["auth_time"] <= claims["iat"]
    assert claims["at_hash"]
    userinfo = await world.http.get(
        "/oauth/userinfo", headers={"Authorization": f"Bearer {token['access_token']}"}
    )
    assert userinfo.json() == {
        "sub": claims["sub"],
        "fhirUser": f"{FHIR_BASE}/Patient/{world.ids['A']}",
    }

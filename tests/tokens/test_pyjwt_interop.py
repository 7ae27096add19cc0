"""Relying-party interop: an access token from POST /auth/login verifies with PyJWT alone.

PyJWT gets nothing but the published JWKS (fetched over the app's HTTP interface; PyJWKClient
cannot reach an in-process ASGI app) and the documented issuer and audience. It is a second,
independent JOSE implementation, so this also checks that carevault's tokens and JWKS are
standard rather than merely self-consistent.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import jwt
import pytest

from carevault.identity.roles import Role

USERNAME = "dr.interop.zed"
REQUIRED_CLAIMS = [
    "iss",
    "sub",
    "aud",
    "exp",
    "iat",
    "nbf",
    "jti",
    "client_id",
    "scope",
    "roles",
    "auth_time",
    "amr",
]
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def _b64url_json(segment: str) -> tuple[bytes, dict[str, Any]]:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    return raw, json.loads(raw)


async def _check_interop(harness: Any, alg: str) -> None:
    settings = harness.services.settings
    assert settings.signing_algorithm == alg
    await harness.add_user(USERNAME, Role.nurse)
    token = (await harness.login(USERNAME))["access_token"]

    response = await harness.client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    cache_control = response.headers.get("cache-control", "")
    assert "max-age=" in cache_control, cache_control
    jwks = response.json()
    assert set(jwks) == {"keys"}
    assert len(jwks["keys"]) >= 2  # current + pre-published next
    for key in jwks["keys"]:
        assert key.get("kid"), key
        assert key["use"] == "sig"
        assert key["alg"] == alg
        assert not PRIVATE_MEMBERS & set(key), f"private members published: {set(key)}"
    assert len({k["kid"] for k in jwks["keys"]}) == len(jwks["keys"])

    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg
    assert header["typ"] == "at+jwt"
    assert set(header) == {"alg", "kid", "typ"}

    key_set = jwt.PyJWKSet.from_dict(jwks)
    kids = [k.key_id for k in key_set.keys]
    assert header["kid"] in kids
    signing_key = key_set[header["kid"]]
    claims = jwt.decode(
        token,
        key=signing_key,
        algorithms=[alg],
        audience=settings.audience,
        issuer=settings.issuer,
        options={
            "require": REQUIRED_CLAIMS,
            "verify_exp": True,
            "verify_nbf": True,
            "verify_iat": True,
        },
    )
    for name in REQUIRED_CLAIMS:
        assert name in claims, name
    assert claims["iss"] == "http://testserver"
    assert claims["aud"] == settings.audience
    assert claims["roles"] == ["nurse"]
    assert claims["amr"] == ["pwd"]
    assert claims["exp"] - claims["iat"] == settings.access_token_ttl_seconds
    assert claims["nbf"] == claims["iat"]
    assert str(uuid.UUID(claims["sub"])) == claims["sub"]
    assert claims["jti"] and claims["sid"] and claims["client_id"] and claims["scope"]

    # No username anywhere in the token: not in a claim, not in the header.
    header_raw, _ = _b64url_json(token.split(".")[0])
    payload_raw, _ = _b64url_json(token.split(".")[1])
    for raw in (header_raw, payload_raw):
        assert USERNAME.encode() not in raw
        assert b"interop" not in raw.lower()

    # PyJWT is not rubber-stamping: the other published key, a wrong audience and a wrong
    # issuer are all refused.
    other_kids = [kid for kid in kids if kid != header["kid"]]
    assert other_kids
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            token,
            key=key_set[other_kids[0]],
            algorithms=[alg],
            audience=settings.audience,
            issuer=settings.issuer,
        )
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(
            token,
            key=signing_key,
            algorithms=[alg],
            audience="someone-else",
            issuer=settings.issuer,
        )
    with pytest.raises(jwt.InvalidIssuerError):
        jwt.decode(
            token,
            key=signing_key,
            algorithms=[alg],
            audience=settings.audience,
            issuer="https://elsewhere.example",
        )

    # What PyJWT read is what carevault itself accepts for this token.
    me = await harness.client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    assert me.json()["id"] == claims["sub"]
    assert me.json()["username"] == USERNAME


async def test_es256_tokens_verify_with_pyjwt(harness: Any) -> None:
    await _check_interop(harness, "ES256")


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated:joserfc.errors.SecurityWarning")
@pytest.mark.parametrize("alg", ["EdDSA", "PS256", "RS256"])
async def test_other_signing_algorithms_verify_with_pyjwt(
    settings_factory: Any, harness_factory: Any, alg: str
) -> None:
    harness = await harness_factory(settings_factory(signing_algorithm=alg))
    await _check_interop(harness, alg)

"""Discovery documents: RFC 8414, OpenID Connect discovery, SMART configuration."""

from __future__ import annotations

from authlib.oauth2.rfc8414 import AuthorizationServerMetadata

from tests.oauth.support import BASE, OAuthWorld


async def test_discovery_documents_agree(world: OAuthWorld) -> None:
    rfc8414 = (await world.http.get("/.well-known/oauth-authorization-server")).json()
    AuthorizationServerMetadata(rfc8414).validate()
    assert rfc8414["issuer"] == BASE
    assert rfc8414["code_challenge_methods_supported"] == ["S256"]
    assert rfc8414["authorization_response_iss_parameter_supported"] is True
    assert "ES256" in rfc8414["dpop_signing_alg_values_supported"]
    oidc = (await world.http.get("/.well-known/openid-configuration")).json()
    assert oidc["jwks_uri"] == f"{BASE}/.well-known/jwks.json"
    assert oidc["userinfo_endpoint"] == f"{BASE}/oauth/userinfo"
    assert oidc["id_token_signing_alg_values_supported"]
    assert "public" in oidc["subject_types_supported"]
    smart = (await world.http.get("/.well-known/smart-configuration")).json()
    for name in (
        "authorization_endpoint",
        "token_endpoint",
        "revocation_endpoint",
        "introspection_endpoint",
    ):
        assert smart[name] == rfc8414[name] == oidc[name]
    assert "launch/patient" in smart["scopes_supported"]
    assert "plain" not in smart["code_challenge_methods_supported"]

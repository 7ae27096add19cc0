"""Discovery documents: RFC 8414 authorization server metadata, OpenID Connect discovery, SMART
App Launch's `/.well-known/smart-configuration`, and the SMART `security` block of the FHIR
CapabilityStatement (some clients, fhirclient among them, discover the server only there).

The RFC 8414 document is checked by authlib's `AuthorizationServerMetadata` before it is served,
so a document that breaks the RFC fails the tests rather than a client."""

from __future__ import annotations

from typing import Any

from authlib.common.security import is_secure_transport
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from carevault.access.scopes import LETTERS
from carevault.oauth.client_assertion import ALGORITHMS as ASSERTION_ALGORITHMS
from carevault.oauth.scopes import CONTEXT_SCOPES

router = APIRouter(tags=["oauth"])
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
_CACHE = {"Cache-Control": "public, max-age=300"}
_LETTERS = "".join(LETTERS.values())


def endpoints(issuer: str) -> dict[str, str]:
    return {
        "authorization_endpoint": f"{issuer}/oauth/authorize",
        "token_endpoint": f"{issuer}/oauth/token",
        "revocation_endpoint": f"{issuer}/oauth/revoke",
        "introspection_endpoint": f"{issuer}/oauth/introspect",
        "userinfo_endpoint": f"{issuer}/oauth/userinfo",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
    }


def scopes_supported() -> list[str]:
    resource = [f"{context}/*.{_LETTERS}" for context in ("patient", "user", "system")]
    return sorted(CONTEXT_SCOPES) + resource


def authorization_server_metadata(request: Request) -> dict[str, Any]:
    services = request.app.state.services
    issuer = services.settings.issuer
    algorithms = list(request.app.state.oauth.dpop.algorithms)
    auth_methods = ["private_key_jwt", "client_secret_basic", "none"]
    body: dict[str, Any] = {
        "issuer": issuer,
        **endpoints(issuer),
        "scopes_supported": scopes_supported(),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "revocation_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "introspection_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_methods_supported": auth_methods[:2],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
        "dpop_signing_alg_values_supported": algorithms,
    }
    AuthorizationServerMetadata(body).validate()
    return body


@router.get("/.well-known/oauth-authorization-server")
async def oauth_metadata(request: Request) -> JSONResponse:
    """RFC 8414."""
    return JSONResponse(authorization_server_metadata(request), headers=_CACHE)


@router.get("/.well-known/openid-configuration")
async def openid_configuration(request: Request) -> JSONResponse:
    """OpenID Connect Discovery 1.0."""
    key_alg = request.app.state.services.keyring.current.alg
    body = authorization_server_metadata(request)
    body.update(
        {
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [key_alg],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "nonce",
                "at_hash",
                "amr",
                "acr",
                "fhirUser",
            ],
        }
    )
    return JSONResponse(body, headers=_CACHE)


@router.get("/.well-known/smart-configuration")
async def smart_configuration(request: Request) -> JSONResponse:
    """SMART App Launch 2.x §2.2 (well-known discovery)."""
    issuer = request.app.state.services.settings.issuer
    urls = endpoints(issuer)
    body = {
        "issuer": issuer,
        "jwks_uri": urls["jwks_uri"],
        "authorization_endpoint": urls["authorization_endpoint"],
        "token_endpoint": urls["token_endpoint"],
        "revocation_endpoint": urls["revocation_endpoint"],
        "introspection_endpoint": urls["introspection_endpoint"],
        "userinfo_endpoint": urls["userinfo_endpoint"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "none"],
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "scopes_supported": scopes_supported(),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "dpop_signing_alg_values_supported": list(request.app.state.oauth.dpop.algorithms),
        "capabilities": [
            "launch-standalone",
            "client-public",
            "client-confidential-asymmetric",
            "client-confidential-symmetric",
            "context-standalone-patient",
            "permission-offline",
            "permission-patient",
            "permission-user",
            "permission-v1",
            "permission-v2",
            "sso-openid-connect",
        ],
    }
    return JSONResponse(body, headers=_CACHE)


def fhir_security(issuer: str, cors: bool) -> dict[str, Any]:
    """`CapabilityStatement.rest[0].security` for a SMART server (none is offered when the
    issuer is not https: see `oauth.provider.oauth_offered`)."""
    if not is_secure_transport(issuer + "/"):
        return {"cors": cors, "description": "Bearer tokens from POST /auth/login."}
    urls = endpoints(issuer)
    return {
        "cors": cors,
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                        "display": "SMART-on-FHIR",
                    }
                ],
                "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
            }
        ],
        "extension": [
            {
                "url": OAUTH_URIS,
                "extension": [
                    {"url": "authorize", "valueUri": urls["authorization_endpoint"]},
                    {"url": "token", "valueUri": urls["token_endpoint"]},
                    {"url": "revoke", "valueUri": urls["revocation_endpoint"]},
                    {"url": "introspect", "valueUri": urls["introspection_endpoint"]},
                ],
            }
        ],
        "description": (
            "SMART App Launch 2 (OAuth 2.0 with PKCE, OpenID Connect, DPoP): discovery at "
            "/.well-known/smart-configuration. Tokens from /auth/login are accepted as well."
        ),
    }

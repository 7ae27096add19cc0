"""The OpenAPI document: every status an operation can answer, and its security scheme.

FastAPI's generated document knows the success answer and the request's shape; it does not
know what the edge answers before a route runs (413, 415, 429, a CSRF 403), what the
authenticate step answers (401, 403, 503), nor that carevault's errors are RFC 9457 problem
documents (FHIR's, OperationOutcomes; OAuth's protocol endpoints, RFC 6749 §5.2 JSON).
`install` replaces `app.openapi` with a function that post-processes FastAPI's document once
(and again only if the routes change):

- each operation's error statuses, from what it is (rules below), from the statuses its route
  declares (`responses=`), and from `HANDLER_STATUSES` for what its handler raises; each with
  the media types it is really answered in;
- protection is read from the route's dependencies (does it depend on the functions of
  tokens/bearer.py?), not kept in a list, so a new route documents itself; the few routes that
  read the browser session cookie themselves are `SESSION_ROUTES`;
- `components.securitySchemes` and a `security` requirement on every operation (`[]` for
  the public ones).

Rules (which status, for which operation; the edge's refusals are OperationOutcomes under
/fhir, problem documents elsewhere; authentication's and CSRF's are problem documents):

| status | operations | answered by |
| --- | --- | --- |
| 400 | a JSON body (malformed JSON), or the handler's (table) | problems.py / handler |
| 401 | protected: no, a bad, expired or revoked credential | tokens/bearer.py |
| 403 | protected (token not for this API, enrollment-only); unsafe methods (CSRF) | bearer, csrf |
| 404 | a path parameter names something; FHIR: an unknown type or id | handler |
| 400, 408, 413, 415 | POST, PUT, PATCH (JSON shape, slow body, size, type) | limits.py |
| 422 | a body or a parameter FastAPI validates, or the handler's (table) | problems.py |
| 429 | every operation but the health checks (rate_limit.EXEMPT_PATHS) | rate_limit.py |
| 431 | every operation (request headers too large) | limits.py |
| 503 | where rate limits apply (their store cannot be asked), protected (revocation cannot be |
|     | checked), audited paths (/fhir, /audit: fail closed) | |

405 is not declared: an operation of this document never answers it; a method the path does
not have does (an operation that is not in the document). 500 is not declared either: no
input may produce one (the one deliberate 500, a stored FHIR record that does not decrypt, is
an integrity alarm, not an answer to input).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute

from carevault.edge.problems import PROBLEM_JSON
from carevault.edge.rate_limit import EXEMPT_PATHS as RATE_LIMIT_EXEMPT
from carevault.identity.web.sessions import COOKIE as SESSION_COOKIE
from carevault.oauth.metadata import scopes_supported
from carevault.tokens import bearer

FHIR_JSON = "application/fhir+json"
JSON = "application/json"
HTML = "text/html"
FORM = "application/x-www-form-urlencoded"

WRITE_METHODS = frozenset({"post", "put", "patch"})
UNSAFE_METHODS = WRITE_METHODS | {"delete"}

# The authenticate step's functions: a route that depends on one is protected.
FIRST_PARTY_AUTH: frozenset[Callable[..., Any]] = frozenset(
    {bearer.authenticate, bearer.authenticate_enrollment}
)
RESOURCE_AUTH: frozenset[Callable[..., Any]] = frozenset({bearer.authenticate_resource})

# Routes that read the browser session cookie in the handler (bearer.session_principal or the
# session store) and answer 401 without a live one.
SESSION_ROUTES = frozenset(
    {
        ("get", "/auth/session"),
        ("post", "/auth/session/logout"),
        ("post", "/auth/session/step-up"),
    }
)

# OAuth's own endpoints (RFC 6749 §5.2, RFC 7009, RFC 7662): errors are `{"error": ...}`
# JSON, and the client authenticates as OAuth says, not with a security scheme.
OAUTH_PROTOCOL = frozenset({"/oauth/token", "/oauth/revoke", "/oauth/introspect"})
# The authorization endpoint and its sign-in pages: HTML for people, redirects to clients.
OAUTH_PAGES = re.compile(r"^/oauth/authorize(/|$)")

# FHIR content outside /fhir: the audit trail as AuditEvents (its errors are problems).
FHIR_ELSEWHERE = frozenset({"/audit/AuditEvent"})

# What each handler raises beyond the rules, by (method, path): status -> media types
# (None: the operation's own error media type). Kept honest by tests/e2e/test_fuzz.py, which
# fails on any status an operation answers and does not declare.
_FHIR_READ = {403: None, 404: None, 410: None}
HANDLER_STATUSES: dict[tuple[str, str], dict[int, tuple[str, ...] | None]] = {
    ("post", "/auth/login"): {429: None},
    ("post", "/auth/mfa/verify"): {429: None},
    ("post", "/auth/step-up"): {429: None},
    ("post", "/auth/mfa/totp/confirm"): {429: None},
    ("post", "/auth/webauthn/register/verify"): {409: None},
    ("post", "/auth/webauthn/login/options"): {409: None},
    ("post", "/auth/webauthn/login/verify"): {409: None, 429: None},
    ("post", "/auth/webauthn/step-up/options"): {409: None},
    ("post", "/auth/session/login"): {400: None, 401: None, 422: None},
    ("post", "/auth/session/mfa"): {400: None, 401: None, 422: None},
    ("post", "/auth/session/step-up"): {400: None, 422: None},
    ("post", "/auth/session/webauthn/options"): {401: None},
    ("post", "/access/break-glass"): {404: None, 422: None},
    ("get", "/access/break-glass"): {400: None},
    ("get", "/audit"): {400: None},
    ("get", "/audit/AuditEvent"): {400: None},
    ("get", "/audit/checkpoint"): {404: None},
    ("get", "/audit/proof/inclusion"): {400: None, 404: None},
    ("get", "/audit/proof/consistency"): {400: None, 404: None},
    ("get", "/oauth/authorize"): {302: (), 403: None},
    ("post", "/oauth/authorize/login"): {302: (), 303: (), 403: None},
    ("post", "/oauth/authorize/mfa"): {302: (), 303: ()},
    ("post", "/oauth/authorize/consent"): {302: (), 403: None},
    ("post", "/oauth/token"): {503: (PROBLEM_JSON,)},
    ("post", "/oauth/revoke"): {503: (PROBLEM_JSON,)},
    ("post", "/oauth/introspect"): {400: None, 503: (PROBLEM_JSON,)},
    ("get", "/fhir/Patient/{patient_id}/$access-report"): {400: None, 403: None, 404: None},
    ("post", "/fhir"): {400: None, 403: None, 404: None, 409: None, 412: None, 422: None},
    ("get", "/fhir/Patient/{resource_id}/$everything"): {400: None, 401: None, **_FHIR_READ},
    ("get", "/fhir/{resource_type}/{resource_id}/_history"): _FHIR_READ,
    ("get", "/fhir/{resource_type}/_history"): {403: None, 404: None},
    ("get", "/fhir/{resource_type}"): {400: None, 403: None, 404: None},
    ("post", "/fhir/{resource_type}/_search"): {400: None, 403: None, 404: None, 415: None},
    ("post", "/fhir/{resource_type}"): {
        200: None,
        400: None,
        403: None,
        404: None,
        409: None,
        410: None,
        412: None,
        413: None,
        422: None,
    },
    ("get", "/fhir/{resource_type}/{resource_id}"): _FHIR_READ,
    ("get", "/fhir/{resource_type}/{resource_id}/_history/{version}"): _FHIR_READ,
    ("put", "/fhir/{resource_type}/{resource_id}"): {
        201: None,
        400: None,
        409: None,
        412: None,
        413: None,
        422: None,
        428: None,
        **_FHIR_READ,
    },
    ("delete", "/fhir/Patient/{resource_id}"): {
        200: None,
        400: None,
        401: None,
        409: None,
        412: None,
        428: None,
        **_FHIR_READ,
    },
    ("delete", "/fhir/{resource_type}/{resource_id}"): {
        409: None,
        412: None,
        428: None,
        **_FHIR_READ,
    },
}

REASONS = {
    200: "OK",
    201: "Created",
    302: "Found: a redirect to the client",
    303: "See Other: back to the authorization request",
    400: "Bad Request",
    401: "Unauthorized: no, a bad, expired or revoked credential; or a step-up is required",
    403: "Forbidden: not allowed, a token not for this API, or a missing CSRF token",
    404: "Not Found (or not visible to the caller)",
    408: "Request Timeout: the body did not arrive in time",
    409: "Conflict",
    410: "Gone: deleted",
    412: "Precondition Failed (If-Match or If-None-Exist)",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content: the request is not valid",
    428: "Precondition Required: this server requires If-Match",
    429: "Too Many Requests: rate limited (see Retry-After)",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable: the audit trail or the revocation list cannot be reached",
}

SCHEMAS: dict[str, dict[str, Any]] = {
    # RFC 9457 §3: the members, and extensions (`errors`: where a request was invalid).
    "Problem": {
        "title": "Problem",
        "type": "object",
        "description": "RFC 9457 problem details; extension members may follow.",
        "properties": {
            "type": {"type": "string", "format": "uri-reference", "default": "about:blank"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 100, "maximum": 599},
            "detail": {"type": "string"},
            "instance": {"type": "string", "format": "uri-reference"},
            "errors": {"type": "array", "items": {"type": "object"}},
        },
        "required": ["type", "title", "status"],
        "additionalProperties": True,
    },
    # FHIR R4 OperationOutcome, as far as a client needs it.
    "OperationOutcome": {
        "title": "OperationOutcome",
        "type": "object",
        "properties": {
            "resourceType": {"const": "OperationOutcome"},
            "issue": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "severity": {"enum": ["fatal", "error", "warning", "information"]},
                        "code": {"type": "string"},
                        "diagnostics": {"type": "string"},
                    },
                    "required": ["severity", "code"],
                },
            },
        },
        "required": ["resourceType", "issue"],
    },
    "FhirResource": {
        "title": "FhirResource",
        "type": "object",
        "description": "A FHIR R4 resource (a Bundle for searches, history and batches).",
        "properties": {"resourceType": {"type": "string"}},
        "required": ["resourceType"],
    },
    # RFC 6749 §5.2
    "OAuthError": {
        "title": "OAuthError",
        "type": "object",
        "properties": {
            "error": {"type": "string"},
            "error_description": {"type": "string"},
            "error_uri": {"type": "string"},
        },
        "required": ["error"],
    },
}

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "HTTPBearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An access token (RFC 9068 JWT) from POST /auth/login or /oauth/token.",
    },
    "DPoP": {
        "type": "http",
        "scheme": "DPoP",
        "description": (
            "RFC 9449: a DPoP-bound access token as `Authorization: DPoP <token>`, with a "
            "`DPoP` header holding a proof for this request signed by the bound key."
        ),
    },
    "session": {
        "type": "apiKey",
        "in": "cookie",
        "name": SESSION_COOKIE,
        "description": (
            "The web portal's session (POST /auth/session/login). Unsafe methods also need "
            "the session's CSRF token as `X-CSRF-Token`."
        ),
    },
}


def _oauth2_scheme() -> dict[str, Any]:
    scopes = {scope: scope for scope in scopes_supported()}
    return {
        "type": "oauth2",
        "description": "OAuth 2.0 / SMART App Launch (PKCE S256 required).",
        "flows": {
            "authorizationCode": {
                "authorizationUrl": "/oauth/authorize",
                "tokenUrl": "/oauth/token",
                "refreshUrl": "/oauth/token",
                "scopes": scopes,
            },
            "clientCredentials": {"tokenUrl": "/oauth/token", "scopes": scopes},
        },
    }


FIRST_PARTY_SECURITY = [{"HTTPBearer": []}, {"session": []}]
RESOURCE_SECURITY = [{"HTTPBearer": []}, {"DPoP": []}, {"OAuth2": []}, {"session": []}]
SESSION_SECURITY = [{"session": []}]


@dataclass
class Operation:
    """What the document needs to know about one operation (method, path) of the app."""

    method: str
    path: str
    security: list[dict[str, list[str]]] = field(default_factory=list)
    json_body: bool = False
    validated: bool = False
    path_params: bool = False

    @property
    def protected(self) -> bool:
        return bool(self.security)

    @property
    def fhir(self) -> bool:
        return self.path == "/fhir" or self.path.startswith("/fhir/")

    @property
    def audited(self) -> bool:
        return self.fhir or self.path == "/audit" or self.path.startswith("/audit/")

    @property
    def error_media(self) -> tuple[str, ...]:
        """The media type the handler's own errors come in."""
        if self.fhir:
            return (FHIR_JSON,)
        if self.path in OAUTH_PROTOCOL:
            return (JSON,)
        if OAUTH_PAGES.match(self.path):
            return (HTML, PROBLEM_JSON)
        return (PROBLEM_JSON,)

    @property
    def success_media(self) -> str | None:
        if self.fhir or self.path in FHIR_ELSEWHERE:
            return FHIR_JSON
        if OAUTH_PAGES.match(self.path):
            return HTML
        return None  # FastAPI's own

    def statuses(self, declared: dict[str, Any]) -> dict[int, tuple[str, ...]]:
        """Every error status (and success statuses FastAPI does not know) -> media types."""
        own = self.error_media
        found: dict[int, set[str]] = {}

        def add(status: int, media: tuple[str, ...] | None) -> None:
            found.setdefault(status, set()).update(own if media is None else media)

        problem = (PROBLEM_JSON,)
        # The edge's own refusals (limits.py, rate_limit.py): OperationOutcomes under /fhir.
        edge = (FHIR_JSON,) if self.fhir else problem
        if self.path not in RATE_LIMIT_EXEMPT:
            add(429, edge)
            add(503, edge)  # the rate-limit store cannot be asked: fail closed
        add(431, edge)  # request headers over max_header_bytes
        for key, response in declared.items():
            if key.isdigit() and int(key) >= 400 and not _fastapi_422(response):
                add(int(key), None)
        if self.protected:
            add(401, problem)
            add(403, problem)
            add(503, problem)
        if self.method in UNSAFE_METHODS:
            add(403, problem)  # CSRF: a live session cookie without its token
        if self.method in WRITE_METHODS:
            add(400, edge)  # JSON nested too deeply, a list too long
            add(408, edge)  # the body did not arrive in time
            add(413, edge)
            add(415, edge)
        if self.validated:
            add(422, problem)
        if self.json_body:
            add(400, problem)
        if self.path_params:
            add(404, None)
        if self.audited:
            add(503, own if self.fhir else problem)
        for status, media in HANDLER_STATUSES.get((self.method, self.path), {}).items():
            if status < 400:
                found.setdefault(status, set()).update(media if media is not None else ())
                if media is None and self.success_media:
                    found[status].add(self.success_media)
            else:
                add(status, media)
        return {status: tuple(sorted(media)) for status, media in sorted(found.items())}


def _fastapi_422(response: dict[str, Any]) -> bool:
    """The 422 FastAPI adds to any operation with parameters, whether or not they can fail."""
    return "#/components/schemas/HTTPValidationError" in json.dumps(response)


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _calls(sub)


def operations(app: FastAPI) -> dict[tuple[str, str], Operation]:
    """Every documented operation of `app`, by (method, path)."""
    found: dict[tuple[str, str], Operation] = {}
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        path: str = route.path_format
        dependant: Dependant = route.dependant
        calls = set(_calls(dependant))
        # A str path parameter matches whatever the path holds: only the others can fail.
        params = [
            p
            for p in get_flat_params(dependant)
            if p not in dependant.path_params or p.field_info.annotation is not str
        ]
        for method in route.methods or ():
            method = method.lower()
            if calls & FIRST_PARTY_AUTH:
                security = FIRST_PARTY_SECURITY
            elif calls & RESOURCE_AUTH:
                security = RESOURCE_SECURITY
            elif (method, path) in SESSION_ROUTES:
                security = SESSION_SECURITY
            else:
                security = []
            found[(method, path)] = Operation(
                method=method,
                path=path,
                security=security,
                json_body=route.body_field is not None,
                validated=route.body_field is not None or bool(params),
                path_params=bool(dependant.path_params),
            )
    return found


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_MEDIA_SCHEMA = {
    PROBLEM_JSON: _ref("Problem"),
    FHIR_JSON: _ref("OperationOutcome"),
    JSON: _ref("OAuthError"),
    HTML: {"type": "string"},
}


def _unique_operation_ids(document: dict[str, Any]) -> None:
    """An operation id is unique (OpenAPI 3.1 §4.8.10.1); a route with several methods
    (/oauth/userinfo) gets the same one from FastAPI for each."""
    seen: set[str] = set()
    for path_item in document.get("paths", {}).values():
        for method, operation in path_item.items():
            op_id = operation.get("operationId")
            if op_id is None:
                continue
            if op_id in seen:
                operation["operationId"] = op_id = f"{op_id}_{method}"
            seen.add(op_id)


def document(base: dict[str, Any], app: FastAPI) -> dict[str, Any]:
    """FastAPI's document `base` (not changed) with carevault's statuses and security."""
    doc = copy.deepcopy(base)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(copy.deepcopy(SCHEMAS))
    schemes = components.setdefault("securitySchemes", {})
    schemes.update(copy.deepcopy(SECURITY_SCHEMES))
    schemes["OAuth2"] = _oauth2_scheme()
    known = operations(app)
    for path, path_item in doc.get("paths", {}).items():
        for method, op in path_item.items():
            facts = known.get((method, path))
            if facts is None:
                continue
            _document_operation(op, facts)
            if facts.fhir:
                _fhir_request(op, facts)
    # FastAPI's 422 body is not what carevault answers (problems.py): no longer referenced.
    if "#/components/schemas/HTTPValidationError" not in json.dumps(doc["paths"]):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    _unique_operation_ids(doc)
    return doc


def _document_operation(op: dict[str, Any], facts: Operation) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    statuses = facts.statuses(responses)
    if "422" in responses and 422 not in statuses:
        del responses["422"]  # FastAPI's, for parameters that cannot fail
    success_media = facts.success_media
    if success_media is not None:
        for key, response in responses.items():
            if key.startswith("2") and key != "204":
                schema = _ref("FhirResource") if success_media == FHIR_JSON else {"type": "string"}
                response["content"] = {success_media: {"schema": schema}}
    for status, media_types in statuses.items():
        response = responses.setdefault(str(status), {})
        if not response.get("description"):
            response["description"] = REASONS.get(status, "")
        if status >= 400 or media_types:
            response["content"] = {m: {"schema": _MEDIA_SCHEMA[m]} for m in media_types}
        elif status < 300 and success_media is not None:
            schema = _ref("FhirResource") if success_media == FHIR_JSON else {"type": "string"}
            response["content"] = {success_media: {"schema": schema}}
        if status == 429:
            response.setdefault("headers", {})["Retry-After"] = {
                "description": "Seconds until a request may succeed.",
                "schema": {"type": "string"},
            }
    op["responses"] = dict(sorted(responses.items()))
    op["security"] = facts.security


_PATIENT = {
    "resourceType": "Patient",
    "name": [{"family": "Example", "given": ["Pat"]}],
    "gender": "unknown",
    "birthDate": "1970-01-01",
}
_FHIR_EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/fhir/{resource_type}"): _PATIENT,
    ("put", "/fhir/{resource_type}/{resource_id}"): {**_PATIENT, "id": "example"},
    ("post", "/fhir"): {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient?family=Example"}}],
    },
}


def _fhir_request(op: dict[str, Any], facts: Operation) -> None:
    """What FastAPI cannot see of a FHIR request (fhir/routes.py reads bodies itself, so that
    every error is an OperationOutcome): the resource types and ids paths take, and bodies."""
    from carevault.fhir.routes import ID_PATTERN
    from carevault.fhir.validation import SUPPORTED_TYPES

    for parameter in op.get("parameters", []):
        if parameter.get("in") != "path":
            continue
        if parameter["name"] == "resource_type":
            parameter["schema"] = {"type": "string", "enum": sorted(SUPPORTED_TYPES)}
            parameter["example"] = "Patient"
        elif parameter["name"] in ("resource_id", "patient_id"):
            parameter["schema"] = {"type": "string", "pattern": ID_PATTERN.pattern}
            parameter["example"] = "example"
        elif parameter["name"] == "version":
            parameter["schema"] = {"type": "string", "pattern": "^[0-9]{1,9}$"}
            parameter["example"] = "1"
    if facts.method in ("post", "put") and not facts.path.endswith("/_search"):
        example = _FHIR_EXAMPLES.get((facts.method, facts.path))
        media: dict[str, Any] = {"schema": _ref("FhirResource")}
        if example is not None:
            media["example"] = example
        op["requestBody"] = {"required": True, "content": {FHIR_JSON: media}}
    elif facts.path.endswith("/_search"):
        op["requestBody"] = {
            "required": False,
            "content": {FORM: {"schema": {"type": "object", "additionalProperties": True}}},
        }


def install(app: FastAPI) -> None:
    """Serve the post-processed document at /openapi.json (public: it holds no data), built
    once and rebuilt only when FastAPI's own document is (the routes changed)."""
    generate = FastAPI.openapi.__get__(app)
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        base = generate()
        if cache.get("base") is not base:
            cache["document"] = document(base, app)
            cache["base"] = base
        return cache["document"]  # type: ignore[no-any-return]

    app.openapi = openapi  # type: ignore[method-assign]

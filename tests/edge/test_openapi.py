"""The OpenAPI document (edge/openapi.py): each operation declares the statuses it can answer,
in the media types it answers them in, and its security; and the app really answers them.

tests/edge/test_fuzz.py holds the other half: every status the app answers to generated
requests is declared.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema_rs
import pytest
from fastapi import Depends, FastAPI

from carevault.edge import openapi
from carevault.edge.problems import PROBLEM_JSON
from carevault.edge.rate_limit import EXEMPT_PATHS
from carevault.tokens.bearer import authenticate, authenticate_resource

FHIR_JSON = "application/fhir+json"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
HIGH = "1000000/minute"
SCHEMA_OF = {
    PROBLEM_JSON: {"$ref": "#/components/schemas/Problem"},
    FHIR_JSON: {"$ref": "#/components/schemas/OperationOutcome"},
    "application/json": {"$ref": "#/components/schemas/OAuthError"},
    "text/html": {"type": "string"},
}
# Public by design: no data behind them, or they are how a caller gets a credential.
MUST_BE_PUBLIC = [
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/.well-known/jwks.json"),
    ("get", "/.well-known/openid-configuration"),
    ("get", "/.well-known/smart-configuration"),
    ("get", "/fhir/metadata"),
    ("post", "/auth/login"),
    ("post", "/auth/refresh"),
    ("post", "/oauth/token"),
    ("get", "/oauth/authorize"),
    ("get", "/audit/public-key"),
]
# Bodies checked before the session is (a 422 for `{}`), shaped well enough to reach it.
BODIES = {"/auth/session/step-up": {"method": "totp", "code": "000000"}}
MUST_BE_PROTECTED = [
    ("get", "/auth/me"),
    ("get", "/audit"),
    ("get", "/admin/clients"),
    ("get", "/fhir/{resource_type}/{resource_id}"),
    ("post", "/fhir"),
    ("get", "/auth/session"),
]


@pytest.fixture
async def edge(harness_factory: Any, settings_factory: Any) -> Any:
    """An app whose rate limits stay out of the way of these many requests."""
    settings = settings_factory(
        issuer_url="https://testserver",
        rate_limit_per_address=HIGH,
        rate_limit_per_principal=HIGH,
        rate_limit_auth_per_address=HIGH,
    )
    return await harness_factory(settings)


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def _fhir(path: str) -> bool:
    return path == "/fhir" or path.startswith("/fhir/")


async def test_document_is_served_without_credentials(edge: Any) -> None:
    response = await edge.client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc == json.loads(json.dumps(edge.app.openapi()))
    assert doc["openapi"].startswith("3.1")
    assert edge.app.openapi() is edge.app.openapi()  # built once


async def test_every_operation_declares_429_and_typed_error_bodies(edge: Any) -> None:
    doc = edge.app.openapi()
    operations = _operations(doc)
    assert len(operations) >= 60
    for method, path, op in operations:
        where = f"{method.upper()} {path}"
        responses = op["responses"]
        edge = FHIR_JSON if _fhir(path) else PROBLEM_JSON
        if path in EXEMPT_PATHS:  # health checks: never rate limited
            assert "429" not in responses, where
        else:
            assert responses["429"]["content"] == {edge: {"schema": SCHEMA_OF[edge]}}
            assert "Retry-After" in responses["429"]["headers"], where
            assert edge in responses["503"]["content"], where
        for status, response in responses.items():
            assert response.get("description"), (where, status)
            if int(status) < 400:
                continue
            content = response.get("content")
            assert content, (where, status)
            for media, body in content.items():
                assert body["schema"] == SCHEMA_OF[media], (where, status, media)
            if not _fhir(path):
                assert FHIR_JSON not in content, (where, status)
        if _fhir(path) and "404" in responses:
            assert FHIR_JSON in responses["404"]["content"], where
    schemas = doc["components"]["schemas"]
    # FastAPI's own 422 body is gone: carevault answers problems (edge/problems.py)
    assert "HTTPValidationError" not in schemas
    assert "HTTPValidationError" not in json.dumps(doc["paths"])
    problem = schemas["Problem"]
    assert set(problem["properties"]) >= {"type", "title", "status", "detail", "instance"}
    assert problem["additionalProperties"] is True
    outcome = schemas["OperationOutcome"]
    issue = outcome["properties"]["issue"]["items"]
    assert set(issue["required"]) == {"severity", "code"}
    assert "diagnostics" in issue["properties"]


async def test_security_is_declared_per_operation(edge: Any) -> None:
    doc = edge.app.openapi()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {**schemes["HTTPBearer"], "type": "http", "scheme": "bearer"}
    assert schemes["DPoP"]["scheme"] == "DPoP"
    assert schemes["session"] == {
        **schemes["session"],
        "type": "apiKey",
        "in": "cookie",
        "name": "__Host-carevault-session",
    }
    flows = schemes["OAuth2"]["flows"]
    assert flows["authorizationCode"]["authorizationUrl"] == "/oauth/authorize"
    assert flows["authorizationCode"]["tokenUrl"] == "/oauth/token"
    assert flows["clientCredentials"]["tokenUrl"] == "/oauth/token"
    by_key = {(m, p): op for m, p, op in _operations(doc)}
    for method, path, op in _operations(doc):
        where = f"{method.upper()} {path}"
        assert "security" in op, where
        for requirement in op["security"]:
            assert set(requirement) <= set(schemes), where
        if op["security"]:
            assert {"401", "403", "503"} <= set(op["responses"]), where
    for key in MUST_BE_PUBLIC:
        assert by_key[key]["security"] == [], key
    for key in MUST_BE_PROTECTED:
        assert by_key[key]["security"], key
    fhir_read = by_key[("get", "/fhir/{resource_type}/{resource_id}")]["security"]
    assert {"DPoP": []} in fhir_read and {"OAuth2": []} in fhir_read
    # carevault's own APIs take no OAuth app's token (tokens/bearer.py: _first_party)
    assert {"OAuth2": []} not in by_key[("get", "/auth/me")]["security"]


async def test_protected_operations_answer_401_without_credentials(edge: Any) -> None:
    """Calls every operation the document says is protected, without credentials: the 401
    it declares is the answer (a protection the document claims and the app lacks, or the
    reverse, fails here)."""
    doc = edge.app.openapi()
    called = 0
    for method, path, op in _operations(doc):
        if not op["security"]:
            continue
        kwargs: dict[str, Any] = {"json": {}} if method in ("post", "put", "patch") else {}
        if path in BODIES:
            kwargs = {"json": BODIES[path]}
        response = await edge.client.request(method.upper(), _concrete(path), **kwargs)
        assert response.status_code == 401, (method, path, response.status_code)
        assert "401" in op["responses"]
        assert response.headers["content-type"] in op["responses"]["401"]["content"]
        called += 1
    assert called >= 45


async def test_public_reads_answer_without_credentials(edge: Any) -> None:
    """The other side: what the document calls public (`security: []`) needs no credential."""
    doc = edge.app.openapi()
    public = [(m, p) for m, p, op in _operations(doc) if not op["security"] and m == "get"]
    assert len(public) >= 9
    for method, path in public:
        response = await edge.client.get(_concrete(path))
        assert response.status_code not in (401, 403), (method, path, response.status_code)


async def test_writes_declare_and_answer_413_and_415(edge: Any) -> None:
    doc = edge.app.openapi()
    limit = edge.services.settings.max_body_bytes
    oversize = b"[" + b"0," * limit + b"0]"
    writes = 0
    for method, path, op in _operations(doc):
        if method not in ("post", "put", "patch"):
            assert "415" not in op["responses"], (method, path)
            continue
        writes += 1
        url = _concrete(path)
        for status, headers, body in (
            (413, {"content-type": "application/json"}, oversize),
            (415, {"content-type": "text/plain"}, b"hello"),
        ):
            assert str(status) in op["responses"], (method, path, status)
            response = await edge.client.request(method.upper(), url, content=body, headers=headers)
            assert response.status_code == status, (method, path, response.status_code)
            assert response.headers["content-type"] in op["responses"][str(status)]["content"]
    assert writes >= 35


async def test_document_is_valid_openapi_3_1(edge: Any) -> None:
    """No OpenAPI meta-schema validator is installed: the rules of OpenAPI 3.1 that a
    generator gets wrong, checked one by one, and every schema checked as JSON Schema 2020-12
    (the dialect OpenAPI 3.1 uses)."""
    doc = edge.app.openapi()
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    text = json.dumps(doc)
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', text)):
        assert ref.startswith("#/"), ref
        node: Any = doc
        for part in ref[2:].split("/"):
            node = node[part]
    operation_ids = [op["operationId"] for _, _, op in _operations(doc)]
    assert len(operation_ids) == len(set(operation_ids))  # §4.8.10.1: unique
    for method, path, op in _operations(doc):
        templated = set(re.findall(r"\{([^}]+)\}", path))
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert templated == declared, (method, path)
        for parameter in op.get("parameters", []):
            if parameter["in"] == "path":
                assert parameter["required"] is True, (method, path)
        for status in op["responses"]:
            assert re.fullmatch(r"[1-5](\d\d|XX)|default", status), (method, path, status)
        for requirement in op["security"]:
            for name, scopes in requirement.items():
                assert isinstance(scopes, list)
    registry = jsonschema_rs.Registry([("urn:carevault:openapi", doc)])
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
        # resolvable as referenced
        jsonschema_rs.validator_for(
            {"$ref": f"urn:carevault:openapi#/components/schemas/{name}"}, registry=registry
        )


def test_protection_is_read_from_the_dependencies() -> None:
    """A new route documents itself: no list to keep up to date."""
    app = FastAPI()

    @app.get("/new/first-party")
    async def first(_: Any = Depends(authenticate)) -> dict[str, str]:
        return {}

    @app.post("/new/resource")
    async def resource(_: Any = Depends(authenticate_resource)) -> dict[str, str]:
        return {}

    @app.get("/new/public")
    async def public() -> dict[str, str]:
        return {}

    openapi.install(app)
    paths = app.openapi()["paths"]
    assert paths["/new/first-party"]["get"]["security"] == openapi.FIRST_PARTY_SECURITY
    assert paths["/new/resource"]["post"]["security"] == openapi.RESOURCE_SECURITY
    assert paths["/new/public"]["get"]["security"] == []
    assert "401" in paths["/new/resource"]["post"]["responses"]
    assert {"413", "415", "429"} <= set(paths["/new/resource"]["post"]["responses"])
    assert set(paths["/new/public"]["get"]["responses"]) == {"200", "429", "431", "503"}

"""FHIR REST (base `/fhir`): create, read, vread, update, delete, history, metadata.

Bodies are read and validated here (fhir.resources), never by FastAPI's models, so that every
error is a FHIR OperationOutcome. Responses carry ETag, Last-Modified and Location as the FHIR
specification describes, and `Cache-Control: no-store`: they are ePHI.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from carevault import __version__
from carevault.fhir import outcome
from carevault.fhir.authorization import may_use_fhir
from carevault.fhir.store import Gone, IntegrityFailure, NotFound, StoredResource, VersionConflict
from carevault.fhir.store import WriteContention, instant
from carevault.fhir.validation import FhirValidationError, is_supported_type, validate_resource
from carevault.identity.events import SecurityEvent
from carevault.identity.principal import Principal
from carevault.tokens.bearer import authenticate

router = APIRouter(prefix="/fhir", tags=["fhir"])
log = structlog.get_logger("carevault.fhir")

FHIR_JSON = "application/fhir+json"
ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
ETAG_PATTERN = re.compile(r'^(?:W/)?"(\d{1,9})"$')


class FhirError(Exception):
    def __init__(self, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
        super().__init__(str(status))


def fhir_response(body: dict[str, Any] | None, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    content = orjson.dumps(body) if body is not None else b""
    return Response(content, status_code=status, media_type=FHIR_JSON if body is not None else None,
                    headers={"Cache-Control": "no-store", **(headers or {})})


async def error_response(_request: Request, err: FhirError) -> Response:
    return fhir_response(err.body, err.status, err.headers)


async def fhir_principal(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if not may_use_fhir(principal):
        raise FhirError(403, outcome.operation_outcome([{
            "severity": "error", "code": "forbidden",
            "diagnostics": "You are not allowed to use the record server."}]))
    return principal


Caller = Annotated[Principal, Depends(fhir_principal)]


def _check_type(resource_type: str) -> None:
    if not is_supported_type(resource_type):
        raise FhirError(404, outcome.not_supported())


def _check_id(resource_id: str) -> None:
    if not ID_PATTERN.fullmatch(resource_id):
        raise FhirError(404, outcome.not_found())


async def _body(request: Request, resource_type: str) -> dict[str, Any]:
    raw = await request.body()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FhirError(400, outcome.invalid_request()) from None
    try:
        return validate_resource(parsed, resource_type)
    except FhirValidationError as err:
        raise FhirError(422 if isinstance(parsed, dict) else 400,
                        outcome.validation_failed(err)) from None


def _headers(stored: StoredResource, *, location: bool = False) -> dict[str, str]:
    headers = {"ETag": stored.etag, "Last-Modified": stored.last_modified}
    if location:
        headers["Location"] = (f"/fhir/{stored.resource_type}/{stored.id}"
                               f"/_history/{stored.version}")
    return headers


async def _integrity_failure(request: Request, principal: Principal) -> FhirError:
    # The one place a 5xx is right: a stored row does not decrypt. Never served as garbage.
    await request.app.state.services.events.record(SecurityEvent(
        "record_integrity_failure", "alert", user_id=principal.user_id,
        client_id=principal.client_id, request_id=request.headers.get("x-request-id")))
    log.error("record_integrity_failure")
    return FhirError(500, outcome.processing_error())


def _gone(err: Gone) -> FhirError:
    return FhirError(410, outcome.gone(), {"ETag": f'W/"{err.version}"'})


@router.get("/metadata")
async def capability_statement(request: Request) -> Response:
    from carevault.fhir.validation import SUPPORTED_TYPES

    interactions = [{"code": c} for c in ("read", "vread", "update", "delete", "history-instance",
                                          "history-type", "create")]
    body = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(0)[:10],
        "kind": "instance",
        "software": {"name": "carevault", "version": __version__},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": False,
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"}]}],
                "description": "Bearer access tokens (RFC 9068) from this server's /auth/login.",
            },
            "resource": [{"type": t, "interaction": interactions, "versioning": "versioned",
                          "readHistory": True, "updateCreate": False}
                         for t in sorted(SUPPORTED_TYPES)],
        }],
    }
    return fhir_response(body)


def _history_bundle(entries: list[StoredResource]) -> dict[str, Any]:
    bundle_entries = []
    for stored in entries:
        url = f"{stored.resource_type}/{stored.id}"
        entry: dict[str, Any] = {
            "fullUrl": url,
            "request": {"method": "DELETE" if stored.deleted else "PUT", "url": url},
            "response": {"status": "204" if stored.deleted else "200", "etag": stored.etag,
                         "lastModified": instant(stored.last_updated)},
        }
        if stored.body is not None:
            entry["resource"] = stored.body
        bundle_entries.append(entry)
    return {"resourceType": "Bundle", "type": "history", "total": len(bundle_entries),
            "entry": bundle_entries}


@router.get("/{resource_type}/{resource_id}/_history")
async def instance_history(resource_type: str, resource_id: str, request: Request,
                           principal: Caller) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    try:
        entries = await request.app.state.services.store.history(resource_type, resource_id)
    except NotFound:
        raise FhirError(404, outcome.not_found()) from None
    except IntegrityFailure:
        raise await _integrity_failure(request, principal) from None
    return fhir_response(_history_bundle(entries))


@router.get("/{resource_type}/_history")
async def type_history(resource_type: str, request: Request, principal: Caller) -> Response:
    _check_type(resource_type)
    try:
        entries = await request.app.state.services.store.history(resource_type)
    except IntegrityFailure:
        raise await _integrity_failure(request, principal) from None
    return fhir_response(_history_bundle(entries))


@router.post("/{resource_type}", status_code=201)
async def create(resource_type: str, request: Request, principal: Caller) -> Response:
    _check_type(resource_type)
    body = await _body(request, resource_type)
    try:
        stored = await request.app.state.services.store.create(body)
    except WriteContention:
        raise FhirError(409, outcome.conflict()) from None
    return fhir_response(stored.body, 201, _headers(stored, location=True))


@router.get("/{resource_type}/{resource_id}")
async def read(resource_type: str, resource_id: str, request: Request,
               principal: Caller) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    try:
        stored = await request.app.state.services.store.read(resource_type, resource_id)
    except NotFound:
        raise FhirError(404, outcome.not_found()) from None
    except Gone as err:
        raise _gone(err) from None
    except IntegrityFailure:
        raise await _integrity_failure(request, principal) from None
    return fhir_response(stored.body, 200, _headers(stored))


@router.get("/{resource_type}/{resource_id}/_history/{version}")
async def vread(resource_type: str, resource_id: str, version: str, request: Request,
                principal: Caller) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    if not version.isdigit() or len(version) > 9:
        raise FhirError(404, outcome.not_found())
    try:
        stored = await request.app.state.services.store.vread(resource_type, resource_id,
                                                              int(version))
    except NotFound:
        raise FhirError(404, outcome.not_found()) from None
    except Gone as err:
        raise _gone(err) from None
    except IntegrityFailure:
        raise await _integrity_failure(request, principal) from None
    return fhir_response(stored.body, 200, _headers(stored))


@router.put("/{resource_type}/{resource_id}")
async def update(resource_type: str, resource_id: str, request: Request,
                 principal: Caller) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    if_match = None
    if "if-match" in request.headers:
        match = ETAG_PATTERN.fullmatch(request.headers["if-match"].strip())
        if not match:
            raise FhirError(412, outcome.precondition_failed())
        if_match = int(match.group(1))
    body = await _body(request, resource_type)
    if body.get("id") != resource_id:
        raise FhirError(400, outcome.operation_outcome([{
            "severity": "error", "code": "invalid",
            "diagnostics": "The resource id must match the id in the URL."}]))
    try:
        # Update-as-create is off for ordinary callers: it would reveal which ids exist.
        stored, created = await request.app.state.services.store.update(
            resource_type, resource_id, body, if_match=if_match, allow_create=False)
    except NotFound:
        raise FhirError(404, outcome.not_found()) from None
    except VersionConflict:
        raise FhirError(412, outcome.precondition_failed()) from None
    except WriteContention:
        raise FhirError(409, outcome.conflict()) from None
    return fhir_response(stored.body, 201 if created else 200, _headers(stored, location=created))


@router.delete("/{resource_type}/{resource_id}", status_code=204)
async def delete(resource_type: str, resource_id: str, request: Request,
                 principal: Caller) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    try:
        stored = await request.app.state.services.store.delete(resource_type, resource_id)
    except NotFound:
        raise FhirError(404, outcome.not_found()) from None
    except WriteContention:
        raise FhirError(409, outcome.conflict()) from None
    return fhir_response(None, 204, {"ETag": stored.etag})

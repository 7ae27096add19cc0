"""FHIR REST (base `/fhir`): create, read, vread, update, delete, history, metadata.

Also: conditional create (`If-None-Exist`), `Idempotency-Key` on create (fhir/idempotency.py),
version-aware update and delete (`If-Match`, required when `fhir_require_if_match` is set),
update-as-create for the user ids in `fhir_update_create_users`, and `Patient/{id}/$everything`.

Bodies are read and validated here (fhir.resources), never by FastAPI's models, so that every
error is a FHIR OperationOutcome. Responses carry ETag, Last-Modified and Location as the FHIR
specification describes, and `Cache-Control: no-store`: they are ePHI.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import and_, false, func, not_, or_, select

from carevault import __version__
from carevault.access.control import redact
from carevault.access.decision import Action, Decision
from carevault.audit.events import SecurityEvent
from carevault.audit.request import request_id
from carevault.db.engine import read_connection
from carevault.db.tables import fhir_compartments, fhir_resources
from carevault.edge.problems import ProblemError
from carevault.fhir import idempotency, outcome
from carevault.fhir.authorization import (
    AccessDenied,
    FhirCaller,
    authorize,
    authorize_gone,
    authorize_type,
    fhir_caller,
    forbidden,
    not_visible,
    visible_body,
)
from carevault.fhir.bundles import store_failure
from carevault.fhir.search import (
    BAD_CURSOR,
    CONTROL_PARAMS,
    CURSOR_ALONE,
    DEFAULT_COUNT,
    FORMATS,
    INVALID_VALUE,
    MAX_PARAMS,
    UNKNOWN_PARAM,
    CursorCodec,
    Search,
    SearchError,
    SearchResult,
    execute,
    parse_search,
)
from carevault.fhir.search_params import search_params_for
from carevault.fhir.store import (
    Gone,
    IntegrityFailure,
    NotFound,
    StoredResource,
    StoreError,
    instant,
)
from carevault.fhir.validation import FhirValidationError, is_supported_type, validate_resource
from carevault.identity.mfa.step_up import require_step_up
from carevault.identity.principal import Principal
from carevault.identity.roles import Role
from carevault.tokens.bearer import FIRST_PARTY_CLIENTS, authenticate_resource

router = APIRouter(prefix="/fhir", tags=["fhir"])
log = structlog.get_logger("carevault.fhir")

FHIR_JSON = "application/fhir+json"
ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
ETAG_PATTERN = re.compile(r'^(?:W/)?"(\d{1,9})"$')


class FhirError(Exception):
    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
        super().__init__(str(status))


def _issue(status: int, code: str, text: str) -> FhirError:
    return FhirError(
        status,
        outcome.operation_outcome([{"severity": "error", "code": code, "diagnostics": text}]),
    )


def fhir_response(
    body: dict[str, Any] | None, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    content = orjson.dumps(body) if body is not None else b""
    return Response(
        content,
        status_code=status,
        media_type=FHIR_JSON if body is not None else None,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


async def error_response(_request: Request, err: FhirError) -> Response:
    return fhir_response(err.body, err.status, err.headers)


async def access_denied_response(_request: Request, err: AccessDenied) -> Response:
    return fhir_response(err.body, err.status)


async def fhir_principal(
    request: Request, principal: Annotated[Principal, Depends(authenticate_resource)]
) -> FhirCaller:
    """Every FHIR route's caller: the token's principal, with the access facts of the request
    (purpose of use, relationships, grants) that every decision on this request uses."""
    return await fhir_caller(request, principal)


Caller = Annotated[FhirCaller, Depends(fhir_principal)]


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
    limit = request.app.state.services.settings.fhir_max_attachment_bytes
    try:
        return validate_resource(parsed, resource_type, max_attachment_bytes=limit)
    except FhirValidationError as err:
        # 400: not an object, or base64Binary content that is not base64; 413: inline binary
        # content over fhir_max_attachment_bytes; 422: not a valid resource of the type.
        status = err.status or (422 if isinstance(parsed, dict) else 400)
        raise FhirError(status, outcome.validation_failed(err)) from None


def _headers(stored: StoredResource, *, location: bool = False) -> dict[str, str]:
    headers = {"ETag": stored.etag, "Last-Modified": stored.last_modified}
    if location:
        headers["Location"] = f"/fhir/{stored.resource_type}/{stored.id}/_history/{stored.version}"
    return headers


async def _integrity_failure(request: Request, principal: FhirCaller) -> FhirError:
    # The one place a 5xx is right: a stored row does not decrypt. Never served as garbage.
    await request.app.state.services.events.record(
        SecurityEvent(
            "record_integrity_failure",
            "alert",
            user_id=principal.user_id,
            client_id=principal.client_id,
            request_id=request_id(request),
        )
    )
    log.error("record_integrity_failure")
    return FhirError(500, outcome.processing_error())


@asynccontextmanager
async def store_errors(request: Request, principal: FhirCaller) -> AsyncIterator[None]:
    """Every route's mapping of the store's errors (`bundles.store_failure`): NotFound 404,
    Gone 410 (with the ETag of the deleting version), VersionConflict 412, WriteContention
    409; an IntegrityFailure is a security event and a 500, never garbage."""
    try:
        yield
    except IntegrityFailure:
        raise await _integrity_failure(request, principal) from None
    except StoreError as err:
        failure = store_failure(err)
        headers = {"ETag": f'W/"{err.version}"'} if isinstance(err, Gone) else None
        raise FhirError(failure.status, failure.outcome, headers) from None


@router.get("/metadata")
async def capability_statement(request: Request) -> Response:
    from carevault.fhir.validation import SUPPORTED_TYPES
    from carevault.oauth.metadata import fhir_security

    settings = request.app.state.services.settings
    interactions = [
        {"code": c}
        for c in ("create", "read", "vread", "update", "delete", "history-instance", "history-type")
    ]
    body = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(0)[:10],
        "kind": "instance",
        "software": {"name": "carevault", "version": __version__},
        # cpb-15: a statement of kind "instance" describes its implementation
        "implementation": {"description": "carevault record server"},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": fhir_security(settings.issuer, cors=bool(settings.cors_origins)),
                "resource": [
                    {
                        "type": t,
                        "interaction": _interactions(interactions, t),
                        "versioning": "versioned-update",
                        "readHistory": True,
                        # only for the user ids in fhir_update_create_users (carevault import)
                        "updateCreate": bool(settings.fhir_update_create_users),
                        "conditionalCreate": True,
                        "conditionalRead": "not-supported",
                        "conditionalUpdate": False,
                        "conditionalDelete": "not-supported",
                        "searchParam": _search_params(t),
                        **_search_includes(t),
                        **_operations(t),
                    }
                    for t in sorted(SUPPORTED_TYPES)
                ],
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }
    return fhir_response(body)


_SEARCH_DOC = {
    "phi": (
        "Holds personal data: matched only through keyed blind indexes. String values "
        "match case- and accent-insensitively by starts-with; tokens exactly; dates only "
        "by equality at year, month or day precision. Modifiers (:contains, :exact, "
        ":text, :missing, :not, ...) are not supported."
    ),
    "plain": (
        "Modifiers (:contains, :exact, :text, :missing, :not, :above, :below) are not "
        "supported; dates accept the prefixes eq ne lt gt le ge sa eb (not ap)."
    ),
}


def _operations(resource_type: str) -> dict[str, list[dict[str, str]]]:
    if resource_type != "Patient":
        return {}
    return {
        "operation": [
            {
                "name": "everything",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                "documentation": (
                    "GET only: the Patient and every current resource in its compartment, "
                    "as a searchset Bundle paged by _count (default "
                    f"{EVERYTHING_DEFAULT_COUNT}, at most {EVERYTHING_MAX_COUNT}) with "
                    "opaque next links. Other parameters (start, end, _since, _type) are "
                    "not supported."
                ),
            },
            {
                "name": "access-report",
                "definition": "urn:carevault:OperationDefinition:Patient-access-report",
                "documentation": (
                    "GET only, for the patient themself and auditors: a Bundle of AuditEvents, "
                    "one per access to this patient's records by someone else (when, what kind "
                    "of record, action, purpose of use, role and organization; break-glass "
                    "accesses flagged), paged by _count and _cursor."
                ),
            },
        ]
    }


def _interactions(base: list[dict[str, str]], resource_type: str) -> list[dict[str, str]]:
    return base + [{"code": "search-type"}] if search_params_for(resource_type) else base


def _search_params(resource_type: str) -> list[dict[str, str]]:
    return [
        {
            "name": code,
            "definition": param.url,
            "type": param.kind,
            "documentation": _SEARCH_DOC[param.sensitivity],
        }
        for code, param in search_params_for(resource_type).items()
    ]


def _search_includes(resource_type: str) -> dict[str, list[str]]:
    includes = [
        f"{resource_type}:{code}"
        for code, param in search_params_for(resource_type).items()
        if param.kind == "reference" and not param.phi
    ]
    return {"searchInclude": includes} if includes else {}


def _history_bundle(entries: list[StoredResource]) -> dict[str, Any]:
    bundle_entries = []
    for stored in entries:
        url = f"{stored.resource_type}/{stored.id}"
        entry: dict[str, Any] = {
            "fullUrl": url,
            "request": {"method": "DELETE" if stored.deleted else "PUT", "url": url},
            "response": {
                "status": "204" if stored.deleted else "200",
                "etag": stored.etag,
                "lastModified": instant(stored.last_updated),
            },
        }
        if stored.body is not None:
            entry["resource"] = stored.body
        bundle_entries.append(entry)
    return {
        "resourceType": "Bundle",
        "type": "history",
        "total": len(bundle_entries),
        "entry": bundle_entries,
    }


EVERYTHING_DEFAULT_COUNT = DEFAULT_COUNT
# Lower than a search's MAX_COUNT: $everything pages mix every type, DocumentReferences with
# inline attachments (up to fhir_max_attachment_bytes each) among them.
EVERYTHING_MAX_COUNT = 200
_START = ("", "")  # keyset position before the first member (the page held only the Patient)


def _everything_page_request(
    request: Request, resource_id: str, user_id: str
) -> tuple[Search, tuple[Any, ...] | None]:
    """The page a $everything request asks for: `_count` (and `_format`) on the first page,
    `_cursor` alone after it. The cursor is search's (`CursorCodec`: encrypted, authenticated,
    bound to the caller and expiring), issued for the pseudo-type
    ``Patient/<id>/$everything``, so a search's cursor or another patient's does not decode."""
    scope = f"Patient/{resource_id}/$everything"
    pairs = request.query_params.multi_items()
    after = None
    try:
        cursors = [value for name, value in pairs if name == "_cursor"]
        if cursors:
            if len(pairs) != 1:
                raise SearchError(CURSOR_ALONE)
            pairs, after = _cursor_codec(request).decode(cursors[0], scope, user_id)
            if after is None or len(after) != 2 or not all(isinstance(v, str) for v in after):
                raise SearchError(BAD_CURSOR)
        count = EVERYTHING_DEFAULT_COUNT
        for name, value in pairs:
            if name == "_format" and value in FORMATS:
                continue
            if name != "_count":  # start, end, _since, _type...: refused, not ignored
                raise FhirError(400, outcome.not_supported())
            if not value.isascii() or not value.isdigit() or len(value) > 9:
                raise SearchError(INVALID_VALUE)
            count = min(int(value), EVERYTHING_MAX_COUNT)
    except SearchError as err:
        raise _search_error(err) from None
    page = Search(scope, (("_count", str(count)),), after, count, "accurate", (), ())
    return page, after


async def _compartment_page(
    engine: Any,
    patient_id: str,
    after: tuple[str, str] | None,
    limit: int,
    visible: Callable[[str], Awaitable[Any]],
) -> tuple[int, list[tuple[str, str]], bool]:
    """(number of members, the next `limit` members after `after` in (type, id) order,
    whether more follow). Members: current, not deleted (nor erased) resources of the Patient
    compartment of `patient_id`, the Patient itself left out, that the caller may read
    (`visible(type)`: the access filter of each type). Keyset paging over the compartment
    index, so that only one page of records is read and decrypted per request."""
    c, r = fhir_compartments, fhir_resources
    where = and_(
        c.c.patient_id == patient_id,
        r.c.deleted.is_(False),
        r.c.erased_at.is_(None),
        not_(and_(c.c.resource_type == "Patient", c.c.id == patient_id)),
    )
    joined = c.join(r, and_(r.c.resource_type == c.c.resource_type, r.c.id == c.c.id))
    async with read_connection(engine) as conn:
        present = (
            await conn.execute(
                select(c.c.resource_type).where(c.c.patient_id == patient_id).distinct()
            )
        ).scalars()
        per_type = [and_(r.c.resource_type == t, await visible(t)) for t in sorted(present)]
        where = and_(where, or_(false(), *per_type))
        total = (
            await conn.execute(select(func.count()).select_from(joined).where(where))
        ).scalar_one()
        page_where = where
        if after is not None:
            page_where = and_(
                where,
                or_(
                    c.c.resource_type > after[0],
                    and_(c.c.resource_type == after[0], c.c.id > after[1]),
                ),
            )
        rows = (
            await conn.execute(
                select(c.c.resource_type, c.c.id)
                .select_from(joined)
                .where(page_where)
                .order_by(c.c.resource_type, c.c.id)
                .limit(limit + 1)
            )
        ).all()
    members = [(row.resource_type, row.id) for row in rows]
    return total, members[:limit], len(members) > limit


async def require_step_up_fhir(request: Request, principal: Principal) -> None:
    """Step-up (identity/mfa/step_up.py) for a FHIR route: the same check, recorded refusal
    and `WWW-Authenticate` challenge, but an OperationOutcome (code `login`) for the body."""
    try:
        await require_step_up(request, principal)
    except ProblemError as err:
        raise FhirError(
            401,
            outcome.operation_outcome(
                [
                    {
                        "severity": "error",
                        "code": "login",
                        "diagnostics": "A recent authentication with a second factor is "
                        "required: POST /auth/step-up, then repeat the request with the new "
                        "token.",
                    }
                ]
            ),
            {"WWW-Authenticate": err.headers["WWW-Authenticate"]},
        ) from None


def _staff(caller: FhirCaller) -> bool:
    """Anyone but a patient. A patient's own record is their right of access, and another
    patient's is refused by the access decision as if it did not exist."""
    return set(caller.roles) != {Role.patient}


@router.get("/Patient/{resource_id}/$everything")
async def patient_everything(resource_id: str, request: Request, principal: Caller) -> Response:
    """The Patient and every current resource in its compartment (right of access), as a
    paged searchset Bundle: the Patient first, then the others by type and id. `_count`
    (default 50, at most EVERYTHING_MAX_COUNT) sets the page size and a `next` link carries
    an opaque cursor; no other parameter (start, end, _since, _type) is supported: they are
    refused rather than ignored. Staff need step-up (a whole record at once is a high-risk
    read); asked before the record is looked at, so the refusal says nothing about it."""
    _check_id(resource_id)
    if _staff(principal):
        await require_step_up_fhir(request, principal.principal)
    page, after = _everything_page_request(request, resource_id, principal.user_id)
    services = request.app.state.services
    store = services.store
    first = after is None
    # on every page: is the Patient still there, and may the caller still read it?
    patient, decision = await _read_authorized(request, principal, "Patient", resource_id)
    patient = dataclasses.replace(patient, body=redact(patient.body, decision))

    async def visible(resource_type: str) -> Any:
        return await principal.access.search_condition(principal.requester, resource_type)

    async with store_errors(request, principal):
        limit = max(page.count - 1, 0) if first else page.count
        total, members, has_next = await _compartment_page(
            services.engine, resource_id, None if first else after, limit, visible
        )
        by_type: dict[str, list[str]] = {}
        for member_type, member_id in members:
            by_type.setdefault(member_type, []).append(member_id)
        found = {t: await store.read_many(t, ids) for t, ids in by_type.items()}
    await principal.access.prefetch(
        [r.body for rs in found.values() for r in rs.values() if r.body]
    )
    resources = [patient] if first and page.count > 0 else []
    # a member deleted since the page was listed is left out (read_many skips it)
    for member_type, member_id in members:
        if member_id in found[member_type]:
            shown = await visible_body(request, principal, found[member_type][member_id])
            if shown is not None:
                resources.append(dataclasses.replace(found[member_type][member_id], body=shown))
    entries = [
        {"fullUrl": f"{r.resource_type}/{r.id}", "resource": r.body, "search": {"mode": "match"}}
        for r in resources
    ]
    codec = _cursor_codec(request)
    base = f"/fhir/Patient/{resource_id}/$everything"
    links = [
        {
            "relation": "self",
            "url": f"{base}?_count={page.count}"
            if first
            else f"{base}?_cursor=" + codec.encode(page, after, principal.user_id),
        }
    ]
    if page.count > 0 and has_next:
        position = members[-1] if members else _START
        cursor = codec.encode(page, position, principal.user_id)
        links.append({"relation": "next", "url": f"{base}?_cursor={cursor}"})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total + 1,
        "link": links,
        "entry": entries,
    }
    return fhir_response(bundle)


@router.get("/{resource_type}/{resource_id}/_history")
async def instance_history(
    resource_type: str, resource_id: str, request: Request, principal: Caller
) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    try:
        await _read_authorized(request, principal, resource_type, resource_id)
    except FhirError as err:
        if err.status != 410:  # a deleted record keeps its history
            raise
    async with store_errors(request, principal):  # Gone: erased (crypto-shredded)
        entries = await request.app.state.services.store.history(resource_type, resource_id)
    return fhir_response(_history_bundle(await _visible_versions(request, principal, entries)))


async def _visible_versions(
    request: Request, caller: FhirCaller, entries: list[StoredResource]
) -> list[StoredResource]:
    """The versions the caller may see, each judged on its own body (labels and patients can
    change between versions); a deletion on the record's compartment."""
    shown: list[StoredResource] = []
    await caller.access.prefetch([e.body for e in entries if e.body])
    for entry in entries:
        if entry.body is None:
            try:
                await authorize_gone(request, caller, entry.resource_type, entry.id)
            except AccessDenied:
                continue
            shown.append(entry)
            continue
        body = await visible_body(request, caller, entry)
        if body is not None:
            shown.append(dataclasses.replace(entry, body=body))
    return shown


@router.get("/{resource_type}/_history")
async def type_history(resource_type: str, request: Request, principal: Caller) -> Response:
    _check_type(resource_type)
    await authorize_type(principal, Action.search, resource_type, request)
    async with store_errors(request, principal):
        entries = await request.app.state.services.store.history(resource_type)
    return fhir_response(_history_bundle(await _visible_versions(request, principal, entries)))


FORM = "application/x-www-form-urlencoded"


def _search_error(err: SearchError) -> FhirError:
    return FhirError(
        400,
        outcome.operation_outcome(
            [{"severity": "error", "code": err.code, "diagnostics": err.text}]
        ),
    )


def _cursor_codec(request: Request) -> CursorCodec:
    services = request.app.state.services
    codec = getattr(request.app.state, "search_cursors", None)
    if codec is None:
        codec = CursorCodec(services.secrets.subject_hash, getattr(services, "clock", time.time))
        request.app.state.search_cursors = codec
    return codec


async def _search(
    resource_type: str, pairs: list[tuple[str, str]], request: Request, principal: FhirCaller
) -> Response:
    _check_type(resource_type)
    services = request.app.state.services
    decision = await authorize_type(principal, Action.search, resource_type, request)
    visible = await principal.access.search_condition(principal.requester, resource_type)
    codec = _cursor_codec(request)
    try:
        after = None
        cursors = [value for name, value in pairs if name == "_cursor"]
        if cursors:
            if len(pairs) != 1:
                raise SearchError(CURSOR_ALONE)
            pairs, after = codec.decode(cursors[0], resource_type, principal.user_id)
        if decision.redact_to is not None:
            _only_redacted_params(pairs, decision.redact_to)
        search = parse_search(resource_type, pairs, services.blind_index, after)
        result = await execute(services.engine, search, visible)
    except SearchError as err:
        raise _search_error(err) from None
    async with store_errors(request, principal):
        bundle = await _search_bundle(result, services.store, request, principal)
    links = [
        {
            "relation": "self",
            "url": f"/fhir/{resource_type}?_cursor="
            + codec.encode(search, search.after, principal.user_id),
        }
    ]
    if result.has_next:
        links.append(
            {
                "relation": "next",
                "url": f"/fhir/{resource_type}?_cursor="
                + codec.encode(search, result.last, principal.user_id),
            }
        )
    bundle["link"] = links
    return fhir_response(bundle)


def _only_redacted_params(pairs: list[tuple[str, str]], shown: frozenset[str]) -> None:
    """A caller shown only some elements of a type may search only by those: searching by a
    hidden element would tell them its value one guess at a time."""
    for name, _value in pairs:
        base = name.split(":", 1)[0]
        if base not in CONTROL_PARAMS and base not in ("_id", "_lastUpdated") and base not in shown:
            raise SearchError(UNKNOWN_PARAM)


async def _search_bundle(
    result: SearchResult, store: Any, request: Request, caller: FhirCaller
) -> dict[str, Any]:
    search = result.search
    # the matches' current versions came with the page, in the same statement (same snapshot)
    found = await store.materialise_many(result.rows)
    await caller.access.prefetch([r.body for r in found.values() if r.body])
    entries = []
    for i in result.ids:
        if i not in found:
            continue
        body = await visible_body(request, caller, found[i])
        if body is None:  # the search's filter and the decision disagree: the decision wins
            log.error("search_filter_mismatch", resource_type=search.resource_type)
            continue
        entries.append(
            {
                "fullUrl": f"{search.resource_type}/{i}",
                "resource": body,
                "search": {"mode": "match"},
            }
        )
    by_type: dict[str, list[str]] = {}
    for included_type, included_id in result.includes:
        by_type.setdefault(included_type, []).append(included_id)
    for included_type, ids in by_type.items():
        if not is_supported_type(included_type):
            continue
        included = await store.read_many(included_type, ids)
        await caller.access.prefetch([r.body for r in included.values() if r.body])
        for i in ids:
            body = await visible_body(request, caller, included[i]) if i in included else None
            if body is not None:  # an include the caller may not read is left out silently
                entries.append(
                    {
                        "fullUrl": f"{included_type}/{i}",
                        "resource": body,
                        "search": {"mode": "include"},
                    }
                )
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.total is not None:
        bundle["total"] = result.total
    bundle["entry"] = entries
    return bundle


@router.get("/{resource_type}")
async def search_type(resource_type: str, request: Request, principal: Caller) -> Response:
    return await _search(resource_type, request.query_params.multi_items(), request, principal)


@router.post("/{resource_type}/_search")
async def search_post(resource_type: str, request: Request, principal: Caller) -> Response:
    raw = await request.body()
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if raw and media != FORM:
        raise FhirError(415, outcome.not_supported())
    try:
        form = parse_qsl(
            raw.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=bool(raw),
            max_num_fields=200,
        )
    except (UnicodeDecodeError, ValueError):
        raise FhirError(400, outcome.invalid_request()) from None
    pairs = request.query_params.multi_items() + form
    return await _search(resource_type, pairs, request, principal)


def _if_none_exist(request: Request, resource_type: str) -> Search | None:
    """The search of an `If-None-Exist` header (`a=1&b=2`, also `?a=1` or `Type?a=1`)."""
    value = request.headers.get("if-none-exist")
    if value is None:
        return None
    query = value.strip()
    if "?" in query:
        prefix, _, query = query.partition("?")
        if prefix not in ("", resource_type, f"/fhir/{resource_type}"):
            raise _issue(400, "invalid", "If-None-Exist must be a search of the same type.")
    try:
        pairs = parse_qsl(
            query, keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_PARAMS
        )
    except ValueError:
        pairs = []
    if not pairs or any(name in CONTROL_PARAMS for name, _ in pairs):
        raise _issue(400, "invalid", "If-None-Exist must be a search query (no _count etc.).")
    try:
        # two rows are enough to tell 0, 1 and "more than one" apart
        return parse_search(
            resource_type,
            [*pairs, ("_count", "2"), ("_total", "none")],
            request.app.state.services.blind_index,
        )
    except SearchError as err:
        raise _search_error(err) from None


async def _create_or_match(
    request: Request, principal: FhirCaller, body: dict[str, Any], search: Search | None
) -> tuple[StoredResource, int]:
    """Create `body` (201), or with If-None-Exist return the one match (200) or refuse (412).
    The match is looked for only among records the caller may read: a conditional create
    must not tell whether an invisible record matches."""
    services = request.app.state.services
    await authorize(request, principal, Action.create, body["resourceType"], None, new=body)
    async with store_errors(request, principal):  # Gone: the match's patient was erased
        if search is not None:
            visible = await principal.access.search_condition(
                principal.requester, search.resource_type
            )
            try:
                result = await execute(services.engine, search, visible)
            except SearchError as err:
                raise _search_error(err) from None
            if len(result.ids) > 1:
                raise _issue(
                    412, "multiple-matches", "If-None-Exist matched more than one resource."
                )
            if result.ids:
                try:
                    match = await services.store.read(search.resource_type, result.ids[0])
                except NotFound:  # the match was deleted meanwhile
                    raise FhirError(409, outcome.conflict()) from None
                return await _shown(request, principal, match), 200
        return await services.store.create(body), 201


async def _shown(request: Request, caller: FhirCaller, stored: StoredResource) -> StoredResource:
    """`stored` with the body the caller may see; as missing if they may see none of it."""
    body = await visible_body(request, caller, stored)
    if body is None:
        raise not_visible(caller)
    return dataclasses.replace(stored, body=body)


def idempotency_key(request: Request, principal: FhirCaller) -> str | None:
    """The caller's `Idempotency-Key` (hashed with their user id), None without one; 400 for
    a malformed key."""
    if "idempotency-key" not in request.headers:
        return None
    try:
        return idempotency.key_hash(principal.user_id, request.headers["idempotency-key"])
    except idempotency.InvalidKey:
        raise _issue(
            400, "invalid", "Idempotency-Key must be 1 to 255 printable ASCII characters."
        ) from None


def idempotency_claim_error(err: Exception) -> FhirError:
    """422 for a key used with another request, 409 while its first request is running."""
    if isinstance(err, idempotency.KeyReused):
        return _issue(
            422, "business-rule", "This Idempotency-Key was already used with another body."
        )
    return FhirError(409, outcome.conflict())


@router.post("/{resource_type}", status_code=201)
async def create(resource_type: str, request: Request, principal: Caller) -> Response:
    _check_type(resource_type)
    services = request.app.state.services
    key = idempotency_key(request, principal)
    search = _if_none_exist(request, resource_type)
    body = await _body(request, resource_type)
    if key is None:
        stored, status = await _create_or_match(request, principal, body, search)
        return fhir_response(stored.body, status, _headers(stored, location=True))

    keys = idempotency.IdempotencyKeys(services.engine, getattr(services, "clock", time.time))
    try:
        recorded = await keys.claim(key, idempotency.body_hash(await request.body()))
    except (idempotency.KeyReused, idempotency.StillPending) as err:
        raise idempotency_claim_error(err) from None
    if recorded is not None:  # replay the first response, write nothing
        async with store_errors(request, principal):
            stored = await services.store.vread(
                recorded.resource_type, recorded.resource_id, recorded.version
            )
        stored = await _shown(request, principal, stored)  # access may have changed since
        return fhir_response(stored.body, recorded.status, _headers(stored, location=True))
    try:
        stored, status = await _create_or_match(request, principal, body, search)
    except Exception:
        await keys.release(key)  # a failed create must not block the client's retry
        raise
    await keys.complete(
        key, idempotency.Recorded(stored.resource_type, stored.id, stored.version, status)
    )
    return fhir_response(stored.body, status, _headers(stored, location=True))


@router.get("/{resource_type}/{resource_id}")
async def read(
    resource_type: str, resource_id: str, request: Request, principal: Caller
) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    stored, decision = await _read_authorized(request, principal, resource_type, resource_id)
    return fhir_response(redact(stored.body, decision), 200, _headers(stored))


async def _read_authorized(
    request: Request, caller: FhirCaller, resource_type: str, resource_id: str
) -> tuple[StoredResource, Decision]:
    """The current version (its full body: shown only through `redact`) and the decision to
    read it, if the caller may; a deleted one answers 410 only to callers who may read it,
    and a record they may not read answers as missing."""
    async with store_errors(request, caller):
        try:
            stored = await request.app.state.services.store.read(resource_type, resource_id)
        except Gone:
            await authorize_gone(request, caller, resource_type, resource_id)
            raise
    decision = await authorize(request, caller, Action.read, resource_type, stored.body)
    return stored, decision


@router.get("/{resource_type}/{resource_id}/_history/{version}")
async def vread(
    resource_type: str, resource_id: str, version: str, request: Request, principal: Caller
) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    if not version.isdigit() or len(version) > 9:
        raise FhirError(404, outcome.not_found())
    async with store_errors(request, principal):
        try:
            stored = await request.app.state.services.store.vread(
                resource_type, resource_id, int(version)
            )
        except Gone:
            await authorize_gone(request, principal, resource_type, resource_id)
            raise
    body = await visible_body(request, principal, stored)
    if body is None:
        raise not_visible(principal)
    return fhir_response(body, 200, _headers(stored))


def _if_match(request: Request) -> int | None:
    """The version of `If-Match: W/"n"`; 428 if it is missing and `fhir_require_if_match`."""
    if "if-match" not in request.headers:
        if request.app.state.services.settings.fhir_require_if_match:
            raise _issue(
                428,
                "required",
                'This server requires If-Match (W/"version") on updates and deletes.',
            )
        return None
    match = ETAG_PATTERN.fullmatch(request.headers["if-match"].strip())
    if not match:
        raise FhirError(412, outcome.precondition_failed())
    return int(match.group(1))


@router.put("/{resource_type}/{resource_id}")
async def update(
    resource_type: str, resource_id: str, request: Request, principal: Caller
) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    if_match = _if_match(request)
    body = await _body(request, resource_type)
    if body.get("id") != resource_id:
        raise _issue(400, "invalid", "The resource id must match the id in the URL.")
    # Update-as-create is off for ordinary callers: it would reveal which ids exist.
    allow_create = principal.user_id in request.app.state.services.settings.fhir_update_create_users
    try:
        current, _ = await _read_authorized(request, principal, resource_type, resource_id)
    except FhirError as err:
        if err.status != 404 or not allow_create:
            raise
        await authorize(request, principal, Action.create, resource_type, None, new=body)
    else:
        await authorize(request, principal, Action.update, resource_type, current.body, new=body)
    async with store_errors(request, principal):  # Gone: erased (crypto-shredded)
        stored, created = await request.app.state.services.store.update(
            resource_type, resource_id, body, if_match=if_match, allow_create=allow_create
        )
    stored = await _shown(request, principal, stored)
    return fhir_response(stored.body, 201 if created else 200, _headers(stored, location=created))


@router.delete("/Patient/{resource_id}", status_code=204)
async def delete_patient(
    resource_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(authenticate_resource)],
) -> Response:
    """`?_erase=true` (admin only, with step-up, through carevault's own login):
    crypto-shredding erasure (fhir/erasure.py). Without it (or with `_erase=false`) the
    ordinary clinical-staff logical delete below."""
    from carevault.fhir.erasure import ErasureFailed, PatientNotFound, erase_patient

    values = request.query_params.getlist("_erase")
    if len(values) > 1 or (values and values[0] not in ("true", "false")):
        raise _issue(400, "invalid", "_erase must be true or false.")
    if not values or values[0] == "false":
        caller = await fhir_principal(request, principal)
        return await delete("Patient", resource_id, request, caller)
    if Role.admin not in principal.roles or principal.client_id not in FIRST_PARTY_CLIENTS:
        raise _issue(403, "forbidden", "Only an administrator may erase a patient.")
    await require_step_up_fhir(request, principal)
    _check_id(resource_id)
    try:
        report = await erase_patient(request.app.state.services, resource_id, principal.user_id)
    except PatientNotFound:
        raise FhirError(404, outcome.not_found()) from None
    except ErasureFailed:
        log.error("patient_erasure_failed")
        raise FhirError(500, outcome.processing_error()) from None
    return fhir_response(
        outcome.operation_outcome(
            [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": f"Erased: {report.resources} resource(s), "
                    f"{report.versions_shredded} version(s) shredded; "
                    f"{report.shared_other_scope} shared resource(s) under another "
                    "patient's key were unlinked, not erased.",
                }
            ]
        ),
        200,
    )


@router.delete("/{resource_type}/{resource_id}", status_code=204)
async def delete(
    resource_type: str, resource_id: str, request: Request, principal: Caller
) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    if_match = _if_match(request)
    store = request.app.state.services.store
    try:
        current, _ = await _read_authorized(request, principal, resource_type, resource_id)
    except FhirError as err:
        if err.status != 410:
            raise
        # deleting a deleted record changes nothing; it still takes the right to delete it
        patients = await principal.access.facts.compartment_of(resource_type, resource_id)
        decision = await principal.access.decide_for_patients(
            principal.requester, Action.delete, resource_type, patients
        )
        if not decision.permit:
            raise forbidden() from None
    else:
        await authorize(request, principal, Action.delete, resource_type, current.body)
    async with store_errors(request, principal):
        stored = await store.delete(resource_type, resource_id, if_match=if_match)
    return fhir_response(None, 204, {"ETag": stored.etag})

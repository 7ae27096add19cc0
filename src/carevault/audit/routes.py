"""The auditors' API (`/audit`, auditor role only) and the audit public key (public).

- `GET /audit` -> `{"entries": [...], "next": seq | null}`, newest first. Each entry is the
  stored document (the canonical JSON the chain covers, keys as `audit/entry.py` defines them)
  with its chain MAC added as `"mac"` (hex): drop `mac`, serialise the rest with sorted keys
  and no whitespace, append the MAC bytes, and the RFC 9162 leaf hash of that is the entry's
  leaf in the Merkle tree. Filters: `patient`, `actor` (user id), `action` (exact, or a prefix
  ending in `*`, e.g. `fhir.*`), `outcome` (permit | deny | error), `since` (inclusive) and
  `until` (exclusive), ISO 8601 dates or date-times with `Z` or an offset, `break_glass`
  (true | false), `limit` (1..500, default 100) and `before` (a sequence number: the `next` of
  the previous page).
- `GET /audit/AuditEvent` -> the same selection as a FHIR searchset Bundle of AuditEvent
  resources (`audit/audit_event.py`), with a `next` link.
- `GET /audit/checkpoint` -> the latest signed tree head (one is signed first if there is none
  but the trail has entries).
- `GET /audit/proof/inclusion?seq=N&size=S` -> RFC 9162 inclusion proof of entry N in the tree
  of checkpoint size S, with that checkpoint.
- `GET /audit/proof/consistency?from=A&to=B` -> RFC 9162 consistency proof between the
  checkpoints of sizes A and B, with both.
- `GET /audit/public-key` -> JWKS holding the Ed25519 checkpoint key (no authentication).

Errors are problem+json: 401 without a token, 403 for any role but auditor, 400 for a query
parameter that is unknown, repeated or out of range, 404 (generic) for a size that is not a
checkpoint's or entries that retention removed.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import URL

from carevault.audit.archive import public_jwks
from carevault.audit.audit_event import auditor_view
from carevault.audit.log import AuditLog, ChainBroken, Checkpoint, ProofUnavailable
from carevault.audit.queries import (
    FILTER_PARAMS,
    MAX_SEQ,
    InvalidQuery,
    Page,
    actors,
    list_entries,
    parse_filter,
    parse_int,
    single_values,
)
from carevault.audit.request import request_audit
from carevault.crypto.custody import AuditKeys
from carevault.edge.problems import ProblemError
from carevault.identity.principal import Principal
from carevault.identity.roles import Role
from carevault.tokens.bearer import authenticate

router = APIRouter(prefix="/audit", tags=["audit"])

FHIR_JSON = "application/fhir+json"
NO_STORE = {"Cache-Control": "no-store"}


async def auditor_principal(
    request: Request, principal: Annotated[Principal, Depends(authenticate)]
) -> Principal:
    """The auditor role and nothing else (not even admin) reads the trail."""
    audit = request_audit(request)
    if audit is not None:
        audit.identify(principal.user_id, principal.client_id, principal.roles)
    if Role.auditor not in principal.roles:
        raise ProblemError(403)
    return principal


Auditor = Annotated[Principal, Depends(auditor_principal)]


def _invalid(err: InvalidQuery) -> ProblemError:
    return ProblemError(
        400, "A query parameter is not valid.", extra={"errors": [{"parameter": err.param}]}
    )


def _values(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    try:
        return single_values(request.query_params.multi_items(), allowed)
    except InvalidQuery as err:
        raise _invalid(err) from None


def _log(request: Request) -> AuditLog:
    return request.app.state.services.audit  # type: ignore[no-any-return]


async def _page(request: Request) -> Page:
    try:
        filt = parse_filter(_values(request, FILTER_PARAMS))
    except InvalidQuery as err:
        raise _invalid(err) from None
    page = await list_entries(request.app.state.services.engine, filt)
    audit = request_audit(request)
    if audit is not None:
        audit.detail["count"] = len(page.entries)
    return page


@router.get("")
async def list_audit_entries(request: Request, _: Auditor) -> Response:
    page = await _page(request)
    entries = [{**e.document, "mac": e.mac.hex()} for e in page.entries]
    return Response(
        orjson.dumps({"entries": entries, "next": page.next}),
        media_type="application/json",
        headers=NO_STORE,
    )


@router.get("/AuditEvent")
async def audit_events(request: Request, _: Auditor) -> Response:
    page = await _page(request)
    people = await actors(
        request.app.state.services.engine, (e.document.get("user") for e in page.entries)
    )
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "self", "url": _relative(request.url)}],
        "entry": [
            {
                "resource": auditor_view(e.document, people.get(e.document.get("user", ""))),
                "search": {"mode": "match"},
            }
            for e in page.entries
        ],
    }
    if page.next is not None:
        url = request.url.include_query_params(before=page.next)
        bundle["link"].append({"relation": "next", "url": _relative(url)})
    return Response(orjson.dumps(bundle), media_type=FHIR_JSON, headers=NO_STORE)


def _relative(url: URL) -> str:
    return f"{url.path}?{url.query}" if url.query else url.path


@router.get("/checkpoint")
async def latest_checkpoint(request: Request, _: Auditor) -> JSONResponse:
    _values(request, frozenset())
    trail = _log(request)
    try:
        checkpoint = await trail.latest_checkpoint() or await trail.checkpoint()
    except ChainBroken:  # nothing is signed over a changed entry; `audit verify` names it
        raise ProblemError(503, "The audit trail cannot be signed right now.") from None
    if checkpoint is None:
        raise ProblemError(404, "The audit trail has no entries yet.")
    return JSONResponse(checkpoint.document(), headers=NO_STORE)


async def _checkpoint_at(trail: AuditLog, size: int) -> Checkpoint:
    checkpoint = await trail.checkpoint_at(size)
    if checkpoint is None:
        raise ProblemError(404)
    return checkpoint


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@router.get("/proof/inclusion")
async def inclusion_proof(request: Request, _: Auditor) -> JSONResponse:
    values = _values(request, frozenset({"seq", "size"}))
    try:
        for name in ("seq", "size"):
            if name not in values:
                raise InvalidQuery(name)
        seq = parse_int(values["seq"], "seq", 1, MAX_SEQ)
        size = parse_int(values["size"], "size", 1, MAX_SEQ)
        if seq > size:
            raise InvalidQuery("seq")
    except InvalidQuery as err:
        raise _invalid(err) from None
    trail = _log(request)
    checkpoint = await _checkpoint_at(trail, size)
    try:
        proof = await trail.inclusion_proof(seq, size)
        leaf = await trail.leaf_hash(seq)
    except ProofUnavailable:
        raise ProblemError(404) from None
    return JSONResponse(
        {
            "seq": seq,
            "size": size,
            "leaf_index": seq - 1,
            "leaf_hash": _b64(leaf),
            "proof": [_b64(p) for p in proof],
            "checkpoint": checkpoint.document(),
        },
        headers=NO_STORE,
    )


@router.get("/proof/consistency")
async def consistency_proof(request: Request, _: Auditor) -> JSONResponse:
    values = _values(request, frozenset({"from", "to"}))
    try:
        for name in ("from", "to"):
            if name not in values:
                raise InvalidQuery(name)
        first = parse_int(values["from"], "from", 1, MAX_SEQ)
        second = parse_int(values["to"], "to", 1, MAX_SEQ)
        if first > second:
            raise InvalidQuery("from")
    except InvalidQuery as err:
        raise _invalid(err) from None
    trail = _log(request)
    older = await _checkpoint_at(trail, first)
    newer = await _checkpoint_at(trail, second)
    try:
        proof = await trail.consistency_proof(first, second) if first < second else []
    except ProofUnavailable:
        raise ProblemError(404) from None
    return JSONResponse(
        {
            "from": first,
            "to": second,
            "proof": [_b64(p) for p in proof],
            "checkpoints": [older.document(), newer.document()],
        },
        headers=NO_STORE,
    )


@router.get("/public-key")
async def public_key(request: Request) -> Response:
    keys: AuditKeys = request.app.state.services.custody.audit_keys()
    return Response(
        orjson.dumps(public_jwks(keys)),
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )

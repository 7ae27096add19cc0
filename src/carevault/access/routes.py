"""`/access/break-glass`: open emergency access, list grants (auditors), revoke early.

- `POST /access/break-glass` `{"patient": id, "reason": text, "minutes": n}` -> 201 grant (the
  reason is never echoed). 403 for a role that may not; 401 with
  `WWW-Authenticate: Bearer error="insufficient_user_authentication", max_age=N,
  acr_values="urn:carevault:mfa"` (RFC 9470) unless the token shows a second factor proved
  within N seconds (a two-step login or `POST /auth/step-up`); 404 for no such patient; 422 for
  a field out of bounds.
- `GET /access/break-glass?active=true&limit=n` -> grants with their reasons, for auditors and
  admins only (403 for everyone else). Each listing is itself recorded as a security event.
- `POST /access/break-glass/{id}/revoke` -> 200; by an auditor, an admin or the grant's own
  user; an unknown, foreign, expired or already revoked grant is 404 alike.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from carevault.access.break_glass import (
    REASON_MAX,
    REASON_MIN,
    BreakGlass,
    Grant,
    GrantNotFound,
    InvalidRequest,
    NotEligible,
    PatientNotFound,
    StaleAuthentication,
)
from carevault.audit.events import SecurityEvent
from carevault.audit.request import request_id
from carevault.edge.client_address import client_address
from carevault.edge.problems import ProblemError
from carevault.identity.mfa.policy import ACR_MFA
from carevault.identity.principal import Principal
from carevault.identity.roles import Role
from carevault.tokens.bearer import REALM, authenticate

router = APIRouter(prefix="/access", tags=["access"])

AUDIT_ROLES = frozenset({Role.auditor, Role.admin})
REAUTHENTICATE = "urn:carevault:problem:reauthentication-required"


class OpenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patient: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9\-.]{1,64}$")]
    reason: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=REASON_MIN, max_length=REASON_MAX),
    ]
    minutes: StrictInt | None = Field(None, ge=1, le=240)


def _service(request: Request) -> BreakGlass:
    return request.app.state.services.break_glass  # type: ignore[no-any-return]


def _instant(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def _grant_json(grant: Grant, now: float, *, with_reason: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": grant.id,
        "patient": grant.patient_id,
        "user": grant.user_id,
        "purpose": grant.purpose,
        "created_at": _instant(grant.created_at),
        "expires_at": _instant(grant.expires_at),
        "revoked_at": _instant(grant.revoked_at),
        "revoked_by": grant.revoked_by,
        "active": grant.active(now),
    }
    if with_reason:
        body["reason"] = grant.reason
    return body


def _forbidden() -> ProblemError:
    return ProblemError(403)


def _reauthenticate(err: StaleAuthentication) -> ProblemError:
    challenge = (
        f'{REALM}, error="insufficient_user_authentication", '
        f'error_description="A recent authentication with a second factor is required", '
        f'max_age={err.max_age}, acr_values="{ACR_MFA}"'
    )
    return ProblemError(
        401,
        "Prove a second factor again (POST /auth/step-up) to open emergency access.",
        title="Fresh authentication required",
        type_=REAUTHENTICATE,
        headers={"WWW-Authenticate": challenge},
        extra={"max_age": err.max_age, "acr_values": ACR_MFA},
    )


def _invalid(err: InvalidRequest) -> ProblemError:
    return ProblemError(422, extra={"errors": [{"pointer": f"/{err.field}", "type": err.kind}]})


async def break_glass_principal(
    request: Request, principal: Annotated[Principal, Depends(authenticate)]
) -> Principal:
    """Role and freshness before the body is looked at: a registrar learns only "403"."""
    service = _service(request)
    try:
        service.check_principal(principal)
    except (NotEligible, StaleAuthentication) as err:
        await service.record_denied(
            principal,
            type(err).__name__,
            client_address(request, request.app.state.services.settings.trusted_proxies),
            request_id(request),
        )
        if isinstance(err, StaleAuthentication):
            raise _reauthenticate(err) from None
        raise _forbidden() from None
    return principal


async def auditor_principal(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if not AUDIT_ROLES & set(principal.roles):
        raise _forbidden()
    return principal


@router.post("/break-glass", status_code=201)
async def open_break_glass(
    request: Request,
    body: OpenRequest,
    principal: Annotated[Principal, Depends(break_glass_principal)],
) -> JSONResponse:
    service = _service(request)
    services = request.app.state.services
    try:
        grant = await service.open(
            principal,
            body.patient,
            body.reason,
            body.minutes,
            source_address=client_address(request, services.settings.trusted_proxies),
            request_id=request_id(request),
        )
    except NotEligible:
        raise _forbidden() from None
    except StaleAuthentication as err:
        raise _reauthenticate(err) from None
    except InvalidRequest as err:
        raise _invalid(err) from None
    except PatientNotFound:
        raise ProblemError(404) from None
    return JSONResponse(
        _grant_json(grant, grant.created_at, with_reason=False),
        status_code=201,
        headers={"Cache-Control": "no-store", "Location": f"/access/break-glass/{grant.id}"},
    )


@router.get("/break-glass")
async def list_break_glass(
    request: Request,
    principal: Annotated[Principal, Depends(auditor_principal)],
    active: Annotated[bool, Query()] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    services = request.app.state.services
    service = _service(request)
    grants = await service.list_grants(active_only=active, limit=limit)
    # Reasons may hold PHI: reading them is itself on the record.
    await services.events.record(
        SecurityEvent(
            event="break_glass_listed",
            outcome="success",
            user_id=principal.user_id,
            client_id=principal.client_id,
            source_address=client_address(request, services.settings.trusted_proxies),
            request_id=request_id(request),
            details={"count": len(grants), "active_only": active},
        )
    )
    now = service.now()
    return JSONResponse(
        {"grants": [_grant_json(g, now, with_reason=True) for g in grants]},
        headers={"Cache-Control": "no-store"},
    )


@router.post("/break-glass/{grant_id}/revoke")
async def revoke_break_glass(
    request: Request,
    grant_id: str,
    principal: Annotated[Principal, Depends(authenticate)],
) -> JSONResponse:
    services = request.app.state.services
    privileged = bool(AUDIT_ROLES & set(principal.roles))
    try:
        await _service(request).revoke(
            grant_id,
            principal.user_id,
            only_own=not privileged,
            client_id=principal.client_id,
            source_address=client_address(request, services.settings.trusted_proxies),
            request_id=request_id(request),
        )
    except GrantNotFound:
        raise ProblemError(404) from None
    return JSONResponse({"id": grant_id, "revoked": True}, headers={"Cache-Control": "no-store"})

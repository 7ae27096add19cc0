"""Pieces every `/auth/*` router answers with: the request's context for the security events,
and the token response (with its refresh cookie)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from carevault.audit.request import request_id
from carevault.edge.client_address import client_address
from carevault.identity.authentication import RequestContext, TokenGrant

REFRESH_COOKIE = "__Secure-carevault-refresh"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "Bearer"  # noqa: S105 - the RFC 6750 token type, not a secret
    expires_in: int
    refresh_token: str


def context(request: Request) -> RequestContext:
    settings = request.app.state.services.settings
    agent = request.headers.get("user-agent") or ""
    return RequestContext(
        address=client_address(request, settings.trusted_proxies),
        request_id=request_id(request),
        device=agent[:128] or None,
    )


def token_response(request: Request, grant: TokenGrant) -> JSONResponse:
    settings = request.app.state.services.settings
    body = TokenResponse(
        access_token=grant.access_token,
        expires_in=grant.expires_in,
        refresh_token=grant.refresh_token,
    )
    response = JSONResponse(body.model_dump(), headers=NO_STORE)
    response.set_cookie(
        REFRESH_COOKIE,
        grant.refresh_token,
        max_age=settings.refresh_absolute_ttl_seconds,
        path="/auth",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response

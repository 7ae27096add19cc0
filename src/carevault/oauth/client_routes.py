"""`/admin/clients`: the OAuth client registry over HTTP, for admins.

- `POST /admin/clients`: register a client (the fields of `carevault client add`); 201 with
  the same JSON as the CLI, `client_secret` included once when one is issued.
- `GET /admin/clients`, `GET /admin/clients/{client_id}`: never a secret or its hash.
- `POST /admin/clients/{client_id}/disable`: disable it and cut off every token it holds.

Every route needs the admin role (403 otherwise, asked first); the changes (POST) also need
step-up (401, identity/mfa/step_up.py), exactly as identity/admin_routes.py. A registration
that can't be accepted answers 422 with the registry's own (fixed, generic) message; an
unknown client id and a string no client id could be answer the same 404.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from carevault.edge.problems import ProblemError
from carevault.identity.admin_routes import Admin, admin_role
from carevault.identity.principal import Principal
from carevault.identity.responses import NO_STORE, context
from carevault.oauth.clients import (
    Client,
    ClientError,
    ClientRegistry,
    disable_client,
    register_client,
)

router = APIRouter(prefix="/admin", tags=["admin"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Not authenticated, or step-up required"},
    403: {"description": "Not an administrator"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such client"}}


class ClientRequest(BaseModel):
    """The registry checks every value (oauth/clients.py); this only bounds the shapes."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=256)
    auth_method: str = Field(max_length=32)
    redirect_uris: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=32
    )
    scope: str = Field(max_length=4096)
    grant_types: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, max_length=8
    )
    jwks: dict[str, Any] | None = None
    require_dpop: bool = False


AdminReader = Annotated[Principal, Depends(admin_role)]


def _clients(request: Request) -> ClientRegistry:
    return request.app.state.services.clients  # type: ignore[no-any-return]


def _client(client: Client, status: int = 200, **more: Any) -> JSONResponse:
    return JSONResponse({**client.describe(), **more}, status_code=status, headers=NO_STORE)


@router.post("/clients", status_code=201, responses={**_ERRORS, 422: {}})
async def create_client(body: ClientRequest, request: Request, admin: Admin) -> JSONResponse:
    """Register a client; its secret (client_secret_basic) is in this answer and nowhere else."""
    services = request.app.state.services
    ctx = context(request)
    try:
        client, secret = await register_client(
            _clients(request),
            services.events,
            body.name,
            by=admin.user_id,
            ctx=ctx,
            auth_method=body.auth_method,
            redirect_uris=body.redirect_uris,
            scope=body.scope,
            grant_types=body.grant_types,
            jwks=body.jwks,
            require_dpop=body.require_dpop,
        )
    except ClientError as err:
        await services.events.record(
            ctx.event("client_registered", "failure", admin.user_id, reason="invalid")
        )
        raise ProblemError(422, str(err)) from None
    more = {"client_secret": secret} if secret is not None else {}
    return _client(client, 201, **more)


@router.get("/clients", responses=_ERRORS)
async def list_clients(request: Request, admin: AdminReader) -> JSONResponse:
    """Every registered client, disabled ones included."""
    clients = await _clients(request).list()
    return JSONResponse([c.describe() for c in clients], headers=NO_STORE)


@router.get("/clients/{client_id}", responses={**_ERRORS, **_NOT_FOUND})
async def get_client(client_id: str, request: Request, admin: AdminReader) -> JSONResponse:
    client = await _clients(request).get(client_id)
    if client is None:
        raise ProblemError(404)
    return _client(client)


@router.post("/clients/{client_id}/disable", responses={**_ERRORS, **_NOT_FOUND})
async def disable(client_id: str, request: Request, admin: Admin) -> JSONResponse:
    """Disable the client and revoke its sessions and tokens (repeatable: a second call
    finishes what a failed one left)."""
    services = request.app.state.services
    client = await disable_client(
        client_id,
        clients=services.clients,
        revocations=services.revocations,
        events=services.events,
        settings=services.settings,
        by=admin.user_id,
        ctx=context(request),
    )
    if client is None:
        raise ProblemError(404)
    return _client(client)

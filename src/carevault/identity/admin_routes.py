"""`/admin/users/{username}/...`: account administration over HTTP, for admins with step-up.

- `POST .../mfa-reset`: every factor and recovery code removed and every session ended; the
  user's next login enrolls a factor again (a lost or stolen authenticator).
- `PUT .../roles` `{"roles": [...]}`: replace the roles; a privilege change, so every session
  of the user ends.
- `POST .../disable` (every session ends) and `POST .../enable`.

Every route needs the admin role (403 otherwise, asked first: a non-admin is never invited to
step up) and then step-up (401, identity/mfa/step_up.py). An unknown username and a name no
account could have answer the same 404. Every change and every refusal is a security event.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from carevault.audit.events import SecurityEvent
from carevault.edge.problems import ProblemError
from carevault.identity.accounts import AccountError, User
from carevault.identity.admin import AccountAdmin
from carevault.identity.mfa.step_up import require_step_up
from carevault.identity.principal import Principal
from carevault.identity.responses import NO_STORE, context
from carevault.identity.roles import Role
from carevault.tokens.bearer import authenticate

router = APIRouter(prefix="/admin", tags=["admin"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Not authenticated, or step-up required"},
    403: {"description": "Not an administrator"},
    404: {"description": "No such user"},
}


class RolesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    roles: list[Role] = Field(min_length=1, max_length=len(Role))


async def admin_role(
    request: Request, principal: Annotated[Principal, Depends(authenticate)]
) -> Principal:
    """An admin (any other caller is refused, and the refusal recorded)."""
    if Role.admin not in principal.roles:
        ctx = context(request)
        await request.app.state.services.events.record(
            SecurityEvent(
                "admin_api",
                "denied",
                user_id=principal.user_id,
                client_id=principal.client_id,
                source_address=ctx.address,
                request_id=ctx.request_id,
                details={"reason": "role"},
            )
        )
        raise ProblemError(403)
    return principal


async def admin_principal(
    request: Request, principal: Annotated[Principal, Depends(admin_role)]
) -> Principal:
    """An admin whose token shows a recent second factor."""
    return await require_step_up(request, principal)


Admin = Annotated[Principal, Depends(admin_principal)]


def _accounts(request: Request) -> AccountAdmin:
    return request.app.state.services.accounts  # type: ignore[no-any-return]


async def _target(request: Request, username: str) -> User:
    try:
        return await _accounts(request).find(username)
    except AccountError:
        raise ProblemError(404) from None


def _account(user: User, **more: Any) -> JSONResponse:
    body = {
        "id": user.id,
        "username": user.username,
        "roles": list(user.roles),
        "enabled": user.enabled,
        **more,
    }
    return JSONResponse(body, headers=NO_STORE)


@router.post("/users/{username}/mfa-reset", responses=_ERRORS)
async def mfa_reset(username: str, request: Request, admin: Admin) -> JSONResponse:
    """Remove the user's factors and recovery codes and end their sessions."""
    user = await _target(request, username)
    await request.app.state.services.mfa.reset(user, context(request), by=admin.user_id)
    return _account(user, mfa_reset=True)


@router.put("/users/{username}/roles", responses={**_ERRORS, 409: {}, 422: {}})
async def set_roles(
    username: str, body: RolesRequest, request: Request, admin: Admin
) -> JSONResponse:
    """Replace the user's roles (their links must suit them); their sessions end."""
    user = await _target(request, username)
    if user.id == admin.user_id:
        # The way back would be the command line: an admin does not demote themself here.
        raise ProblemError(409, "An administrator cannot change their own roles.")
    try:
        user = await _accounts(request).set_roles(
            username, body.roles, by=admin.user_id, ctx=context(request)
        )
    except AccountError as err:
        if err.code == "not_found":  # removed meanwhile
            raise ProblemError(404) from None
        # The roles do not suit the account's links (a Patient, a Practitioner): fixed text.
        raise ProblemError(422, err.message) from None
    return _account(user)


async def _set_enabled(
    username: str, enabled: bool, request: Request, admin: Principal
) -> JSONResponse:
    user = await _target(request, username)
    if user.id == admin.user_id:
        raise ProblemError(409, "An administrator cannot disable or enable their own account.")
    try:
        user = await _accounts(request).set_enabled(
            username, enabled, by=admin.user_id, ctx=context(request)
        )
    except AccountError:
        raise ProblemError(404) from None
    return _account(user)


@router.post("/users/{username}/disable", responses={**_ERRORS, 409: {}})
async def disable(username: str, request: Request, admin: Admin) -> JSONResponse:
    """Disable the account and end every session it has."""
    return await _set_enabled(username, False, request, admin)


@router.post("/users/{username}/enable", responses=_ERRORS)
async def enable(username: str, request: Request, admin: Admin) -> JSONResponse:
    """Enable a disabled account."""
    return await _set_enabled(username, True, request, admin)

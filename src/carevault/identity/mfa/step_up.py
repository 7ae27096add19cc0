"""Step-up (RFC 9470): high-risk actions need a recent authentication with a second factor.

`StepUp` is a FastAPI dependency for such routes: the principal's `auth_time` must be at most
`step_up_max_age_seconds` old and its `amr` must show a second factor, else 401 with
`WWW-Authenticate: Bearer error="insufficient_user_authentication", max_age=..., acr_values=...`
(and the refusal is recorded). `POST /auth/step-up` proves a factor again and returns a fresh
access token that passes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from carevault.audit.events import SecurityEvent
from carevault.audit.request import request_id
from carevault.edge.client_address import client_address
from carevault.edge.problems import ProblemError
from carevault.identity.mfa.policy import ACR_MFA, is_fresh_mfa
from carevault.identity.principal import Principal
from carevault.tokens.bearer import REALM, authenticate, authenticate_enrollment

STEP_UP_TYPE = "https://carevault.dev/problems/step-up-required"


def step_up_challenge(max_age: int) -> ProblemError:
    challenge = (
        f'{REALM}, error="insufficient_user_authentication", '
        f'error_description="A recent authentication with a second factor is required", '
        f'max_age={max_age}, acr_values="{ACR_MFA}"'
    )
    return ProblemError(
        401,
        "This action needs a recent authentication with a second factor: "
        "POST /auth/step-up, then repeat the request with the new token.",
        title="Step-up authentication required",
        type_=STEP_UP_TYPE,
        headers={"WWW-Authenticate": challenge},
        extra={"max_age": max_age, "acr_values": ACR_MFA},
    )


async def require_step_up(
    request: Request, principal: Annotated[Principal, Depends(authenticate)]
) -> Principal:
    await check_step_up(request, principal)
    return principal


async def require_step_up_if_enrolled(
    request: Request, principal: Annotated[Principal, Depends(authenticate_enrollment)]
) -> Principal:
    """Adding a factor: the first one needs only the login (or the enrollment token); once
    the account has a factor, adding another needs a fresh proof of one, or a stolen access
    token could plant the thief's authenticator."""
    if await request.app.state.services.mfa.methods(principal.user_id):
        await check_step_up(request, principal)
    return principal


async def check_step_up(request: Request, principal: Principal) -> None:
    services = request.app.state.services
    max_age = services.settings.step_up_max_age_seconds
    now = services.clock()
    if is_fresh_mfa(principal.amr, principal.auth_time, now, max_age):
        return
    await services.events.record(
        SecurityEvent(
            "step_up_required",
            "denied",
            user_id=principal.user_id,
            client_id=principal.client_id,
            source_address=client_address(request, services.settings.trusted_proxies),
            request_id=request_id(request),
            details={"route": getattr(request.scope.get("route"), "path", None)},
        )
    )
    raise step_up_challenge(max_age)


StepUp = Annotated[Principal, Depends(require_step_up)]
NewFactor = Annotated[Principal, Depends(require_step_up_if_enrolled)]

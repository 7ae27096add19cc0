"""`/auth/mfa/*` and `/auth/step-up`: the login's second step, TOTP enrollment, recovery codes,
the factor list, and step-up. WebAuthn's ceremonies are in `webauthn_routes.py`.

Every refusal is a problem document with a fixed message: a wrong code, a replayed code and a
code for another user read the same.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from carevault.edge.problems import ProblemError
from carevault.identity.authentication import TokenGrant
from carevault.identity.mfa.policy import METHOD_RECOVERY, METHOD_TOTP, METHOD_WEBAUTHN
from carevault.identity.mfa.service import (
    FactorProof,
    FactorRequired,
    MfaFailed,
    MfaLocked,
    MfaService,
    MfaTokenInvalid,
)
from carevault.identity.mfa.step_up import NewFactor, StepUp
from carevault.identity.principal import Principal
from carevault.identity.responses import NO_STORE, context, token_response
from carevault.identity.throttle import AddressThrottled
from carevault.tokens.bearer import authenticate, authenticate_enrollment

router = APIRouter(prefix="/auth", tags=["mfa"])
NOT_ACCEPTED = "The second factor was not accepted."
TOKEN_INVALID = "The MFA token is invalid or expired; log in again."  # noqa: S105 - a message

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Not accepted"},
    429: {"description": "Too many failed attempts"},
}


class MfaVerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mfa_token: str = Field(min_length=1, max_length=64)
    method: str = Field(pattern=f"^({METHOD_TOTP}|{METHOD_RECOVERY}|{METHOD_WEBAUTHN})$")
    code: str | None = Field(None, min_length=1, max_length=32)
    credential: dict[str, Any] | None = None  # a WebAuthn assertion (PublicKeyCredential JSON)


class StepUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(pattern=f"^({METHOD_TOTP}|{METHOD_RECOVERY}|{METHOD_WEBAUTHN})$")
    code: str | None = Field(None, min_length=1, max_length=32)
    credential: dict[str, Any] | None = None


class CodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=1, max_length=16)


def mfa_service(request: Request) -> MfaService:
    return request.app.state.services.mfa  # type: ignore[no-any-return]


def grant_body(grant: TokenGrant) -> dict[str, Any]:
    return {
        "access_token": grant.access_token,
        "token_type": "Bearer",
        "expires_in": grant.expires_in,
        "refresh_token": grant.refresh_token,
    }


def refused(err: Exception) -> ProblemError:
    if isinstance(err, MfaLocked):
        return ProblemError(
            429,
            "Too many failed attempts; try again later.",
            headers={"Retry-After": str(err.retry_after)},
        )
    if isinstance(err, AddressThrottled):
        return ProblemError(
            429,
            "Too many failed attempts; try again later.",
            headers={"Retry-After": str(err.retry_after)},
        )
    if isinstance(err, MfaTokenInvalid):
        return ProblemError(401, TOKEN_INVALID)
    return ProblemError(401, NOT_ACCEPTED)


def _proof(body: MfaVerifyRequest | StepUpRequest) -> FactorProof:
    return FactorProof(body.method, body.code, body.credential)


@router.post("/mfa/verify", responses=_ERRORS)
async def mfa_verify(body: MfaVerifyRequest, request: Request) -> Response:
    """Finish a login with the mfa_token `POST /auth/login` gave and one factor's proof."""
    try:
        grant = await mfa_service(request).verify_login(
            body.mfa_token, _proof(body), context(request)
        )
    except (MfaFailed, MfaLocked, MfaTokenInvalid, AddressThrottled) as err:
        raise refused(err) from None
    return token_response(request, grant)  # as a one-step login answers (refresh cookie too)


@router.post("/step-up", responses=_ERRORS)
async def step_up(
    body: StepUpRequest,
    request: Request,
    principal: Annotated[Principal, Depends(authenticate)],
) -> Response:
    """Prove a factor again: a fresh access token (same session) for high-risk actions."""
    settings = request.app.state.services.settings
    try:
        token = await mfa_service(request).step_up(principal, _proof(body), context(request))
    except (MfaFailed, MfaLocked, AddressThrottled) as err:
        raise refused(err) from None
    return JSONResponse(
        {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": settings.access_token_ttl_seconds,
        },
        headers=NO_STORE,
    )


@router.post("/mfa/totp/enroll", responses=_ERRORS)
async def totp_enroll(request: Request, principal: NewFactor) -> Response:
    """Start a TOTP enrollment: the secret as an otpauth URI and a QR code (SVG). The factor
    counts only once `POST /auth/mfa/totp/confirm` has seen a code from it."""
    try:
        enrollment = await mfa_service(request).enroll_totp(principal, context(request))
    except MfaFailed as err:
        raise refused(err) from None
    return JSONResponse(
        {"otpauth_uri": enrollment.otpauth_uri, "qr_svg": enrollment.qr_svg}, headers=NO_STORE
    )


@router.post("/mfa/totp/confirm", responses=_ERRORS)
async def totp_confirm(body: CodeRequest, request: Request, principal: NewFactor) -> Response:
    """Activate the enrolled TOTP factor with a current code. Answers the recovery codes (once,
    for a first factor) and, for an enrollment-scoped token, the tokens of the login."""
    try:
        done = await mfa_service(request).confirm_totp(principal, body.code, context(request))
    except (MfaFailed, MfaLocked, AddressThrottled) as err:
        raise refused(err) from None
    result: dict[str, Any] = {"recovery_codes": done.recovery_codes}
    if done.grant is not None:
        result.update(grant_body(done.grant))
    return JSONResponse(result, headers=NO_STORE)


@router.get("/mfa/factors")
async def factors(
    request: Request, principal: Annotated[Principal, Depends(authenticate_enrollment)]
) -> Response:
    service = mfa_service(request)
    summary = await service.summary(principal.user_id)
    keys = await service.webauthn.describe(principal.user_id) if service.webauthn else []
    return JSONResponse(
        {
            "totp": summary.totp,
            "webauthn": keys,
            "recovery_codes_remaining": summary.recovery_codes_remaining,
            "methods": await service.methods(principal.user_id),
        },
        headers=NO_STORE,
    )


@router.delete(
    "/mfa/totp/{factor_id}",
    status_code=204,
    responses={401: {"description": "Step-up required"}, 404: {}, 409: {}},
)
async def totp_remove(factor_id: str, request: Request, principal: StepUp) -> Response:
    """Remove a TOTP factor (step-up). The last factor of an account that must have MFA stays."""
    try:
        removed = await mfa_service(request).remove_totp(principal, factor_id, context(request))
    except FactorRequired:
        raise ProblemError(409, "This account must keep a second factor.") from None
    except MfaFailed as err:
        raise refused(err) from None
    if not removed:
        raise ProblemError(404)
    return Response(status_code=204)


@router.post("/mfa/recovery-codes", responses={401: {}, 409: {}})
async def recovery_codes(request: Request, principal: StepUp) -> Response:
    """A new set of recovery codes (step-up); the previous set stops working."""
    try:
        codes = await mfa_service(request).regenerate_recovery_codes(principal, context(request))
    except FactorRequired:
        raise ProblemError(409, "Enroll a second factor first.") from None
    except MfaFailed as err:
        raise refused(err) from None
    return JSONResponse({"recovery_codes": codes}, headers=NO_STORE)

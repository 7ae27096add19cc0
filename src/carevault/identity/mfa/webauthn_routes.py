"""`/auth/webauthn/*`: the WebAuthn ceremonies (registration, the login's second step, step-up
options) and the removal of a credential.

Each ceremony is two requests: `.../options` stores a challenge for what the caller is (the
session, or the login attempt of an mfa_token) and answers the options for
`navigator.credentials.create()` / `.get()`; the matching call takes the authenticator's
response (the PublicKeyCredential's JSON). Step-up finishes at `POST /auth/step-up` and a
login may finish at `POST /auth/mfa/verify` too. Refusals are generic problem documents; the
reason goes to the trail.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from carevault.edge.problems import ProblemError
from carevault.identity.accounts import User
from carevault.identity.mfa.challenges import token_hash
from carevault.identity.mfa.policy import ENROLL_SCOPE, METHOD_WEBAUTHN
from carevault.identity.mfa.routes import NOT_ACCEPTED, grant_body, mfa_service, refused
from carevault.identity.mfa.service import (
    FactorProof,
    FactorRequired,
    MfaFailed,
    MfaLocked,
    MfaTokenInvalid,
    WebAuthnFailed,
)
from carevault.identity.mfa.step_up import StepUp, require_step_up
from carevault.identity.mfa.webauthn import CredentialLimit, NoCredentials, WebAuthnCredentials
from carevault.identity.principal import Principal
from carevault.identity.responses import NO_STORE, context, token_response
from carevault.identity.throttle import AddressThrottled
from carevault.tokens.bearer import authenticate, authenticate_enrollment

router = APIRouter(prefix="/auth/webauthn", tags=["mfa"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Not accepted"},
    409: {"description": "No usable security key, or too many"},
    429: {"description": "Too many failed attempts"},
}

# base64url text of the PublicKeyCredential's parts; attestation objects may carry a
# certificate chain, the rest is small.
_Id = Annotated[str, Field(min_length=1, max_length=1400)]
_SMALL = 4096
_LARGE = 32768


class _CredentialJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: _Id
    rawId: _Id
    type: Literal["public-key"]
    authenticatorAttachment: str | None = Field(None, max_length=32)
    clientExtensionResults: dict[str, Any] = Field(default_factory=dict, max_length=16)


class _AttestationResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clientDataJSON: str = Field(min_length=1, max_length=_SMALL)
    attestationObject: str = Field(min_length=1, max_length=_LARGE)
    transports: list[Annotated[str, Field(max_length=32)]] = Field(
        default_factory=list, max_length=8
    )
    authenticatorData: str | None = Field(None, max_length=_LARGE)
    publicKey: str | None = Field(None, max_length=_SMALL)
    publicKeyAlgorithm: int | None = None


class RegistrationCredential(_CredentialJSON):
    response: _AttestationResponse


class _AssertionResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clientDataJSON: str = Field(min_length=1, max_length=_SMALL)
    authenticatorData: str = Field(min_length=1, max_length=_LARGE)
    signature: str = Field(min_length=1, max_length=_SMALL)
    userHandle: str | None = Field(None, max_length=_SMALL)


class AuthenticationCredential(_CredentialJSON):
    response: _AssertionResponse


class RegisterVerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credential: RegistrationCredential
    label: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")


class LoginOptionsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mfa_token: str = Field(min_length=1, max_length=64)


class LoginVerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mfa_token: str = Field(min_length=1, max_length=64)
    credential: AuthenticationCredential


def _credentials(request: Request) -> WebAuthnCredentials:
    webauthn = mfa_service(request).webauthn
    if not isinstance(webauthn, WebAuthnCredentials):
        raise ProblemError(404)
    return webauthn


def _options(options: str) -> Response:
    return Response(options, media_type="application/json", headers=NO_STORE)


def _session(principal: Principal) -> str:
    return f"sid:{principal.session_id}"


def _dump(credential: BaseModel) -> dict[str, Any]:
    return credential.model_dump(exclude_none=True)


async def _user(request: Request, principal: Principal) -> User:
    user = await request.app.state.services.users.by_id(principal.user_id)
    if user is None or not user.enabled:
        raise refused(MfaFailed("account"))
    return user  # type: ignore[no-any-return]


async def _may_add_key(request: Request, principal: Principal, user: User) -> None:
    """An account that has a factor adds another only after proving one recently (step-up):
    an access token alone must not be enough to plant someone else's key on the account.
    An enrollment-scoped token is for an account with no factor yet."""
    if ENROLL_SCOPE in principal.scopes:
        return
    if await mfa_service(request).methods(user.id):
        await require_step_up(request, principal)


@router.post("/register/options", responses=_ERRORS)
async def register_options(
    request: Request, principal: Annotated[Principal, Depends(authenticate_enrollment)]
) -> Response:
    """Start registering a security key or passkey: the options for
    `navigator.credentials.create()`."""
    user = await _user(request, principal)
    await _may_add_key(request, principal, user)
    try:
        options = await _credentials(request).registration_options(
            user, _session(principal), context(request)
        )
    except CredentialLimit:
        raise ProblemError(409, "This account has as many security keys as it may.") from None
    return _options(options)


@router.post("/register/verify", responses=_ERRORS)
async def register_verify(
    body: RegisterVerifyRequest,
    request: Request,
    principal: Annotated[Principal, Depends(authenticate_enrollment)],
) -> Response:
    """Finish the registration with the authenticator's response. Answers the credential, the
    recovery codes (once, for a first factor) and, for an enrollment-scoped token, the tokens
    of the login that was waiting for a factor."""
    user = await _user(request, principal)
    await _may_add_key(request, principal, user)
    ctx = context(request)
    try:
        registered = await _credentials(request).register(
            user, _session(principal), _dump(body.credential), body.label, ctx
        )
    except CredentialLimit:
        raise ProblemError(409, "This account has as many security keys as it may.") from None
    except WebAuthnFailed:
        raise ProblemError(401, NOT_ACCEPTED) from None
    try:
        done = await mfa_service(request).factor_added(principal, registered.proof, ctx)
    except MfaFailed as err:
        raise refused(err) from None
    result: dict[str, Any] = {
        "credential": registered.credential,
        "recovery_codes": done.recovery_codes,
    }
    if done.grant is not None:
        result.update(grant_body(done.grant))
    return JSONResponse(result, headers=NO_STORE)


@router.post("/login/options", responses=_ERRORS)
async def login_options(body: LoginOptionsRequest, request: Request) -> Response:
    """The options for `navigator.credentials.get()` for the login attempt of `mfa_token`
    (which stays usable: the assertion spends it)."""
    try:
        user = await mfa_service(request).login_user(body.mfa_token)
    except MfaTokenInvalid as err:
        raise refused(err) from None
    try:
        options = await _credentials(request).authentication_options(
            user, token_hash(body.mfa_token)
        )
    except NoCredentials:
        raise ProblemError(409, "No security key is registered for this account.") from None
    return _options(options)


@router.post("/login/verify", responses=_ERRORS)
async def login_verify(body: LoginVerifyRequest, request: Request) -> Response:
    """Finish the login with the authenticator's assertion (as `POST /auth/mfa/verify` with
    method `webauthn`)."""
    proof = FactorProof(METHOD_WEBAUTHN, credential=_dump(body.credential))
    try:
        grant = await mfa_service(request).verify_login(body.mfa_token, proof, context(request))
    except (MfaFailed, MfaLocked, MfaTokenInvalid, AddressThrottled) as err:
        raise refused(err) from None
    return token_response(request, grant)


@router.post("/step-up/options", responses=_ERRORS)
async def step_up_options(
    request: Request, principal: Annotated[Principal, Depends(authenticate)]
) -> Response:
    """The options for an assertion that `POST /auth/step-up` (method `webauthn`) takes."""
    user = await _user(request, principal)
    try:
        options = await _credentials(request).authentication_options(user, _session(principal))
    except NoCredentials:
        raise ProblemError(409, "No security key is registered for this account.") from None
    return _options(options)


@router.delete(
    "/credentials/{credential_id}",
    status_code=204,
    responses={401: {"description": "Step-up required"}, 404: {}, 409: {}},
)
async def remove_credential(
    credential_id: Annotated[str, Path(min_length=1, max_length=64)],
    request: Request,
    principal: StepUp,
) -> Response:
    """Remove a security key (step-up). The last factor of an account that must have MFA
    stays."""
    service = mfa_service(request)
    credentials = _credentials(request)
    user = await _user(request, principal)
    listed = await credentials.describe(user.id)
    target = next((c for c in listed if c["id"] == credential_id), None)
    if target is None:
        raise ProblemError(404)
    # A flagged key is no factor any more: removing it leaves the account as strong as it is.
    if not target["flagged"]:
        others = sum(1 for c in listed if not c["flagged"] and c["id"] != credential_id)
        totp = len(await service.totp.factors(user.id))
        try:
            await service.ensure_removable(user, remaining_factors=others + totp)
        except FactorRequired:
            raise ProblemError(409, "This account must keep a second factor.") from None
    if not await credentials.remove(user.id, credential_id):
        raise ProblemError(404)
    await service.factor_removed(user, METHOD_WEBAUTHN, context(request))
    return Response(status_code=204, headers=NO_STORE)

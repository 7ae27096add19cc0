"""`/oauth/*`: authorize (sign-in, second factor, consent and patient picker pages), token,
revoke, introspect and userinfo.

The browser side signs in through the web portal's server-side session (identity/web/), so a
user already signed in to carevault is not asked again, and CSRF protection is the portal's:
every form POST carries the session's token. The original authorization request travels in a
hidden field and is validated again by authlib on every step; nothing in it is trusted.

Token-endpoint errors are RFC 6749 §5.2 JSON (`error`, `error_description`), not problem
documents: that is the format OAuth clients parse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

import structlog
from authlib.oauth2.rfc6749 import AccessDeniedError, InvalidRequestError, OAuth2Error
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from carevault.access.decision import Action
from carevault.audit.events import SecurityEvent
from carevault.edge.problems import ProblemError
from carevault.fhir.store import StoreError
from carevault.identity.authentication import (
    EnrollmentRequired,
    LoginFailed,
    MfaRequired,
    first_party_scope,
)
from carevault.identity.mfa.service import FactorProof, MfaFailed, MfaLocked, MfaTokenInvalid
from carevault.identity.principal import Principal
from carevault.identity.responses import NO_STORE, context
from carevault.identity.roles import Role
from carevault.identity.throttle import AddressThrottled
from carevault.identity.web.csrf import foreign_origin
from carevault.identity.web.login import begin, finish, set_session_cookie
from carevault.identity.web.sessions import ACTIVE, MFA_PENDING, SessionGone
from carevault.oauth import pages
from carevault.oauth.dpop import DpopError
from carevault.oauth.replay import ReplayCacheUnavailable
from carevault.oauth.scopes import LAUNCH_PATIENT, describe, resource_scopes, split
from carevault.oauth.server import Authorization, DpopRequired
from carevault.oauth.server import Request as OAuthRequest
from carevault.oauth.server import Response as OAuthResponse
from carevault.tokens.bearer import authenticate, authenticate_resource
from carevault.tokens.revocation import RevocationUnavailable

log = structlog.get_logger("carevault.oauth")
router = APIRouter(prefix="/oauth", tags=["oauth"])
_FORM = "application/x-www-form-urlencoded"
_MAX_FIELDS = 30
_MAX_REQUEST_CHARS = 8192
_LOGIN_FAILED = "Invalid username or password."
_BAD_REQUEST = (
    "This sign-in request cannot be completed: the application or its return address is not "
    "registered here, or the request is malformed."
)
MAX_PICKER_PATIENTS = 200
_FORM_BODY = {"required": True, "content": {_FORM: {"schema": {"type": "object"}}}}


def _provider(request: Request) -> Any:
    return request.app.state.oauth


async def _form(request: Request) -> list[tuple[str, str]]:
    """The body's form fields; RFC 6749 §3.1/§3.2: a parameter sent twice is an error."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != _FORM:
        raise _OAuthFailure(InvalidRequestError("The body must be a form."))
    try:
        pairs = parse_qsl(
            (await request.body()).decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=_MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise _OAuthFailure(InvalidRequestError("Malformed form body.")) from None
    names = [name for name, _ in pairs]
    if len(names) != len(set(names)):
        raise _OAuthFailure(InvalidRequestError("A parameter was sent more than once."))
    return pairs


class _OAuthFailure(Exception):
    def __init__(self, error: OAuth2Error) -> None:
        self.error = error


def _oauth_request(
    request: Request, method: str, query: list[tuple[str, str]], form: list[tuple[str, str]]
) -> OAuthRequest:
    settings = request.app.state.services.settings
    return OAuthRequest(
        method,
        f"{settings.issuer}{request.url.path}",
        request.headers,  # case-insensitive, as authlib's lookups need
        query,
        form,
        context(request),
    )


def _respond(result: OAuthResponse, extra: dict[str, str] | None = None) -> Response:
    headers = dict(NO_STORE)
    headers.update(extra or {})
    if result.status in (301, 302, 303) and result.location:
        response: Response = RedirectResponse(result.location, status_code=302, headers=headers)
        return response
    for name, value in result.headers:
        if name.lower() not in ("content-type", "cache-control", "pragma"):
            headers[name] = value
    return JSONResponse(result.body, status_code=result.status, headers=headers)


def _error_json(error: OAuth2Error, headers: dict[str, str] | None = None) -> Response:
    status, body, error_headers = error()
    merged = dict(NO_STORE)
    merged.update({k: v for k, v in error_headers if k.lower() == "www-authenticate"})
    merged.update(headers or {})
    return JSONResponse(dict(body), status_code=status, headers=merged)


def _dpop_error(err: DpopError, nonce: str) -> Response:
    headers = dict(NO_STORE)
    headers["DPoP-Nonce"] = nonce
    return JSONResponse(
        {"error": err.error, "error_description": err.description},
        status_code=400,
        headers=headers,
    )


# --- the authorization endpoint ------------------------------------------------------------


async def _validated(request: Request, query: list[tuple[str, str]]) -> tuple[OAuthRequest, Any]:
    """authlib's validation of an authorization request: (request, grant), or raises
    `OAuth2Error` (with `redirect_uri` set only when the client and its URI were verified)."""
    server = _provider(request).server
    oauth_request = _oauth_request(request, "GET", query, [])
    grant = await server.run(lambda: server.consent_grant(oauth_request))
    return oauth_request, grant


def _refusal(request: Request, oauth_request: OAuthRequest, error: OAuth2Error) -> Response:
    """An error the client hears about by redirect, or a page when the redirect URI is not
    trusted (RFC 6749 §4.1.2.1: never redirect to an unverified URI)."""
    if getattr(error, "redirect_uri", None):
        server = _provider(request).server
        return _respond(server.error_redirect(oauth_request, error))
    log.info("authorize_refused", error=error.error)
    return pages.error_page(_BAD_REQUEST)


def _query_of(raw: str) -> list[tuple[str, str]] | None:
    if len(raw) > _MAX_REQUEST_CHARS:
        return None
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    except ValueError:
        return None
    return pairs


def _smart_audience_ok(request: Request, oauth_request: OAuthRequest) -> bool:
    """SMART App Launch: `aud` names the FHIR server the token is for; a request for FHIR
    scopes must name this one, so a token meant for another server is never minted here."""
    settings = request.app.state.services.settings
    scopes = split(oauth_request.payload.data.get("scope"))
    aud = oauth_request.payload.data.get("aud")
    if aud is None:
        return not resource_scopes(scopes)
    return aud.rstrip("/") == f"{settings.issuer}/fhir"


@router.get("/authorize", responses={400: {"description": "Unknown client or redirect URI"}})
async def authorize(request: Request) -> Response:
    """Start or continue an authorization: sign in, second factor, consent, then a redirect
    to the client with `code`, `state` and `iss`."""
    raw = request.url.query
    query = _query_of(raw)
    if query is None:
        return pages.error_page(_BAD_REQUEST)
    return await _continue(request, raw, query)


async def _continue(
    request: Request, raw: str, query: list[tuple[str, str]], error: str | None = None
) -> Response:
    services = request.app.state.services
    oauth_request = _oauth_request(request, "GET", query, [])
    try:
        oauth_request, grant = await _validated(request, query)
    except OAuth2Error as err:
        return _refusal(request, oauth_request, err)

    def refuse(err: OAuth2Error) -> Response:
        err.redirect_uri = grant.redirect_uri
        err.state = oauth_request.payload.state
        return _refusal(request, oauth_request, err)

    if not _smart_audience_ok(request, oauth_request):
        return refuse(InvalidRequestError("aud must be this server's FHIR base URL."))
    data = oauth_request.payload.data
    prompts = set(data.get("prompt", "").split())
    try:
        max_age = int(data["max_age"]) if "max_age" in data else None
    except ValueError:
        return refuse(InvalidRequestError("max_age must be a number of seconds."))
    if "none" in prompts and len(prompts) > 1:
        return refuse(InvalidRequestError("prompt=none goes with no other prompt."))
    client = oauth_request.client.client
    session = await services.browser_sessions.of_request(request.scope)
    user = None
    if session is not None and session.state == ACTIVE:
        user = await services.users.by_id(session.user_id)
    if user is None or not user.enabled or _login_again(session, prompts, max_age, services):
        # OpenID Connect Core §3.1.2.1: prompt=none never shows a page
        if "none" in prompts:
            return refuse(_OidcError("login_required"))
        if session is not None and session.state == MFA_PENDING:
            return pages.mfa_page(raw, session.csrf_token, PAGE_METHODS)
        return pages.login_page(client.name, raw, session.csrf_token if session else None)
    scopes = oauth_request.granted_scope
    picker = await _patient_choices(request, user, scopes)
    if isinstance(picker, Response):
        return refuse(AccessDeniedError("No patient context is available for this user."))
    approved = await _provider(request).consents.approved(user.id, client.id)
    remembered = picker is None and set(scopes) <= approved and _identity_assured(client)
    if remembered and "consent" not in prompts:
        approval = _approval(session, user, _own_patient(user, scopes))
        server = _provider(request).server
        return _respond(await server.run(lambda: server.authorize(oauth_request, grant, approval)))
    if "none" in prompts:
        return refuse(_OidcError("consent_required"))
    return pages.consent_page(
        client.name,
        [describe(s) for s in scopes],
        raw,
        session.csrf_token,
        picker,
        error,
    )


class _OidcError(OAuth2Error):  # type: ignore[misc]
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


def _login_again(session: Any, prompts: set[str], max_age: int | None, services: Any) -> bool:
    """prompt=login, or a sign-in older than max_age: the user signs in again. (After that
    sign-in the request comes back without prompt=login: see `_after_sign_in`.)"""
    if "login" in prompts:
        return True
    if max_age is None:
        return False
    auth_time = session.auth_time or int(session.created_at)
    return bool(services.clock() - auth_time > max_age)


def _identity_assured(client: Any) -> bool:
    """Whether a remembered approval may be used without asking (RFC 8252 §8.6): not for a
    public client whose redirect is a loopback address or private scheme, which any local
    program could claim; a confidential client, or one returning to an https URL, is itself."""
    if not client.public:
        return True
    return all(uri.startswith("https://") for uri in client.redirect_uris)


def _after_sign_in(raw: str) -> str:
    """The authorization request to continue with once the user signed in: without
    prompt=login, which that sign-in satisfied."""
    pairs = [
        (name, " ".join(p for p in value.split() if p != "login") if name == "prompt" else value)
        for name, value in parse_qsl(raw, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    ]
    return urlencode([(n, v) for n, v in pairs if not (n == "prompt" and not v)])


# The methods the pages offer: a security key needs script, so it is used on the portal.
PAGE_METHODS = ["totp", "recovery"]


def _own_patient(user: Any, scopes: list[str]) -> str | None:
    if LAUNCH_PATIENT in scopes and Role.patient in user.roles:
        return user.patient_id  # type: ignore[no-any-return]
    return None


def _approval(session: Any, user: Any, patient: str | None) -> Authorization:
    return Authorization(
        user=user,
        amr=list(session.amr),
        acr=session.acr,
        auth_time=session.auth_time or int(session.created_at),
        patient=patient,
    )


async def _patient_choices(
    request: Request, user: Any, scopes: list[str]
) -> list[tuple[str, str]] | None | Response:
    """The SMART patient picker's choices when `launch/patient` needs a practitioner to choose
    (patients they have a care relationship with); None when nothing is to be chosen (no
    launch/patient, or a patient user, whose context is their own record); a `Response`
    when a patient user has no linked record."""
    if LAUNCH_PATIENT not in scopes:
        return None
    if Role.patient in user.roles:
        return None if user.patient_id else pages.error_page(_BAD_REQUEST)
    requester = await _requester(request, user)
    choices = []
    for patient_id in sorted(requester.care_patients)[:MAX_PICKER_PATIENTS]:
        body = await _readable_patient(request, requester, patient_id)
        if body is not None:
            choices.append((patient_id, _patient_label(patient_id, body)))
    return choices


async def _readable_patient(
    request: Request, requester: Any, patient_id: str
) -> dict[str, Any] | None:
    """The Patient record if the user may read it now without break-glass (the policy's
    relationships, labels and the patient's consent all apply), else None."""
    try:
        stored = await request.app.state.services.store.read("Patient", patient_id)
    except StoreError:
        return None
    if stored.body is None:
        return None
    decision, _ = await request.app.state.services.access.decide_on(
        requester, Action.read, "Patient", stored.body
    )
    return stored.body if decision.permit and not decision.break_glass else None


async def _requester(request: Request, user: Any) -> Any:
    services = request.app.state.services
    principal = Principal(
        user_id=user.id,
        client_id="carevault-oauth",
        roles=tuple(user.roles),
        scopes=tuple(first_party_scope(user).split()),
        amr=(),
        auth_time=0,
        session_id="",
        token_id="",
        token_expires_at=0,
    )
    return await services.access.requester(principal, None)


def _patient_label(patient_id: str, body: dict[str, Any]) -> str:
    """A patient's name and birth date as the picker shows them to the practitioner."""
    names = body.get("name") or []
    name = names[0] if names and isinstance(names[0], dict) else {}
    text = name.get("text") or " ".join([*name.get("given", []), name.get("family", "")]).strip()
    birth = body.get("birthDate")
    return f"{text or patient_id}{f' ({birth})' if birth else ''}"


async def _posted_request(request: Request) -> tuple[dict[str, str], str, list[tuple[str, str]]]:
    """The fields of a form POSTed by one of the pages, and the authorization request in it."""
    try:
        fields = dict(await _form(request))
    except _OAuthFailure:
        raise ProblemError(400) from None
    raw = fields.get("request", "")
    query = _query_of(raw)
    if query is None:
        raise ProblemError(400)
    return fields, raw, query


@router.post(
    "/authorize/login",
    openapi_extra={"requestBody": _FORM_BODY},
    responses={400: {"description": "Bad request"}, 401: {"description": "Not accepted"}},
)
async def authorize_login(request: Request) -> Response:
    services = request.app.state.services
    fields, raw, query = await _posted_request(request)
    oauth_request = _oauth_request(request, "GET", query, [])
    try:
        oauth_request, _grant = await _validated(request, query)
    except OAuth2Error as err:
        return _refusal(request, oauth_request, err)
    client = oauth_request.client.client
    ctx = context(request)
    if foreign_origin(request.headers):
        return pages.error_page(_BAD_REQUEST, 403)
    sessions = services.browser_sessions
    previous = await sessions.of_request(request.scope)
    csrf = previous.csrf_token if previous is not None else None
    username, password = fields.get("username", ""), fields.get("password", "")
    if not username or not password or len(username) > 256 or len(password) > 1024:
        return pages.login_page(client.name, raw, csrf, _LOGIN_FAILED)
    try:
        user, second = await services.authenticator.check_password(username, password, ctx)
    except LoginFailed:
        return pages.login_page(client.name, raw, csrf, _LOGIN_FAILED)
    except AddressThrottled:
        return pages.login_page(client.name, raw, csrf, "Too many failed sign-ins; try later.")
    if previous is not None:
        await sessions.end(previous.id, "rotated")
    if isinstance(second, EnrollmentRequired):
        return pages.error_page(
            "This account must enroll a second factor first: sign in to the carevault portal, "
            "enroll one, then try again.",
            403,
        )
    session, value = await begin(services, ctx, user, second)
    if isinstance(second, MfaRequired):
        response: Response = pages.mfa_page(raw, session.csrf_token, second.methods)
        set_session_cookie(response, value)
        return response
    return _back_to_authorize(raw, value)


def _back_to_authorize(raw: str, cookie: str) -> Response:
    """Signed in: on to the authorization request, with the new session's cookie."""
    response = RedirectResponse(
        f"/oauth/authorize?{_after_sign_in(raw)}", status_code=303, headers=NO_STORE
    )
    set_session_cookie(response, cookie)
    return response


@router.post(
    "/authorize/mfa",
    openapi_extra={"requestBody": _FORM_BODY},
    responses={400: {"description": "Bad request"}, 401: {"description": "Not accepted"}},
)
async def authorize_mfa(request: Request) -> Response:
    services = request.app.state.services
    fields, raw, query = await _posted_request(request)
    sessions = services.browser_sessions
    session = await sessions.of_request(request.scope)
    if session is None or session.state != MFA_PENDING or session.mfa_attempt is None:
        return await _continue(request, raw, query)
    ctx = context(request)
    proof = FactorProof(fields.get("method", ""), fields.get("code", "")[:32] or None, None)
    try:
        user, verified = await services.mfa.complete_attempt(session.mfa_attempt, proof, ctx)
    except MfaTokenInvalid:
        await sessions.end(session.id, "mfa_expired")
        return await _continue(request, raw, query)
    except (MfaFailed, MfaLocked, AddressThrottled):
        return pages.mfa_page(raw, session.csrf_token, PAGE_METHODS, "That code was not accepted.")
    try:
        active, value = await finish(services, ctx, session, user, verified, proof.method)
    except SessionGone:
        return await _continue(request, raw, query)
    return _back_to_authorize(raw, value)


@router.post(
    "/authorize/consent",
    openapi_extra={"requestBody": _FORM_BODY},
    responses={400: {"description": "Bad request"}},
)
async def authorize_consent(request: Request) -> Response:
    services = request.app.state.services
    fields, raw, query = await _posted_request(request)
    oauth_request = _oauth_request(request, "GET", query, [])
    try:
        oauth_request, grant = await _validated(request, query)
    except OAuth2Error as err:
        return _refusal(request, oauth_request, err)
    session = await services.browser_sessions.of_request(request.scope)
    if session is None or session.state != ACTIVE:
        return await _continue(request, raw, query)
    user = await services.users.by_id(session.user_id)
    if user is None or not user.enabled:
        return await _continue(request, raw, query)
    server = _provider(request).server
    client = oauth_request.client.client
    if fields.get("decision") != "approve":
        result = await server.run(lambda: server.authorize(oauth_request, grant, None))
        await server.record("consent_denied", client, user.id, context(request))
        return _respond(result)
    scopes = oauth_request.granted_scope
    patient = _own_patient(user, scopes)
    if LAUNCH_PATIENT in scopes and Role.patient not in user.roles:
        patient = fields.get("patient") or None
        requester = await _requester(request, user)
        if patient is None or await _readable_patient(request, requester, patient) is None:
            return await _continue(request, raw, query, "Choose a patient you care for.")
    await _provider(request).consents.remember(user.id, client.id, scopes)
    await request.app.state.services.events.record(
        SecurityEvent(
            "consent_granted",
            "success",
            user_id=user.id,
            client_id=client.id,
            source_address=context(request).address,
            request_id=context(request).request_id,
            patient_id=patient,  # the launch patient: on that patient's access report
            details={"scope": " ".join(scopes)},
        )
    )
    approval = _approval(session, user, patient)
    return _respond(await server.run(lambda: server.authorize(oauth_request, grant, approval)))


# --- the token endpoint and its companions -------------------------------------------------


async def _dpop_thumbprint(request: Request) -> str | None:
    """The key a token request proved with DPoP, or None without a proof (raises DpopError)."""
    values = request.headers.getlist("dpop")
    if not values:
        return None
    services = request.app.state.services
    proof = await _provider(request).dpop.verify(
        values,
        method=request.method,
        url=f"{services.settings.issuer}{request.url.path}",
        require_nonce=services.settings.dpop_nonce_required,
    )
    return proof.jkt  # type: ignore[no-any-return]


@router.post(
    "/token",
    openapi_extra={"requestBody": _FORM_BODY},
    responses={
        400: {"description": "OAuth error"},
        401: {"description": "Client not authenticated"},
    },
)
async def token(request: Request) -> Response:
    provider = _provider(request)
    nonce = provider.dpop.nonce()
    try:
        form = await _form(request)
        jkt = await _dpop_thumbprint(request)
    except _OAuthFailure as failure:
        return _error_json(failure.error)
    except DpopError as err:
        return _dpop_error(err, nonce)
    except ReplayCacheUnavailable:
        raise ProblemError(503, headers={"Retry-After": "1"}) from None
    oauth_request = _oauth_request(request, "POST", [], form)
    oauth_request.jkt = jkt
    server = provider.server
    try:
        return await _answer(
            oauth_request, server, server.token, {"DPoP-Nonce": nonce} if jkt else None
        )
    except DpopRequired:
        return _dpop_error(DpopError("invalid_dpop_proof", "A DPoP proof is required."), nonce)


async def _answer(
    oauth_request: OAuthRequest,
    server: Any,
    endpoint: Callable[[OAuthRequest], OAuthResponse],
    headers: dict[str, str] | None = None,
) -> Response:
    """Run one of authlib's endpoints and answer what it decided."""
    try:
        result = await server.run(lambda: endpoint(oauth_request))
    except OAuth2Error as err:
        return _error_json(err)
    except (ReplayCacheUnavailable, RevocationUnavailable):
        raise ProblemError(503, headers={"Retry-After": "1"}) from None
    return _respond(result, headers)


async def _endpoint(request: Request, name: str) -> Response:
    try:
        form = await _form(request)
    except _OAuthFailure as failure:
        return _error_json(failure.error)
    server = _provider(request).server
    oauth_request = _oauth_request(request, "POST", [], form)
    return await _answer(oauth_request, server, lambda r: server.endpoint(name, r))


@router.post(
    "/revoke",
    openapi_extra={"requestBody": _FORM_BODY},
    responses={
        400: {"description": "OAuth error"},
        401: {"description": "Client not authenticated"},
    },
)
async def revoke(request: Request) -> Response:
    """RFC 7009: revoke an access or refresh token of the calling client (200 whatever the
    token was, so the answer does not tell whether it existed)."""
    return await _endpoint(request, "revocation")


@router.post(
    "/introspect",
    openapi_extra={"requestBody": _FORM_BODY},
    responses={401: {"description": "Client not authenticated"}},
)
async def introspect(request: Request) -> Response:
    """RFC 7662, for confidential clients, about their own tokens: `active: false` for
    anything revoked, expired, unknown or another client's."""
    return await _endpoint(request, "introspection")


# Two routes rather than one with two methods: each operation gets its own OpenAPI id.
@router.get("/userinfo", responses={401: {"description": "Not authenticated"}})
@router.post("/userinfo", responses={401: {"description": "Not authenticated"}})
async def userinfo(
    request: Request, principal: Annotated[Principal, Depends(authenticate_resource)]
) -> Response:
    """OpenID Connect userinfo, minimal: the subject and its FHIR resource (`fhirUser`)."""
    if "openid" not in principal.scopes:
        raise ProblemError(
            403,
            "The token lacks the openid scope.",
            headers={"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="openid"'},
        )
    body: dict[str, Any] = {"sub": principal.user_id}
    user = await request.app.state.services.users.by_id(principal.user_id)
    if user is not None and "fhirUser" in principal.scopes:
        fhir_user = _provider(request).issuance.fhir_user(user)
        if fhir_user:
            body["fhirUser"] = fhir_user
    return JSONResponse(body, headers=NO_STORE)


# --- the user's remembered approvals --------------------------------------------------------


@router.get("/consents", responses={401: {"description": "Not authenticated"}, 403: {}})
async def list_consents(
    request: Request, principal: Annotated[Principal, Depends(authenticate)]
) -> Response:
    """The apps the caller has approved, with the scopes and when."""
    services = request.app.state.services
    approvals = []
    for client_id, scope, granted_at in await _provider(request).consents.of_user(
        principal.user_id
    ):
        client = await services.clients.get(client_id)
        approvals.append(
            {
                "client_id": client_id,
                "client_name": client.name if client is not None else None,
                "scope": scope,
                "granted_at": int(granted_at),
            }
        )
    return JSONResponse(approvals, headers=NO_STORE)


@router.delete(
    "/consents/{client_id}",
    status_code=204,
    responses={401: {"description": "Not authenticated"}, 403: {}, 404: {}},
)
async def revoke_consent(
    client_id: str, request: Request, principal: Annotated[Principal, Depends(authenticate)]
) -> Response:
    """Withdraw an approval: the app must ask again, and every token it holds for the caller
    is revoked now (its sessions end)."""
    services = request.app.state.services
    provider = _provider(request)
    approved = await provider.consents.approved(principal.user_id, client_id[:64])
    if len(client_id) > 64 or not approved:
        raise ProblemError(404)
    # Tokens first, the approval last: if revocation cannot be recorded now (503), nothing
    # is lost and the user's retry does it all again.
    try:
        for sid in await services.refresh.unexpired_families(principal.user_id, client_id):
            await services.sessions.end_family(sid)
    except RevocationUnavailable:
        raise ProblemError(503, headers={"Retry-After": "1"}) from None
    await services.refresh.revoke_user_families(principal.user_id, "consent_revoked", client_id)
    await provider.consents.revoke(principal.user_id, client_id)
    await provider.server.record(
        "consent_revoked", None, principal.user_id, context(request), client_id=client_id
    )
    return Response(status_code=204)

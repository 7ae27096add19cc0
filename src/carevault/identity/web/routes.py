"""`/auth/session/*` and `/auth/sessions`: the web portal's login (the password, then a second
factor when the account has one), the session's own state, logout, and the user's list of
sessions (browser sessions and token logins) with a way to end each.

A browser session becomes active only once the login is complete: an account that must enroll a
second factor first does so through the API. The login and the second step take JSON or a form.
CSRF is checked before any of these run (`csrf.py`) on every state-changing request that carries
a live session cookie. Refusals are problem documents with fixed messages.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from carevault.audit.events import SecurityEvent
from carevault.edge.problems import ProblemError, problem_response
from carevault.identity.authentication import (
    EnrollmentRequired,
    LoginFailed,
    MfaRequired,
    RequestContext,
)
from carevault.identity.mfa.policy import (
    AMR_PASSWORD,
    METHOD_RECOVERY,
    METHOD_TOTP,
    METHOD_WEBAUTHN,
    acr_of,
)
from carevault.identity.mfa.routes import refused
from carevault.identity.mfa.service import FactorProof, MfaFailed, MfaLocked, MfaTokenInvalid
from carevault.identity.mfa.webauthn import NoCredentials
from carevault.identity.principal import Principal
from carevault.identity.responses import NO_STORE, context
from carevault.identity.routes import LOGIN_FAILED_DETAIL, LoginRequest
from carevault.identity.throttle import AddressThrottled
from carevault.identity.web.csrf import foreign_origin
from carevault.identity.web.login import begin, clear_session_cookie, finish, set_session_cookie
from carevault.identity.web.sessions import (
    ACTIVE,
    MFA_PENDING,
    BrowserSession,
    BrowserSessions,
    SessionGone,
)
from carevault.tokens.bearer import REALM, WEB_CLIENT, authenticate, session_principal

router = APIRouter(prefix="/auth", tags=["sessions"])
NOT_SIGNED_IN = "Authentication is required."
NO_LOGIN_WAITING = "No login is waiting for a second factor; log in again."
ENROLL_FIRST = (
    "This account must enroll a second factor first: log in through the API "
    "(POST /auth/login) and enroll, then sign in here."
)
_FORM = "application/x-www-form-urlencoded"
_MAX_FORM_FIELDS = 20
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"type": "object"}},
        _FORM: {"schema": {"type": "object"}},
    },
}
Model = TypeVar("Model", bound=BaseModel)


class SessionMfaRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(pattern=f"^({METHOD_TOTP}|{METHOD_RECOVERY}|{METHOD_WEBAUTHN})$")
    code: str | None = Field(None, min_length=1, max_length=32)
    credential: dict[str, Any] | None = None  # a WebAuthn assertion (PublicKeyCredential JSON)


def _sessions(request: Request) -> BrowserSessions:
    return request.app.state.services.browser_sessions  # type: ignore[no-any-return]


def _not_signed_in(*, clear: bool = False) -> Response:
    response = problem_response(401, NOT_SIGNED_IN, headers={"WWW-Authenticate": REALM})
    if clear:
        clear_session_cookie(response)
    return response


async def _parsed(request: Request, model: type[Model]) -> Model:
    """The body as `model`, from JSON or a form (a form's `csrf_token` is the middleware's)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    raw = await request.body()
    data: Any
    try:
        if media == _FORM:
            pairs = parse_qsl(
                raw.decode("utf-8"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS
            )
            data = dict(pairs)
        else:
            data = orjson.loads(raw) if raw else {}
    except (UnicodeDecodeError, ValueError):  # orjson.JSONDecodeError is a ValueError
        raise ProblemError(400) from None
    if isinstance(data, dict):
        data.pop("csrf_token", None)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_input=False)) from None


async def _record(
    request: Request,
    event: str,
    outcome: str,
    ctx: RequestContext,
    user_id: str | None,
    **details: Any,
) -> None:
    await request.app.state.services.events.record(
        SecurityEvent(
            event,
            outcome,
            user_id=user_id,
            client_id=WEB_CLIENT,
            source_address=ctx.address,
            request_id=ctx.request_id,
            details=details,
        )
    )


def _signed_in(session: BrowserSession, value: str) -> Response:
    response = JSONResponse(
        {"authenticated": True, "csrf_token": session.csrf_token}, headers=NO_STORE
    )
    set_session_cookie(response, value)
    return response


@router.post(
    "/session/login",
    openapi_extra={"requestBody": _BODY},
    responses={
        401: {"description": "Invalid credentials"},
        403: {"description": "Cross-site request, or a second factor must be enrolled first"},
        429: {"description": "Too many failed logins"},
    },
)
async def session_login(request: Request) -> Response:
    """Log in with a username and password. Answers the session's CSRF token and sets the
    session cookie; when the account has a second factor the session waits for it
    (`POST /auth/session/mfa`)."""
    services = request.app.state.services
    sessions = _sessions(request)
    body = await _parsed(request, LoginRequest)
    ctx = context(request)
    if foreign_origin(request.headers):
        await _record(request, "csrf_rejected", "denied", ctx, None, reason="cross_site_login")
        raise ProblemError(403, "Missing or invalid CSRF token.")
    try:
        user, second = await services.authenticator.check_password(
            body.username, body.password, ctx
        )
    except LoginFailed:
        # The same bytes as POST /auth/login for every kind of failure.
        return problem_response(401, LOGIN_FAILED_DETAIL)
    except AddressThrottled as err:
        return problem_response(
            429,
            "Too many failed logins; try again later.",
            headers={"Retry-After": str(err.retry_after)},
        )
    # Whatever session this browser had ends here: its id is never valid after a login.
    previous = await sessions.of_request(request.scope)
    if previous is not None:
        await sessions.end(previous.id, "rotated")
    if isinstance(second, EnrollmentRequired):
        await _record(
            request, "session_refused", "denied", ctx, user.id, reason="enrollment_required"
        )
        response = problem_response(403, ENROLL_FIRST)
        clear_session_cookie(response)
        return response
    if isinstance(second, MfaRequired):
        session, value = await begin(services, ctx, user, second)
        response = JSONResponse(
            {"mfa_required": True, "methods": second.methods, "csrf_token": session.csrf_token},
            headers=NO_STORE,
        )
        set_session_cookie(response, value)
        return response
    session, value = await begin(services, ctx, user, None)
    return _signed_in(session, value)


@router.post(
    "/session/mfa",
    openapi_extra={"requestBody": _BODY},
    responses={401: {"description": "Not accepted"}, 429: {"description": "Too many failures"}},
)
async def session_mfa(request: Request) -> Response:
    """The second step of a session login: one factor's proof. The session id changes again."""
    sessions = _sessions(request)
    body = await _parsed(request, SessionMfaRequest)
    ctx = context(request)
    session = await sessions.of_request(request.scope)
    if session is None or session.state != MFA_PENDING or session.mfa_attempt is None:
        raise ProblemError(401, NO_LOGIN_WAITING)
    proof = FactorProof(body.method, body.code, body.credential)
    try:
        user, verified = await request.app.state.services.mfa.complete_attempt(
            session.mfa_attempt, proof, ctx
        )
    except MfaTokenInvalid:
        await sessions.end(session.id, "mfa_expired")
        response = problem_response(401, NO_LOGIN_WAITING)
        clear_session_cookie(response)
        return response
    except (MfaFailed, MfaLocked, AddressThrottled) as err:
        raise refused(err) from None
    if user.id != session.user_id:  # the attempt is only ever stored for its own user
        raise ProblemError(401, NO_LOGIN_WAITING)
    try:
        active, value = await finish(
            request.app.state.services, ctx, session, user, verified, body.method
        )
    except SessionGone:
        raise ProblemError(401, NO_LOGIN_WAITING) from None
    return _signed_in(active, value)


@router.post(
    "/session/webauthn/options",
    responses={401: {"description": "No login waiting"}, 409: {"description": "No usable key"}},
)
async def session_webauthn_options(request: Request) -> Response:
    """The WebAuthn options for the second step of a session login (the challenge is bound
    to the login attempt this session holds; `POST /auth/session/mfa` takes the assertion).
    State-changing, so it needs the session's CSRF token like every other POST."""
    services = request.app.state.services
    session = await _sessions(request).of_request(request.scope)
    if session is None or session.state != MFA_PENDING or session.mfa_attempt is None:
        raise ProblemError(401, NO_LOGIN_WAITING)
    user = await services.users.by_id(session.user_id)
    if user is None or not user.enabled or services.mfa.webauthn is None:
        raise ProblemError(401, NO_LOGIN_WAITING)
    try:
        options = await services.mfa.webauthn.authentication_options(user, session.mfa_attempt)
    except NoCredentials:
        raise ProblemError(409, "This account has no usable security key.") from None
    return Response(options, media_type="application/json", headers=NO_STORE)


@router.post(
    "/session/step-up",
    openapi_extra={"requestBody": _BODY},
    responses={401: {"description": "Not accepted"}, 429: {"description": "Too many failures"}},
)
async def session_step_up(request: Request) -> Response:
    """Prove a factor again inside a browser session (for high-risk actions): the session's
    auth_time and amr are renewed and, a privilege change, its id rotated; its absolute
    deadline stays the login's. (WebAuthn: `POST /auth/webauthn/step-up/options` first.)"""
    services = request.app.state.services
    sessions = _sessions(request)
    body = await _parsed(request, SessionMfaRequest)
    ctx = context(request)
    session = await sessions.of_request(request.scope)
    if session is None or session.state != ACTIVE or session.user_id is None:
        raise ProblemError(401, "Authentication is required.")
    user = await services.users.by_id(session.user_id)
    if user is None or not user.enabled:
        raise ProblemError(401, "Authentication is required.")
    proof = FactorProof(body.method, body.code, body.credential)
    try:
        verified = await services.mfa.prove(user, proof, f"sid:web-{session.id}", ctx)
    except (MfaFailed, MfaLocked, AddressThrottled) as err:
        raise refused(err) from None
    now = services.clock()
    amr = sorted({AMR_PASSWORD, *session.amr, *verified.amr})
    try:
        active, value = await sessions.rotate(
            session,
            ctx,
            state=ACTIVE,
            user_id=user.id,
            amr=amr,
            acr=acr_of(amr, user_verified=verified.user_verified),
            auth_time=int(now),
            lifetime=session.absolute_expires_at - now,
        )
    except SessionGone:
        raise ProblemError(401, "Authentication is required.") from None
    await _record(
        request, "step_up", "success", ctx, user.id, session=active.id, method=body.method
    )
    return _signed_in(active, value)


@router.get("/session", responses={401: {"description": "No session"}})
async def session_info(request: Request) -> Response:
    """The current browser session: its state, user, strength, limits and CSRF token."""
    session = await _sessions(request).of_request(request.scope)
    if session is None:
        return _not_signed_in()
    user: dict[str, Any] | None = None
    if session.state == ACTIVE:
        principal = await session_principal(request)
        if principal is None:
            return _not_signed_in(clear=True)
        profile = await request.app.state.profiles.get(principal.user_id)
        user = {
            "id": principal.user_id,
            "username": profile.username if profile is not None else None,
            "roles": list(principal.roles),
        }
    elif session.state != MFA_PENDING:
        return _not_signed_in()
    return JSONResponse(
        {
            "id": session.id,
            "state": session.state,
            "user": user,
            "amr": list(session.amr),
            "acr": session.acr,
            "auth_time": session.auth_time,
            "idle_expires_at": int(session.idle_expires_at),
            "absolute_expires_at": int(session.absolute_expires_at),
            "csrf_token": session.csrf_token,
        },
        headers=NO_STORE,
    )


@router.post("/session/logout", status_code=204, responses={401: {"description": "No session"}})
async def session_logout(request: Request) -> Response:
    """End the current browser session and clear its cookie."""
    sessions = _sessions(request)
    session = await sessions.of_request(request.scope)
    if session is None:
        return _not_signed_in(clear=True)
    ended = await sessions.end(session.id, "logout")
    await _after_browser_end(request, session)
    if ended is not None:
        await _record(
            request,
            "session_ended",
            "success",
            context(request),
            session.user_id,
            session=session.id,
            kind="browser",
            reason="logout",
        )
    response = Response(status_code=204)
    clear_session_cookie(response)
    return response


async def _after_browser_end(request: Request, session: BrowserSession) -> None:
    # A step-up token minted from this session (`POST /auth/step-up`) carries its id as `sid`.
    await request.app.state.services.sessions.end_family(f"web-{session.id}")


@router.get("/sessions", responses={401: {"description": "Not authenticated"}})
async def list_sessions(
    request: Request, principal: Annotated[Principal, Depends(authenticate)]
) -> Response:
    """The caller's live sessions: browser sessions and token logins (refresh families)."""
    sessions = _sessions(request)
    items: list[dict[str, Any]] = []
    for browser in await sessions.active_for_user(principal.user_id):
        items.append(
            {
                "id": browser.id,
                "kind": "browser",
                "device": browser.device,
                "created_at": int(browser.created_at),
                "last_seen_at": int(browser.last_seen_at),
                "address": browser.address,
                "acr": browser.acr,
                "current": principal.session_id == f"web-{browser.id}",
            }
        )
    for login in await sessions.token_logins(principal.user_id):
        last = login.last_used_at if login.last_used_at is not None else login.created_at
        items.append(
            {
                "id": login.id,
                "kind": "token",
                "device": login.device,
                "created_at": int(login.created_at),
                "last_seen_at": int(last),
                "address": login.address,
                "acr": login.acr,
                "current": principal.session_id == login.id,
            }
        )
    items.sort(key=lambda item: (item["last_seen_at"], item["created_at"]), reverse=True)
    return JSONResponse({"sessions": items}, headers=NO_STORE)


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    responses={401: {"description": "Not authenticated"}, 404: {"description": "No such session"}},
)
async def end_session(
    session_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(authenticate)],
) -> Response:
    """End one of the caller's sessions: a browser session, or a token login with its access
    tokens. Another user's session is not found."""
    services = request.app.state.services
    sessions = _sessions(request)
    if not _ID.fullmatch(session_id):
        raise ProblemError(404)
    kind = "browser"
    ended = await sessions.end(session_id, "ended_by_user", user_id=principal.user_id)
    if ended is not None:
        await _after_browser_end(request, ended)
    elif await sessions.token_logins(principal.user_id, session_id):
        kind = "token"
        await services.sessions.end_session(session_id, None, None)
    else:
        raise ProblemError(404)
    current = principal.session_id in (session_id, f"web-{session_id}")
    await _record(
        request,
        "session_ended",
        "success",
        context(request),
        principal.user_id,
        session=session_id,
        kind=kind,
        reason="ended_by_user",
        current=current,
    )
    response = Response(status_code=204)
    if current and kind == "browser":
        clear_session_cookie(response)
    return response

"""The authenticate step: `Authorization: Bearer <JWT>` -> `Principal`, or a 401.

Signature, claims and revocation are checked on every request. Any failure answers the same
generic 401 with `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750 §3); the reason
goes to the log, never to the client. If revocation cannot be checked the request is denied
(503): failing open would let a revoked token through.

A request without an Authorization header may instead carry the web portal's session cookie
(identity/web/): an active browser session of an enabled user is a principal too, its roles
read from the user row on every request. The revocation list is asked about it as about a
token, so logout-all and account changes (password reset, role change, MFA reset) end browser
sessions as well. CSRF is checked before any route by identity/web/csrf.py.
"""

from __future__ import annotations

import structlog
from fastapi import Request

from carevault.edge.metrics import AUTH_FAILURES
from carevault.edge.problems import ProblemError
from carevault.identity.authentication import FIRST_PARTY_CLIENT, first_party_scope
from carevault.identity.mfa.policy import ENROLL_SCOPE
from carevault.identity.principal import Principal
from carevault.identity.web.sessions import ACTIVE
from carevault.oauth.dpop import DpopError
from carevault.oauth.replay import ReplayCacheUnavailable
from carevault.tokens.access import AccessClaims, InvalidTokenError
from carevault.tokens.revocation import RevocationUnavailable

log = structlog.get_logger("carevault.auth")
REALM = 'Bearer realm="carevault"'
DPOP_REALM = 'DPoP realm="carevault"'
WEB_CLIENT = "carevault-web"
FIRST_PARTY_CLIENTS = frozenset({FIRST_PARTY_CLIENT, WEB_CLIENT})


def _revocation_unavailable() -> ProblemError:
    log.error("revocation_unavailable")
    return ProblemError(503, "Service temporarily unavailable.", headers={"Retry-After": "1"})


def _unauthorized(error: str | None, scheme: str = "bearer") -> ProblemError:
    if error:  # a credential was presented and refused (none at all is not a failure)
        AUTH_FAILURES.labels(kind="token").inc()
    realm = DPOP_REALM if scheme == "dpop" else REALM
    challenge = f'{realm}, error="{error}"' if error else realm
    return ProblemError(401, "Authentication is required.", headers={"WWW-Authenticate": challenge})


def _enrollment_refused(principal: Principal) -> Principal:
    if ENROLL_SCOPE in principal.scopes:
        raise ProblemError(
            403,
            "Enroll a second factor first.",
            headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope"'},
        )
    return principal


def _first_party(principal: Principal) -> Principal:
    """carevault's own APIs (account, factors, sessions, admin, break-glass, audit) take only
    tokens carevault issued to itself: an app the user authorized for FHIR data must not plant
    a factor, read the session list or act as an administrator."""
    if principal.client_id not in FIRST_PARTY_CLIENTS:
        raise ProblemError(
            403,
            "This token is for the FHIR API only.",
            headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope"'},
        )
    return principal


async def authenticate(request: Request) -> Principal:
    """The principal of a full first-party access token (carevault's own login or browser
    session). An enrollment-scoped token (an account that must enroll a second factor first)
    and a token issued to an OAuth client are refused: 403, insufficient_scope."""
    return _enrollment_refused(await authenticate_enrollment(request))


async def authenticate_resource(request: Request) -> Principal:
    """The FHIR API's caller: a first-party token or one issued to an OAuth client (whose
    scopes the access-control engine applies together with the user's roles)."""
    return _enrollment_refused(await _principal(request))


async def authenticate_enrollment(request: Request) -> Principal:
    """Any valid first-party access token, enrollment-scoped ones included: only for the
    routes that enroll a factor."""
    return _first_party(await _principal(request))


async def _principal(request: Request) -> Principal:
    services = request.app.state.services
    header = request.headers.get("authorization")
    if not header:
        principal = await session_principal(request)
        if principal is None:
            raise _unauthorized(None)
        return principal
    scheme, _, token = header.partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "dpop") or not token or token != token.strip():
        raise _unauthorized("invalid_token" if scheme in ("bearer", "dpop") else None)
    try:
        claims = services.verifier.verify(token)
        revoked = await services.revocations.is_revoked(claims)
    except InvalidTokenError as err:
        log.info("token_rejected", reason=err.reason)
        raise _unauthorized("invalid_token", scheme) from None
    except RevocationUnavailable:
        raise _revocation_unavailable() from None
    if revoked:
        log.info("token_rejected", reason="revoked")
        raise _unauthorized("invalid_token", scheme)
    await _check_binding(request, scheme, token, claims)
    patient = None
    if claims.client_id not in FIRST_PARTY_CLIENTS and any(
        s.startswith("patient/") for s in claims.scope.split()
    ):
        patient = await request.app.state.oauth.launch.patient(claims.sid)
    return Principal(
        user_id=claims.sub,
        client_id=claims.client_id,
        roles=claims.roles,
        scopes=tuple(claims.scope.split()),
        amr=claims.amr,
        auth_time=claims.auth_time,
        session_id=claims.sid,
        token_id=claims.jti,
        token_expires_at=claims.exp,
        acr=claims.acr,
        patient=patient,
    )


async def _check_binding(request: Request, scheme: str, token: str, claims: AccessClaims) -> None:
    """RFC 9449 §7: a DPoP-bound token needs the DPoP scheme and a proof, made for this
    request and this token, with the key it is bound to; a bearer token may not pretend to be
    bound. The proof's `jti` is remembered by every worker (the shared replay cache)."""
    if claims.jkt is None:
        if scheme == "dpop":
            log.info("token_rejected", reason="dpop scheme for an unbound token")
            raise _unauthorized("invalid_token", scheme)
        return
    if scheme != "dpop":
        log.info("token_rejected", reason="bound token sent as bearer")
        raise _unauthorized("invalid_token", "dpop")
    services = request.app.state.services
    dpop = request.app.state.oauth.dpop
    try:
        await dpop.verify(
            request.headers.getlist("dpop"),
            method=request.method,
            url=f"{services.settings.issuer}{request.url.path}",
            access_token=token,
            expected_jkt=claims.jkt,
            require_nonce=services.settings.dpop_nonce_required,
        )
    except DpopError as err:
        log.info("dpop_rejected", reason=err.description)
        AUTH_FAILURES.labels(kind="token").inc()
        raise ProblemError(
            401,
            "Authentication is required.",
            headers={
                "WWW-Authenticate": f'DPoP realm="carevault", error="{err.error}"',
                "DPoP-Nonce": dpop.nonce(),
            },
        ) from None
    except ReplayCacheUnavailable:
        raise _revocation_unavailable() from None


async def session_principal(request: Request) -> Principal | None:
    """The principal of the request's browser session cookie, or None: no live active session,
    a disabled or deleted user, or a session the revocation list denies (it is ended then)."""
    services = request.app.state.services
    sessions = services.browser_sessions
    session = await sessions.of_request(request.scope)
    if session is None or session.state != ACTIVE or session.user_id is None:
        return None
    user = await services.users.by_id(session.user_id)
    if user is None or not user.enabled:
        await sessions.end(session.id, "disabled")
        return None
    auth_time = session.auth_time if session.auth_time is not None else int(session.created_at)
    expires_at = int(session.expires_at)
    claims = AccessClaims(
        sub=user.id,
        jti=session.id,
        sid=f"web-{session.id}",
        client_id=WEB_CLIENT,
        scope=first_party_scope(user),
        roles=tuple(user.roles),
        amr=session.amr,
        auth_time=auth_time,
        # A user-wide cut-off is compared in whole seconds: a session authenticated in the
        # cut-off's own second counts as older, so it ends rather than outliving a password
        # reset made a moment after it (the price: a login in that same second is ended too).
        iat=auth_time - 1,
        exp=expires_at,
        acr=session.acr,
    )
    try:
        revoked = await services.revocations.is_revoked(claims)
    except RevocationUnavailable:
        raise _revocation_unavailable() from None
    if revoked:
        log.info("session_rejected", reason="revoked")
        await sessions.end(session.id, "revoked")
        return None
    return Principal(
        user_id=claims.sub,
        client_id=claims.client_id,
        roles=claims.roles,
        scopes=tuple(claims.scope.split()),
        amr=claims.amr,
        auth_time=auth_time,
        session_id=claims.sid,
        token_id=claims.jti,
        token_expires_at=expires_at,
        acr=claims.acr,
    )

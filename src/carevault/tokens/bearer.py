"""The authenticate step: `Authorization: Bearer <JWT>` -> `Principal`, or a 401.

Signature, claims and revocation are checked on every request. Any failure answers the same
generic 401 with `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750 §3); the reason
goes to the log, never to the client. If revocation cannot be checked the request is denied
(503): failing open would let a revoked token through.
"""

from __future__ import annotations

import structlog
from fastapi import Request

from carevault.edge.problems import ProblemError
from carevault.identity.mfa.policy import ENROLL_SCOPE
from carevault.identity.principal import Principal
from carevault.tokens.access import InvalidTokenError
from carevault.tokens.revocation import RevocationUnavailable

log = structlog.get_logger("carevault.auth")
REALM = 'Bearer realm="carevault"'


def _unauthorized(error: str | None) -> ProblemError:
    challenge = f'{REALM}, error="{error}"' if error else REALM
    return ProblemError(401, "Authentication is required.", headers={"WWW-Authenticate": challenge})


async def authenticate(request: Request) -> Principal:
    """The principal of a full access token. An enrollment-scoped token (an account that must
    enroll a second factor first) is refused here: 403, insufficient_scope."""
    principal = await authenticate_enrollment(request)
    if ENROLL_SCOPE in principal.scopes:
        raise ProblemError(
            403,
            "Enroll a second factor first.",
            headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope"'},
        )
    return principal


async def authenticate_enrollment(request: Request) -> Principal:
    """Any valid access token, enrollment-scoped ones included: only for the routes that
    enroll a factor."""
    services = request.app.state.services
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized(None)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or token != token.strip():
        raise _unauthorized("invalid_token" if scheme.lower() == "bearer" else None)
    try:
        claims = services.verifier.verify(token)
        revoked = await services.revocations.is_revoked(claims)
    except InvalidTokenError as err:
        log.info("token_rejected", reason=err.reason)
        raise _unauthorized("invalid_token") from None
    except RevocationUnavailable:
        log.error("revocation_unavailable")
        raise ProblemError(
            503, "Service temporarily unavailable.", headers={"Retry-After": "1"}
        ) from None
    if revoked:
        log.info("token_rejected", reason="revoked")
        raise _unauthorized("invalid_token")
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
    )

"""The browser-session side of a login, shared by the portal's login (`routes.py`) and the
OAuth sign-in pages (oauth/routes.py): a correct password starts a session that waits for the
second factor or is active at once; a proved factor makes the waiting session active under a
new id. Each session that becomes active is a `session_started` security event."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from carevault.audit.events import SecurityEvent
from carevault.identity.accounts import User
from carevault.identity.authentication import MfaRequired, RequestContext
from carevault.identity.mfa.challenges import token_hash
from carevault.identity.mfa.policy import AMR_PASSWORD, acr_of
from carevault.identity.web.sessions import ACTIVE, COOKIE, MFA_PENDING, BrowserSession
from carevault.tokens.bearer import WEB_CLIENT


def set_session_cookie(response: Response, value: str) -> None:
    # `__Host-`: Secure, Path=/ and no Domain, so no sibling subdomain can set or shadow it. No
    # Max-Age: the cookie goes with the browser; the server enforces the session's limits.
    response.set_cookie(COOKIE, value, path="/", secure=True, httponly=True, samesite="strict")


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")


async def _started(
    services: Any, ctx: RequestContext, session: BrowserSession, **details: Any
) -> None:
    await services.events.record(
        SecurityEvent(
            "session_started",
            "success",
            user_id=session.user_id,
            client_id=WEB_CLIENT,
            source_address=ctx.address,
            request_id=ctx.request_id,
            details={"session": session.id, "amr": list(session.amr), **details},
        )
    )


async def begin(
    services: Any, ctx: RequestContext, user: User, second: MfaRequired | None
) -> tuple[BrowserSession, str]:
    """The session a correct password starts, and its cookie value. With a second factor to
    come only the hash of the login attempt's token is kept; the token itself is never sent."""
    sessions = services.browser_sessions
    if second is not None:
        return await sessions.start(  # type: ignore[no-any-return]
            ctx,
            state=MFA_PENDING,
            user_id=user.id,
            mfa_attempt=token_hash(second.mfa_token),
            lifetime=second.expires_in,
        )
    amr = [AMR_PASSWORD]
    session, value = await sessions.start(
        ctx,
        state=ACTIVE,
        user_id=user.id,
        amr=amr,
        acr=acr_of(amr),
        auth_time=int(services.clock()),
    )
    await _started(services, ctx, session)
    return session, value


async def finish(
    services: Any,
    ctx: RequestContext,
    session: BrowserSession,
    user: User,
    verified: Any,
    method: str,
) -> tuple[BrowserSession, str]:
    """The waiting session made active, under a new id, once `verified` (the second factor's
    `VerifiedFactor`) is in. Raises `SessionGone` if the session ended meanwhile."""
    active, value = await services.browser_sessions.rotate(
        session,
        ctx,
        state=ACTIVE,
        user_id=user.id,
        amr=verified.amr,
        acr=acr_of(verified.amr, user_verified=verified.user_verified),
        auth_time=int(services.clock()),
    )
    await _started(services, ctx, active, method=method)
    return active, value

"""CSRF protection for cookie-authenticated requests: pure ASGI middleware before every route.

A browser attaches the session cookie to a request whichever page made it. SameSite=Strict
keeps it off cross-site requests in current browsers; the synchronizer token is the lock that
does not depend on the browser: every state-changing request (POST, PUT, PATCH, DELETE) that
carries a live session cookie must also carry that session's token, as the `X-CSRF-Token`
header or a `csrf_token` form field, and a page of another origin cannot read it. Requests
without the cookie (bearer tokens, which a browser never adds by itself) pass untouched, and so
do requests whose cookie is dead: it authenticates nothing, so there is nothing to forge.
A form's `csrf_token` field is taken out of the body the route gets: FHIR search refuses any
parameter it does not know, and the token is none of the route's business.

The middleware runs inside the audit trail's (a refused FHIR write is recorded as refused, with
the request's id) and inside the body limits (a form body is read here under them).
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carevault.audit.events import SecurityEvent, SecurityEventLog
from carevault.audit.request import REQUEST_ID_KEY
from carevault.edge.client_address import client_address
from carevault.edge.problems import problem_response
from carevault.identity.web.sessions import BrowserSession, BrowserSessions

HEADER = "x-csrf-token"
FORM_FIELD = "csrf_token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REJECTED = "Missing or invalid CSRF token."
_FORM = "application/x-www-form-urlencoded"
_MAX_FORM_FIELDS = 200
# The OAuth sign-in form replaces whatever session the browser has. It is reached by a
# cross-site redirect from the app, which a SameSite=Strict cookie does not follow, so the page
# cannot know the old session's token; the route refuses cross-site posts (Fetch Metadata).
TOKENLESS_PATHS = frozenset({"/oauth/authorize/login"})


def foreign_origin(headers: Headers) -> bool:
    """The browser says another site made this request (Fetch Metadata). For the login form,
    which no cookie protects yet: a forged login would sign the victim in as the attacker."""
    return headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site")


def token_matches(presented: str | None, expected: str) -> bool:
    if not presented:
        return False
    # bytes: compare_digest refuses non-ASCII str, and the header is the client's to choose.
    return hmac.compare_digest(presented.encode(), expected.encode())


class CsrfProtection:
    def __init__(
        self,
        app: ASGIApp,
        sessions: BrowserSessions,
        events: SecurityEventLog,
        trusted_proxies: list[str],
    ) -> None:
        self.app = app
        self._sessions = sessions
        self._events = events
        self._trusted_proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in UNSAFE_METHODS
            or scope.get("path") in TOKENLESS_PATHS
        ):
            await self.app(scope, receive, send)
            return
        session = await self._sessions.of_request(scope)
        if session is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        presented = headers.get(HEADER)
        if presented is None and _is_form(headers):
            try:
                body = await _read_body(receive)
            except HTTPException:  # the body limit, raised by the outer middleware
                await problem_response(413, "The request body is too large.")(scope, receive, send)
                return
            if body is None:
                return  # the client went away
            presented, rest = _form_token(body)
            scope, receive = _with_length(scope, len(rest)), _replay(rest, receive)
        if token_matches(presented, session.csrf_token):
            await self.app(scope, receive, send)
            return
        await self._refuse(scope, receive, send, session, "mismatch" if presented else "missing")

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, session: BrowserSession, reason: str
    ) -> None:
        parts = [p for p in scope.get("path", "").split("/") if p]
        await self._events.record(
            SecurityEvent(
                "csrf_rejected",
                "denied",
                user_id=session.user_id,
                source_address=client_address(Request(scope), self._trusted_proxies),
                request_id=scope.get("state", {}).get(REQUEST_ID_KEY),
                # The area, not the path: a path can name a record.
                details={
                    "reason": reason,
                    "method": scope["method"],
                    "area": parts[0][:16] if parts else "",
                    "session": session.id,
                },
            )
        )
        await problem_response(403, REJECTED)(scope, receive, send)


def _is_form(headers: Headers) -> bool:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower() == _FORM


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read here, handed to the route as if it had not been read."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _form_token(body: bytes) -> tuple[str | None, bytes]:
    """The form's `csrf_token` and the body without it."""
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        return None, body
    tokens = [value for name, value in pairs if name == FORM_FIELD]
    rest = [(name, value) for name, value in pairs if name != FORM_FIELD]
    return (tokens[0] if len(tokens) == 1 else None), urlencode(rest).encode()


def _with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    headers.append((b"content-length", str(length).encode()))
    # In place, not a copy: what the router records in the scope (the matched route, read by
    # the access log and the metrics outside) must reach the outer middlewares.
    scope["headers"] = headers
    return scope

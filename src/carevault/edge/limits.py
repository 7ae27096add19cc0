"""Pure ASGI middleware: body size (413) and content type on writes (415), before any parsing.

The body is counted while it streams, so a client that lies in Content-Length, or sends chunks
without one, is cut off at the limit without the rest being read into memory.
"""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_WRITE_METHODS = frozenset({b"POST", b"PUT", b"PATCH", "POST", "PUT", "PATCH"})


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


# A browser's own login forms post their fields as a form body, and OAuth's endpoints take
# nothing else (RFC 6749 §3.2, RFC 7009 §2.1, RFC 7662 §2.1).
_FORM_PATHS = frozenset(
    {
        "/auth/session/login",
        "/auth/session/mfa",
        "/oauth/authorize/login",
        "/oauth/authorize/mfa",
        "/oauth/authorize/consent",
        "/oauth/token",
        "/oauth/revoke",
        "/oauth/introspect",
        "/oauth/userinfo",
    }
)


def _is_search_form(scope: Scope, content_type: str) -> bool:
    """FHIR's POST [base]/[type]/_search carries its parameters as a form body, and so do the
    browser session's login forms; nothing else may send one."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        return False
    path = scope.get("path", "")
    if path in _FORM_PATHS:
        return True
    return path.startswith("/fhir/") and path.endswith("/_search") and path.count("/") == 3


async def _problem(send: Send, status: int, title: str, detail: str) -> None:
    body = orjson.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    # An HTTPException so that FastAPI's body parsing passes it through as a 413 rather than
    # wrapping it in a generic 400.
    def __init__(self) -> None:
        super().__init__(413)


class RequestLimits:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_length: int | None = None
        content_type = ""
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    await _problem(send, 400, "Bad Request", "Invalid Content-Length.")
                    return
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = True
        if content_length is not None and content_length > self.max_body_bytes:
            await _problem(send, 413, "Content Too Large", "The request body is too large.")
            return
        has_body = chunked or (content_length or 0) > 0
        if (
            scope["method"] in _WRITE_METHODS
            and has_body
            and not _is_json(content_type)
            and not _is_search_form(scope, content_type)
        ):
            await _problem(
                send, 415, "Unsupported Media Type", "Send JSON (application/json or a +json type)."
            )
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await _problem(send, 413, "Content Too Large", "The request body is too large.")

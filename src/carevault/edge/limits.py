"""Pure ASGI middleware: request limits, checked before anything parses the request.

In order, before a byte of the body is read:
- header bytes over `max_header_bytes` -> 431 (RFC 6585 §5);
- a Content-Length that is not a plain number -> 400; one over the route's body limit -> 413;
- a write (POST, PUT, PATCH) with a body of a type not allowed -> 415 (JSON everywhere, a form
  body only where a form is the protocol).

Then the body is read here, whole, under three bounds, and only then handed to the app:
- its size, counted as it streams (a lying Content-Length or a chunked body is cut off at the
  limit, the rest never read) -> 413;
- for JSON, its shape: nesting depth over `max_json_depth`, or an array of more than
  `max_json_array_items` items -> 400, judged by an incremental scanner (`JsonShape`) over the
  bytes as they arrive, so that neither the parser's recursion nor a huge list is ever reached;
- the time it takes to arrive, `request_timeout_seconds` from the request's start -> 408 (a
  client that trickles its body, slowloris-style, holds a worker no longer than that).

Only the body read is timed: once the body is in, the handler runs to its end, so a refusal
here always comes before the handler started and never leaves a write half done (DESIGN.md
invariant 6). What bounds a slow handler, slow headers and idle connections is the server and
the proxy in front (docs/deployment.md).

Every refusal is generic, `Cache-Control: no-store`, closes the connection (the rest of the
body is not read), and is an OperationOutcome under /fhir, problem+json elsewhere.
"""

from __future__ import annotations

import asyncio
import re
from http import HTTPStatus
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carevault.config import Settings
from carevault.fhir.outcome import operation_outcome

_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})

# Sign-in, token and consent bodies are a few fields; a small limit keeps the unauthenticated
# endpoints from being made to buffer megabytes. A WebAuthn registration carries an
# attestation, certificate chain included (a TPM's runs to several KiB).
AUTH_MAX_BODY_BYTES = 16 * 1024
WEBAUTHN_MAX_BODY_BYTES = 64 * 1024
_SMALL_BODY_PREFIXES = (
    ("/auth/webauthn/", WEBAUTHN_MAX_BODY_BYTES),
    ("/auth/", AUTH_MAX_BODY_BYTES),
    ("/oauth/", AUTH_MAX_BODY_BYTES),
)
_DIGITS = re.compile(rb"[0-9]{1,18}")


def body_limit(path: str, max_body_bytes: int) -> int:
    """The largest body a path takes: small for /auth and /oauth, `max_body_bytes` for FHIR
    (a transaction Bundle at POST /fhir included) and the rest."""
    for prefix, limit in _SMALL_BODY_PREFIXES:
        if path.startswith(prefix):
            return min(limit, max_body_bytes)
    return max_body_bytes


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


def is_fhir_path(path: str) -> bool:
    return path == "/fhir" or path.startswith("/fhir/")


def refusal_response(
    scope: Scope, status: int, fhir_code: str, detail: str, *, close: bool = False
) -> Response:
    """A generic refusal made at the edge: an OperationOutcome (issue `fhir_code`) for the FHIR
    API, RFC 9457 problem+json for everything else. `detail` is a fixed text, never input."""
    headers = {"Cache-Control": "no-store"}
    if close:
        headers["Connection"] = "close"
    if is_fhir_path(scope.get("path", "")):
        body: Any = operation_outcome(
            [{"severity": "error", "code": fhir_code, "diagnostics": detail}]
        )
        media_type = "application/fhir+json"
    else:
        body = {
            "type": "about:blank",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
        }
        media_type = "application/problem+json"
    return Response(orjson.dumps(body), status, headers=headers, media_type=media_type)


class JsonTooDeep(Exception):
    pass


class JsonArrayTooLong(Exception):
    pass


# Outside strings only brackets, commas and the opening quote matter; inside, only the closing
# quote and the backslash that may escape it. Scanning from one to the next with a compiled
# pattern keeps a megabyte of base64 attachment to a handful of steps.
_STRUCTURAL = re.compile(rb'[\[\]{},"]')
_IN_STRING = re.compile(rb'["\\]')
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")


class JsonShape:
    """An incremental check of a JSON text's nesting depth and array lengths (RFC 8259 §9
    lets a parser set both limits), fed the bytes in any chunks: the verdict does not depend on
    where the chunks split. It judges shape only; whether the text is valid JSON is the
    parser's business afterwards (malformed input is never refused here for being malformed).
    """

    __slots__ = ("max_depth", "max_items", "_in_string", "_escaped", "_arrays", "_commas")

    def __init__(self, max_depth: int, max_items: int) -> None:
        self.max_depth = max_depth
        self.max_items = max_items
        self._in_string = False
        self._escaped = False  # the previous byte was a backslash inside a string
        self._arrays: list[bool] = []  # the open containers, innermost last: array or object
        self._commas: list[int] = []  # commas seen directly in each open container

    def feed(self, data: bytes) -> None:
        """Take the next bytes; raise JsonTooDeep or JsonArrayTooLong once a limit is passed."""
        pos, end = 0, len(data)
        while pos < end:
            if self._escaped:
                self._escaped = False  # the escaped byte; \uXXXX's digits hold no quote
                pos += 1
            elif self._in_string:
                match = _IN_STRING.search(data, pos)
                if match is None:
                    return
                pos = match.end()
                if data[match.start()] == 0x5C:  # backslash
                    self._escaped = True
                else:
                    self._in_string = False
            else:
                match = _STRUCTURAL.search(data, pos)
                if match is None:
                    return
                pos = match.end()
                byte = data[match.start()]
                if byte == 0x22:  # quote
                    self._in_string = True
                elif byte in _OPEN:
                    if len(self._arrays) >= self.max_depth:
                        raise JsonTooDeep
                    self._arrays.append(byte == 0x5B)
                    self._commas.append(0)
                elif byte in _CLOSE:
                    if self._arrays:
                        self._arrays.pop()
                        self._commas.pop()
                elif self._arrays and self._arrays[-1]:  # a comma between array items
                    self._commas[-1] += 1
                    if self._commas[-1] >= self.max_items:  # n commas: n + 1 items
                        raise JsonArrayTooLong


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class RequestLimits:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_body_bytes = settings.max_body_bytes
        self.max_header_bytes = settings.max_header_bytes
        self.max_depth = settings.max_json_depth
        self.max_items = settings.max_json_array_items
        self.timeout = settings.request_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body_receive = await self._checked(scope, receive)
        except _Refused as refused:
            await refused.response(scope, receive, send)
            return
        if body_receive is not None:
            await self.app(scope, body_receive, send)

    async def _checked(self, scope: Scope, receive: Receive) -> Receive | None:
        """The request's receive with its body read and checked (None: the client left)."""
        path = scope.get("path", "")
        header_bytes = 0
        content_length: int | None = None
        content_type = ""
        chunked = False
        for name, value in scope["headers"]:
            header_bytes += len(name) + len(value) + 4  # "name: value\r\n"
            if name == b"content-length":
                if not _DIGITS.fullmatch(value):
                    raise _Refused(_bad_length(scope))
                content_length = int(value)
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = True
        if header_bytes > self.max_header_bytes:
            raise _Refused(
                refusal_response(
                    scope, 431, "too-long", "The request headers are too large.", close=True
                )
            )
        limit = body_limit(path, self.max_body_bytes)
        if content_length is not None and content_length > limit:
            raise _Refused(_too_large(scope))
        has_body = chunked or (content_length or 0) > 0
        if has_body and self._media_refused(scope, content_type):
            raise _Refused(_unsupported(scope))

        shape = JsonShape(self.max_depth, self.max_items) if _is_json(content_type) else None
        chunks: list[bytes] = []
        received = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None  # http.disconnect: nobody to answer
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    if received > limit:
                        raise _Refused(_too_large(scope))
                    if shape is not None:
                        shape.feed(chunk)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise _Refused(
                refusal_response(
                    scope, 408, "timeout", "The request body did not arrive in time.", close=True
                )
            ) from None
        except JsonTooDeep:
            raise _Refused(
                refusal_response(
                    scope, 400, "structure", "The request body is nested too deeply.", close=True
                )
            ) from None
        except JsonArrayTooLong:
            raise _Refused(
                refusal_response(
                    scope, 400, "too-long", "The request body has a list too long.", close=True
                )
            ) from None
        body = b"".join(chunks)
        if body and not has_body and self._media_refused(scope, content_type):
            raise _Refused(_unsupported(scope))

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return replay

    @staticmethod
    def _media_refused(scope: Scope, content_type: str) -> bool:
        return (
            scope["method"] in _WRITE_METHODS
            and not _is_json(content_type)
            and not _is_search_form(scope, content_type)
        )


def _bad_length(scope: Scope) -> Response:
    return refusal_response(scope, 400, "invalid", "Invalid Content-Length.", close=True)


def _too_large(scope: Scope) -> Response:
    return refusal_response(scope, 413, "too-long", "The request body is too large.", close=True)


def _unsupported(scope: Scope) -> Response:
    return refusal_response(
        scope,
        415,
        "not-supported",
        "Send JSON (application/json or a +json type).",
        close=True,
    )

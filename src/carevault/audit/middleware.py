"""Audit before answering: a response on the record server's paths (`/fhir`, `/audit`) leaves
only after its request's entries are committed. If they cannot be, the client gets 503 and
none of the response (fail closed). Entries carry the request's id, which the outermost
middleware (edge/request_context.py) made, put in the scope's state and echoes in
`X-Request-ID`.

The response is held at its start message: carevault's record routes build whole responses,
so by then every record the request touched has been decided and recorded.
"""

from __future__ import annotations

import re

import orjson
import structlog
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carevault.audit.entry import keyed_hash
from carevault.audit.request import (
    REQUEST_ID_KEY,
    STATE_KEY,
    WRITES,
    RequestAudit,
    accept_request_id,
    query_hash,
)
from carevault.audit.writer import AuditUnavailable, AuditWriter
from carevault.edge.client_address import client_address
from carevault.fhir.outcome import operation_outcome
from carevault.fhir.validation import is_supported_type

log = structlog.get_logger("carevault.audit")

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_WRITTEN_VERSION_HEADERS = frozenset({b"location", b"etag"})
_UNAVAILABLE_TEXT = "The request cannot be recorded right now; nothing was disclosed. Try again."


class AuditTrail:
    def __init__(
        self, app: ASGIApp, writer: AuditWriter, secret: bytes, trusted_proxies: list[str]
    ) -> None:
        self.app = app
        self.writer = writer
        self._secret = secret
        self._trusted_proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        state = scope.setdefault("state", {})
        rid = state.get(REQUEST_ID_KEY)
        if rid is None:  # not behind RequestContext (a test's bare stack)
            rid = state[REQUEST_ID_KEY] = accept_request_id(headers.get("x-request-id"))
        path: str = scope["path"]
        interaction = _interaction(scope["method"], path)
        if interaction is None:
            await self.app(scope, receive, send)
            return
        audit = self._request_audit(scope, headers, rid, interaction, path)
        state[STATE_KEY] = audit
        fhir = path == "/fhir" or path.startswith("/fhir/")
        if interaction in WRITES:
            try:
                await self.writer.write([audit.started()])
            except AuditUnavailable:
                await _send_unavailable(send, fhir)
                return
        failed = False
        started = False

        async def send_audited(message: Message) -> None:
            nonlocal failed, started
            if message["type"] == "http.response.start":
                started = True
                # What an entry takes from the response: a write's new id and version.
                response_headers = {
                    name.decode(): v.decode("latin-1")
                    for k, v in message.get("headers", [])
                    if (name := k.lower()) in _WRITTEN_VERSION_HEADERS
                }
                try:
                    await self.writer.write(audit.finish(message["status"], response_headers))
                except AuditUnavailable:
                    failed = True
                    await _send_unavailable(send, fhir)
                    return
            elif failed:
                return  # the original body never leaves
            await send(message)

        try:
            await self.app(scope, receive, send_audited)
        except Exception:
            if not started:
                # An unhandled error: record it (best effort; the error handler answers 500).
                try:
                    await self.writer.write(audit.finish(500, {}))
                except AuditUnavailable:
                    log.error("audit_write_failed_on_error")
            raise

    def _request_audit(
        self, scope: Scope, headers: Headers, rid: str, interaction: str, path: str
    ) -> RequestAudit:
        agent = headers.get("user-agent")
        audit = RequestAudit(
            interaction=interaction,
            request_id=rid,
            source=client_address(Request(scope), self._trusted_proxies),
            user_agent=keyed_hash(self._secret, agent) if agent else None,
        )
        parts = [p for p in path.split("/") if p]
        if parts[0] == "fhir" and len(parts) > 1 and is_supported_type(parts[1]):
            audit.resource_type = parts[1]
            if len(parts) > 2 and _ID.fullmatch(parts[2]):
                audit.resource_id = parts[2]
        if interaction in ("fhir.search", "fhir.history", "audit.query", "audit.events"):
            audit.query = query_hash(self._secret, scope.get("query_string", b"").decode())
        return audit


def _interaction(method: str, path: str) -> str | None:
    """The audited interaction a request stands for; None outside the audited paths."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return None
    if parts[0] == "audit":
        return "audit." + ("query" if len(parts) == 1 else _AUDIT_ACTIONS.get(parts[1], "other"))
    if parts[0] != "fhir":
        return None
    rest = parts[1:]
    if not rest:
        return "fhir.bundle" if method == "POST" else "fhir.other"
    if rest == ["metadata"]:
        return "fhir.capabilities"
    last = rest[-1]
    if last.startswith("$"):
        return "fhir." + last[1:]
    if "_history" in rest:
        return "fhir.vread" if rest[-1] != "_history" else "fhir.history"
    if len(rest) == 1 or last == "_search":
        if method == "POST" and last != "_search":
            return "fhir.create"
        return "fhir.search"
    return _INSTANCE_ACTIONS.get(method, "fhir.other")


_INSTANCE_ACTIONS = {
    "GET": "fhir.read",
    "HEAD": "fhir.read",
    "PUT": "fhir.update",
    "PATCH": "fhir.update",
    "DELETE": "fhir.delete",
}
_AUDIT_ACTIONS = {
    "AuditEvent": "events",
    "proof": "proof",
    "checkpoint": "checkpoint",
    "public-key": "public-key",
}


async def unavailable_response(request: Request, _err: Exception) -> Response:
    """For `AuditUnavailable` raised inside a handler (a security event that could not be
    recorded): the request fails, 503, whatever path it was on."""
    path = request.url.path
    return _unavailable(path == "/fhir" or path.startswith("/fhir/"))


def _unavailable(fhir: bool) -> Response:
    if fhir:
        body = orjson.dumps(
            operation_outcome(
                [{"severity": "error", "code": "transient", "diagnostics": _UNAVAILABLE_TEXT}]
            )
        )
        media_type = "application/fhir+json"
    else:
        body = orjson.dumps(
            {
                "type": "about:blank",
                "title": "Service Unavailable",
                "status": 503,
                "detail": _UNAVAILABLE_TEXT,
            }
        )
        media_type = "application/problem+json"
    return Response(
        body,
        status_code=503,
        media_type=media_type,
        headers={"Cache-Control": "no-store", "Retry-After": "5"},
    )


async def _send_unavailable(send: Send, fhir: bool) -> None:
    response = _unavailable(fhir)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})

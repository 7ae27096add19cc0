"""Outermost middleware: the request id, the access log line and the request metrics.

Every answer, whoever makes it (a route, a problem handler, the limits' 413/415, the rate
limit's 429, a CORS preflight, a 404 of an unknown path, a crash), leaves with `X-Request-ID`,
is counted in `carevault_http_requests_total` and the latency histogram, and is logged as one
`request` line on the `carevault.access` logger:

    {"event": "request", "method": "GET", "route": "/fhir/Patient/{id}", "status": 200,
     "duration_ms": 3.1, "request_id": "…", "logger": "carevault.access", ...}

The route is the matched route's *template*, never the path nor the query string (both can
carry a name or an identifier); a request no route matched is `<unmatched>`. No address and
no principal: logs.py says why.

The id is the client's `X-Request-ID` when it is a UUID, else a new UUID (anything freer could
carry a name into the logs and the audit trail). It is put in the scope's state, where the
audit trail (audit/middleware.py) and the security events take it, and bound into structlog's
context variables for the request, so every log line made while it runs carries `request_id`.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carevault.config import Settings
from carevault.edge.metrics import (
    LATENCY,
    REQUESTS,
    UNMATCHED,
    allowed_networks,
    method_label,
)
from carevault.edge.problems import problem_response

REQUEST_ID_KEY = "request_id"  # in scope["state"]
HEADER = b"x-request-id"
# Status of a request whose client went away before any response started (nginx's 499).
CLIENT_CLOSED = 499
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

access_log = structlog.get_logger("carevault.access")


def accept_request_id(header: str | None) -> str:
    """The client's id if it is a UUID (lower-cased), else a new random one."""
    if header and _UUID.fullmatch(header):
        return header.lower()
    return str(uuid.uuid4())


def route_template(scope: Scope) -> str:
    """The template of the route the router matched (`/fhir/{type}/{id}`), or UNMATCHED.

    Starlette's router puts the matched route in `scope["route"]` (and FastAPI its APIRoute);
    a request refused before routing, or that no route matched, has none."""
    route: Any = scope.get("route")
    template = getattr(route, "path_format", None)
    return template if isinstance(template, str) and template else UNMATCHED


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContext:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        # /metrics reads these on every scrape; a bad entry fails the start, not a scrape.
        allowed_networks(tuple(settings.metrics_allowed_addresses))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = accept_request_id(_header(scope, HEADER))
        scope.setdefault("state", {})[REQUEST_ID_KEY] = rid
        stamp = (HEADER, rid.encode())
        status = CLIENT_CLOSED
        started = False
        arrived = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [h for h in message.get("headers", ()) if h[0].lower() != HEADER]
                message["headers"] = [*headers, stamp]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                if not started:  # normally SecurityHeaders has answered it already
                    await problem_response(500, "Internal error.")(scope, receive, send_with_id)
                raise
            finally:
                _observe(scope, status, time.perf_counter() - arrived)


# (method, route, status) -> the counter and histogram children: `labels()` takes a lock and
# rebuilds the key on every call. Bounded as the metrics' own label sets are: methods are
# labelled from a fixed list, routes are templates, statuses are codes.
_SERIES: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _observe(scope: Scope, status: int, seconds: float) -> None:
    method = method_label(scope["method"])
    route = route_template(scope)
    series = _SERIES.get((method, route, status))
    if series is None:
        series = (
            REQUESTS.labels(method=method, route=route, status=str(status)),
            LATENCY.labels(method=method, route=route),
        )
        _SERIES[(method, route, status)] = series
    series[0].inc()
    series[1].observe(seconds)
    log = access_log.warning if status >= 500 else access_log.info
    log(
        "request",
        method=method,
        route=route,
        status=status,
        duration_ms=round(seconds * 1000, 3),
    )

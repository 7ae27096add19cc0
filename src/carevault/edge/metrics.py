"""Prometheus metrics and the /metrics route.

Labels carry route templates, methods, status codes and fixed classes only: never an id, a
name or anything a client typed. A request the router did not match is labelled
`UNMATCHED`, whatever its path.

`/metrics` answers only a peer in `metrics_allowed_addresses` (the real peer; a forwarded
address only through a trusted proxy, edge/client_address.py) or a request with
`Authorization: Bearer <metrics_token>` (compared in constant time). Anyone else gets the same
404 as a path that does not exist, for every method: the endpoint does not reveal itself.

Several uvicorn workers: each keeps its own counters, so `carevault serve --workers N` calls
`prepare_workers` first, which points prometheus_client's multiprocess mode at a fresh
directory under the data directory; every worker then writes its values there and a scrape,
whichever worker takes it, adds them up (MultiProcessCollector). One process (tests, a single
worker) needs none of this.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
import shutil
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from carevault.config import Settings
from carevault.edge.client_address import address_in, client_address

router = APIRouter()

UNMATCHED = "<unmatched>"  # the route label of a request no route matched (a 404, a 413...)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "carevault_http_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "carevault_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route template.",
    ["method", "route"],
)
AUTH_FAILURES = Counter(
    "carevault_auth_failures_total",
    "Refused authentications, by kind (password, mfa, token, client...).",
    ["kind"],
)
RATE_LIMITED = Counter(
    "carevault_rate_limited_total",
    "Requests refused with 429, by limit class (address, principal, auth).",
    ["limit"],
)
AUDIT_WRITES = Counter(
    "carevault_audit_writes_total",
    "Audit entries written (ok) or refused because the trail could not take them (failed).",
    ["outcome"],
)

# Security events (audit/events.py) that are refused authentications, and their kind.
_AUTH_EVENT_KINDS = {
    "login": "password",
    "login_locked": "password",
    "login_throttled": "password",
    "mfa_verify": "mfa",
    "step_up": "mfa",
    "token_refresh": "refresh",
    "refresh_reuse": "refresh",
    "client_auth": "client",
}
_REFUSED = frozenset({"failure", "denied", "alert"})


def count_auth_failure(event: str, outcome: str) -> None:
    """Count a security event if it is a refused authentication (a wrong password, a wrong
    second factor, a refused refresh token or client); other events are not counted."""
    kind = _AUTH_EVENT_KINDS.get(event)
    if kind is not None and outcome in _REFUSED:
        AUTH_FAILURES.labels(kind=kind).inc()


def method_label(method: str) -> str:
    """The method, or "other": a client-chosen token is not a label value."""
    return method if method in METHODS else "other"


@functools.lru_cache(maxsize=8)
def allowed_networks(
    addresses: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`metrics_allowed_addresses` parsed: addresses or CIDR networks. Raises ValueError on an
    entry that is neither (RequestContext parses them at start-up)."""
    return tuple(ipaddress.ip_network(a.strip(), strict=False) for a in addresses)


def _address_allowed(address: str | None, settings: Settings) -> bool:
    return address_in(address, settings.metrics_allowed_addresses)


def _token_allowed(header: str | None, settings: Settings) -> bool:
    if settings.metrics_token is None or not header:
        return False
    expected = settings.metrics_token.get_secret_value()
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not expected:
        return False
    return hmac.compare_digest(token.encode(), expected.encode())


def scrape_allowed(request: Request, settings: Settings) -> bool:
    return _token_allowed(request.headers.get("authorization"), settings) or _address_allowed(
        client_address(request, settings.trusted_proxies), settings
    )


def exposition() -> bytes:
    """The text exposition of every metric: this process's, or in multiprocess mode the sum
    over every worker's files."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


async def metrics(request: Request) -> Response:
    # FastAPI names only its own routes in scope["route"]; the access line and the request
    # metrics read the template there.
    request.scope["route"] = _ROUTE
    settings: Settings = request.app.state.services.settings
    if not scrape_allowed(request, settings):
        raise HTTPException(404)  # exactly what an unknown path gets
    if request.method not in ("GET", "HEAD"):
        raise HTTPException(405, headers={"Allow": "GET, HEAD"})
    return Response(
        exposition(), media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"}
    )


class _MetricsApp:
    """The route as a plain ASGI app: Starlette routes every method to one (a function
    endpoint would get GET and HEAD only), so a refused request answers 404 whatever its
    method, where a method-bound route would betray itself with a 405."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await metrics(Request(scope, receive))
        await response(scope, receive, send)


_ROUTE = Route("/metrics", _MetricsApp(), include_in_schema=False)
router.routes.append(_ROUTE)


def multiprocess_dir(settings: Settings) -> Path:
    return settings.data_dir / "prometheus"


def prepare_workers(settings: Settings, workers: int) -> Path | None:
    """Before uvicorn starts `workers` processes: with more than one, an empty multiprocess
    directory (values of an earlier run are removed) named in PROMETHEUS_MULTIPROC_DIR, which
    the workers inherit and read when they import prometheus_client. Returns the directory,
    or None for one worker (its counters live in its memory)."""
    if workers <= 1:
        return None
    directory = multiprocess_dir(settings)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700, parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory

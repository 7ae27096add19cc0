"""Prometheus metrics and the /metrics route.

(Partly a stub: the exposition route, its access rule and multi-worker collection are filled in
by issue 8.) Labels carry route templates, methods, status codes and fixed classes only: never
an id, a name or anything a client typed.
"""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import Counter, Histogram

router = APIRouter()

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

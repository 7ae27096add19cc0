"""Prometheus metrics (edge/metrics.py, edge/request_context.py): what the counters count for a
scripted set of requests, read back through GET /metrics; labels hold route templates and
fixed values only; /metrics answers only an allowed peer or the metrics token, and anyone
else gets exactly the 404 of a path that does not exist; several worker processes add up
(prometheus_client's multiprocess mode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from carevault.edge import metrics
from carevault.identity.roles import Role
from tests.audit.test_fail_closed import block_audit, unblock_audit

FHIR = "application/fhir+json"
PATIENT_ID = "Zyxwardenfeld-1937-11-23"  # a name-like id: it must never become a label
NAME = "Quillonia"
TOKEN = "metrics-token-for-tests-91"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(client: httpx.AsyncClient) -> tuple[str, Samples]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return response.text, samples(response.text)


def value(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, frozenset(labels.items())), 0.0)


def route_templates(routes: Any) -> Any:
    """Every path template of the app, through FastAPI's included routers."""
    for route in routes:
        if hasattr(route, "original_router"):
            prefix = getattr(route, "include_context", None)
            yield from (
                getattr(prefix, "prefix", "") + t
                for t in route_templates(route.original_router.routes)
            )
        elif hasattr(route, "path"):
            yield route.path


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def client_from(h: Any, address: str) -> httpx.AsyncClient:
    """A client of the harness's app whose peer address is `address`."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=h.app, client=(address, 41000)),
        base_url="http://testserver",
    )


async def test_requests_and_latency_by_route_template_and_status(harness: Any) -> None:
    _, before = await scrape(harness.client)
    for _ in range(3):
        assert (await harness.client.get("/healthz")).status_code == 200
    assert (await harness.client.get(f"/fhir/Patient/{PATIENT_ID}")).status_code == 401
    assert (await harness.client.get(f"/no/such/{NAME}?name={NAME}")).status_code == 404
    assert (await harness.client.delete("/healthz")).status_code == 405
    assert (await harness.client.request("ZYXMETHOD", "/healthz")).status_code == 405
    text, after = await scrape(harness.client)

    requests = "carevault_http_requests_total"
    assert delta(before, after, requests, method="GET", route="/healthz", status="200") == 3
    fhir = "/fhir/{resource_type}/{resource_id}"
    assert delta(before, after, requests, method="GET", route=fhir, status="401") == 1
    unmatched = metrics.UNMATCHED
    assert delta(before, after, requests, method="GET", route=unmatched, status="404") == 1
    assert delta(before, after, requests, method="DELETE", route="/healthz", status="405") == 1
    assert delta(before, after, requests, method="other", route="/healthz", status="405") == 1
    # the first scrape itself was counted, under its own template
    assert value(after, requests, method="GET", route="/metrics", status="200") >= 1

    latency = "carevault_http_request_duration_seconds_count"
    assert delta(before, after, latency, method="GET", route="/healthz") == 3
    assert delta(before, after, latency, method="GET", route=fhir) == 1

    # Labels are templates and fixed values: nothing the client typed.
    for typed in (PATIENT_ID, NAME, "ZYXMETHOD", "/no/such"):
        assert typed not in text
    # The registry is the process's: only the series this test moved are this app's.
    routes = {
        dict(labels)["route"]
        for (name, labels), count in after.items()
        if name.startswith("carevault_http_")
        and "route" in dict(labels)
        and count != before.get((name, labels), 0.0)
    }
    assert routes >= {"/healthz", fhir, unmatched, "/metrics"}
    # Every label is the template of one of the app's routes.
    templates = set(route_templates(harness.app.routes))
    assert routes - {unmatched} <= templates


async def test_auth_failures_by_kind(harness: Any) -> None:
    await harness.add_user("dr-metrics", Role.physician)
    failures = "carevault_auth_failures_total"
    _, before = await scrape(harness.client)
    grant = await harness.login("dr-metrics")  # successes count nothing
    assert (await harness.me(grant["access_token"])).status_code == 200
    assert (await harness.client.get("/auth/me")).status_code == 401  # no credential at all
    _, middle = await scrape(harness.client)
    for kind in ("password", "mfa", "token", "refresh", "client"):
        assert delta(before, middle, failures, kind=kind) == 0, kind

    await harness.login("dr-metrics", "Wrong-password-4471", expect=401)
    await harness.login("nobody-at-all", "Wrong-password-4471", expect=401)
    bad = await harness.client.get("/auth/me", headers={"Authorization": "Bearer eyJ.bad.token"})
    assert bad.status_code == 401
    assert (await harness.refresh("not-a-refresh-token")).status_code in (400, 401)
    before = middle
    _, after = await scrape(harness.client)

    assert delta(before, after, failures, kind="password") == 2
    assert delta(before, after, failures, kind="token") == 1
    assert delta(before, after, failures, kind="refresh") == 1
    assert delta(before, after, failures, kind="mfa") == 0


async def test_audit_writes_ok_and_failed(harness: Any, settings: Any) -> None:
    await harness.add_user("svc", Role.service)
    token = (await harness.login("svc"))["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    _, before = await scrape(harness.client)
    created = await harness.client.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "gender": "female"},
        headers={**auth, "Content-Type": FHIR},
    )
    assert created.status_code == 201
    _, middle = await scrape(harness.client)
    writes = "carevault_audit_writes_total"
    assert delta(before, middle, writes, outcome="ok") >= 2  # the .start entry and the create
    assert delta(before, middle, writes, outcome="failed") == 0

    block_audit(settings)
    try:
        refused = await harness.client.get(f"/fhir/Patient/{created.json()['id']}", headers=auth)
        assert refused.status_code == 503
    finally:
        unblock_audit(settings)
    _, after = await scrape(harness.client)
    assert delta(middle, after, writes, outcome="failed") >= 1


async def test_metrics_refused_elsewhere_exactly_like_an_unknown_path(
    settings_factory: Any, harness_factory: Any
) -> None:
    settings = settings_factory(metrics_token=TOKEN)
    h = await harness_factory(settings)
    async with client_from(h, "203.0.113.7") as stranger:
        unknown = await stranger.get("/no-such-endpoint")
        assert unknown.status_code == 404
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
            {"X-Forwarded-For": "127.0.0.1"},  # no trusted proxy: the header means nothing
        ):
            refused = await stranger.get("/metrics", headers=headers)
            assert refused.status_code == 404, headers
            assert refused.content == unknown.content
            assert refused.headers["content-type"] == unknown.headers["content-type"]
            assert "carevault_" not in refused.text
        for method in ("DELETE", "PUT", "OPTIONS", "TRACE", "ZYXMETHOD"):
            assert (await stranger.request(method, "/metrics")).status_code == (
                await stranger.request(method, "/no-such-endpoint")
            ).status_code, method

        allowed = await stranger.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200
        assert allowed.headers["content-type"] == CONTENT_TYPE_LATEST
        assert "carevault_http_requests_total" in allowed.text

    # An allowed peer needs no token (the test client's peer is 127.0.0.1, allowed by default).
    assert (await h.client.get("/metrics")).status_code == 200
    # ... and a POST to it is a wrong method, not a secret.
    assert (await h.client.delete("/metrics")).status_code == 405


async def test_allowed_addresses_networks_and_trusted_proxies(
    settings_factory: Any, harness_factory: Any
) -> None:
    settings = settings_factory(
        metrics_allowed_addresses=["10.0.0.0/8", "192.0.2.10"],
        trusted_proxies=["198.51.100.1"],
    )
    h = await harness_factory(settings)
    cases = [
        ("10.20.30.40", {}, 200),
        ("192.0.2.10", {}, 200),
        ("192.0.2.11", {}, 404),
        ("127.0.0.1", {}, 404),  # not in this list
        ("198.51.100.1", {"X-Forwarded-For": "10.1.1.1"}, 200),  # through the trusted proxy
        ("198.51.100.1", {"X-Forwarded-For": "203.0.113.9"}, 404),
        ("198.51.100.1", {}, 404),  # the proxy itself is not allowed
        ("203.0.113.9", {"X-Forwarded-For": "10.1.1.1"}, 404),  # not a trusted proxy
        ("203.0.113.9", {"Authorization": "Bearer anything"}, 404),  # no token configured
    ]
    for address, headers, status in cases:
        async with client_from(h, address) as client:
            response = await client.get("/metrics", headers=headers)
        assert response.status_code == status, (address, headers)


def test_a_bad_allowed_address_fails_at_start() -> None:
    with pytest.raises(ValueError):
        metrics.allowed_networks(("10.0.0.0/8", "not-an-address"))


_WORKER = """
import sys
from carevault.edge import metrics
for _ in range(int(sys.argv[1])):
    metrics.REQUESTS.labels(method="GET", route="/healthz", status="200").inc()
metrics.LATENCY.labels(method="GET", route="/healthz").observe(0.01)
metrics.AUDIT_WRITES.labels(outcome="ok").inc(int(sys.argv[1]))
"""


def _run_worker(count: int) -> None:
    """A fresh interpreter, as uvicorn spawns a worker: it inherits the environment."""
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(count)],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def _files(directory: Path) -> list[Path]:
    return list(directory.glob("*.db"))


async def test_several_workers_add_up(
    settings: Any, harness_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever prepare_workers sets is undone after the test (monkeypatch restores the state
    # it saw at its first change: setenv records it, delenv then clears the variable).
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "unset-below")
    monkeypatch.delenv(metrics.MULTIPROC_ENV)
    assert metrics.prepare_workers(settings, 1) is None
    assert metrics.MULTIPROC_ENV not in os.environ

    stale = metrics.multiprocess_dir(settings)
    stale.mkdir(parents=True)
    (stale / "counter_99999.db").write_bytes(b"left over from an earlier run")
    directory = metrics.prepare_workers(settings, 2)
    assert directory == stale and list(directory.iterdir()) == []  # cleared at start
    assert os.environ[metrics.MULTIPROC_ENV] == str(directory)
    assert oct(directory.stat().st_mode & 0o777) == oct(0o700)

    _run_worker(3)
    _run_worker(4)
    assert len(_files(directory)) >= 2  # one set of files per process

    h = await harness_factory(settings)
    text, scraped = await scrape(h.client)
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    assert value(scraped, "carevault_http_requests_total", **labels) == 7
    assert value(scraped, "carevault_audit_writes_total", outcome="ok") == 7
    assert (
        value(
            scraped, "carevault_http_request_duration_seconds_count", method="GET", route="/healthz"
        )
        == 2
    )


async def test_rate_limited_requests_are_counted_by_limit_class(
    settings_factory: Any, harness_factory: Any
) -> None:
    h = await harness_factory(settings_factory(rate_limit_auth_per_address="2/minute"))
    _, before = await scrape(h.client)
    statuses = [
        (await h.client.post("/auth/login", json={"username": "x", "password": "y"})).status_code
        for _ in range(5)
    ]
    _, after = await scrape(h.client)
    refused = statuses.count(429)
    assert refused >= 1, statuses
    limited = "carevault_rate_limited_total"
    classes = {
        dict(labels)["limit"]: after[(name, labels)] for (name, labels) in after if name == limited
    }
    assert set(classes) <= {"address", "principal", "auth"}
    assert sum(delta(before, after, limited, limit=c) for c in classes) == refused
    assert (
        delta(
            before,
            after,
            "carevault_http_requests_total",
            method="POST",
            route=metrics.UNMATCHED,
            status="429",
        )
        + delta(
            before,
            after,
            "carevault_http_requests_total",
            method="POST",
            route="/auth/login",
            status="429",
        )
        == refused
    )

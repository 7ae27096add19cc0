"""`carevault serve --workers 2`: /metrics adds up both workers' counters whichever worker
answers the scrape (prometheus_client's multiprocess mode, set up by
carevault.edge.metrics.prepare_workers before the workers start), and each worker writes its
log lines as JSON through carevault's formatter (carevault.logs.uvicorn_log_config, which
uvicorn applies in every worker process)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

HEALTHZ = {"method": "GET", "route": "/healthz", "status": "200"}


def _healthz_count(response: httpx.Response) -> float:
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "carevault_http_requests_total" and sample.labels == HEALTHZ:
                return float(sample.value)
    return 0.0


@pytest.fixture
def store() -> str:
    """Metrics and logs do not depend on the store: SQLite only (each case costs ~20 s)."""
    return "sqlite"


def test_metrics_add_up_across_workers_and_logs_are_json(
    server_factory: Callable[..., Server],
) -> None:
    server = server_factory(workers=2)
    (a,), (b,) = server.clients_per_worker(1).values()
    before = _healthz_count(a.get("/metrics"))
    for i in range(10):
        assert (a if i % 2 == 0 else b).get("/healthz").status_code == 200
    # each worker answers with the sum over both
    assert _healthz_count(a.get("/metrics")) == before + 10
    assert _healthz_count(b.get("/metrics")) == before + 10

    lines = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    access = [
        line
        for line in lines
        if line.get("logger") == "carevault.access" and line.get("route") == "/healthz"
    ]
    assert len(access) >= 10, server.log()
    assert all(line["request_id"] and line["status"] == 200 for line in access)
    assert any(line.get("logger", "").startswith("uvicorn") for line in lines), server.log()

"""Rate limits across processes: two `carevault serve` processes of one deployment (same data
directory and keys) on one Redis count every client in ONE window, whichever process answers;
memory storage (the embedded default) is per process, as edge/rate_limit.py documents.

Each server's `carevault init` makes new instance secrets, so its keys in Redis are its own:
parallel runs on one Redis database do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import REDIS_SKIP, REDIS_URL
from tests.e2e.conftest import Server, bearer, login

pytestmark = [pytest.mark.slow]

PLAIN = "/.well-known/jwks.json"


@pytest.fixture
def store() -> str:
    """Limits do not touch the database: SQLite only (overrides tests/conftest.py)."""
    return "sqlite"


def _state(response: httpx.Response, name: str) -> dict[str, int]:
    for member in response.headers["ratelimit"].split(","):
        policy, *params = member.strip().split(";")
        if policy == f'"{name}"':
            return {k: int(v) for k, v in (p.split("=") for p in params)}
    raise AssertionError(f"no {name} in {response.headers['ratelimit']}")


@pytest.mark.redis
@pytest.mark.skipif(REDIS_URL is None, reason=REDIS_SKIP)
def test_two_server_processes_on_one_redis_share_each_limit(
    server_factory: Callable[..., Server], serve_factory: Callable[..., Server]
) -> None:
    assert REDIS_URL is not None
    env = {
        "CAREVAULT_RATE_LIMIT_STORAGE_URL": REDIS_URL,
        "CAREVAULT_RATE_LIMIT_PER_ADDRESS": "5/minute",
        "CAREVAULT_RATE_LIMIT_PER_PRINCIPAL": "4/minute",
        "CAREVAULT_TRUSTED_PROXIES": "127.0.0.1",  # X-Forwarded-For names the client
        # One deployment, one issuer (by default each process would name its own port).
        "CAREVAULT_ISSUER": "http://carevault.test",
    }
    first = server_factory(workers=1, env=env)
    # A second process of the same deployment: same data directory, keys and database.
    second = serve_factory(first.env, first.cwd, first.data_dir, first.database_url, workers=1)
    assert first.process.pid != second.process.pid
    servers = [first.client(), second.client()]

    # One client address, requests alternated between the processes: cut at 5 in all.
    client = {"X-Forwarded-For": "203.0.113.10"}
    answers = [servers[i % 2].get(PLAIN, headers=client) for i in range(8)]
    assert [r.status_code for r in answers] == [200] * 5 + [429] * 3
    assert [_state(r, "address")["r"] for r in answers[:5]] == [4, 3, 2, 1, 0]
    for refused in answers[5:]:
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) == _state(refused, "address")["t"] >= 1

    # One principal (a token from the first process), a fresh address per request: the
    # principal's window is shared too, cut at 4.
    token = login(servers[0], "alice")["access_token"]
    statuses = [
        servers[i % 2]
        .get("/auth/me", headers={**bearer(token), "X-Forwarded-For": f"198.51.100.{i}"})
        .status_code
        for i in range(6)
    ]
    assert statuses == [200] * 4 + [429] * 2


def test_memory_windows_are_per_worker(server_factory: Callable[..., Server]) -> None:
    """The documented limit of the embedded default: N workers, N windows."""
    server = server_factory(workers=2, env={"CAREVAULT_RATE_LIMIT_PER_ADDRESS": "3/minute"})
    pools: dict[int, list[Any]] = server.clients_per_worker(1)
    (a,), (b,) = pools.values()
    answers = [(a if i % 2 == 0 else b).get(PLAIN).status_code for i in range(8)]
    assert answers == [200] * 6 + [429] * 2

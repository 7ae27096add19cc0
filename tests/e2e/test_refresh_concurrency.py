"""Refresh rotation and revocation across the worker processes of a real `carevault serve`.

Each test pins keep-alive connections to both workers (checked through /proc, not assumed), so
"the other worker" below is a fact of the test, not a likely outcome of load balancing.
"""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import Server, bearer, fire_together, jwt_part, login

pytestmark = [pytest.mark.slow]

CONCURRENT = 8


def _refresh(server: Server, client: httpx.Client, token: str) -> tuple[int, int, dict]:
    response = client.post("/auth/refresh", json={"refresh_token": token})
    return response.status_code, server.worker_of(response), response.json()


def _me_status(server: Server, client: httpx.Client, access_token: str) -> tuple[int, int]:
    response = client.get("/auth/me", headers=bearer(access_token))
    return response.status_code, server.worker_of(response)


def _spread(pools: dict[int, list[httpx.Client]]) -> list[httpx.Client]:
    """Interleave the workers' clients: w1, w2, w1, w2, ..."""
    columns = list(pools.values())
    return [client for row in zip(*columns, strict=True) for client in row]


def _family_rows(server: Server, family_id: str) -> int:
    return server.query("SELECT count(*) FROM refresh_tokens WHERE family_id = ?", [family_id])[0][
        0
    ]


def _family_revoked(server: Server, family_id: str) -> tuple[object, object]:
    return server.query(
        "SELECT revoked_at, revoked_reason FROM refresh_families WHERE id = ?", [family_id]
    )[0]


def test_concurrent_refreshes_in_grace_window_rotate_once(server_factory):
    server = server_factory(workers=2)
    pools = server.clients_per_worker(CONCURRENT // 2)
    clients = _spread(pools)
    session = login(clients[0])
    family = jwt_part(session["access_token"], 1)["sid"]

    results = fire_together(
        [(lambda c=c: _refresh(server, c, session["refresh_token"])) for c in clients]
    )

    statuses = [status for status, _, _ in results]
    assert statuses == [200] * CONCURRENT, results
    assert {worker for _, worker, _ in results} == set(pools), "both workers must have answered"
    successors = {body["refresh_token"] for _, _, body in results}
    assert len(successors) == 1, "every retry in the grace window gets the same successor"
    successor = successors.pop()
    assert successor != session["refresh_token"]
    # One rotation: the login token and its single successor, and no theft alarm.
    assert _family_rows(server, family) == 2
    assert _family_revoked(server, family) == (None, None)
    reuse = "SELECT count(*) FROM audit_entries WHERE action = 'security.refresh_reuse'"
    assert server.query(reuse)[0][0] == 0
    # Every access token handed out works, on either worker.
    for index, (_, _, body) in enumerate(results):
        assert jwt_part(body["access_token"], 1)["sid"] == family
        status, _ = _me_status(server, clients[(index + 1) % len(clients)], body["access_token"])
        assert status == 200

    # The successor works (once more rotation), from the other worker too.
    status, _, body = _refresh(server, clients[1], successor)
    assert status == 200, body
    assert body["refresh_token"] not in (successor, session["refresh_token"])
    assert _family_rows(server, family) == 3


def test_concurrent_reuse_without_grace_revokes_only_that_family(server_factory):
    server = server_factory(workers=2, env={"CAREVAULT_REFRESH_GRACE_SECONDS": "0"})
    pools = server.clients_per_worker(CONCURRENT // 2)
    clients = _spread(pools)
    other = login(clients[0])  # another session of the same user, logged in first
    session = login(clients[1])
    family = jwt_part(session["access_token"], 1)["sid"]
    for client in clients[:2]:  # both workers have the session live before the race
        assert _me_status(server, client, session["access_token"])[0] == 200

    results = fire_together(
        [(lambda c=c: _refresh(server, c, session["refresh_token"])) for c in clients]
    )

    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] + [401] * (CONCURRENT - 1), results
    assert {worker for _, worker, _ in results} == set(pools)
    winner = next(body for status, _, body in results if status == 200)
    assert _family_revoked(server, family)[1] == "reuse"

    # The whole family is dead on both workers: the winner's refresh and access tokens, and
    # the access token from login.
    for client in clients[:2]:
        assert _refresh(server, client, winner["refresh_token"])[0] == 401
        assert _me_status(server, client, session["access_token"])[0] == 401
        assert _me_status(server, client, winner["access_token"])[0] == 401
    # ... and only that family.
    for client in clients[:2]:
        assert _me_status(server, client, other["access_token"])[0] == 200
    status, _, body = _refresh(server, clients[1], other["refresh_token"])
    assert status == 200, body
    assert _me_status(server, clients[0], body["access_token"])[0] == 200


def test_same_second_replay_without_grace_is_reuse(server_factory):
    server = server_factory(workers=2, env={"CAREVAULT_REFRESH_GRACE_SECONDS": "0"})
    client_a, client_b = (pool[0] for pool in server.clients_per_worker(1).values())
    # Replayed on the worker that rotated, then on the other worker.
    for replay_client in (client_a, client_b):
        for _ in range(3):  # until both land in one wall-clock second (the Keycloak case)
            session = login(client_a)
            family = jwt_part(session["access_token"], 1)["sid"]
            first = client_a.post("/auth/refresh", json={"refresh_token": session["refresh_token"]})
            replay = replay_client.post(
                "/auth/refresh", json={"refresh_token": session["refresh_token"]}
            )

            # Whatever the timing, a replay with the window off is reuse.
            assert first.status_code == 200, first.text
            assert replay.status_code == 401, replay.text
            revoked_at, reason = _family_revoked(server, family)
            assert reason == "reuse"
            rotated = first.json()
            for client in (client_a, client_b):
                assert _refresh(server, client, rotated["refresh_token"])[0] == 401
                assert _me_status(server, client, rotated["access_token"])[0] == 401
                assert _me_status(server, client, session["access_token"])[0] == 401
            used_at = server.query(
                "SELECT max(used_at) FROM refresh_tokens WHERE family_id = ?", [family]
            )[0][0]
            if int(used_at) == int(revoked_at):
                break
        else:
            pytest.fail("three replays in a row straddled a second boundary")


def test_logout_all_on_one_worker_is_seen_at_once_by_the_other(server_factory):
    server = server_factory(workers=2)
    pools = server.clients_per_worker(5)
    (worker_a, clients_a), (worker_b, clients_b) = pools.items()
    session1 = login(clients_a[0])
    session2 = login(clients_b[0])
    # Both workers have checked session 2's token (and loaded their revocation state).
    for client in (clients_a[0], clients_b[0]):
        assert _me_status(server, client, session2["access_token"])[0] == 200

    response = clients_a[0].post("/auth/logout-all", headers=bearer(session1["access_token"]))
    assert response.status_code == 204, response.text
    assert server.worker_of(response) == worker_a

    # First request right after, on the other worker; then many more on both.
    assert _me_status(server, clients_b[0], session2["access_token"]) == (401, worker_b)
    answered = []
    for _ in range(3):
        for client in _spread(pools):
            status, worker = _me_status(server, client, session2["access_token"])
            answered.append(worker)
            assert status == 401, f"worker {worker} still accepts a logged-out session"
    assert len(answered) >= 20
    assert set(answered) == {worker_a, worker_b}
    for client in (clients_a[0], clients_b[0]):
        assert _me_status(server, client, session1["access_token"])[0] == 401
    for session in (session1, session2):
        assert _refresh(server, clients_b[1], session["refresh_token"])[0] == 401
    # A new login afterwards is a new session and works everywhere.
    fresh = login(clients_b[2])
    for client in (clients_a[1], clients_b[1]):
        assert _me_status(server, client, fresh["access_token"])[0] == 200

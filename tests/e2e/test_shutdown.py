"""Graceful shutdown: SIGTERM while FHIR creates are in flight cuts none of them mid-write.

A real `carevault serve` takes a stream of concurrent `POST /fhir/Patient`s; SIGTERM arrives
while they run. Then:
- every request either got a complete response (a 201, never a 5xx) or none at all (refused,
  or its connection closed before any response byte): nothing is cut mid-response;
- requests that were running when the signal came finished with their 201;
- the server exits 0 within `shutdown_timeout_seconds` (plus start-up slack for the workers);
- after a restart on the same data, each 201's Patient reads back, the store holds exactly
  those (a request without a response created nothing), and the audit trail verifies with a
  `fhir.create` entry for each of them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from tests.e2e.conftest import Server, bearer, login

# Spawned workers import the whole app; on a 2-core box shared with other test runs that has
# taken longer than the shared fixture's 45 s.
START_TIMEOUT = 150.0
SHUTDOWN_TIMEOUT = 10.0
EXIT_SLACK = 10.0  # process teardown on a loaded 2-core box
THREADS = 12


@dataclass
class Outcomes:
    created: list[tuple[str, float, float]] = field(default_factory=list)  # id, sent, answered
    unanswered: list[str] = field(default_factory=list)  # the failure, before any response
    cut: list[str] = field(default_factory=list)  # a response started and did not finish
    other: list[str] = field(default_factory=list)  # a complete response that is not a 201
    lock: threading.Lock = field(default_factory=threading.Lock)


def _patient() -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test:shutdown", "value": uuid.uuid4().hex}],
        "name": [{"family": "Graceful", "given": ["Shut"]}],
    }


def _writer(base_url: str, token: str, stop: threading.Event, out: Outcomes) -> None:
    """POST Patients on one keep-alive connection (reconnecting when it closes) until a
    connection is refused or `stop` is set."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            sent = time.monotonic()
            headers_seen = False
            try:
                with client.stream(
                    "POST",
                    "/fhir/Patient",
                    json=_patient(),
                    headers={**bearer(token), "content-type": "application/fhir+json"},
                ) as response:
                    headers_seen = True
                    body = response.read()
            except httpx.ConnectError as err:  # refused: the listener is closed
                with out.lock:
                    out.unanswered.append(f"refused: {err}")
                return
            except httpx.TransportError as err:
                with out.lock:
                    (out.cut if headers_seen else out.unanswered).append(repr(err))
                continue
            with out.lock:
                if response.status_code == 201:
                    out.created.append((json.loads(body)["id"], sent, time.monotonic()))
                else:
                    out.other.append(f"{response.status_code} {body[:300]!r}")


@pytest.fixture(autouse=True)
def patient_start(monkeypatch: pytest.MonkeyPatch) -> None:
    wait_ready = Server.wait_ready
    monkeypatch.setattr(
        Server, "wait_ready", lambda self, timeout=START_TIMEOUT: wait_ready(self, timeout)
    )


# Two workers only: the parent hands SIGTERM on to both, which covers one worker's path too
# (each 1-worker case cost ~30 s of the suite's 15-minute budget).
@pytest.mark.parametrize("workers", [2])
def test_sigterm_during_writes_cuts_nothing(
    server_factory: Callable[..., Server],
    serve_factory: Callable[..., Server],
    workers: int,
) -> None:
    server = server_factory(
        workers=workers,
        users=(("svc", "service"),),
        env={
            "CAREVAULT_SHUTDOWN_TIMEOUT_SECONDS": str(SHUTDOWN_TIMEOUT),
            "CAREVAULT_RATE_LIMIT_ENABLED": "false",
        },
    )
    with server.client() as http:
        token = login(http, "svc")["access_token"]

    out = Outcomes()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_writer, args=(server.base_url, token, stop, out), daemon=True)
        for _ in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(out.created) < 3 * THREADS:
        assert time.monotonic() < deadline, f"too few creates: {out.created[:3]} {out.other[:3]}"
        assert not out.other and not out.cut, (out.other[:3], out.cut[:3])
        time.sleep(0.05)

    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    try:
        code = server.process.wait(SHUTDOWN_TIMEOUT + EXIT_SLACK)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit {SHUTDOWN_TIMEOUT + EXIT_SLACK}s after SIGTERM\n{server.log()}")
    exited = time.monotonic()
    stop.set()
    for thread in threads:
        thread.join(30)
    assert code == 0, server.log()

    assert not out.cut, f"responses cut mid-write: {out.cut[:5]}"
    assert not out.other, f"not 201: {out.other[:5]}"
    # Some requests were running when the signal came, and finished.
    in_flight = [c for c in out.created if c[1] < signalled < c[2]]
    assert in_flight, "no request was in flight at SIGTERM; the test proved nothing"
    assert all(answered <= exited for _, _, answered in out.created)

    # The same data directory (and database) again.
    again = serve_factory(
        server.env, server.cwd, server.data_dir, server.database_url, workers=workers
    )
    created = {c[0] for c in out.created}
    assert len(created) == len(out.created)
    with again.client() as http:
        token = login(http, "svc")["access_token"]
        for patient_id in created:
            response = http.get(f"/fhir/Patient/{patient_id}", headers=bearer(token))
            assert response.status_code == 200, (patient_id, response.text)
    stored = {row[0] for row in again.query("SELECT id FROM fhir_resources")}
    assert stored == created, (
        f"{len(stored - created)} stored without a 201 answer, {len(created - stored)} lost"
    )
    entries = again.query(
        "SELECT entry FROM audit_entries WHERE action = ? AND outcome = ?",
        ("fhir.create", "permit"),
    )
    audited = {pid for pid in created if any(pid in entry for (entry,) in entries)}
    assert audited == created, f"{len(created - audited)} creates without an audit entry"
    again.stop()
    verify = again.cli("audit", "verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr

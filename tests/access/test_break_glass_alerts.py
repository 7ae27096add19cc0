"""Alerts of break-glass grants: one log event and (when configured) one webhook delivery per
grant, retried with backoff on 5xx and connection errors, never on 4xx; a failing webhook
never fails or delays the request. The webhook receiver is a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog

from carevault.access.alerts import AlertSinks
from carevault.identity.roles import Role
from tests.access.test_break_glass import REASON, URL, bearer, new_patient, open_grant, user_token


class Receiver:
    """A tiny HTTP/1.1 server: answers each request with the next scripted status."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.statuses = list(statuses or [])
        self.delay = delay
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((lines[0], headers, body))
            if self.delay:
                await asyncio.sleep(self.delay)
            status = self.statuses.pop(0) if self.statuses else 200
            writer.write(
                f"HTTP/1.1 {status} Scripted\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Any]:
    started: list[Receiver] = []

    async def start(statuses: list[int] | None = None, delay: float = 0.0) -> Receiver:
        receiver = await Receiver(statuses, delay).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.close()


async def webhook_harness(harness_factory, settings_factory, url: str) -> Any:
    h = await harness_factory(settings_factory(alert_webhook_url=url))
    h.services.alerts.base_delay = 0.01  # the retry schedule, shrunk for the test
    h.services.alerts.max_delay = 0.05
    return h


def alert_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "break_glass_opened"]


# --- through HTTP ------------------------------------------------------------------------------


async def test_each_grant_raises_exactly_one_alert(
    harness_factory, settings_factory, receiver_factory
) -> None:
    receiver = await receiver_factory()
    h = await webhook_harness(harness_factory, settings_factory, receiver.url)
    patient = await new_patient(h)
    user_id, token = await user_token(h, "al.once")

    with structlog.testing.capture_logs() as logs:
        first = (await open_grant(h, token, patient)).json()["id"]
        second = (await open_grant(h, token, patient, minutes=10)).json()["id"]
        problem_response = await open_grant(h, token, "no-such-patient")  # no grant: no alert
        await h.services.alerts.drain()

    assert problem_response.status_code == 404
    events = alert_events(logs)
    assert [e["grant_id"] for e in events] == [first, second]
    assert all(e["log_level"] == "warning" for e in events)
    assert events[0]["user_id"] == user_id and events[0]["patient_id"] == patient
    assert REASON not in repr(logs)

    assert len(receiver.requests) == 2
    posted = [json.loads(body) for _, _, body in receiver.requests]
    assert [p["grant_id"] for p in posted] == [first, second]
    assert posted[0]["alert"] == "break_glass_opened" and posted[0]["patient_id"] == patient
    for line, headers, body in receiver.requests:
        assert line.startswith("POST /hook ")
        assert headers["content-type"] == "application/json"
        assert REASON.encode() not in body
    assert [h["idempotency-key"] for _, h, _ in receiver.requests] == [first, second]

    # revoking and listing raise no further alerts
    _, auditor = await user_token(h, "al.once.auditor", Role.auditor)
    with structlog.testing.capture_logs() as later:
        await h.client.post(f"{URL}/{first}/revoke", headers=bearer(auditor))
        await h.client.get(URL, headers=bearer(auditor))
        await h.services.alerts.drain()
    assert alert_events(later) == [] and len(receiver.requests) == 2


async def test_log_alert_without_webhook(harness) -> None:
    h = harness
    assert h.services.alerts.webhook_url is None
    patient = await new_patient(h)
    _, token = await user_token(h, "al.logonly")
    with structlog.testing.capture_logs() as logs:
        gid = (await open_grant(h, token, patient)).json()["id"]
    assert [e["grant_id"] for e in alert_events(logs)] == [gid]
    assert h.services.alerts.pending == 0


async def test_webhook_retries_5xx_then_stops_without_duplicates(
    harness_factory, settings_factory, receiver_factory
) -> None:
    receiver = await receiver_factory([503, 503, 200])
    h = await webhook_harness(harness_factory, settings_factory, receiver.url)
    patient = await new_patient(h)
    _, token = await user_token(h, "al.retry")

    with structlog.testing.capture_logs() as logs:
        response = await open_grant(h, token, patient)
        assert response.status_code == 201  # answered before the deliveries finished
        await h.services.alerts.drain()
        await asyncio.sleep(0.2)  # nothing more arrives afterwards

    assert len(receiver.requests) == 3
    keys = {headers["idempotency-key"] for _, headers, _ in receiver.requests}
    assert keys == {response.json()["id"]}
    assert len({body for _, _, body in receiver.requests}) == 1  # the same alert each time
    assert [e["attempt"] for e in logs if e["event"] == "alert_webhook_retry"] == [1, 2]
    assert [e["attempts"] for e in logs if e["event"] == "alert_webhook_delivered"] == [3]
    assert len(alert_events(logs)) == 1


async def test_webhook_4xx_is_not_retried(
    harness_factory, settings_factory, receiver_factory
) -> None:
    receiver = await receiver_factory([400, 200])
    h = await webhook_harness(harness_factory, settings_factory, receiver.url)
    patient = await new_patient(h)
    _, token = await user_token(h, "al.4xx")
    with structlog.testing.capture_logs() as logs:
        assert (await open_grant(h, token, patient)).status_code == 201
        await h.services.alerts.drain()
    assert len(receiver.requests) == 1
    assert [e["status"] for e in logs if e["event"] == "alert_webhook_rejected"] == [400]


async def test_unreachable_webhook_never_fails_the_request(
    harness_factory, settings_factory
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    h = await webhook_harness(harness_factory, settings_factory, f"http://127.0.0.1:{port}/x")
    patient = await new_patient(h)
    user_id, token = await user_token(h, "al.down")

    with structlog.testing.capture_logs() as logs:
        response = await open_grant(h, token, patient)
        assert response.status_code == 201, response.text
        await h.services.alerts.drain()

    assert await h.services.break_glass.active_patients(user_id) == {patient}
    assert len([e for e in logs if e["event"] == "alert_webhook_retry"]) == 4
    failed = [e for e in logs if e["event"] == "alert_webhook_failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 5
    assert len(alert_events(logs)) == 1  # the log alert went out regardless


async def test_slow_webhook_does_not_delay_the_request(
    harness_factory, settings_factory, receiver_factory
) -> None:
    receiver = await receiver_factory(delay=5.0)
    h = await webhook_harness(harness_factory, settings_factory, receiver.url)
    patient = await new_patient(h)
    _, token = await user_token(h, "al.slow")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await open_grant(h, token, patient)).status_code == 201
    assert loop.time() - started < 3.0
    assert h.services.alerts.pending == 1
    h.services.alerts.drain_seconds = 0.1  # shutdown cancels what is still in flight


# --- the sinks alone ---------------------------------------------------------------------------


async def test_backoff_is_exponential_and_capped(settings) -> None:
    sinks = AlertSinks(settings, base_delay=0.5, max_delay=4.0)
    assert [sinks._delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # noqa: SLF001


async def test_close_cancels_deliveries_in_flight(settings, receiver_factory) -> None:
    receiver = await receiver_factory(delay=10.0)
    sinks = AlertSinks(
        settings.model_copy(update={"alert_webhook_url": receiver.url}), drain_seconds=0.1
    )
    with structlog.testing.capture_logs() as logs:
        await sinks.emit({"alert": "break_glass_opened", "grant_id": "g-1"})
        assert sinks.pending == 1
        await sinks.close()
    assert sinks.pending == 0
    assert [e["count"] for e in logs if e["event"] == "alert_webhook_abandoned"] == [1]


async def test_emit_never_raises_on_odd_alerts(settings) -> None:
    sinks = AlertSinks(
        settings.model_copy(update={"alert_webhook_url": "http://127.0.0.1:9/"}),
        drain_seconds=0.1,
    )
    with structlog.testing.capture_logs() as logs:
        await sinks.emit({"alert": "x", "event": "clash", "value": object()})
        await sinks.close()
    assert logs[0]["event"] == "x"

"""Alert sinks for security alerts (a break-glass grant, ...).

Every alert is a structured log event at WARNING, always. When `Settings.alert_webhook_url` is
set, the same JSON is also POSTed there from a background task that never delays or fails the
request that raised it: retried with capped exponential backoff on connection errors, timeouts,
429 and 5xx; given up on any other 4xx (retrying a refused request does not help). Each POST
carries `Idempotency-Key: <alert id>` so that a receiver can drop the duplicate a retry after a
lost answer may produce. Alerts hold opaque ids only: never a reason text, a name or a token.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import structlog

from carevault.config import Settings

log = structlog.get_logger("carevault.alerts")


class AlertSinks:
    def __init__(
        self,
        settings: Settings,
        *,
        attempts: int = 5,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        timeout: float = 5.0,
        drain_seconds: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.webhook_url = settings.alert_webhook_url or None
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.drain_seconds = drain_seconds
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def emit(self, alert: dict[str, Any]) -> None:
        """Log the alert; schedule its webhook delivery. Never raises, never waits."""
        name = str(alert.get("alert", "alert"))
        fields = {k: v for k, v in alert.items() if k not in ("alert", "event")}
        log.warning(name, alert=True, **fields)
        if not self.webhook_url:
            return
        try:
            body = json.dumps(alert, separators=(",", ":"), sort_keys=True, default=str)
        except (TypeError, ValueError):
            log.error("alert_webhook_unserializable", alert_name=name)
            return
        key = str(alert.get("grant_id") or alert.get("id") or "")
        task = asyncio.get_running_loop().create_task(self._deliver(name, key, body.encode()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait for the deliveries in flight (tests)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=self.timeout,
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    def _delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.base_delay * (2 ** (attempt - 1))))

    async def _deliver(self, name: str, key: str, body: bytes) -> None:
        assert self.webhook_url
        headers = {"Content-Type": "application/json", "User-Agent": "carevault-alerts"}
        if key:
            headers["Idempotency-Key"] = key
        for attempt in range(1, self.attempts + 1):
            outcome: str
            try:
                response = await self._http().post(self.webhook_url, content=body, headers=headers)
            except httpx.HTTPError as err:
                outcome = type(err).__name__
            except Exception as err:  # noqa: BLE001 - a sink must never take the process down
                log.error("alert_webhook_failed", alert_name=name, error_type=type(err).__name__)
                return
            else:
                status = response.status_code
                if 200 <= status < 300:
                    log.info("alert_webhook_delivered", alert_name=name, attempts=attempt)
                    return
                if 400 <= status < 500 and status not in (408, 429):
                    log.error("alert_webhook_rejected", alert_name=name, status=status)
                    return
                outcome = f"http_{status}"
            if attempt < self.attempts:
                log.warning(
                    "alert_webhook_retry", alert_name=name, attempt=attempt, outcome=outcome
                )
                await asyncio.sleep(self._delay(attempt))
            else:
                log.error(
                    "alert_webhook_failed", alert_name=name, attempts=attempt, outcome=outcome
                )

    async def close(self) -> None:
        """Give deliveries in flight a moment, cancel the rest, close the HTTP client."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.drain_seconds)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        if left:
            log.error("alert_webhook_abandoned", count=len(left))
            await asyncio.gather(*left, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

"""Alert rules over the audit trail: what, among committed entries, deserves a person's look.

- `denial_burst`: one actor (a user, or an address when nobody is signed in) refused
  `audit_denial_burst` times within `audit_denial_window_seconds`: probing or a broken client.
  Raised once per window per actor.
- `refresh_token_reuse`: a rotated refresh token was presented again (a stolen copy).

Break-glass grants alert where they are opened (access/break_glass.py) and a failed
`audit verify` where it fails (audit/commands.py). Alerts go to the alert sinks (log, webhook)
and into the trail as `security.alert` entries; they carry ids and counts, never PHI.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from carevault.audit.entry import AuditEntry, Outcome
from carevault.config import Settings


class AlertRules:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = settings.audit_denial_burst
        self._window = settings.audit_denial_window_seconds
        self._clock = clock
        self._denials: dict[str, deque[float]] = {}
        self._raised: dict[str, float] = {}

    def observe(self, entries: list[AuditEntry]) -> list[dict[str, Any]]:
        """The alerts these newly committed entries raise."""
        alerts: list[dict[str, Any]] = []
        now = self._clock()
        for entry in entries:
            if entry.action.startswith("security.alert"):
                continue
            if entry.action == "security.refresh_reuse":
                alerts.append(
                    {
                        "alert": "refresh_token_reuse",
                        "user_id": entry.user,
                        "client_id": entry.client,
                        "request_id": entry.request_id,
                    }
                )
            if entry.outcome is Outcome.deny and self._threshold:
                burst = self._denial(entry, now)
                if burst is not None:
                    alerts.append(burst)
        return alerts

    def _denial(self, entry: AuditEntry, now: float) -> dict[str, Any] | None:
        actor = f"user:{entry.user}" if entry.user else f"address:{entry.source}"
        window = self._denials.setdefault(actor, deque())
        window.append(now)
        while window and window[0] <= now - self._window:
            window.popleft()
        if len(self._denials) > 10_000:  # bounded memory under an address-spraying flood
            self._denials = {
                k: v for k, v in self._denials.items() if v and v[-1] > now - self._window
            }
        if len(window) < self._threshold or now - self._raised.get(actor, -1e18) < self._window:
            return None
        self._raised[actor] = now
        return {
            "alert": "denial_burst",
            "user_id": entry.user,
            "source": None if entry.user else entry.source,
            "denials": len(window),
            "window_seconds": self._window,
        }


def alert_entry(alert: dict[str, Any]) -> AuditEntry:
    detail = {
        k: v
        for k, v in alert.items()
        if k not in ("alert", "user_id", "client_id", "source", "request_id") and v is not None
    }
    detail["rule"] = alert["alert"]
    return AuditEntry(
        action="security.alert",
        outcome=Outcome.permit,
        user=alert.get("user_id"),
        client=alert.get("client_id"),
        source=alert.get("source"),
        request_id=alert.get("request_id"),
        detail=detail,
    )

"""Security events (logins, lockouts, refresh reuse, logout, key rotation, break-glass, ...)
as audit entries. Events never carry a password, a token, a username or anything clinical: an
attempted username appears only as a keyed hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from carevault.audit.entry import AuditEntry, Outcome
from carevault.audit.writer import AuditWriter
from carevault.edge.metrics import count_auth_failure

_OUTCOMES = {"success": Outcome.permit, "failure": Outcome.deny, "denied": Outcome.deny}
# An alert is a security event worth a look; most are refusals, these are not.
_ALERT_OUTCOMES = {
    "break_glass_opened": Outcome.permit,
    "record_integrity_failure": Outcome.error,
    "audit_verify_failed": Outcome.error,
}


@dataclass
class SecurityEvent:
    event: str
    outcome: str  # success | failure | denied | alert
    user_id: str | None = None
    client_id: str | None = None
    subject_hash: str | None = None
    source_address: str | None = None
    request_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    patient_id: str | None = None
    roles: tuple[str, ...] = ()

    def entry(self) -> AuditEntry:
        alert = self.outcome == "alert"
        outcome = (
            _ALERT_OUTCOMES.get(self.event, Outcome.deny) if alert else _OUTCOMES[self.outcome]
        )
        detail = dict(self.details)
        if alert:
            detail["alert"] = True
        if self.subject_hash:
            detail["subject"] = self.subject_hash
        return AuditEntry(
            action=f"security.{self.event}",
            outcome=outcome,
            user=self.user_id,
            client=self.client_id,
            roles=self.roles,
            patient=self.patient_id,
            purpose=detail.pop("purpose", None),
            break_glass=self.event.startswith("break_glass") and outcome is Outcome.permit,
            request_id=self.request_id,
            source=self.source_address,
            detail=detail,
        )


class SecurityEventLog:
    """Records an event durably before returning; raises `AuditUnavailable` otherwise."""

    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer

    async def record(self, event: SecurityEvent) -> None:
        count_auth_failure(event.event, event.outcome)
        await self._writer.write([event.entry()])

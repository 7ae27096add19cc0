"""Alert rules: a burst of refusals by one actor and refresh-token reuse raise alerts, into the
alert sinks and into the trail; ordinary traffic raises none."""

from __future__ import annotations

from typing import Any

from carevault.audit.alerts import AlertRules
from carevault.audit.entry import AuditEntry, Outcome
from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.conftest import make_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _denied(user: str | None = "u1", source: str = "10.0.0.1") -> AuditEntry:
    return AuditEntry("fhir.read", Outcome.deny, user=user, source=source)


def test_a_burst_of_denials_alerts_once_per_window(tmp_path: Any) -> None:
    clock = Clock()
    rules = AlertRules(make_settings(tmp_path, audit_denial_burst=5), clock)
    assert rules.observe([_denied() for _ in range(4)]) == []
    alerts = rules.observe([_denied()])
    assert [a["alert"] for a in alerts] == ["denial_burst"]
    assert alerts[0]["user_id"] == "u1" and alerts[0]["denials"] == 5
    assert rules.observe([_denied() for _ in range(10)]) == []  # same window: once
    clock.now += 61
    assert rules.observe([_denied() for _ in range(4)]) == []  # old ones left the window
    assert [a["alert"] for a in rules.observe([_denied()])] == ["denial_burst"]


def test_denials_are_counted_per_actor_and_permits_do_not_count(tmp_path: Any) -> None:
    rules = AlertRules(make_settings(tmp_path, audit_denial_burst=3), Clock())
    mixed = [_denied("a"), _denied("b"), AuditEntry("fhir.read", Outcome.permit, user="a")]
    assert rules.observe(mixed * 2) == []
    anonymous = rules.observe([_denied(None, "10.9.9.9") for _ in range(3)])
    assert anonymous[0]["source"] == "10.9.9.9" and anonymous[0]["user_id"] is None


def test_refresh_reuse_alerts(tmp_path: Any) -> None:
    rules = AlertRules(make_settings(tmp_path), Clock())
    alerts = rules.observe([AuditEntry("security.refresh_reuse", Outcome.deny, user="u9")])
    assert alerts[0]["alert"] == "refresh_token_reuse" and alerts[0]["user_id"] == "u9"


async def test_probing_records_reach_the_trail_as_an_alert(
    harness_factory: Any, settings_factory: Any
) -> None:
    h = await harness_factory(settings_factory(audit_denial_burst=5))
    await h.add_user("billing1", Role.billing)
    token = (await h.login("billing1"))["access_token"]
    for i in range(6):  # billing may not read clinical records: every one is refused
        response = await h.client.get(
            f"/fhir/Observation?code=probe-{i}", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 403
    await h.services.audit_writer.drain()
    await h.services.audit_writer.drain()
    alerts = await audit_documents(h.services.engine, "security.alert")
    assert [a["detail"]["rule"] for a in alerts] == ["denial_burst"]
    assert alerts[0]["user"] is not None

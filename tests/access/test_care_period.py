"""A care relationship ends when its CareTeam participant period ends, with no write in
between: the cached relationship expires at the period's boundary."""

from __future__ import annotations

from datetime import UTC, datetime

from carevault.identity.roles import Role


def _instant(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def test_care_ends_with_the_participant_period(clocked, clock) -> None:
    h = clocked
    await h.add_user("svc.period", Role.service)
    await h.add_user("dr.period", Role.physician, practitioner_id="prac-period")
    svc = {"Authorization": f"Bearer {(await h.login('svc.period'))['access_token']}"}
    patient = await h.client.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "name": [{"family": "Periodic"}]},
        headers=svc,
    )
    pid = patient.json()["id"]
    team = {
        "resourceType": "CareTeam",
        "status": "active",
        "subject": {"reference": f"Patient/{pid}"},
        "participant": [
            {
                "member": {"reference": "Practitioner/prac-period"},
                "period": {"start": _instant(clock.now - 60), "end": _instant(clock.now + 120)},
            }
        ],
    }
    assert (await h.client.post("/fhir/CareTeam", json=team, headers=svc)).status_code == 201
    dr = {"Authorization": f"Bearer {(await h.login('dr.period'))['access_token']}"}
    assert (await h.client.get(f"/fhir/Patient/{pid}", headers=dr)).status_code == 200
    clock.advance(60)
    assert (await h.client.get(f"/fhir/Patient/{pid}", headers=dr)).status_code == 200
    clock.advance(70)  # past the end of the period; nothing was written meanwhile
    assert (await h.client.get(f"/fhir/Patient/{pid}", headers=dr)).status_code == 404

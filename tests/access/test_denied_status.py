"""`denied_status = 403` in the policy: deployments that prefer it get 403 for a record the
caller may not read (and say so openly), while a missing record stays 404; the default (404
for both) is covered by test_fhir_access_*."""

from __future__ import annotations

from pathlib import Path

from carevault.access.policy import DEFAULT_POLICY
from tests.access.fhir_world import MISSING, build_world


async def test_denied_status_403_when_the_policy_says_so(
    settings_factory, harness_factory, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        DEFAULT_POLICY.read_text().replace("denied_status = 404", "denied_status = 403")
    )
    h = await harness_factory(settings_factory(access_policy_file=policy))
    w = await build_world(h)

    denied = await w.get("patA", f"/fhir/Observation/{w.ids['obsB']}")
    assert denied.status_code == 403, denied.text
    assert denied.json()["issue"][0]["code"] == "forbidden"
    assert "Betaworldsky" not in denied.text
    missing = await w.get("patA", f"/fhir/Observation/{MISSING}")
    assert missing.status_code == 404
    own = await w.get("patA", f"/fhir/Observation/{w.ids['obsA']}")
    assert own.status_code == 200
    # searches still just leave the record out
    bundle = await w.search("patA", "/fhir/Observation?_total=accurate")
    assert w.ids["obsB"] not in str(bundle)

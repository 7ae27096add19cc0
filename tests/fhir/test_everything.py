"""Patient/$everything, paged: every compartment resource exactly once across the pages (the
Patient first), `_count` capped, next links carrying search's encrypted cursor (tampered,
foreign or other-patient cursors refused with 400)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from carevault.fhir.routes import EVERYTHING_MAX_COUNT
from carevault.identity.roles import Role
from tests.access.fhir_world import mfa_login
from tests.fhir.samples import care_team
from tests.fhir.test_conditional import _login, condition_body, patient, post
from tests.fhir.test_rest import observation_body


@pytest.fixture
async def clinician(harness):
    harness.client.headers.update(await _login(harness, "dr.everything"))
    return harness


async def _seed(h) -> tuple[str, set[str], str]:
    """A patient with 7 compartment resources of 2 types (+1 deleted), and another patient."""
    alice = (await post(h, patient("MRN-E1"))).json()["id"]
    bob = (await post(h, patient("MRN-E2"))).json()["id"]
    urls = {f"Patient/{alice}"}
    for _ in range(4):
        obs = (await post(h, observation_body(alice))).json()["id"]
        urls.add(f"Observation/{obs}")
    for _ in range(3):
        cond = (await post(h, condition_body(alice))).json()["id"]
        urls.add(f"Condition/{cond}")
    removed = (await post(h, observation_body(alice))).json()["id"]
    assert (await h.client.delete(f"/fhir/Observation/{removed}")).status_code == 204
    await post(h, observation_body(bob))
    return alice, urls, bob


def _cursor(url: str) -> str:
    return parse_qs(urlsplit(url).query)["_cursor"][0]


async def _pages(h, first_url: str) -> list[dict]:
    pages = []
    url: str | None = first_url
    while url is not None:
        response = await h.client.get(url)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page)
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
        assert len(pages) < 50
    return pages


@pytest.mark.parametrize("count", [1, 2, 3, 7, 8, 9, 50])
async def test_paging_covers_every_compartment_resource_exactly_once(clinician, count):
    h = clinician
    alice, expected, _ = await _seed(h)
    pages = await _pages(h, f"/fhir/Patient/{alice}/$everything?_count={count}")
    urls = [e["fullUrl"] for page in pages for e in page["entry"]]
    assert urls[0] == f"Patient/{alice}"
    assert len(urls) == len(set(urls)) == len(expected)  # exactly once each
    assert set(urls) == expected
    assert all(len(page["entry"]) <= count for page in pages)
    assert len(pages) == -(-len(expected) // count)  # no empty trailing page
    assert all(page["total"] == len(expected) for page in pages)
    assert all(e["search"]["mode"] == "match" for page in pages for e in page["entry"])
    # after the Patient: ordered by type, then id
    rest = [tuple(u.split("/")) for u in urls[1:]]
    assert rest == sorted(rest)


async def test_default_page_and_count_cap(clinician):
    h = clinician
    alice, expected, _ = await _seed(h)
    whole = (await h.client.get(f"/fhir/Patient/{alice}/$everything")).json()
    assert {e["fullUrl"] for e in whole["entry"]} == expected
    assert [link["relation"] for link in whole["link"]] == ["self"]
    capped = await h.client.get(f"/fhir/Patient/{alice}/$everything?_count=100000")
    assert capped.status_code == 200
    self_link = capped.json()["link"][0]["url"]
    assert self_link.endswith(f"_count={EVERYTHING_MAX_COUNT}")
    only_total = (await h.client.get(f"/fhir/Patient/{alice}/$everything?_count=0")).json()
    assert only_total["total"] == len(expected) and only_total["entry"] == []


async def test_tampered_and_foreign_cursors_are_refused(clinician):
    h = clinician
    alice, _, bob = await _seed(h)
    first = (await h.client.get(f"/fhir/Patient/{alice}/$everything?_count=2")).json()
    cursor = _cursor(next(link["url"] for link in first["link"] if link["relation"] == "next"))
    ok = await h.client.get(f"/fhir/Patient/{alice}/$everything", params={"_cursor": cursor})
    assert ok.status_code == 200

    flipped = cursor[:10] + ("A" if cursor[10] != "A" else "B") + cursor[11:]
    bad = [flipped, cursor[:-2], cursor + "A", "", "not-a-cursor"]
    for value in bad:
        response = await h.client.get(
            f"/fhir/Patient/{alice}/$everything", params={"_cursor": value}
        )
        assert response.status_code == 400, value
        body = response.json()
        assert body["resourceType"] == "OperationOutcome"
        assert cursor not in response.text

    # issued for alice: not valid for bob, nor for a search, nor with other parameters
    other = await h.client.get(f"/fhir/Patient/{bob}/$everything", params={"_cursor": cursor})
    assert other.status_code == 400
    search = await h.client.get("/fhir/Patient", params={"_cursor": cursor})
    assert search.status_code == 400
    mixed = await h.client.get(
        f"/fhir/Patient/{alice}/$everything", params={"_cursor": cursor, "_count": "5"}
    )
    assert mixed.status_code == 400
    # a search cursor is not an $everything cursor
    listing = (await h.client.get("/fhir/Patient", params={"_count": "1"})).json()
    search_cursor = _cursor(next(lk["url"] for lk in listing["link"] if lk["relation"] == "next"))
    foreign = await h.client.get(
        f"/fhir/Patient/{alice}/$everything", params={"_cursor": search_cursor}
    )
    assert foreign.status_code == 400


async def test_cursor_is_bound_to_the_caller(clinician):
    h = clinician
    alice, _, _ = await _seed(h)
    first = (await h.client.get(f"/fhir/Patient/{alice}/$everything?_count=2")).json()
    cursor = _cursor(next(link["url"] for link in first["link"] if link["relation"] == "next"))
    # another caller who may read alice's records (a nurse on her care team) ...
    await h.add_user("dr.other", Role.nurse, practitioner_id="prac-other")
    assert (await post(h, care_team(alice, "prac-other"))).status_code == 201
    other = {"Authorization": f"Bearer {(await mfa_login(h, 'dr.other'))['access_token']}"}
    mine = await h.client.get(f"/fhir/Patient/{alice}/$everything", headers=other)
    assert mine.status_code == 200, mine.text
    # ... still may not use a cursor issued to someone else
    response = await h.client.get(
        f"/fhir/Patient/{alice}/$everything", params={"_cursor": cursor}, headers=other
    )
    assert response.status_code == 400


@pytest.mark.parametrize("query", ["_count=-1", "_count=x", "_count=1e3", "_type=Observation"])
async def test_bad_parameters_are_400(clinician, query):
    h = clinician
    alice, _, _ = await _seed(h)
    response = await h.client.get(f"/fhir/Patient/{alice}/$everything?{query}")
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_a_page_after_the_patient_was_deleted_is_410(clinician):
    h = clinician
    alice, _, _ = await _seed(h)
    first = (await h.client.get(f"/fhir/Patient/{alice}/$everything?_count=2")).json()
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    assert (await h.client.delete(f"/fhir/Patient/{alice}")).status_code == 204
    assert (await h.client.get(nxt)).status_code == 410


async def test_capability_statement_documents_the_paging(clinician):
    body = (await clinician.client.get("/fhir/metadata")).json()
    resources = {r["type"]: r for r in body["rest"][0]["resource"]}
    operations = {o["name"]: o for o in resources["Patient"]["operation"]}
    assert sorted(operations) == ["access-report", "everything"]
    operation = operations["everything"]
    assert "_count" in operation["documentation"]
    assert str(EVERYTHING_MAX_COUNT) in operation["documentation"]

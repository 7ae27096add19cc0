"""Approvals of one app by one user sent in parallel (several tabs, a double submit): every
scope approved is remembered and no approval fails. On PostgreSQL (READ COMMITTED) a merge
computed from a plain read loses the scopes of the approvals committed in between, and two
first approvals both insert the row."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx

from tests.conftest import STRONG_PASSWORD
from tests.oauth.support import OAuthWorld, hidden, pkce_pair, query_of
from tests.oauth.test_grants import authorization_url

# One scope per approval sent in parallel.
SCOPES = tuple(
    f"patient/{resource_type}.rs"
    for resource_type in (
        "Observation",
        "Condition",
        "Encounter",
        "MedicationRequest",
        "AllergyIntolerance",
        "Procedure",
        "Immunization",
        "DiagnosticReport",
        "DocumentReference",
        "CarePlan",
    )
)


def _authorization_url(world: OAuthWorld, scope: str) -> str:
    _, challenge = pkce_pair()
    return authorization_url(world.clients["patient-app"].id, scope, challenge)


async def _consent_forms(
    world: OAuthWorld, browser: httpx.AsyncClient, scopes: Sequence[str]
) -> list[dict[str, str]]:
    """The filled-in consent form of one authorization per scope, none submitted yet."""
    forms = []
    for scope in scopes:
        page = await browser.get(_authorization_url(world, f"launch/patient {scope}"))
        assert page.status_code == 200 and "consent" in page.text, page.text
        forms.append(
            {
                "request": hidden(page.text, "request"),
                "csrf_token": hidden(page.text, "csrf_token"),
                "decision": "approve",
            }
        )
    return forms


async def _sign_in(world: OAuthWorld, browser: httpx.AsyncClient, scope: str) -> None:
    page = await browser.get(_authorization_url(world, scope))
    signed_in = await browser.post(
        "/oauth/authorize/login",
        data={
            "request": hidden(page.text, "request"),
            "username": "patA",
            "password": STRONG_PASSWORD,
        },
    )
    assert signed_in.status_code == 303, signed_in.text


async def _approve_in_parallel(
    world: OAuthWorld, browser: httpx.AsyncClient, scopes: Sequence[str]
) -> None:
    forms = await _consent_forms(world, browser, scopes)
    answers = await asyncio.gather(
        *(browser.post("/oauth/authorize/consent", data=form) for form in forms)
    )
    for answer in answers:
        assert answer.status_code == 302, answer.text
        assert "code" in query_of(answer.headers["location"])


async def _approved(world: OAuthWorld) -> frozenset[str]:
    user = await world.services.users.by_username("patA")
    return await world.app.state.oauth.consents.approved(user.id, world.clients["patient-app"].id)


async def test_parallel_first_approvals_all_remembered(world: OAuthWorld) -> None:
    async with world.browser() as browser:
        await _sign_in(world, browser, "launch/patient patient/Patient.rs")
        await _approve_in_parallel(world, browser, SCOPES)
    assert await _approved(world) == {"launch/patient", *SCOPES}


async def test_parallel_widenings_of_an_approval_all_remembered(world: OAuthWorld) -> None:
    async with world.browser() as browser:
        await _sign_in(world, browser, "launch/patient patient/Patient.rs")
        await _approve_in_parallel(world, browser, ["patient/Patient.rs"])
        await _approve_in_parallel(world, browser, SCOPES)
    assert await _approved(world) == {"launch/patient", "patient/Patient.rs", *SCOPES}

"""What the FHIR handlers call: they ask, this module asks the decision point, they obey.

`AccessControl` turns a request into the decision point's inputs (the requester from the
token and the stored facts; the target from the record's body) and its answer into what a
handler needs: a `Decision` to obey, a SQL condition for searches, a redacted body.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from carevault.access.decision import (
    REDACT,
    Action,
    Decision,
    Requester,
    Target,
    decide,
    visibility,
)
from carevault.access.facts import AccessFacts, labels_of
from carevault.access.filters import visible
from carevault.access.policy import DEFAULT_PURPOSE, PURPOSES, Policy
from carevault.identity.principal import Principal

PURPOSE_HEADER = "x-purpose-of-use"
ALWAYS_SHOWN = ("resourceType", "id", "meta")


class InvalidPurpose(ValueError):
    """The X-Purpose-Of-Use header names no purpose this server knows."""


class AccessControl:
    def __init__(
        self, policy: Policy, facts: AccessFacts, clock: Callable[[], float] = time.time
    ) -> None:
        self.policy = policy
        self.facts = facts
        facts.organizations_needed = policy.organization_boundary
        self._clock = clock

    @property
    def denied_status(self) -> int:
        return self.policy.denied_status

    async def requester(self, principal: Principal, purpose_header: str | None) -> Requester:
        purpose = DEFAULT_PURPOSE if purpose_header is None else purpose_header.strip()
        if purpose not in PURPOSES:
            raise InvalidPurpose("unknown purpose of use")
        await self.facts.refresh()
        return await self.facts.requester(principal, purpose)

    async def target(self, resource_type: str, body: Mapping[str, Any] | None) -> Target:
        if body is None:
            return Target(resource_type)
        patients = await self.facts.patient_facts(self.facts.patients_of(body))
        return Target(resource_type, patients, labels_of(body))

    async def decide(
        self,
        requester: Requester,
        action: Action,
        resource_type: str,
        body: Mapping[str, Any] | None = None,
    ) -> Decision:
        """The decision on one record (`body` as stored, or as about to be written); without a
        body, on the type alone (may this requester search it, create such records at all)."""
        return (await self.decide_on(requester, action, resource_type, body))[0]

    async def decide_on(
        self,
        requester: Requester,
        action: Action,
        resource_type: str,
        body: Mapping[str, Any] | None = None,
    ) -> tuple[Decision, tuple[str, ...]]:
        """`decide`, and the ids of the patients the record belongs to (for the audit trail)."""
        target = await self.target(resource_type, body)
        decision = decide(self.policy, requester, action, target, self._clock())
        return decision, tuple(p.id for p in target.patients)

    async def decide_for_patients(
        self, requester: Requester, action: Action, resource_type: str, patient_ids: list[str]
    ) -> Decision:
        """For a record known only by its compartment (a deleted one has no body to read)."""
        patients = await self.facts.patient_facts(patient_ids)
        return decide(
            self.policy, requester, action, Target(resource_type, patients), self._clock()
        )

    async def prefetch(self, bodies: list[Mapping[str, Any]]) -> None:
        """Load the patient facts of many records at once (a page of results), so that the
        decisions on each of them that follow read only caches."""
        patients = {p for body in bodies for p in self.facts.patients_of(body)}
        if patients:
            await self.facts.patient_facts(patients)

    async def search_condition(self, requester: Requester, resource_type: str) -> Any:
        """The SQL condition of what a search of `resource_type` may return."""
        consents = await self.facts.all_consent_rules()
        return visible(visibility(self.policy, requester, resource_type, consents, self._clock()))


def redact(body: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """The body as the decision lets the requester see it."""
    if REDACT not in decision.obligations or decision.redact_to is None:
        return body
    keep = set(ALWAYS_SHOWN) | decision.redact_to
    return {key: value for key, value in body.items() if key in keep}

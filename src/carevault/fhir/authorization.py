"""The record server's one door to access control: who is calling (`FhirCaller`, built once
per request from the token and the stored access facts) and whether they may act on a record
(`authorize`). Handlers ask and obey; the decision itself is `access.decision.decide`.

A read that is denied answers exactly like a missing record (404, the same OperationOutcome,
no other header) unless the policy says 403; an action the caller may not take on a record
they may read answers 403; a type they may not search or create at all answers 403.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import Request
from sqlalchemy.exc import SQLAlchemyError

from carevault.access.control import PURPOSE_HEADER, AccessControl, InvalidPurpose, redact
from carevault.access.decision import Action, Decision, Requester
from carevault.audit.entry import Outcome
from carevault.audit.events import SecurityEvent
from carevault.audit.request import request_audit, request_id
from carevault.fhir import outcome
from carevault.fhir.bundles import EntryFailure
from carevault.fhir.store import Gone, NotFound, StoredResource
from carevault.identity.principal import Principal

log = structlog.get_logger("carevault.access")


class AccessDenied(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(str(status))


@dataclass
class FhirCaller:
    principal: Principal
    requester: Requester
    access: AccessControl
    break_glass_used: bool = field(default=False)

    @property
    def user_id(self) -> str:
        return self.principal.user_id

    @property
    def client_id(self) -> str:
        return self.principal.client_id

    @property
    def roles(self) -> tuple[str, ...]:
        return self.principal.roles


async def fhir_caller(request: Request, principal: Principal) -> FhirCaller:
    access: AccessControl = request.app.state.services.access
    audit = request_audit(request)
    if audit is not None:
        audit.identify(principal.user_id, principal.client_id, principal.roles)
    try:
        requester = await access.requester(principal, request.headers.get(PURPOSE_HEADER))
    except (RuntimeError, SQLAlchemyError, OSError):
        # The access facts cannot be checked: deny, as the revocation check does (503).
        log.error("access_facts_unavailable")
        raise AccessDenied(
            503,
            outcome.operation_outcome(
                [
                    {
                        "severity": "error",
                        "code": "transient",
                        "diagnostics": "Access cannot be checked right now; try again.",
                    }
                ]
            ),
        ) from None
    except InvalidPurpose:
        raise AccessDenied(
            400,
            outcome.operation_outcome(
                [
                    {
                        "severity": "error",
                        "code": "invalid",
                        "diagnostics": "X-Purpose-Of-Use must be one of TREAT, ETREAT, HPAYMT, "
                        "HOPERAT, PUBHLTH.",
                    }
                ]
            ),
        ) from None
    if audit is not None:
        audit.purpose = requester.purpose
    return FhirCaller(principal, requester, access)


def not_visible(caller: FhirCaller) -> AccessDenied:
    if caller.access.denied_status == 403:
        return AccessDenied(403, _forbidden())
    return AccessDenied(404, outcome.forbidden_as_not_found())


def forbidden() -> AccessDenied:
    return AccessDenied(403, _forbidden())


def _forbidden() -> dict[str, Any]:
    return outcome.operation_outcome(
        [
            {
                "severity": "error",
                "code": "forbidden",
                "diagnostics": "You are not allowed to do this.",
            }
        ]
    )


async def authorize_type(
    caller: FhirCaller, action: Action, resource_type: str, request: Request | None = None
) -> Decision:
    """May the caller search (or create, history) this type at all? 403 if not."""
    decision = await caller.access.decide(caller.requester, action, resource_type)
    if not decision.permit:
        if request is not None:
            _record(request, action, Outcome.deny, resource_type)
        raise forbidden()
    return decision


async def authorize(
    request: Request,
    caller: FhirCaller,
    action: Action,
    resource_type: str,
    current: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None = None,
) -> Decision:
    """The decision for `action` on a record: `current` as stored (None for a create), `new`
    as it would be written (create, update). Raises `AccessDenied`: as if missing when the
    caller may not read `current`; 403 when they may read it but not do this. Either way the
    request's audit entries get one for this record."""
    access = caller.access
    decision: Decision | None = None
    record = current if current is not None else new
    patients: tuple[str, ...] = ()
    if current is not None:
        decision, patients = await access.decide_on(
            caller.requester, Action.read, resource_type, current
        )
        if not decision.permit:
            _record(request, action, Outcome.deny, resource_type, record, patients)
            raise not_visible(caller)
        if action is not Action.read:
            decision = await access.decide(caller.requester, action, resource_type, current)
            if not decision.permit:
                _record(request, action, Outcome.deny, resource_type, record, patients)
                raise forbidden()
    if new is not None:
        decision, new_patients = await access.decide_on(
            caller.requester, action, resource_type, new
        )
        patients = tuple(dict.fromkeys(patients + new_patients))
        if not decision.permit:
            _record(request, action, Outcome.deny, resource_type, record, patients)
            raise forbidden()
    if decision is None:  # neither a record nor a body: the type alone
        decision = await authorize_type(caller, action, resource_type, request)
        return decision
    await note_break_glass(request, caller, decision, patients)
    _record(
        request,
        action,
        Outcome.permit,
        resource_type,
        record,
        patients,
        break_glass=decision.break_glass,
    )
    return decision


async def visible_body(
    request: Request, caller: FhirCaller, stored: StoredResource
) -> dict[str, Any] | None:
    """The body of a stored record as the caller may see it, or None if they may not. A body
    returned is recorded in the request's audit entries (a record withheld is not shown, so
    the request's own entry covers it)."""
    if stored.body is None:
        return None
    decision, patients = await caller.access.decide_on(
        caller.requester, Action.read, stored.resource_type, stored.body
    )
    if not decision.permit:
        return None
    await note_break_glass(request, caller, decision, patients)
    audit = request_audit(request)
    if audit is not None:
        audit.record(
            audit.interaction,
            Outcome.permit,
            stored.resource_type,
            stored.id,
            str(stored.version),
            patients,
            break_glass=decision.break_glass,
        )
    return redact(stored.body, decision)


def _record(
    request: Request,
    action: Action,
    outcome: Outcome,
    resource_type: str,
    record: Mapping[str, Any] | None = None,
    patients: tuple[str, ...] = (),
    *,
    break_glass: bool = False,
) -> None:
    audit = request_audit(request)
    if audit is None:
        return
    meta = (record or {}).get("meta") or {}
    audit.record(
        action.value,
        outcome,
        resource_type,
        (record or {}).get("id"),
        meta.get("versionId"),
        patients,
        break_glass=break_glass,
    )


async def authorize_gone(
    request: Request, caller: FhirCaller, resource_type: str, resource_id: str
) -> None:
    """A deleted record has no body to decide on: its compartment (kept on delete) decides
    whether the caller may learn that it existed (410) or not (404)."""
    patients = await caller.access.facts.compartment_of(resource_type, resource_id)
    decision = await caller.access.decide_for_patients(
        caller.requester, Action.read, resource_type, patients
    )
    if not decision.permit:
        raise not_visible(caller)


async def note_break_glass(
    request: Request, caller: FhirCaller, decision: Decision, patients: tuple[str, ...] = ()
) -> None:
    """Once per request: an access under a break-glass grant is a security event of its own
    (besides the flagged entry of each record), so that alert rules and auditors see it."""
    if not decision.break_glass or caller.break_glass_used:
        return
    caller.break_glass_used = True
    await request.app.state.services.events.record(
        SecurityEvent(
            "break_glass_access",
            "success",
            user_id=caller.user_id,
            client_id=caller.client_id,
            roles=caller.roles,
            patient_id=patients[0] if patients else None,
            request_id=request_id(request),
            details={"purpose": caller.requester.purpose},
        )
    )
    log.warning("break_glass_access", user_id=caller.user_id)


class EntryAccess:
    """Bundle entries, decided as the REST interactions they stand for (an EntryAuthorizer)."""

    def __init__(self, request: Request, caller: FhirCaller) -> None:
        self._request = request
        self._caller = caller

    async def read(self, stored: StoredResource) -> dict[str, Any] | None:
        return await visible_body(self._request, self._caller, stored)

    async def deleted(self, resource_type: str, resource_id: str) -> bool:
        try:
            await authorize_gone(self._request, self._caller, resource_type, resource_id)
        except AccessDenied:
            return False
        return True

    async def write(
        self, action: str, resource_type: str, resource_id: str, body: dict[str, Any] | None
    ) -> EntryFailure | None:
        store = self._request.app.state.services.store
        current: dict[str, Any] | None = None
        try:
            if action != "create":
                try:
                    current = (await store.read(resource_type, resource_id)).body
                except NotFound:
                    # Bundle entries never update-as-create: the store answers 404, exactly as
                    # it does for a record the caller may not see.
                    return None
                except Gone:
                    await authorize_gone(self._request, self._caller, resource_type, resource_id)
                    return None  # the store answers 410 (or no-op delete) for it
            await authorize(
                self._request, self._caller, Action(action), resource_type, current, new=body
            )
        except AccessDenied as denied:
            return EntryFailure(denied.status, denied.body)
        return None

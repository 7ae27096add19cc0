"""`GET /fhir/Patient/{id}/$access-report`: a patient's accounting of disclosures, self-served.

Who may ask: the patient themself (a patient account linked to that Patient) and auditors,
with a token whose scopes allow reading AuditEvent (first-party logins do). Anyone else, and
anyone asking about a Patient that does not exist, gets the same 404 OperationOutcome as an
unknown record: the report never tells whether someone is a patient here.

What it shows: a FHIR Bundle (type `collection`) of AuditEvent resources, newest first, one
per access to the patient's data by someone other than the patient (every permitted entry of
the audit trail that names the patient, other than the patient's own accounts'): when, what
kind of record (its resource type, never a record id: a record may name other people too),
the action, why (purpose of use), and who as role and organization. People are named only
when `settings.access_report_names` is on (the Practitioner's name, else the account's user
name). Accesses under break-glass carry BTG in `purposeOfEvent` and the break-glass
extension, and the Bundle says how many there were in all (a `meta.tag` and a first
OperationOutcome entry, severity warning).

Paging: `_count` (1..500, default 100) and `_cursor` (from the `next` link).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from carevault.audit.audit_event import ReportAgent, patient_view
from carevault.audit.entry import Outcome, format_time
from carevault.audit.queries import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_SEQ,
    Actor,
    AuditFilter,
    InvalidQuery,
    actors,
    count_entries,
    list_entries,
    parse_int,
    single_values,
    users_of_patient,
)
from carevault.audit.request import request_audit
from carevault.fhir import outcome
from carevault.fhir.authorization import FhirCaller
from carevault.fhir.routes import ID_PATTERN, Caller, FhirError, fhir_response
from carevault.fhir.store import NotFound, ResourceStore, StoreError
from carevault.identity.roles import Role

router = APIRouter(prefix="/fhir", tags=["fhir"])

ACTION = "fhir.access-report"
REPORT_TAG = "urn:carevault:access-report"
REPORT_PARAMS = frozenset({"_count", "_cursor"})


def _not_found() -> FhirError:
    return FhirError(404, outcome.not_found())


def _allowed(caller: FhirCaller, patient_id: str) -> bool:
    scopes = caller.requester.scopes
    if not scopes.granting_contexts("read", "AuditEvent"):
        return False
    if Role.auditor in caller.roles:
        return True
    return Role.patient in caller.roles and caller.requester.patient_id == patient_id


async def _exists(store: ResourceStore, patient_id: str) -> bool:
    """A Patient that is, or was (deleted, erased), stored here: its accesses still count."""
    try:
        await store.read("Patient", patient_id)
    except NotFound:
        return False
    except StoreError:
        return True
    return True


@router.get("/Patient/{patient_id}/$access-report")
async def access_report(request: Request, patient_id: str, caller: Caller) -> Response:
    services = request.app.state.services
    audit = request_audit(request)
    valid = bool(ID_PATTERN.fullmatch(patient_id))
    if not valid or not _allowed(caller, patient_id):
        if audit is not None:
            audit.record(ACTION, Outcome.deny, "Patient", patient_id if valid else None)
        raise _not_found()
    if not await _exists(services.store, patient_id):
        raise _not_found()
    try:
        values = single_values(request.query_params.multi_items(), REPORT_PARAMS)
        count = parse_int(values.get("_count", str(DEFAULT_LIMIT)), "_count", 1, MAX_LIMIT)
        cursor = None
        if "_cursor" in values:
            cursor = parse_int(values["_cursor"], "_cursor", 1, MAX_SEQ)
    except InvalidQuery:
        raise FhirError(400, outcome.invalid_request()) from None
    if audit is not None:
        audit.record(ACTION, Outcome.permit, "Patient", patient_id, patients=(patient_id,))
    bundle = await build_report(request, patient_id, count, cursor)
    return fhir_response(bundle)


async def build_report(
    request: Request, patient_id: str, count: int, cursor: int | None
) -> dict[str, Any]:
    services = request.app.state.services
    engine = services.engine
    own = await users_of_patient(engine, patient_id)
    accesses = AuditFilter(
        patient=patient_id,
        outcome=Outcome.permit,
        exclude_actors=own,
        limit=count,
        before=cursor,
    )
    page = await list_entries(engine, accesses)
    break_glass = await count_entries(engine, replace(accesses, break_glass=True))
    people = await actors(engine, (e.document.get("user") for e in page.entries))
    names = _Names(services.store, named=services.settings.access_report_names)
    events = []
    for listed in page.entries:
        doc = listed.document
        agent = await names.agent(doc, people.get(doc.get("user", "")))
        events.append({"resource": patient_view(doc, patient_id, agent)})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": format_time(dt.datetime.now(dt.UTC)),
    }
    base = f"/fhir/Patient/{patient_id}/$access-report"
    links = [{"relation": "self", "url": _url(base, count, cursor)}]
    if page.next is not None:
        links.append({"relation": "next", "url": _url(base, count, page.next)})
    bundle["link"] = links
    entries: list[dict[str, Any]] = []
    if break_glass:
        text = (
            "1 access to this record was made under emergency access (break-glass)."
            if break_glass == 1
            else f"{break_glass} accesses to this record were made under emergency access "
            "(break-glass)."
        )
        bundle["meta"] = {"tag": [{"system": REPORT_TAG, "code": "break-glass", "display": text}]}
        entries.append(
            {
                "resource": outcome.operation_outcome(
                    [{"severity": "warning", "code": "informational", "diagnostics": text}]
                )
            }
        )
    entries.extend(events)
    if entries:
        bundle["entry"] = entries
    return bundle


def _url(base: str, count: int, cursor: int | None) -> str:
    query: dict[str, Any] = {"_count": count}
    if cursor is not None:
        query["_cursor"] = cursor
    return f"{base}?{urlencode(query)}"


class _Names:
    """Organization names (always: not a person's) and, when allowed, people's names; each
    looked up once per report."""

    def __init__(self, store: ResourceStore, *, named: bool) -> None:
        self._store = store
        self._named = named
        self._cache: dict[tuple[str, str], str | None] = {}

    async def agent(self, doc: dict[str, Any], actor: Actor | None) -> ReportAgent:
        roles = tuple(doc.get("roles") or ())
        if actor is None:
            return ReportAgent(roles)
        # An entry without roles (some security events keep none): the account's roles now.
        roles = roles or actor.roles
        organization = actor.organization_id
        org_name = await self._name("Organization", organization) if organization else None
        name = None
        practitioner = None
        if self._named:
            if actor.practitioner_id:
                practitioner = actor.practitioner_id
                name = await self._name("Practitioner", practitioner)
            name = name or actor.username
        return ReportAgent(roles, organization, org_name, name, practitioner)

    async def _name(self, resource_type: str, resource_id: str) -> str | None:
        key = (resource_type, resource_id)
        if key not in self._cache:
            try:
                body = (await self._store.read(resource_type, resource_id)).body or {}
            except StoreError:
                body = {}
            self._cache[key] = _display_name(body)
        return self._cache[key]


def _display_name(body: dict[str, Any]) -> str | None:
    name = body.get("name")
    if isinstance(name, str):  # Organization.name
        return name or None
    if isinstance(name, list) and name and isinstance(name[0], dict):  # HumanName
        human = name[0]
        if human.get("text"):
            return str(human["text"])
        parts = [*human.get("prefix", []), *human.get("given", []), human.get("family", "")]
        return " ".join(str(p) for p in parts if p) or None
    return None

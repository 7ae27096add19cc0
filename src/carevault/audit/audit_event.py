"""Audit entries as FHIR R4 AuditEvent resources, in the shape of the IHE Basic Audit Log
Patterns (BALP) where an entry holds what BALP asks for.

- `type`: `rest` (audit-event-type) for FHIR interactions, with the RESTful interaction as a
  subtype (read, vread, create, update, delete, search-type, history-*, capabilities,
  operation); DICOM 110114 User Authentication (subtype 110122 Login / 110123 Logout) for
  logins and logouts; DICOM 110113 Security Alert for other security events (110127 Emergency
  Override Started for a break-glass grant); DICOM 110101 Audit Log Used for the audit API.
  Every event also carries the carevault action itself as a subtype (`ACTION_SYSTEM`), so
  nothing is lost in the mapping.
- `action`: C/R/U/D for create/read and vread/update/delete, E (execute) for searches,
  operations and everything else, as BALP does for queries.
- `outcome`: 0 success (permit), 4 minor failure (deny), 8 serious failure (error), 12 major
  failure (a 5xx); `outcomeDesc` gives the outcome and the HTTP status.
- `purposeOfEvent`: the v3 PurposeOfUse code (v3-ActReason), plus BTG when the access was made
  under a break-glass grant; such events also carry the `BREAK_GLASS_EXTENSION` (true).
- `agent`: the user (requestor; `who` = the linked Practitioner or Patient where there is one,
  with the user id as identifier; roles; network address) and the client application
  (DICOM 110150 Application).
- `source`: observer = this server (security-source-type 4, Application Server).
- `entity`: the patient (object-role 1), the record (object-role 4, Domain Resource, typed by
  its resource type; its version-specific reference), the query (object-role 24, as the
  keyed hash the entry keeps) and the request id (BALP XrequestId).

`patient_view` builds the reduced event of a patient's access report: role and organization
(and a name only where the caller supplies one), the kind of record but no record ids, no
user ids, addresses or clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from carevault.audit.queries import Actor

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
OUTCOME = "http://terminology.hl7.org/CodeSystem/audit-event-outcome"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ROLE_CLASS = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
BALP_ENTITY = "http://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
NETWORK_IP = "2"  # audit-event-agent-network-type: IP address

ACTION_SYSTEM = "urn:carevault:audit-action"
ROLE_SYSTEM = "urn:carevault:role"
USER_SYSTEM = "urn:carevault:user"
CLIENT_SYSTEM = "urn:carevault:client"
QUERY_HASH = "urn:carevault:query-hash"
BREAK_GLASS_EXTENSION = "urn:carevault:fhir:StructureDefinition:break-glass"
OBSERVER = {
    "identifier": {"system": "urn:carevault:server", "value": "carevault"},
    "display": "carevault record server",
}

_REST_SUBTYPES = {
    "read": "read",
    "vread": "vread",
    "create": "create",
    "update": "update",
    "delete": "delete",
    "capabilities": "capabilities",
}
_CRUD = {"create": "C", "read": "R", "vread": "R", "update": "U", "delete": "D"}
_OUTCOMES = {"permit": ("0", "Success"), "deny": ("4", "Minor failure")}
_PURPOSES = {
    "TREAT": "treatment",
    "ETREAT": "Emergency Treatment",
    "HPAYMT": "healthcare payment",
    "HOPERAT": "healthcare operations",
    "PUBHLTH": "public health",
}
BTG = {"system": ACT_REASON, "code": "BTG", "display": "break the glass"}


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def event_type(doc: Mapping[str, Any]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """`type` and the standard `subtype` codings of an entry (the carevault action aside)."""
    action: str = doc["action"]
    group, _, name = action.partition(".")
    if group == "fhir":
        subtypes = []
        code = _REST_SUBTYPES.get(name)
        if name == "search":
            code = "search-type" if doc.get("type") else "search-system"
        elif name == "history":
            code = (
                "history-instance"
                if doc.get("id")
                else "history-type"
                if doc.get("type")
                else "history-system"
            )
        elif code is None and name not in ("bundle", "other"):
            code = "operation"  # $everything, $access-report, ...
        if code:
            subtypes.append(_coding(RESTFUL, code))
        return _coding(EVENT_TYPE, "rest", "RESTful Operation"), subtypes
    if group == "security":
        if name.startswith("login") or name == "account_locked":
            return _coding(DCM, "110114", "User Authentication"), [_coding(DCM, "110122", "Login")]
        if name.startswith("logout"):
            return _coding(DCM, "110114", "User Authentication"), [_coding(DCM, "110123", "Logout")]
        if name == "break_glass_opened":
            return _coding(DCM, "110113", "Security Alert"), [
                _coding(DCM, "110127", "Emergency Override Started")
            ]
        return _coding(DCM, "110113", "Security Alert"), []
    if group == "audit":
        return _coding(DCM, "110101", "Audit Log Used"), []
    return _coding(DCM, "110100", "Application Activity"), []


def event_action(doc: Mapping[str, Any]) -> str:
    group, _, name = doc["action"].partition(".")
    return _CRUD.get(name, "E") if group == "fhir" else "E"


def _outcome(doc: Mapping[str, Any]) -> tuple[str, str]:
    outcome = doc.get("outcome", "error")
    status = doc.get("status")
    if outcome in _OUTCOMES:
        code = _OUTCOMES[outcome][0]
    else:
        code = "12" if isinstance(status, int) and status >= 500 else "8"
    description = outcome if status is None else f"{outcome} (HTTP {status})"
    return code, description


def purposes(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    purpose = doc.get("purpose")
    if purpose:
        found.append({"coding": [_coding(ACT_REASON, purpose, _PURPOSES.get(purpose))]})
    if doc.get("break_glass"):
        found.append({"coding": [dict(BTG)], "text": "emergency access (break-glass)"})
    return found


def _roles(roles: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"coding": [_coding(ROLE_SYSTEM, role)], "text": role} for role in roles]


def _user_agent_type(doc: Mapping[str, Any]) -> dict[str, Any]:
    if event_action(doc) in ("C", "U", "D"):
        return {"coding": [_coding(PARTICIPATION, "AUT", "author (originator)")]}
    return {"coding": [_coding(PARTICIPATION, "IRCP", "information recipient")]}


def _common(doc: Mapping[str, Any]) -> dict[str, Any]:
    type_, subtypes = event_type(doc)
    subtypes.append(_coding(ACTION_SYSTEM, doc["action"]))
    code, description = _outcome(doc)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": type_,
        "subtype": subtypes,
        "action": event_action(doc),
        "recorded": doc["at"],
        "outcome": code,
        "outcomeDesc": description,
    }
    if doc.get("break_glass"):
        event["extension"] = [{"url": BREAK_GLASS_EXTENSION, "valueBoolean": True}]
    reasons = purposes(doc)
    if reasons:
        event["purposeOfEvent"] = reasons
    return event


def _source() -> dict[str, Any]:
    return {
        "observer": dict(OBSERVER),
        "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
    }


def _patient_entity(patient: str) -> dict[str, Any]:
    return {
        "what": {"reference": f"Patient/{patient}"},
        "type": _coding(ENTITY_TYPE, "1", "Person"),
        "role": _coding(OBJECT_ROLE, "1", "Patient"),
    }


def auditor_view(doc: Mapping[str, Any], actor: Actor | None) -> dict[str, Any]:
    """The whole entry as an AuditEvent (for auditors)."""
    event = _common(doc)
    event["id"] = str(doc["seq"])
    user: dict[str, Any] = {"type": _user_agent_type(doc), "requestor": True}
    if doc.get("user"):
        who: dict[str, Any] = {"identifier": {"system": USER_SYSTEM, "value": doc["user"]}}
        if actor is not None and actor.practitioner_id:
            who["reference"] = f"Practitioner/{actor.practitioner_id}"
        elif actor is not None and actor.patient_id:
            who["reference"] = f"Patient/{actor.patient_id}"
        user["who"] = who
    if doc.get("roles"):
        user["role"] = _roles(doc["roles"])
    if doc.get("source"):
        user["network"] = {"address": doc["source"], "type": NETWORK_IP}
    reasons = purposes(doc)
    if reasons:
        user["purposeOfUse"] = reasons
    agents = [user]
    if actor is not None and actor.organization_id:
        agents.append(_organization_agent(actor.organization_id, None))
    if doc.get("client"):
        agents.append(
            {
                "type": {"coding": [_coding(DCM, "110150", "Application")]},
                "who": {"identifier": {"system": CLIENT_SYSTEM, "value": doc["client"]}},
                "requestor": False,
            }
        )
    event["agent"] = agents
    event["source"] = _source()
    entities: list[dict[str, Any]] = []
    if doc.get("patient"):
        entities.append(_patient_entity(doc["patient"]))
    if doc.get("type"):
        record = _record_entity(doc["type"])
        if doc.get("id"):
            reference = f"{doc['type']}/{doc['id']}"
            if doc.get("version"):
                reference += f"/_history/{doc['version']}"
            record["what"] = {"reference": reference}
        entities.append(record)
    if doc.get("query"):
        entities.append(
            {
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "24", "Query"),
                "detail": [{"type": QUERY_HASH, "valueString": doc["query"]}],
            }
        )
    if doc.get("request_id"):
        entities.append(
            {
                "what": {"identifier": {"value": doc["request_id"]}},
                "type": _coding(BALP_ENTITY, "XrequestId", "X-Request-Id"),
            }
        )
    if entities:
        event["entity"] = entities
    return event


@dataclass(frozen=True)
class ReportAgent:
    """Who looked, as a patient's report shows it."""

    roles: tuple[str, ...]
    organization_id: str | None = None
    organization_name: str | None = None
    name: str | None = None  # only when the report may name people
    practitioner_id: str | None = None  # only with a name


def patient_view(doc: Mapping[str, Any], patient: str, agent: ReportAgent) -> dict[str, Any]:
    """An access to `patient`'s data as their access report shows it: when, what kind of
    record, the action, why, break-glass, and who as role and organization."""
    event = _common(doc)
    user: dict[str, Any] = {"type": _user_agent_type(doc), "requestor": True}
    if agent.roles:
        user["role"] = _roles(agent.roles)
    if agent.name:
        who: dict[str, Any] = {"display": agent.name}
        if agent.practitioner_id:
            who["reference"] = f"Practitioner/{agent.practitioner_id}"
        user["who"] = who
    reasons = purposes(doc)
    if reasons:
        user["purposeOfUse"] = reasons
    agents = [user]
    if agent.organization_id:
        agents.append(_organization_agent(agent.organization_id, agent.organization_name))
    event["agent"] = agents
    event["source"] = _source()
    entities = [_patient_entity(patient)]
    if doc.get("type"):  # the kind of record only: its id might name someone else too
        entities.append(_record_entity(doc["type"]))
    event["entity"] = entities
    return event


def _record_entity(resource_type: str) -> dict[str, Any]:
    """A record, typed by its resource type (the AuditEventEntityType value set includes the
    resource types), in the role of a domain resource."""
    return {
        "type": _coding(RESOURCE_TYPES, resource_type, resource_type),
        "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
    }


def _organization_agent(organization_id: str, name: str | None) -> dict[str, Any]:
    who: dict[str, Any] = {"reference": f"Organization/{organization_id}"}
    if name:
        who["display"] = name
    return {
        "type": {"coding": [_coding(ROLE_CLASS, "PROV", "healthcare provider")]},
        "who": who,
        "requestor": False,
    }

"""What one request did to records, collected while it runs and committed before it answers.

Every request has an id (made by edge/request_context.py, the outermost middleware, and kept
in the scope's state); the middleware (`audit/middleware.py`) gives one on the record server's
paths a `RequestAudit` carrying it. The authorization door (`fhir/authorization.py`) adds an
entry for each record it lets the caller act on and for each refusal; when the response is
about to leave, the middleware stamps every entry with the final status and adds one entry
for the request itself where the interaction touched no single record (a search, a history,
a bundle, a request refused before any record was looked at), so no request is ever left
out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request

from carevault.audit.entry import AuditEntry, Outcome, keyed_hash
from carevault.edge.request_context import REQUEST_ID_KEY as REQUEST_ID_KEY
from carevault.edge.request_context import accept_request_id as accept_request_id

STATE_KEY = "audit"
# Interactions whose one entry is the record they touched; others always get a request entry.
# Of these, the writes are also recorded as started (`<action>.start`) before they run: a
# write that cannot be recorded is refused before it changes anything.
_SINGLE_RECORD = frozenset({"read", "vread", "create", "update", "delete"})
WRITES = frozenset({"fhir.create", "fhir.update", "fhir.delete", "fhir.bundle"})


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get(REQUEST_ID_KEY)


def request_audit(request: Request) -> RequestAudit | None:
    return request.scope.get("state", {}).get(STATE_KEY)


@dataclass
class RequestAudit:
    interaction: str  # fhir.read, fhir.search, audit.query, ...
    request_id: str
    source: str | None
    user_agent: str | None  # keyed hash
    resource_type: str | None = None
    resource_id: str | None = None
    query: str | None = None  # keyed hash of the normalised query string
    user: str | None = None
    client: str | None = None
    roles: tuple[str, ...] = ()
    purpose: str | None = None
    entries: list[AuditEntry] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def identify(
        self, user: str, client: str, roles: tuple[str, ...], purpose: str | None = None
    ) -> None:
        self.user, self.client, self.roles = user, client, roles
        if purpose is not None:
            self.purpose = purpose

    def record(
        self,
        action: str,
        outcome: Outcome,
        resource_type: str | None,
        resource_id: str | None = None,
        version: str | None = None,
        patients: tuple[str, ...] | list[str] = (),
        *,
        break_glass: bool = False,
    ) -> None:
        """One entry per patient the record belongs to (none for a record of no patient), so
        that a patient's report finds every record of theirs."""
        for patient in patients or (None,):
            self.entries.append(
                AuditEntry(
                    action=f"fhir.{action}" if "." not in action else action,
                    outcome=outcome,
                    patient=patient,
                    resource_type=resource_type,
                    resource_id=resource_id,
                    version=version,
                    break_glass=break_glass,
                )
            )

    def started(self) -> AuditEntry:
        """The entry committed before a write runs."""
        return AuditEntry(
            action=f"{self.interaction}.start",
            outcome=Outcome.permit,
            resource_type=self.resource_type,
            resource_id=self.resource_id,
            request_id=self.request_id,
            source=self.source,
            user_agent=self.user_agent,
        )

    def finish(self, status: int, headers: dict[str, str]) -> list[AuditEntry]:
        """Every entry of the request, stamped with who, why, where and how it ended."""
        single = self.interaction.removeprefix("fhir.") in _SINGLE_RECORD
        if not self.entries or not single:
            self.entries.insert(
                0,
                AuditEntry(
                    action=self.interaction,
                    outcome=_request_outcome(status),
                    resource_type=self.resource_type,
                    resource_id=self.resource_id,
                    query=self.query,
                    detail=self.detail,
                ),
            )
        else:
            self.entries = _one_per_patient(self.interaction, self.entries)
            if status < 400:
                _fill_written_version(self.entries, headers)
        for entry in self.entries:
            entry.status = status
            entry.user, entry.client, entry.roles = self.user, self.client, self.roles
            entry.purpose = self.purpose
            entry.request_id = self.request_id
            entry.source = self.source
            entry.user_agent = self.user_agent
            if entry.outcome is Outcome.permit and status >= 400:
                entry.outcome = Outcome.error
        return self.entries


def _one_per_patient(interaction: str, entries: list[AuditEntry]) -> list[AuditEntry]:
    """A single-record interaction is one entry per patient of that record: the checks it
    made on the way (may the caller read the current version, then update it; the body shown
    back) are steps of the one interaction, and the last of them is its outcome."""
    last: dict[str | None, AuditEntry] = {}
    for entry in entries:
        entry.action = interaction
        last.pop(entry.patient, None)
        last[entry.patient] = entry
    return list(last.values())


def _request_outcome(status: int) -> Outcome:
    if status in (401, 403):
        return Outcome.deny
    return Outcome.permit if status < 400 else Outcome.error


def _fill_written_version(entries: list[AuditEntry], headers: dict[str, str]) -> None:
    """A create learns its id, and a write its new version, only once stored: from the
    Location and ETag of the response."""
    location = headers.get("location", "")
    etag = headers.get("etag", "")
    parts = location.split("/")
    version = etag.removeprefix('W/"').removesuffix('"') if etag.startswith('W/"') else None
    for entry in entries:
        if entry.action in ("fhir.create", "fhir.update"):
            if entry.resource_id is None and "_history" in parts:
                entry.resource_id = parts[parts.index("_history") - 1]
            if version:
                entry.version = version


def query_hash(key: bytes, query_string: str) -> str | None:
    """A keyed hash of the query's parameters in a canonical order: equal searches compare
    equal in the trail, and the values themselves are never stored."""
    if not query_string:
        return None
    pairs = sorted(parse_qsl(query_string, keep_blank_values=True))
    return keyed_hash(key, urlencode(pairs))

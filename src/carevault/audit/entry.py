"""One audit entry: who did what to which record, why, and how it ended. Never PHI.

An entry names people and records only by their ids (user id, client id, patient id, resource
type/id/version), never by a name, a body or a search value: a search is kept as a keyed hash of
its query string. Its canonical form (the bytes the chain MAC and the Merkle leaf cover) is
RFC 8785 JSON for the values entries hold (strings, integers, booleans, lists, objects): keys
sorted, no insignificant whitespace, UTF-8; absent fields are omitted rather than null.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson


class Outcome(StrEnum):
    permit = "permit"
    deny = "deny"
    error = "error"


@dataclass(slots=True)
class AuditEntry:
    """An entry before the store gives it its sequence number and time."""

    action: str  # e.g. fhir.read, fhir.search, auth.login, token.refresh_reuse
    outcome: Outcome
    status: int | None = None  # the HTTP status the request answered
    user: str | None = None
    client: str | None = None
    roles: tuple[str, ...] = ()
    patient: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    version: str | None = None
    purpose: str | None = None
    break_glass: bool = False
    request_id: str | None = None
    source: str | None = None  # the client's address
    user_agent: str | None = None  # a keyed hash of the User-Agent header
    query: str | None = None  # a keyed hash of a search's query string
    detail: dict[str, Any] = field(default_factory=dict)  # ids and codes only

    def document(self, seq: int, at: str) -> dict[str, Any]:
        """The entry as it is stored, chained and exported; `at` as `format_time` writes it
        (once per batch: formatting it per entry was two fifths of chaining one)."""
        doc: dict[str, Any] = {
            "seq": seq,
            "at": at,
            "action": self.action,
            "outcome": str(self.outcome),
        }
        optional = {
            "status": self.status,
            "user": self.user,
            "client": self.client,
            "roles": list(self.roles) or None,
            "patient": self.patient,
            "type": self.resource_type,
            "id": self.resource_id,
            "version": self.version,
            "purpose": self.purpose,
            "break_glass": True if self.break_glass else None,
            "request_id": self.request_id,
            "source": self.source,
            "ua": self.user_agent,
            "query": self.query,
            "detail": self.detail or None,
        }
        doc.update((k, v) for k, v in optional.items() if v is not None)
        return doc


def canonical(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def format_time(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def chain_mac(mac_key: Any, previous: bytes, canonical_entry: bytes) -> bytes:
    """entry_mac = HMAC-SHA256(audit key, prev_mac || canonical JSON of the entry); the
    first entry's prev_mac is 32 zero bytes. `mac_key` is the audit PRF (tink HMAC-SHA256)."""
    return mac_key.compute(previous + canonical_entry, 32)


GENESIS_MAC = bytes(32)


def keyed_hash(key: bytes, value: str) -> str:
    """For values an entry may refer to but must not hold (a query string, a User-Agent)."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]

"""Bulk import of transaction and batch Bundles from files (``carevault import``).

Made for Synthea output of both generations:

* older exports: every fullUrl is ``urn:uuid:<uuid>`` and patient bundles reference the
  Organizations and Practitioners of the export's ``hospitalInformation*.json`` and
  ``practitionerInformation*.json`` bundles by those ``urn:uuid:`` fullUrls. Those files are
  loaded first; every resource is stored under the uuid of its fullUrl (update-as-create), and
  one fullUrl -> ``Type/id`` map is kept across all files of the run, so references across
  files are rewritten like references within one Bundle;
* newer exports: Organization/Practitioner entries carry ``request.ifNoneExist`` and other
  resources use conditional references (``Organization?identifier=<system>|<value>``). An
  ``ifNoneExist`` entry that matches exactly one resource is not written (its fullUrl maps to
  the match); a conditional update (``PUT Type?query``) updates its one match, or creates.
  A conditional reference is resolved by searching the store (search.py), plus the resources
  of this run not committed yet (``identifier`` queries): exactly one match is required,
  zero or several are an entry error. Types whose identifier is not a search parameter
  (Synthea's ``Location?identifier=...``) are matched against this run's entries only, so the
  hospitalInformation file must be imported in the same run as the patients that use it.

Contained resources and their ``#id`` references are kept; ``urn:uuid:`` and conditional
references inside contained resources are rewritten like all others (real Synthea
ExplanationOfBenefits carry a contained ServiceRequest and Coverage that point at the patient
and practitioner that way).

Each file is written in ONE store transaction (`ResourceStore.write_many`) when it is a
transaction Bundle; entries that could not be prepared (invalid, unresolvable reference) are
reported and left out. A batch Bundle, or a transaction whose write fails, is written entry
by entry (update-as-create), so that one bad entry never stops the rest. Re-importing the
same files updates the same ids (new versions, no duplicates).

Errors are (file name, entry index, fixed message): never a value from the file (PHI).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import ChainMap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl

import orjson
from sqlalchemy.exc import SQLAlchemyError

from carevault.fhir.bundles import rewrite_references
from carevault.fhir.compartment import split_absolute_reference
from carevault.fhir.search import SearchError, execute, parse_search
from carevault.fhir.store import Erased, StoreError, WriteOperation
from carevault.fhir.validation import FhirValidationError, is_supported_type, validate_resource
from carevault.runtime import Services

REFERENCE_FIRST: Final = ("hospitalInformation", "practitionerInformation")

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE = r"[A-Z][A-Za-z]{0,63}"
_TYPE_URL = re.compile(rf"(?P<type>{_TYPE})")
_INSTANCE_URL = re.compile(rf"(?P<type>{_TYPE})/(?P<id>[A-Za-z0-9\-.]{{1,64}})")
_CONDITIONAL = re.compile(rf"(?P<type>{_TYPE})\?(?P<query>.+)", re.DOTALL)
_URN_UUID = re.compile(
    r"urn:uuid:([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
)

MSG_FILE = "The file could not be read as JSON"
MSG_NOT_BUNDLE = "The file is not a transaction or batch Bundle"
MSG_ENTRY = "The entry needs a request (POST or PUT) and a resource of the type in its url"
MSG_METHOD = "Only POST and PUT entries can be imported"
MSG_ID = "The entry has no usable id"
MSG_DUPLICATE = "Another entry of the import run already has this fullUrl"
MSG_IF_NONE_EXIST = "The conditional create or update matched more than one resource"
MSG_IF_NONE_EXIST_INVALID = "The conditional create or update is not a supported search"
MSG_CONDITIONAL_NONE = "A conditional reference matched no resource"
MSG_CONDITIONAL_MANY = "A conditional reference matched more than one resource"
MSG_CONDITIONAL_INVALID = "A conditional reference is not a supported search"
MSG_CONDITIONAL_NOT_IN_RUN = (
    "A conditional reference matched no entry of this import run, and resources of its type "
    "cannot be searched by identifier: import the file that has it in the same run"
)
MSG_UNRESOLVED = "A urn: reference does not match the fullUrl of any imported entry"
MSG_INVALID = "The resource is not valid FHIR"
MSG_ERASED = "The resource was erased and cannot be written again"
MSG_WRITE = "The resource could not be written"


@dataclass(frozen=True)
class EntryError:
    file: str
    index: int | None  # None: the file as a whole
    message: str


@dataclass
class FileResult:
    name: str
    bundle_type: str | None
    mode: str  # "transaction", "per-entry", "per-entry (transaction failed)", "skipped"
    entries: int = 0
    loaded: int = 0
    failed: int = 0


@dataclass
class ImportReport:
    files: list[FileResult] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # type -> outcome -> n
    errors: list[EntryError] = field(default_factory=list)

    def count(self, resource_type: str, outcome: str) -> None:
        per_type = self.counts.setdefault(
            resource_type, {"created": 0, "updated": 0, "existing": 0}
        )
        per_type[outcome] += 1

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.counts.values())

    @property
    def ok(self) -> bool:
        return not self.errors


class ImportProgress:
    """Hooks for a progress display; the default does nothing."""

    def file_started(self, name: str, entries: int) -> None:  # pragma: no cover - trivial
        pass

    def advance(self, entries: int) -> None:  # pragma: no cover - trivial
        pass


def ordered_files(paths: Iterable[Path | str]) -> list[Path]:
    """Every ``*.json`` file under the given paths (files as given), the hospital and
    practitioner bundles first, then the rest; each group sorted."""
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*.json")):
                if child.is_file():
                    found[child] = None
        else:
            found[path] = None

    def key(path: Path) -> tuple[int, str]:
        first = path.name.startswith(REFERENCE_FIRST)
        return (0 if first else 1, str(path))

    return sorted(found, key=key)


@dataclass
class _Entry:
    index: int
    resource_type: str = ""
    resource_id: str = ""
    full_url: str | None = None
    resource: dict[str, Any] | None = None
    existing: bool = False  # ifNoneExist matched: nothing to write
    if_none_exist: str | None = None
    update_query: str | None = None  # conditional update: PUT Type?query
    error: str | None = None


class _Run:
    def __init__(self, services: Services, progress: ImportProgress) -> None:
        self.services = services
        self.store = services.store
        self.progress = progress
        self.report = ImportReport()
        self.mapping: dict[str, str] = {}  # fullUrl -> Type/id, across all files
        self.identifiers: dict[tuple[str, str], set[str]] = {}  # (Type, system|value) -> ids
        self.resolved: dict[str, str] = {}  # conditional reference -> Type/id (one match)

    # --- conditional lookups ------------------------------------------------------------

    async def _matches(self, resource_type: str, query: str) -> tuple[set[str], bool] | None:
        """Ids of `resource_type` matching the search `query`, and whether the store was
        searched; None when the query is not supported (neither by search.py nor by the in-run
        identifier index). An ``identifier=system|value`` query on a type whose identifier is
        not a search parameter (e.g. Synthea's ``Location?identifier=...``) is answered from
        this run's entries alone (searched False)."""
        pairs = parse_qsl(query, keep_blank_values=True)
        if not pairs or any(name.startswith("_") for name, _ in pairs):
            return None
        found: set[str] = set()
        supported = False
        if len(pairs) == 1 and pairs[0][0] == "identifier" and "|" in pairs[0][1]:
            supported = True
            found |= self.identifiers.get((resource_type, pairs[0][1]), set())
        try:
            search = parse_search(
                resource_type, [*pairs, ("_count", "2")], self.services.blind_index
            )
        except SearchError:
            return (found, False) if supported else None
        result = await execute(self.services.engine, search)
        found.update(result.ids)
        return found, True

    async def _stored_with(self, entry: _Entry, query: str) -> bool:
        """Whether the resource stored under the entry's own id carries the identifier of its
        ``identifier=system|value`` query: how a conditional create is recognised on a type
        whose identifier cannot be searched (Synthea's Locations, imported again)."""
        pairs = parse_qsl(query, keep_blank_values=True)
        if len(pairs) != 1 or pairs[0][0] != "identifier":
            return False
        try:
            stored = await self.store.read(entry.resource_type, entry.resource_id)
        except StoreError:
            return False
        identifiers = (stored.body or {}).get("identifier")
        return isinstance(identifiers, list) and any(
            isinstance(i, dict) and f"{i.get('system')}|{i.get('value')}" == pairs[0][1]
            for i in identifiers
        )

    def _remember_identifiers(self, entry: _Entry) -> None:
        assert entry.resource is not None
        identifiers = entry.resource.get("identifier")
        if not isinstance(identifiers, list):
            return
        for identifier in identifiers:
            if not isinstance(identifier, dict):
                continue
            system, value = identifier.get("system"), identifier.get("value")
            if isinstance(system, str) and isinstance(value, str):
                key = (entry.resource_type, f"{system}|{value}")
                self.identifiers.setdefault(key, set()).add(entry.resource_id)

    # --- preparation --------------------------------------------------------------------

    def _parse_entry(self, index: int, raw: object) -> _Entry:
        entry = _Entry(index)
        if not isinstance(raw, dict):
            entry.error = MSG_ENTRY
            return entry
        request, resource = raw.get("request"), raw.get("resource")
        full_url = raw.get("fullUrl")
        if (
            not isinstance(request, dict)
            or not isinstance(request.get("method"), str)
            or not isinstance(request.get("url"), str)
        ):
            entry.error = MSG_ENTRY
            return entry
        method, url = request["method"], request["url"].removeprefix("/")
        if method not in ("POST", "PUT"):
            entry.error = MSG_METHOD
            return entry
        conditional = _CONDITIONAL.fullmatch(url) if method == "PUT" else None
        if conditional is not None:
            entry.update_query = conditional["query"]
            match = conditional
        else:
            match = (_TYPE_URL if method == "POST" else _INSTANCE_URL).fullmatch(url)
        if (
            match is None
            or not is_supported_type(match.group("type"))
            or not isinstance(resource, dict)
            or resource.get("resourceType") != match.group("type")
        ):
            entry.error = MSG_ENTRY
            return entry
        entry.resource_type = match.group("type")
        entry.resource = resource
        if isinstance(full_url, str) and full_url:
            entry.full_url = full_url
        if method == "PUT" and entry.update_query is None:
            entry.resource_id = match.group("id")
        else:
            entry.resource_id = self._post_id(entry, resource)
        if not entry.resource_id:
            entry.error = MSG_ID
        if_none_exist = request.get("ifNoneExist")
        if method == "POST" and isinstance(if_none_exist, str) and if_none_exist:
            entry.if_none_exist = if_none_exist  # checked (async) by the caller
        return entry

    @staticmethod
    def _post_id(entry: _Entry, resource: dict[str, Any]) -> str:
        """The id to keep for a POST entry: the uuid of a ``urn:uuid:`` fullUrl, the id of an
        absolute fullUrl, the resource's own id, or (last resort) a new uuid."""
        if entry.full_url is not None:
            urn = _URN_UUID.fullmatch(entry.full_url)
            if urn:
                return urn.group(1).lower()
            absolute = split_absolute_reference(entry.full_url)
            if absolute and absolute[1] == entry.resource_type:
                return absolute[2]
        own = resource.get("id")
        if isinstance(own, str) and _ID.fullmatch(own):
            return own
        return str(uuid.uuid4())

    async def _prepare(self, raw_entries: list[Any]) -> list[_Entry]:
        entries = [self._parse_entry(i, raw) for i, raw in enumerate(raw_entries)]
        # 1. ids and fullUrls (ifNoneExist entries that match an existing resource take its id)
        for entry in entries:
            if entry.error is not None:
                continue
            query = entry.if_none_exist or entry.update_query
            if query is not None:
                answer = await self._matches(entry.resource_type, query)
                if answer is None:
                    entry.error = MSG_IF_NONE_EXIST_INVALID
                    continue
                matches, searched = answer
                if not matches and not searched and await self._stored_with(entry, query):
                    matches = {entry.resource_id}
                if len(matches) > 1:
                    entry.error = MSG_IF_NONE_EXIST
                    continue
                if matches:
                    entry.resource_id = next(iter(matches))
                    entry.existing = entry.if_none_exist is not None
            target = f"{entry.resource_type}/{entry.resource_id}"
            if entry.full_url is not None:
                known = self.mapping.get(entry.full_url)
                if known is not None and known != target:
                    entry.error = MSG_DUPLICATE
                    continue
                self.mapping[entry.full_url] = target
            # an existing match too: its identifiers are those of the query that found it, and
            # conditional references to types that cannot be searched rely on this index
            self._remember_identifiers(entry)
        # 2. references: urn:uuid/fullUrl via the run's map, conditional ones by search
        for entry in entries:
            if entry.error is not None or entry.existing:
                continue
            assert entry.resource is not None
            local = ChainMap(self.resolved, self.mapping)
            for reference in _references(entry.resource):
                conditional = _CONDITIONAL.fullmatch(reference)
                if conditional is None or reference in local:
                    continue
                answer = await self._matches(conditional["type"], conditional["query"])
                matches = answer[0] if answer is not None else set()
                if answer is None:
                    entry.error = MSG_CONDITIONAL_INVALID
                elif not matches and not answer[1]:
                    entry.error = MSG_CONDITIONAL_NOT_IN_RUN
                elif not matches:
                    entry.error = MSG_CONDITIONAL_NONE
                elif len(matches) > 1:
                    entry.error = MSG_CONDITIONAL_MANY
                else:
                    self.resolved[reference] = f"{conditional['type']}/{next(iter(matches))}"
                    continue
                break
            if entry.error is not None:
                continue
            body = dict(entry.resource)
            body["id"] = entry.resource_id
            rewritten, unresolved = rewrite_references(body, local)
            if unresolved:
                entry.error = MSG_UNRESOLVED
                continue
            entry.resource = rewritten
        # 3. validation (CPU-bound: off the event loop)
        limit = self.services.settings.fhir_max_attachment_bytes
        await asyncio.to_thread(_validate_all, entries, limit)
        return entries

    # --- writing ------------------------------------------------------------------------

    async def _write_transaction(self, entries: list[_Entry]) -> bool:
        """All entries in one store transaction, each an update-as-create (no read first:
        reading and decrypting every current version cost a quarter of the import time).
        False when the transaction could not be written (two entries on one resource, an
        erased resource, a write error): the caller then writes entry by entry."""
        operations = [
            WriteOperation(
                "update",
                entry.resource_type,
                entry.resource_id,
                entry.resource,
                allow_create=True,
            )
            for entry in entries
        ]
        try:
            stored = await self.store.write_many(operations)
        except (StoreError, SQLAlchemyError, ValueError):
            return False
        for written in stored:
            # version 1 is a new resource; anything later updated an existing one (a deleted
            # resource written again continues its history)
            self.report.count(
                written.resource_type, "created" if written.version == 1 else "updated"
            )
        return True

    async def _write_one(self, name: str, entry: _Entry) -> bool:
        try:
            stored, created = await self.store.update(
                entry.resource_type, entry.resource_id, entry.resource or {}, allow_create=True
            )
        except Erased:
            self._error(name, entry.index, MSG_ERASED)
            return False
        except (StoreError, SQLAlchemyError):
            self._error(name, entry.index, MSG_WRITE)
            return False
        self.report.count(stored.resource_type, "created" if created else "updated")
        return True

    def _error(self, name: str, index: int | None, message: str) -> None:
        self.report.errors.append(EntryError(name, index, message))

    async def import_file(self, path: Path) -> None:
        name = path.name
        try:
            body = await asyncio.to_thread(lambda: orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError):
            self.report.files.append(FileResult(name, None, "skipped"))
            self._error(name, None, MSG_FILE)
            return
        if (
            not isinstance(body, dict)
            or body.get("resourceType") != "Bundle"
            or body.get("type") not in ("transaction", "batch")
            or not isinstance(body.get("entry", []), list)
        ):
            self.report.files.append(FileResult(name, None, "skipped"))
            self._error(name, None, MSG_NOT_BUNDLE)
            return
        raw_entries: list[Any] = body.get("entry", [])
        bundle_type: str = body["type"]
        result = FileResult(name, bundle_type, "per-entry", entries=len(raw_entries))
        self.report.files.append(result)
        self.progress.file_started(name, len(raw_entries))
        entries = await self._prepare(raw_entries)
        writable: list[_Entry] = []
        for entry in entries:
            if entry.error is not None:
                self._error(name, entry.index, entry.error)
                result.failed += 1
            elif entry.existing:
                self.report.count(entry.resource_type, "existing")
                result.loaded += 1
            else:
                writable.append(entry)
        self.progress.advance(len(entries) - len(writable))
        if bundle_type == "transaction" and writable:
            if await self._write_transaction(writable):
                result.mode = "transaction"
                result.loaded += len(writable)
                self.progress.advance(len(writable))
                return
            result.mode = "per-entry (transaction failed)"
        for entry in writable:
            if await self._write_one(name, entry):
                result.loaded += 1
            else:
                result.failed += 1
            self.progress.advance(1)


def _references(resource: Any) -> list[str]:
    """Every ``reference`` string anywhere in the resource (iterative)."""
    found: list[str] = []
    stack = [resource]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                if key == "reference" and isinstance(child, str):
                    found.append(child)
                else:
                    stack.append(child)
        elif isinstance(value, list):
            stack.extend(value)
    return found


def _validate_all(entries: list[_Entry], max_attachment_bytes: int) -> None:
    for entry in entries:
        if entry.error is not None or entry.existing or entry.resource is None:
            continue
        try:
            entry.resource = validate_resource(
                entry.resource, entry.resource_type, max_attachment_bytes=max_attachment_bytes
            )
        except FhirValidationError:
            entry.error = MSG_INVALID


async def import_paths(
    services: Services,
    paths: Sequence[Path | str],
    progress: ImportProgress | None = None,
) -> ImportReport:
    """Import every Bundle file under `paths` (files or directories of ``*.json``)."""
    run = _Run(services, progress or ImportProgress())
    for path in ordered_files(paths):
        await run.import_file(path)
    return run.report

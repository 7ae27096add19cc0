"""Transaction and batch Bundles (``POST /fhir``): parsing, reference resolution, processing.

A request Bundle is checked entry by entry: ``request.method`` POST/PUT/DELETE/GET and a
relative ``request.url`` (``Type`` for POST, ``Type/id`` for PUT/DELETE/GET,
``Type/id/_history/v`` for GET); conditional interactions and searches are not supported.
Every POST entry gets a server-assigned id up front, so that references to its ``fullUrl``
(``urn:uuid:...``, or any other fullUrl) anywhere in any resource of the Bundle are rewritten
to ``Type/<id>`` before the resources are validated (`validate_resource`) and stored; a PUT
entry's fullUrl maps to ``Type/<url id>`` the same way.

* transaction: all or nothing. Any bad entry, unresolvable ``urn:`` reference, two entries on
  one resource or failed write answers one OperationOutcome naming the entry
  (``Bundle.entry[i]...``) and nothing is stored; the writes (DELETE, POST, PUT, in that order)
  are one `ResourceStore.write_many` call, i.e. one database transaction; GET entries are
  read after the commit.
* batch: every entry on its own (its own store call); a failed entry's
  ``response.outcome`` says why, the others proceed.

The response Bundle's write entries carry their ``response`` element only (status, location,
etag, lastModified) unless the client sends ``Prefer: return=representation``; GET entries
always carry the resource read. `BundleResponse.record` is the response without any resource
body, which is what an ``Idempotency-Key`` keeps (fhir/idempotency.py) to replay it.

Outcomes use the fixed texts of `outcome` and `validation` (no values from the request).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from carevault.fhir import outcome
from carevault.fhir.compartment import split_absolute_reference
from carevault.fhir.store import (
    Gone,
    IntegrityFailure,
    NotFound,
    ResourceStore,
    StoredResource,
    StoreError,
    VersionConflict,
    WriteContention,
    WriteOperation,
    instant,
)
from carevault.fhir.validation import (
    DEFAULT_MAX_ATTACHMENT_BYTES,
    FhirValidationError,
    Issue,
    is_supported_type,
    validate_resource,
)

MAX_ENTRIES: Final = 1000

_ID = r"[A-Za-z0-9\-.]{1,64}"
_TYPE = r"[A-Z][A-Za-z]{0,63}"
_TYPE_URL = re.compile(rf"^(?P<type>{_TYPE})$")
_INSTANCE_URL = re.compile(rf"^(?P<type>{_TYPE})/(?P<id>{_ID})$")
_VERSION_URL = re.compile(rf"^(?P<type>{_TYPE})/(?P<id>{_ID})/_history/(?P<version>\d{{1,9}})$")
_ETAG = re.compile(r'^(?:W/)?"(\d{1,9})"$')
_URN_UUID = re.compile(
    r"^urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_PLACEHOLDER_PREFIXES: Final = ("urn:uuid:", "urn:oid:")
_METHODS: Final = frozenset({"GET", "POST", "PUT", "DELETE"})
# FHIR transaction processing order; GET last (after the commit).
_ORDER: Final = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}

_STATUS_TEXT: Final = {
    200: "200 OK",
    201: "201 Created",
    204: "204 No Content",
    400: "400 Bad Request",
    404: "404 Not Found",
    409: "409 Conflict",
    410: "410 Gone",
    412: "412 Precondition Failed",
    413: "413 Content Too Large",
    422: "422 Unprocessable Entity",
    500: "500 Internal Server Error",
}

_TEXT_NOT_BUNDLE = "The body must be a Bundle"
_TEXT_BUNDLE_TYPE = "Bundle.type must be transaction or batch"
_TEXT_ENTRIES = "Bundle.entry must be a list of entries"
_TEXT_TOO_MANY = "The Bundle has too many entries"
_TEXT_ENTRY = "The entry must be an object"
_TEXT_REQUEST = "The entry needs a request with a method and a url"
_TEXT_METHOD = "The request method is not supported"
_TEXT_URL = "The request url is not valid for its method"
_TEXT_CONDITIONAL = "Conditional interactions and searches are not supported in a Bundle"
_TEXT_RESOURCE = "The entry needs a resource of the type in its request url"
_TEXT_NO_RESOURCE = "The entry must not have a resource"
_TEXT_ID_MISMATCH = "The resource id must match the id in the request url"
_TEXT_IF_MATCH = 'ifMatch must be an ETag such as W/"1"'
_TEXT_FULL_URL = "fullUrl must be a string (urn:uuid: for new resources)"
_TEXT_DUPLICATE_URL = "Two entries have the same fullUrl"
_TEXT_DUPLICATE_TARGET = "Two entries of a transaction act on the same resource"
_TEXT_UNRESOLVED = "A urn: reference does not match the fullUrl of any entry"


class BundleError(Exception):
    """The whole Bundle is refused: `status` and an OperationOutcome `body`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(str(status))
        self.status = status
        self.body = body


@dataclass
class EntryFailure:
    status: int
    outcome: dict[str, Any]


@dataclass
class Entry:
    index: int
    method: str = ""
    resource_type: str = ""
    resource_id: str | None = None
    version: int | None = None  # GET .../_history/v
    if_match: int | None = None
    full_url: str | None = None
    resource: Any = None  # raw (then rewritten, then validated) resource
    failure: EntryFailure | None = None

    @property
    def path(self) -> str:
        return f"Bundle.entry[{self.index}]"


def _issue(code: str, text: str, expression: str | None) -> dict[str, Any]:
    return {"severity": "error", "code": code, "diagnostics": text, "expression": expression}


def _fail(entry: Entry, status: int, code: str, text: str, element: str = "") -> None:
    entry.failure = EntryFailure(
        status, outcome.operation_outcome([_issue(code, text, entry.path + element)])
    )


def _at_entry(body: dict[str, Any], entry: Entry) -> dict[str, Any]:
    """A copy of an OperationOutcome whose issues name the entry."""
    issues = []
    for issue in body.get("issue", []):
        issue = dict(issue)
        issue.setdefault("expression", [entry.path])
        issues.append(issue)
    return {**body, "issue": issues}


def _rebase(issue: Issue, entry: Entry) -> Issue:
    """``Observation.status`` -> ``Bundle.entry[3].resource.status``."""
    base = f"{entry.path}.resource"
    expression = issue.expression
    if not expression:
        expression = base
    elif expression == entry.resource_type:
        expression = base
    elif (
        expression.startswith(entry.resource_type) and expression[len(entry.resource_type)] in ".["
    ):
        expression = base + expression[len(entry.resource_type) :]
    else:
        expression = f"{base}.{expression}"
    return Issue(issue.severity, issue.code, issue.diagnostics, expression)


# --- parsing -----------------------------------------------------------------------------


def parse_bundle(body: object) -> tuple[str, list[Entry]]:
    """Check the Bundle envelope; return its type and entries (bad entries carry a failure).
    Raises BundleError for a body that is not a transaction or batch Bundle at all."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise BundleError(
            400,
            outcome.operation_outcome(
                [
                    _issue(
                        "invalid",
                        _TEXT_NOT_BUNDLE,
                        "resourceType" if isinstance(body, dict) else None,
                    )
                ]
            ),
        )
    bundle_type = body.get("type")
    if bundle_type not in ("transaction", "batch"):
        raise BundleError(
            400,
            outcome.operation_outcome([_issue("not-supported", _TEXT_BUNDLE_TYPE, "Bundle.type")]),
        )
    raw_entries = body.get("entry", [])
    if not isinstance(raw_entries, list):
        raise BundleError(
            400, outcome.operation_outcome([_issue("structure", _TEXT_ENTRIES, "Bundle.entry")])
        )
    if len(raw_entries) > MAX_ENTRIES:
        raise BundleError(
            400, outcome.operation_outcome([_issue("too-costly", _TEXT_TOO_MANY, "Bundle.entry")])
        )
    entries = [_parse_entry(index, raw) for index, raw in enumerate(raw_entries)]
    seen: set[str] = set()
    for entry in entries:
        if entry.full_url is None:
            continue
        if entry.full_url in seen:
            raise BundleError(
                400,
                outcome.operation_outcome(
                    [_issue("invalid", _TEXT_DUPLICATE_URL, f"{entry.path}.fullUrl")]
                ),
            )
        seen.add(entry.full_url)
    return bundle_type, entries


def _parse_entry(index: int, raw: object) -> Entry:
    entry = Entry(index)
    if not isinstance(raw, dict):
        _fail(entry, 400, "structure", _TEXT_ENTRY)
        return entry
    full_url = raw.get("fullUrl")
    if full_url is not None:
        if (
            not isinstance(full_url, str)
            or not full_url
            or len(full_url) > 4096
            or (full_url.startswith("urn:uuid:") and not _URN_UUID.fullmatch(full_url))
        ):
            _fail(entry, 400, "invalid", _TEXT_FULL_URL, ".fullUrl")
            return entry
        entry.full_url = full_url
    request = raw.get("request")
    if (
        not isinstance(request, dict)
        or not isinstance(request.get("method"), str)
        or not isinstance(request.get("url"), str)
    ):
        _fail(entry, 400, "required", _TEXT_REQUEST, ".request")
        return entry
    method, url = request["method"], request["url"]
    if method not in _METHODS:
        _fail(entry, 400, "not-supported", _TEXT_METHOD, ".request.method")
        return entry
    entry.method = method
    if "?" in url or any(k in request for k in ("ifNoneExist", "ifNoneMatch", "ifModifiedSince")):
        _fail(entry, 400, "not-supported", _TEXT_CONDITIONAL, ".request")
        return entry
    url = url.removeprefix("/")
    if method == "POST":
        match = _TYPE_URL.fullmatch(url)
    elif method == "GET":
        match = _INSTANCE_URL.fullmatch(url) or _VERSION_URL.fullmatch(url)
    else:
        match = _INSTANCE_URL.fullmatch(url)
    if not match or not is_supported_type(match.group("type")):
        _fail(entry, 400, "not-supported" if match else "invalid", _TEXT_URL, ".request.url")
        return entry
    groups = match.groupdict()
    entry.resource_type = groups["type"]
    entry.resource_id = groups.get("id")
    if groups.get("version") is not None:
        entry.version = int(groups["version"])
    if_match = request.get("ifMatch")
    if if_match is not None:
        etag = _ETAG.fullmatch(if_match.strip()) if isinstance(if_match, str) else None
        if method != "PUT" or etag is None:
            _fail(
                entry,
                412 if etag is None and method == "PUT" else 400,
                "invalid",
                _TEXT_IF_MATCH,
                ".request.ifMatch",
            )
            return entry
        entry.if_match = int(etag.group(1))
    resource = raw.get("resource")
    if method in ("POST", "PUT"):
        if not isinstance(resource, dict) or resource.get("resourceType") != entry.resource_type:
            _fail(entry, 400, "invalid", _TEXT_RESOURCE, ".resource")
            return entry
        if method == "PUT" and resource.get("id") != entry.resource_id:
            _fail(entry, 400, "invalid", _TEXT_ID_MISMATCH, ".resource.id")
            return entry
        entry.resource = resource
    elif resource is not None:
        _fail(entry, 400, "invalid", _TEXT_NO_RESOURCE, ".resource")
    return entry


# --- references --------------------------------------------------------------------------


def assign_ids(
    entries: list[Entry], new_id: Callable[[], str] = lambda: str(uuid.uuid4())
) -> dict[str, str]:
    """Give every POST entry a new id; return fullUrl -> ``Type/id`` for POST and PUT entries.

    A POST entry with an absolute fullUrl ``<base>/Type/<old id>`` (as servers export them)
    also maps the relative ``Type/<old id>`` that other resources of the Bundle use for it,
    unless a PUT, DELETE or GET entry of the Bundle names that resource itself."""
    mapping: dict[str, str] = {}
    aliases: dict[str, str] = {}
    named = {
        f"{e.resource_type}/{e.resource_id}"
        for e in entries
        if e.failure is None and e.method in ("PUT", "DELETE", "GET")
    }
    for entry in entries:
        if entry.failure is not None:
            continue
        if entry.method == "POST":
            entry.resource_id = new_id()
        if entry.method in ("POST", "PUT") and entry.full_url is not None:
            target = f"{entry.resource_type}/{entry.resource_id}"
            mapping[entry.full_url] = target
            absolute = split_absolute_reference(entry.full_url)
            if entry.method == "POST" and absolute and absolute[1] == entry.resource_type:
                aliases.setdefault(f"{absolute[1]}/{absolute[2]}", target)
    for alias, target in aliases.items():
        if alias not in named:
            mapping.setdefault(alias, target)
    return mapping


def rewrite_references(resource: Any, mapping: dict[str, str]) -> tuple[Any, bool]:
    """A copy of `resource` with every ``{"reference": <mapped fullUrl>}`` rewritten (at any
    depth; iterative, so that nesting cannot exhaust the stack), and whether an unmapped
    ``urn:uuid:``/``urn:oid:`` reference remains."""
    unresolved = False
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(resource, root, 0)]  # (value, parent, key)
    while stack:
        value, parent, key = stack.pop()
        if isinstance(value, dict):
            copy: Any = {}
            for k, child in value.items():
                if k == "reference" and isinstance(child, str):
                    if child in mapping:
                        child = mapping[child]
                    elif child.startswith(_PLACEHOLDER_PREFIXES):
                        unresolved = True
                    copy[k] = child
                else:
                    copy[k] = None
                    stack.append((child, copy, k))
        elif isinstance(value, list):
            copy = [None] * len(value)
            for i, child in enumerate(value):
                stack.append((child, copy, i))
        else:
            copy = value
        parent[key] = copy
    return root[0], unresolved


def resolve(entries: list[Entry], max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES) -> None:
    """Assign ids, rewrite references and validate every resource, in place. Failures are put
    on the entries (a transaction then refuses the whole Bundle); `max_attachment_bytes` is
    the limit of `validate_resource` on inline binary content (413 for the entry)."""
    mapping = assign_ids(entries)
    for entry in entries:
        if entry.failure is not None or entry.resource is None:
            continue
        rewritten, unresolved = rewrite_references(entry.resource, mapping)
        if unresolved:
            _fail(entry, 400, "invalid", _TEXT_UNRESOLVED, ".resource")
            continue
        try:
            entry.resource = validate_resource(
                rewritten, entry.resource_type, max_attachment_bytes=max_attachment_bytes
            )
        except FhirValidationError as err:
            entry.failure = EntryFailure(
                err.status or 422,
                outcome.operation_outcome([_rebase(issue, entry) for issue in err.issues]),
            )


# --- processing --------------------------------------------------------------------------


def _status(code: int) -> str:
    return _STATUS_TEXT.get(code, str(code))


IntegrityHandler = Callable[[], Awaitable[tuple[int, dict[str, Any]]]]


class EntryAuthorizer(Protocol):
    """Access control for each entry (fhir/authorization.py behind it): entries are decided
    one by one exactly as the REST interaction they stand for."""

    async def read(self, stored: StoredResource) -> dict[str, Any] | None:
        """The body the caller may see, or None: then the entry answers as not found."""
        ...

    async def deleted(self, resource_type: str, resource_id: str) -> bool:
        """May the caller learn that this deleted record existed (410), or is it 404?"""
        ...

    async def write(
        self, action: str, resource_type: str, resource_id: str, body: dict[str, Any] | None
    ) -> EntryFailure | None:
        """None if the caller may do this write; else the failure the entry answers with."""
        ...


@dataclass
class EntryResult:
    """One entry of a response Bundle. Everything but `body` is free of PHI (status line,
    ``Type/id``, version, instants, fixed-text OperationOutcomes), which is what an
    Idempotency-Key records (`record`); `body` is the resource as written or read, rendered
    for GET entries always and for writes only with ``Prefer: return=representation``, and
    read again from the store (`target` is its exact version) when a response is replayed."""

    status: int
    full_url: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    location: str | None = None
    outcome: dict[str, Any] | None = None
    target: tuple[str, str, int] | None = None  # (type, id, version) of the entry's resource
    read: bool = False  # a GET entry: its resource is the answer
    body: dict[str, Any] | None = None

    def render(self, representation: bool) -> dict[str, Any]:
        response: dict[str, Any] = {"status": _status(self.status)}
        for name, value in (
            ("location", self.location),
            ("etag", self.etag),
            ("lastModified", self.last_modified),
            ("outcome", self.outcome),
        ):
            if value is not None:
                response[name] = value
        rendered: dict[str, Any] = {}
        if self.full_url is not None:
            rendered["fullUrl"] = self.full_url
        if self.body is not None and (self.read or representation):
            rendered["resource"] = self.body
        rendered["response"] = response
        return rendered

    def record(self) -> dict[str, Any]:
        return {
            "s": self.status,
            "f": self.full_url,
            "e": self.etag,
            "m": self.last_modified,
            "l": self.location,
            "o": self.outcome,
            "t": list(self.target) if self.target is not None else None,
            "r": self.read,
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> EntryResult:
        target = data["t"]
        return cls(
            status=int(data["s"]),
            full_url=data["f"],
            etag=data["e"],
            last_modified=data["m"],
            location=data["l"],
            outcome=data["o"],
            target=(str(target[0]), str(target[1]), int(target[2])) if target else None,
            read=bool(data["r"]),
        )


@dataclass
class BundleResponse:
    """A transaction-response or batch-response Bundle (see `EntryResult`)."""

    id: str
    type: str
    entries: list[EntryResult]

    def render(self, representation: bool = False) -> dict[str, Any]:
        """The response Bundle. Written resources are included only with `representation`
        (``Prefer: return=representation``); by default an entry of a write carries its
        response element only (status, location, etag, lastModified), as FHIR allows."""
        return {
            "resourceType": "Bundle",
            "id": self.id,
            "type": self.type,
            "entry": [entry.render(representation) for entry in self.entries],
        }

    def record(self) -> dict[str, Any]:
        """What replaying this response needs, without any resource body."""
        return {"i": self.id, "y": self.type, "e": [e.record() for e in self.entries]}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> BundleResponse:
        return cls(str(data["i"]), str(data["y"]), [EntryResult.from_record(e) for e in data["e"]])

    async def load_bodies(
        self,
        store: ResourceStore,
        representation: bool,
        on_integrity_failure: IntegrityHandler,
        authorizer: EntryAuthorizer,
    ) -> None:
        """Read again the resource versions a replayed response shows (GET entries; writes
        with `representation`). A version that cannot be read any more (its patient was
        erased since) is left out of its entry; a row that does not decrypt refuses the
        response (BundleError from `on_integrity_failure`)."""
        for entry in self.entries:
            if entry.target is None or not (entry.read or representation):
                continue
            try:
                entry.body = await authorizer.read(await store.vread(*entry.target))
            except IntegrityFailure:
                status, body = await on_integrity_failure()
                raise BundleError(status, body) from None
            except StoreError:
                entry.body = None


def _written(entry: Entry, stored: StoredResource) -> EntryResult:
    if stored.deleted:
        return EntryResult(204, etag=stored.etag)
    created = entry.method == "POST"
    return EntryResult(
        201 if created else 200,
        full_url=f"{stored.resource_type}/{stored.id}",
        etag=stored.etag,
        last_modified=instant(stored.last_updated),
        location=(
            f"{stored.resource_type}/{stored.id}/_history/{stored.version}" if created else None
        ),
        target=(stored.resource_type, stored.id, stored.version),
        body=stored.body,
    )


def _failed(failure: EntryFailure) -> EntryResult:
    return EntryResult(failure.status, outcome=failure.outcome)


def store_failure(err: StoreError) -> EntryFailure:
    """The status and OperationOutcome of a store error: the one mapping of store errors to
    HTTP, shared by the REST routes (`routes.store_errors`) and Bundle entries. An
    `IntegrityFailure` maps to a bare 500 here; callers that read report it first."""
    if isinstance(err, Gone):
        return EntryFailure(410, outcome.gone())
    if isinstance(err, NotFound):
        return EntryFailure(404, outcome.not_found())
    if isinstance(err, VersionConflict):
        return EntryFailure(412, outcome.precondition_failed())
    if isinstance(err, WriteContention):
        return EntryFailure(409, outcome.conflict())
    return EntryFailure(500, outcome.processing_error())


async def _read(
    store: ResourceStore,
    entry: Entry,
    on_integrity_failure: IntegrityHandler,
    authorizer: EntryAuthorizer,
) -> EntryResult:
    assert entry.resource_id is not None
    try:
        if entry.version is None:
            stored = await store.read(entry.resource_type, entry.resource_id)
        else:
            stored = await store.vread(entry.resource_type, entry.resource_id, entry.version)
    except IntegrityFailure:
        status, body = await on_integrity_failure()
        return _failed(EntryFailure(status, body))
    except Gone as err:
        if not await authorizer.deleted(entry.resource_type, entry.resource_id):
            return _failed(store_failure(NotFound("not found")))
        return _failed(store_failure(err))
    except StoreError as err:
        return _failed(store_failure(err))
    shown = await authorizer.read(stored)
    if shown is None:
        return _failed(store_failure(NotFound("not found")))
    stored = StoredResource(
        stored.resource_type, stored.id, stored.version, stored.last_updated, False, shown
    )
    return EntryResult(
        200,
        full_url=f"{stored.resource_type}/{stored.id}",
        etag=stored.etag,
        last_modified=instant(stored.last_updated),
        target=(stored.resource_type, stored.id, stored.version),
        read=True,
        body=stored.body,
    )


def _operation(entry: Entry) -> WriteOperation:
    assert entry.resource_id is not None
    action = {"POST": "create", "PUT": "update", "DELETE": "delete"}[entry.method]
    return WriteOperation(
        action,
        entry.resource_type,
        entry.resource_id,  # type: ignore[arg-type]
        entry.resource if entry.method != "DELETE" else None,
        entry.if_match,
    )


async def process(
    store: ResourceStore,
    body: object,
    on_integrity_failure: IntegrityHandler,
    authorizer: EntryAuthorizer,
    *,
    max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES,
) -> BundleResponse:
    """Process a parsed request body; return the response (`BundleResponse.render` makes the
    response Bundle). Raises BundleError when the Bundle is refused as a whole (always, for a
    transaction that cannot be applied)."""
    bundle_type, entries = await asyncio.to_thread(_prepare, body, max_attachment_bytes)
    if bundle_type == "transaction":
        results = await _transaction(store, entries, on_integrity_failure, authorizer)
    else:
        results = await _batch(store, entries, on_integrity_failure, authorizer)
    return BundleResponse(str(uuid.uuid4()), f"{bundle_type}-response", results)


def _prepare(body: object, max_attachment_bytes: int) -> tuple[str, list[Entry]]:
    # Validating up to MAX_ENTRIES resources takes a while: in a worker thread, off the loop.
    bundle_type, entries = parse_bundle(body)
    resolve(entries, max_attachment_bytes)
    return bundle_type, entries


async def _authorize_write(authorizer: EntryAuthorizer, entry: Entry) -> EntryFailure | None:
    assert entry.resource_id is not None
    action = {"POST": "create", "PUT": "update", "DELETE": "delete"}[entry.method]
    body = entry.resource if entry.method != "DELETE" else None
    return await authorizer.write(action, entry.resource_type, entry.resource_id, body)


async def _shown_result(
    authorizer: EntryAuthorizer, entry: Entry, stored: StoredResource
) -> EntryResult:
    if stored.body is not None:
        stored = StoredResource(
            stored.resource_type,
            stored.id,
            stored.version,
            stored.last_updated,
            stored.deleted,
            await authorizer.read(stored),
        )
    return _written(entry, stored)


async def _transaction(
    store: ResourceStore,
    entries: list[Entry],
    on_integrity_failure: IntegrityHandler,
    authorizer: EntryAuthorizer,
) -> list[EntryResult]:
    for entry in entries:
        if entry.failure is not None:
            raise BundleError(entry.failure.status, entry.failure.outcome)
    writes = sorted((e for e in entries if e.method != "GET"), key=lambda e: _ORDER[e.method])
    targets: set[tuple[str, str | None]] = set()
    for entry in writes:
        target = (entry.resource_type, entry.resource_id)
        if target in targets:
            raise BundleError(
                400,
                outcome.operation_outcome(
                    [_issue("invalid", _TEXT_DUPLICATE_TARGET, f"{entry.path}.request.url")]
                ),
            )
        targets.add(target)
    for entry in writes:  # every entry as its own interaction would be decided: all or nothing
        failure = await _authorize_write(authorizer, entry)
        if failure is not None:
            raise BundleError(failure.status, _at_entry(failure.outcome, entry))
    try:
        stored = await store.write_many([_operation(entry) for entry in writes])
    except StoreError as err:
        failure = store_failure(err)
        index = getattr(err, "operation_index", None)
        body = _at_entry(failure.outcome, writes[index]) if index is not None else failure.outcome
        raise BundleError(failure.status, body) from None
    results: dict[int, EntryResult] = {}
    for entry, written in zip(writes, stored, strict=True):
        results[entry.index] = await _shown_result(authorizer, entry, written)
    for entry in entries:
        if entry.method == "GET":
            results[entry.index] = await _read(store, entry, on_integrity_failure, authorizer)
    return [results[entry.index] for entry in entries]


async def _batch(
    store: ResourceStore,
    entries: list[Entry],
    on_integrity_failure: IntegrityHandler,
    authorizer: EntryAuthorizer,
) -> list[EntryResult]:
    results: list[EntryResult] = []
    for entry in entries:
        if entry.failure is not None:
            results.append(_failed(entry.failure))
        elif entry.method == "GET":
            results.append(await _read(store, entry, on_integrity_failure, authorizer))
        elif (failure := await _authorize_write(authorizer, entry)) is not None:
            results.append(_failed(failure))
        else:
            try:
                [stored] = await store.write_many([_operation(entry)])
            except StoreError as err:
                results.append(_failed(store_failure(err)))
            else:
                results.append(await _shown_result(authorizer, entry, stored))
    return results

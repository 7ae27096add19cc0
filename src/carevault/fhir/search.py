"""FHIR search over the index tables (GET /fhir/{type} and POST /fhir/{type}/_search).

A query is a list of (name, value) pairs: repeated parameters are ANDed, comma-separated values
within one parameter are ORed. Every supported parameter comes from `search_params_for(type)`;
anything else - unknown parameters, modifiers, malformed values - is refused with a 400 rather
than silently ignored (a silently ignored filter returns more records than the caller asked for).

The whole search is ONE SQLAlchemy Core statement over `fhir_resources` (current, not deleted)
with EXISTS filters on `fhir_index_keys` / `fhir_index_dates`; every value is a bound parameter.
PHI parameters are matched only through blind indexes, computed here exactly as the store
writes them:

* PHI strings (name, family, given, address...): `BlindIndex.query` of the value, looked up among
  the stored prefix hashes (case- and accent-insensitive starts-with, as FHIR defines it);
* PHI tokens (identifier, gender, telecom): `BlindIndex.exact` of `token_search_key`;
* PHI dates (birthdate): equality at year/month/day precision (`phi_date_search_key`).

Modifiers (``:contains``, ``:exact``, ``:text``, ``:missing``, ``:not``, ``:above``,
``:below``...) are refused: over blind indexes :contains cannot be answered, and the others are
not implemented. The only modifier accepted is a reference parameter's target type
(``subject:Patient=123``).

The page statement also brings each match's current version (the pointer's version row of
`fhir_versions`: scope and ciphertext), so the page's bodies are read in the same statement and
the same snapshot as the page itself (`SearchResult.rows`, `ResourceStore.materialise_many`).

Paging is keyset paging (results are ordered by the sort keys, then id; a page continues after
the last row of the previous one, so inserts and deletes between pages neither repeat nor skip
results). The cursor - the resource type, every parameter, the position and the caller - is
encrypted and authenticated (AES-256-GCM under a key derived from the instance secrets for this
purpose only).
A cursor can therefore neither be read (search values are often PHI and URLs end up in logs)
nor altered to continue any other query than the one it was issued for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import os
import re
import time
from collections import OrderedDict
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    case,
    false,
    func,
    literal_column,
    not_,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.crypto.blind_index import BlindIndex
from carevault.db.engine import run_read
from carevault.db.key_reads import DIALECTS, in_list, read_by_key, read_on
from carevault.db.tables import fhir_index_dates, fhir_index_keys, fhir_resources, fhir_versions
from carevault.fhir.compartment import parse_relative_reference
from carevault.fhir.search_params import (
    SearchParam,
    SearchParameterError,
    parse_date_search,
    parse_token_search,
    phi_date_search_key,
    search_params_for,
    split_search_values,
    token_search_key,
)
from carevault.fhir.store import MAX_INDEX_KEY, index_label

DEFAULT_COUNT = 50
MAX_COUNT = 1000
MAX_PARAMS = 50  # parameters per query
MAX_OR_VALUES = 100  # comma-separated values per parameter
CURSOR_TTL_SECONDS = 3600
MAX_CURSOR_CHARS = 16384
_CURSOR_AAD = b"carevault search cursor v1"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_COUNT = re.compile(r"^[0-9]{1,9}$", re.ASCII)

CONTROL_PARAMS = frozenset({"_count", "_total", "_sort", "_include", "_format", "_cursor"})
SORT_KEYS = ("_lastUpdated", "_id", "date")
TOTAL_MODES = frozenset({"accurate", "estimate", "none"})
FORMATS = frozenset({"json", "application/json", "application/fhir+json"})

# fixed texts (OperationOutcome diagnostics never echo request values)
UNKNOWN_PARAM = "Unknown or unsupported search parameter"
MODIFIER_TEXT = (
    "Search modifier not supported (PHI parameters are matched through blind "
    "indexes; :contains and other modifiers cannot be honoured)"
)
INVALID_VALUE = "Invalid search parameter value"
BAD_CURSOR = "Invalid or expired paging cursor"
CURSOR_ALONE = "A paging cursor continues its own search: send no other parameters with it"


class SearchError(Exception):
    """A search that must be refused with 400: `code` is the OperationOutcome issue code."""

    def __init__(self, text: str, code: str = "invalid") -> None:
        self.text = text
        self.code = code
        super().__init__(text)


@dataclass(frozen=True)
class Search:
    resource_type: str
    params: tuple[tuple[str, str], ...]  # the canonical query (no _cursor, no _format)
    after: tuple[Any, ...] | None  # keyset position: sort values of the previous page's last row
    count: int
    total: str
    sort: tuple[str, ...]
    includes: tuple[tuple[str, str | None], ...]  # (reference param, target type or None)
    filters: tuple[Filter, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Filter:
    """One search parameter's condition, apart from its values: `shape` says what its SQL is
    (searches of one shape share one statement, see `_plan`), `values` are bound into it in
    order."""

    shape: tuple[Any, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SearchResult:
    search: Search
    total: int | None
    ids: list[str]
    has_next: bool
    last: tuple[Any, ...] | None  # keyset position of the page's last row
    includes: list[tuple[str, str]]  # (type, id), unique, not among the matches
    # The page's rows, in its order: each match's id with its current version's columns as
    # `ResourceStore.materialise_many` takes them (read with the page, in the same statement).
    rows: list[Any] = field(default_factory=list)


# --- cursors -----------------------------------------------------------------------------


class CursorCodec:
    """Opaque, authenticated paging cursors (AES-256-GCM; purpose-derived key)."""

    def __init__(self, secret: bytes, clock: Any = time.time) -> None:
        key = hmac.new(secret, b"search-cursor", hashlib.sha256).digest()
        self._aead = AESGCM(key)
        self._clock = clock

    def encode(self, search: Search, after: tuple[Any, ...] | None, subject: str) -> str:
        position = None if after is None else [_tag(v) for v in after]
        payload = orjson.dumps(
            {
                "t": search.resource_type,
                "q": [list(p) for p in search.params],
                "a": position,
                "u": subject,
                "e": int(self._clock()) + CURSOR_TTL_SECONDS,
            }
        )
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, payload, _CURSOR_AAD)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()

    def decode(
        self, token: str, resource_type: str, subject: str
    ) -> tuple[list[tuple[str, str]], tuple[Any, ...] | None]:
        """(params, keyset position) of a cursor issued for `resource_type` and `subject`;
        SearchError for anything forged, altered, expired or issued for another type or caller."""
        if not token or len(token) > MAX_CURSOR_CHARS:
            raise SearchError(BAD_CURSOR)
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise SearchError(BAD_CURSOR) from None
        # only the canonical encoding: otherwise a changed final character could decode alike
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != token or len(raw) < 29:
            raise SearchError(BAD_CURSOR)
        try:
            data = orjson.loads(self._aead.decrypt(raw[:12], raw[12:], _CURSOR_AAD))
            params = [(str(n), str(v)) for n, v in data["q"]]
            after = None if data["a"] is None else tuple(_untag(v) for v in data["a"])
            expires = int(data["e"])
            ok = data["t"] == resource_type and data["u"] == subject and expires >= self._clock()
        except (InvalidTag, orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
            raise SearchError(BAD_CURSOR) from None
        if not ok:
            raise SearchError(BAD_CURSOR)
        return params, after


def _tag(value: Any) -> list[Any]:
    # floats as repr: JSON has no infinities (open-ended periods index as -inf/+inf)
    if value is None:
        return ["n"]
    if isinstance(value, float):
        return ["f", repr(value)]
    if isinstance(value, int):
        return ["i", value]
    return ["s", str(value)]


def _untag(item: list[Any]) -> Any:
    kind = item[0]
    if kind == "n" and len(item) == 1:
        return None
    if kind == "f" and isinstance(item[1], str):
        return float(item[1])
    if kind == "i" and isinstance(item[1], int):
        return item[1]
    if kind == "s" and isinstance(item[1], str):
        return item[1]
    raise ValueError("bad cursor value")


# --- parsing -----------------------------------------------------------------------------


def _unescape(value: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise SearchError(INVALID_VALUE)
            out.append(nxt)
        else:
            out.append(ch)
    return "".join(out)


def _values(value: str) -> list[str]:
    try:
        values = split_search_values(value)
    except SearchParameterError:
        raise SearchError(INVALID_VALUE) from None
    if len(values) > MAX_OR_VALUES or any(not v for v in values):
        raise SearchError(INVALID_VALUE)
    return values


def _index_key(key: str) -> str:
    if len(key) > MAX_INDEX_KEY:  # as the store writes over-long keys
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


# Built once (an alias copies every column of its table: 0.2 ms a search); one alias serves
# any number of the uncorrelated subqueries below, each a SELECT of its own.
_KEYS = fhir_index_keys.alias("k")
_DATES = fhir_index_dates.alias("d")


def _keys_exist(
    resource_type: str, param: str, keys: Sequence[BindParameter[Any]]
) -> ColumnElement[bool]:
    # `id IN (uncorrelated subquery)`, not a correlated EXISTS: SQLite plans the correlated form
    # as a walk over every resource of the type (17.7 ms at 4,000 resources) and this one as a
    # lookup on ix_fhir_index_keys_lookup (0.5 ms); PostgreSQL plans both well.
    k = _KEYS
    return fhir_resources.c.id.in_(
        select(k.c.id).where(
            and_(k.c.resource_type == resource_type, k.c.param == param, k.c.key.in_(keys))
        )
    )


_DATE_PREFIXES = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"})
_NO_APPROXIMATE = "The date prefix 'ap' is not supported"


def _date_condition(prefix: str, low: Any, high: Any, rl: Any, rh: Any) -> ColumnElement[bool]:
    """FHIR date prefixes (`_DATE_PREFIXES`): the search value's range [low, high) against the
    target's [rl, rh)."""
    within = and_(rl >= low, rh <= high)
    if prefix == "eq":
        return within
    if prefix == "ne":
        return not_(within)
    if prefix == "gt":
        return rh > high
    if prefix == "lt":
        return rl < low
    if prefix == "ge":
        return or_(rh > high, within)
    if prefix == "le":
        return or_(rl < low, within)
    if prefix == "sa":
        return rl >= high
    return rh <= low  # eb


def _point_condition(prefix: str, low: Any, high: Any, column: Any) -> ColumnElement[bool]:
    """Date prefixes against an instant stored as one point (`_lastUpdated`)."""
    return {
        "eq": and_(column >= low, column < high),
        "ne": or_(column < low, column >= high),
        "gt": column >= high,
        "sa": column >= high,
        "lt": column < low,
        "eb": column < low,
        "ge": column >= low,
        "le": column < high,
    }[prefix]


def _parse_date(value: str) -> tuple[str, float, float]:
    try:
        prefix, low, high = parse_date_search(value)
    except SearchParameterError:
        raise SearchError(INVALID_VALUE) from None
    if prefix not in _DATE_PREFIXES:
        raise SearchError(_NO_APPROXIMATE, "not-supported")
    return prefix, low, high


def _reference_keys(param: SearchParam, value: str, target: str | None) -> list[str]:
    value = _unescape(value)
    if target is not None:
        if not _ID.fullmatch(value):
            raise SearchError(INVALID_VALUE)
        return [f"{target}/{value}"]
    if _ID.fullmatch(value):  # a bare id: any of the parameter's target types
        return [f"{t}/{value}" for t in param.targets]
    relative = parse_relative_reference(value)
    if relative is not None:
        return [f"{relative[0]}/{relative[1]}"]
    return [value]  # absolute or urn: references are indexed as written


def _key_filter(param: SearchParam, keys: Sequence[str]) -> Filter:
    unique = tuple(sorted(set(keys)))
    return Filter(("keys", param.code, len(unique)), unique)


def _dated_filter(kind: str, param: SearchParam, values: list[str]) -> Filter:
    dates = [_parse_date(v) for v in values]
    return Filter(
        (kind, param.code, tuple(prefix for prefix, _, _ in dates)),
        tuple(bound for _, low, high in dates for bound in (low, high)),
    )


def _condition(
    resource_type: str, param: SearchParam, modifier: str | None, value: str, blind: BlindIndex
) -> Filter:
    values = _values(value)
    label = index_label(resource_type, param.code)
    if modifier is not None and not (param.kind == "reference" and modifier in param.targets):
        raise SearchError(MODIFIER_TEXT, "not-supported")

    if param.code == "_id":
        ids = tuple(sorted({_unescape(v) for v in values}))
        if not all(_ID.fullmatch(i) for i in ids):
            raise SearchError(INVALID_VALUE)
        return Filter(("id", len(ids)), ids)
    if param.code == "_lastUpdated":
        return _dated_filter("instant", param, values)

    if param.kind == "date":
        if param.phi:
            try:
                return _key_filter(
                    param, [blind.exact(label, phi_date_search_key(v)) for v in values]
                )
            except SearchParameterError as err:
                raise SearchError(str(err)) from None
        return _dated_filter("dates", param, values)

    if param.kind == "token":
        try:
            keys = [token_search_key(*parse_token_search(v)) for v in values]
        except SearchParameterError:
            raise SearchError(INVALID_VALUE) from None
    elif param.kind == "reference":
        keys = [k for v in values for k in _reference_keys(param, v, modifier)]
    elif param.kind == "string":
        if not param.phi:  # no plain string parameter exists; refuse rather than guess
            raise SearchError(UNKNOWN_PARAM, "not-supported")
        texts = [_unescape(v) for v in values]
        if not all(blind.normalize(t) for t in texts):
            raise SearchError(INVALID_VALUE)
        return _key_filter(param, [blind.query(label, t) for t in texts])
    else:  # pragma: no cover - the parameter table only has the four kinds
        raise SearchError(UNKNOWN_PARAM, "not-supported")
    if param.phi:
        return _key_filter(param, [blind.exact(label, k) for k in keys])
    return _key_filter(param, [_index_key(k) for k in keys])


def _clause(
    resource_type: str, shape: tuple[Any, ...], binds: list[BindParameter[Any]]
) -> ColumnElement[bool]:
    """The SQL of a filter of `shape`, its values bound by `binds` (in the filter's order)."""
    kind = shape[0]
    if kind == "id":
        return fhir_resources.c.id.in_(binds)
    if kind == "keys":
        return _keys_exist(resource_type, shape[1], binds)
    # Dated filters: a (low, high) pair of values per prefix.
    dated = [(p, binds[2 * n], binds[2 * n + 1]) for n, p in enumerate(shape[2])]
    if kind == "instant":
        column = fhir_resources.c.last_updated
        return or_(*(_point_condition(p, low, high, column) for p, low, high in dated))
    d = _DATES  # uncorrelated, like _keys_exist: SQLite would otherwise walk every resource
    ranges = [_date_condition(p, low, high, d.c.low, d.c.high) for p, low, high in dated]
    return fhir_resources.c.id.in_(
        select(d.c.id).where(
            and_(d.c.resource_type == resource_type, d.c.param == shape[1], or_(*ranges))
        )
    )


def parse_search(
    resource_type: str,
    pairs: Sequence[tuple[str, str]],
    blind: BlindIndex,
    after: tuple[Any, ...] | None = None,
) -> Search:
    """Validate and compile a query; SearchError (-> 400) for anything not supported."""
    if len(pairs) > MAX_PARAMS:
        raise SearchError(INVALID_VALUE)
    supported: Mapping[str, SearchParam] = search_params_for(resource_type)
    filters: list[Filter] = []
    canonical: list[tuple[str, str]] = []
    control: dict[str, str] = {}
    for name, value in pairs:
        if name == "_format":
            if value not in FORMATS:
                raise SearchError("Only JSON is supported", "not-supported")
            continue
        if name in CONTROL_PARAMS:
            if name == "_cursor":
                raise SearchError(CURSOR_ALONE)
            if name in control:
                raise SearchError(INVALID_VALUE)
            control[name] = value
            canonical.append((name, value))
            continue
        code, _, modifier = name.partition(":")
        param = supported.get(code)
        if param is None:
            if code in (
                "_include",
                "_revinclude",
                "_has",
                "_summary",
                "_elements",
                "_contained",
                "_containedType",
                "_text",
                "_content",
                "_list",
                "_query",
                "_filter",
                "_type",
                "_tag",
                "_profile",
                "_security",
                "_source",
            ):
                raise SearchError("This search parameter is not supported", "not-supported")
            raise SearchError(UNKNOWN_PARAM, "not-supported")
        filters.append(
            _condition(resource_type, param, modifier if ":" in name else None, value, blind)
        )
        canonical.append((name, value))

    count = DEFAULT_COUNT
    if "_count" in control:
        if not _COUNT.fullmatch(control["_count"]):
            raise SearchError(INVALID_VALUE)
        count = min(int(control["_count"]), MAX_COUNT)
    total = control.get("_total", "accurate")
    if total not in TOTAL_MODES:
        raise SearchError(INVALID_VALUE)
    sort: list[str] = []
    if "_sort" in control:
        for item in _values(control["_sort"]):
            key = item[1:] if item.startswith("-") else item
            if (
                key not in SORT_KEYS
                or (key == "date" and supported.get("date") is None)
                or (key == "date" and supported["date"].phi)
                or item in sort
            ):
                raise SearchError("Unsupported sort key", "not-supported")
            sort.append(item)
    includes: list[tuple[str, str | None]] = []
    if "_include" in control:
        for item in _values(control["_include"]):
            parts = item.split(":")
            if len(parts) not in (2, 3) or parts[0] != resource_type:
                raise SearchError("Unsupported _include", "not-supported")
            param = supported.get(parts[1])
            target = parts[2] if len(parts) == 3 else None
            if (
                param is None
                or param.kind != "reference"
                or param.phi
                or (target is not None and target not in param.targets)
            ):
                raise SearchError("Unsupported _include", "not-supported")
            includes.append((parts[1], target))
    search = Search(
        resource_type,
        tuple(canonical),
        after,
        count,
        total,
        tuple(sort),
        tuple(includes),
        tuple(filters),
    )
    if after is not None and len(after) != len(_sort_columns(search)):
        raise SearchError(BAD_CURSOR)
    return search


# --- execution ---------------------------------------------------------------------------


def _sort_columns(search: Search) -> list[tuple[str, Any, bool]]:
    """(kind, expression, descending) of the ordering: the requested sort keys, then id.
    A date key is two columns: "undated" (0/1, so undated rows come last either way) and the
    earliest `low` of the parameter ("nullable": NULL exactly when undated)."""
    columns: list[tuple[str, Any, bool]] = []
    for n, item in enumerate(search.sort):
        descending = item.startswith("-")
        key = item.lstrip("-")
        if key == "_lastUpdated":
            columns.append(("value", fhir_resources.c.last_updated, descending))
        elif key == "_id":
            columns.append(("value", fhir_resources.c.id, descending))
        else:
            d = fhir_index_dates.alias(f"sort_{n}")
            earliest = (
                select(func.min(d.c.low))
                .where(
                    and_(
                        d.c.resource_type == search.resource_type,
                        d.c.id == fhir_resources.c.id,
                        d.c.param == key,
                    )
                )
                .scalar_subquery()
            )
            columns.append(
                (
                    "value",
                    case((earliest.is_(None), literal_column("1")), else_=literal_column("0")),
                    False,
                )
            )
            columns.append(("nullable", earliest, descending))
    if "_id" not in {item.lstrip("-") for item in search.sort}:
        columns.append(("value", fhir_resources.c.id, False))  # ties: a total, stable order
    return columns


def _after(columns: list[tuple[str, Any, bool]], after: tuple[Any, ...]) -> ColumnElement[bool]:
    """Rows strictly after the keyset position (its values, or None where undated), in the
    order of `columns`."""
    clauses: list[ColumnElement[bool]] = []
    equal: list[ColumnElement[bool]] = []
    for (_, column, descending), value in zip(columns, after, strict=True):
        if value is None:
            continue  # undated: the "undated" column before it already pins these rows
        clauses.append(and_(*equal, column < value if descending else column > value))
        equal.append(column == value)
    return or_(*clauses)


# What `ResourceStore.materialise_many` reads of a current version, besides the id.
_VERSION_COLUMNS = (
    fhir_versions.c.resource_type,
    fhir_versions.c.version,
    fhir_versions.c.last_updated,
    fhir_versions.c.deleted,
    fhir_versions.c.scope,
    fhir_versions.c.body,
)


@dataclass(frozen=True)
class _Plan:
    """The statements of one shape of search (`_plan`), every value a parameter named b<n>."""

    visible: ColumnElement[bool] | None  # the condition it was built with (held: see _plan)
    page: Select[Any] | None  # None for _count=0
    count: Select[Any]


# Searches of one shape (the same type, parameters with as many values each, date prefixes,
# sort, page size, cursor position kinds and visibility) run the same statement object with other
# values. SQLAlchemy memoizes the cache key of a statement object, which it otherwise derives
# again from the whole tree on every execution (a third of a name search's event-loop time), and
# PostgreSQL gets a text it can prepare once (`key_reads`).
_PLANS: OrderedDict[tuple[Any, ...], _Plan] = OrderedDict()
_PLANS_KEPT = 512


def _after_shape(search: Search) -> tuple[bool, ...] | None:
    """Which positions of the cursor are undated (None); BAD_CURSOR where one cannot be."""
    if search.after is None:
        return None
    kinds = [kind for kind, _, _ in _sort_columns(search)]
    shape = tuple(value is None for value in search.after)
    if any(undated and kind != "nullable" for undated, kind in zip(shape, kinds, strict=True)):
        raise SearchError(BAD_CURSOR)
    return shape


def _plan(search: Search, visible: ColumnElement[bool] | None) -> _Plan:
    after = _after_shape(search)
    shapes = tuple(f.shape for f in search.filters)
    # `visible` is one object per visibility (access/filters.py caches them), held by the plan,
    # so its id cannot name another condition while the plan is kept.
    key = (search.resource_type, shapes, search.sort, search.count, after, id(visible))
    plan = _PLANS.get(key)
    if plan is not None and plan.visible is visible:
        _PLANS.move_to_end(key)
        return plan
    names = (f"b{n}" for n in itertools.count())  # in `_params`'s order
    clauses = [
        _clause(search.resource_type, f.shape, [bindparam(next(names), None) for _ in f.values])
        for f in search.filters
    ]
    where = and_(
        fhir_resources.c.resource_type == search.resource_type,
        fhir_resources.c.deleted == false(),
        *clauses,
        *(() if visible is None else (visible,)),
    )
    page = None
    if search.count > 0:
        columns = _sort_columns(search)
        page_where = where
        if after is not None:
            position = tuple(None if undated else bindparam(next(names), None) for undated in after)
            page_where = and_(where, _after(columns, position))
        matches = (
            select(
                fhir_resources.c.id,
                fhir_resources.c.version,
                *(c.label(f"s{n}") for n, (_, c, _) in enumerate(columns)),
            )
            .where(page_where)
            .order_by(*(c.desc() if desc else c.asc() for _, c, desc in columns))
            .limit(search.count + 1)
            .subquery("page")
        )
        # The page's current versions, joined to the page once it is chosen (count + 1 rows),
        # not to every match before the sort and limit. An outer join: a pointer without its
        # version row still counts in the page, as it did when the bodies were read apart.
        v = fhir_versions
        ordered = [(matches.c[f"s{n}"], desc) for n, (_, _, desc) in enumerate(columns)]
        page = (
            select(
                matches.c.id,
                *(c for c, _ in ordered),
                *_VERSION_COLUMNS,
            )
            .select_from(
                matches.outerjoin(
                    v,
                    and_(
                        v.c.resource_type == search.resource_type,
                        v.c.id == matches.c.id,
                        v.c.version == matches.c.version,
                    ),
                )
            )
            .order_by(*(c.desc() if desc else c.asc() for c, desc in ordered))
        )
    plan = _Plan(visible, page, select(func.count()).select_from(fhir_resources).where(where))
    _PLANS[key] = plan
    if len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return plan


def _params(search: Search) -> dict[str, Any]:
    """The values of `search` by the names `_plan` bound them to."""
    values = [v for f in search.filters for v in f.values]
    values += [v for v in search.after or () if v is not None]
    return {f"b{n}": value for n, value in enumerate(values)}


_INCLUDE_KEYS = {
    dialect: select(_KEYS.c.param, _KEYS.c.key).where(
        and_(
            _KEYS.c.resource_type == bindparam("resource_type"),
            in_list(_KEYS.c.id, "ids", dialect),
            in_list(_KEYS.c.param, "params", dialect),
        )
    )
    for dialect in DIALECTS
}

# A search's statements in turn: it yields (statement, parameters) and is sent the rows.
_Steps = Generator[tuple[Select[Any], Mapping[str, Any]], list[Any], "SearchResult"]


def _steps(search: Search, plan: _Plan, dialect: str) -> _Steps:
    """The page (with its matches' current versions), the total and the _include targets."""
    params = _params(search)
    ids: list[str] = []
    has_next = False
    last: tuple[Any, ...] | None = None
    rows: list[Any] = []
    if plan.page is not None:
        rows = yield plan.page, params
        has_next = len(rows) > search.count
        rows = rows[: search.count]
        ids = [row[0] for row in rows]
        if rows:
            last = tuple(rows[-1][1 : -len(_VERSION_COLUMNS)])
    total = None
    if search.total != "none":
        if search.after is None and search.count > 0 and not has_next:
            total = len(ids)  # the first page holds every match: counting again tells nothing
        else:
            total = (yield plan.count, params)[0][0]
    includes: list[tuple[str, str]] = []
    if ids and search.includes:
        wanted: dict[str, set[str | None]] = {p: set() for p, _ in search.includes}
        for p, target in search.includes:
            wanted[p].add(target)
        keys = yield (
            _INCLUDE_KEYS[dialect],
            {"resource_type": search.resource_type, "ids": ids, "params": sorted(wanted)},
        )
        seen: set[tuple[str, str]] = set()
        for param, key in sorted(keys, key=lambda row: row[1]):
            relative = parse_relative_reference(key)
            if relative is None or not _TYPE.fullmatch(relative[0]):
                continue
            targets = wanted[param]
            if None not in targets and relative[0] not in targets:
                continue
            if relative[0] == search.resource_type and relative[1] in ids:
                continue
            if relative not in seen:
                seen.add(relative)
                includes.append(relative)
    return SearchResult(search, total, ids, has_next, last, includes, rows)


def _run(conn: Connection, steps: _Steps) -> SearchResult:
    """Every statement on `conn`: one read transaction (SQLite: one snapshot)."""
    try:
        statement, params = next(steps)
        while True:
            statement, params = steps.send(read_on(conn, statement, params))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def _run_by_key(engine: AsyncEngine, steps: _Steps) -> SearchResult:
    """Every statement on PostgreSQL's driver connections of the event loop (`key_reads`), as
    reads by key are: each its own snapshot, as on the read threads' autocommit connections."""
    try:
        statement, params = next(steps)
        while True:
            statement, params = steps.send(await read_by_key(engine, statement, params))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def execute(
    engine: AsyncEngine, search: Search, visible: ColumnElement[bool] | None = None
) -> SearchResult:
    """Run the search. `visible` (access/filters.py) limits it to the records the caller may
    read, so that totals and pages count only those; None only for the server's own lookups
    (import), never for a request."""
    plan = _plan(search, visible)
    dialect = engine.dialect.name
    if dialect == "postgresql":
        return await _run_by_key(engine, _steps(search, plan, dialect))
    return await run_read(engine, lambda conn: _run(conn, _steps(search, plan, dialect)))

"""The search parameters carevault supports, and the index entries a resource produces.

What is searchable is data: `SENSITIVITY` lists every supported (resource type, parameter code)
pair and classifies it; the meaning of each parameter (its type and FHIRPath expression) is
taken from the official SearchParameter definitions (`definitions.py`), never retyped here.

`extract_index(resource)` evaluates those expressions (fhirpathpy, compiled once) and returns
typed `IndexEntry` values for the store to write:

* token -> ``values=(system, code)``; `IndexEntry.keys` are the match keys for the FHIR forms
  ``system|code``, ``system|``, ``|code`` (no system) and ``code`` (any system);
* string -> ``values=(raw string,)``: one entry per name part / address part / string;
* date -> ``values=(low, high)``: UTC epoch seconds, half-open ``[low, high)``, covering the
  precision of the value (``2020`` -> [2020-01-01T00:00Z, 2021-01-01T00:00Z)); a Period spans
  start..end (an open end is -inf/+inf); values without a timezone are taken as UTC;
* reference -> ``values=(type, id)`` for relative references (``Patient/123``), and
  ``(None, reference)`` for absolute and ``urn:`` references, kept as written.

PHI (`phi=True`) entries must be stored only as keyed blind indexes (crypto/blind_index.py);
for a PHI date (birthdate) the values are therefore not epoch bounds but the value's canonical
day/month/year strings (``("1980", "1980-02", "1980-02-03")``), so that equality search at
each precision works through a blind index (range search on PHI dates is not possible).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from types import MappingProxyType
from typing import Any, Final, Literal

from carevault.fhir.compartment import parse_relative_reference, split_absolute_reference
from carevault.fhir.definitions import search_parameter
from carevault.fhir.fhirpath import Node, PathExpression, compile_path

ParamKind = Literal["token", "string", "date", "reference"]
Sensitivity = Literal["phi", "plain"]

COMMON = "Resource"  # pseudo-type under which the parameters of every resource type are listed

# THE table that decides what may be stored in the clear. Every supported search parameter is
# listed here, and only here; a pair that is not listed is not searchable.
#   "phi"   - identifies a person (names, identifiers, birth date, telecom, address parts,
#             gender): the store keeps only keyed blind indexes of these values.
#   "plain" - clinical codes, statuses, categories, clinical event dates, references (opaque
#             ids): stored in the clear so that they can be range-searched and joined.
# Practitioner and Organization names/identifiers are classified "phi" too: they are not
# patient data, but they are names and identifiers, and failing safe costs only prefix search.
SENSITIVITY: Final[Mapping[tuple[str, str], Sensitivity]] = MappingProxyType(
    {
        # every resource type
        (COMMON, "_id"): "plain",
        (COMMON, "_lastUpdated"): "plain",
        # security labels (meta.security): access control filters sensitive records by them
        (COMMON, "_security"): "plain",
        # Patient: demographics
        ("Patient", "identifier"): "phi",
        ("Patient", "name"): "phi",
        ("Patient", "family"): "phi",
        # managingOrganization (an opaque reference): the organization boundary of access control
        ("Patient", "organization"): "plain",
        ("Patient", "given"): "phi",
        ("Patient", "birthdate"): "phi",
        ("Patient", "gender"): "phi",
        ("Patient", "telecom"): "phi",
        ("Patient", "phone"): "phi",
        ("Patient", "email"): "phi",
        ("Patient", "address"): "phi",
        ("Patient", "address-city"): "phi",
        ("Patient", "address-postalcode"): "phi",
        # workforce and organizations
        ("Practitioner", "identifier"): "phi",
        ("Practitioner", "name"): "phi",
        ("Practitioner", "family"): "phi",
        ("Practitioner", "given"): "phi",
        ("PractitionerRole", "practitioner"): "plain",
        ("PractitionerRole", "organization"): "plain",
        ("PractitionerRole", "role"): "plain",
        ("Organization", "identifier"): "phi",
        ("Organization", "name"): "phi",
        # clinical resources
        ("Encounter", "patient"): "plain",
        ("Encounter", "subject"): "plain",
        ("Encounter", "date"): "plain",
        ("Encounter", "status"): "plain",
        ("Encounter", "class"): "plain",
        ("Encounter", "type"): "plain",
        ("Observation", "patient"): "plain",
        ("Observation", "subject"): "plain",
        ("Observation", "code"): "plain",
        ("Observation", "date"): "plain",
        ("Observation", "category"): "plain",
        ("Observation", "status"): "plain",
        ("Observation", "encounter"): "plain",
        ("Condition", "patient"): "plain",
        ("Condition", "subject"): "plain",
        ("Condition", "code"): "plain",
        ("Condition", "onset-date"): "plain",
        ("Condition", "recorded-date"): "plain",
        ("Condition", "category"): "plain",
        ("Condition", "clinical-status"): "plain",
        ("Condition", "encounter"): "plain",
        ("AllergyIntolerance", "patient"): "plain",
        ("AllergyIntolerance", "code"): "plain",
        ("AllergyIntolerance", "date"): "plain",
        ("AllergyIntolerance", "category"): "plain",
        ("AllergyIntolerance", "clinical-status"): "plain",
        ("MedicationRequest", "patient"): "plain",
        ("MedicationRequest", "subject"): "plain",
        ("MedicationRequest", "code"): "plain",
        ("MedicationRequest", "date"): "plain",
        ("MedicationRequest", "authoredon"): "plain",
        ("MedicationRequest", "category"): "plain",
        ("MedicationRequest", "status"): "plain",
        ("MedicationRequest", "intent"): "plain",
        ("MedicationRequest", "encounter"): "plain",
        ("Procedure", "patient"): "plain",
        ("Procedure", "subject"): "plain",
        ("Procedure", "code"): "plain",
        ("Procedure", "date"): "plain",
        ("Procedure", "category"): "plain",
        ("Procedure", "status"): "plain",
        ("Procedure", "encounter"): "plain",
        ("Immunization", "patient"): "plain",
        ("Immunization", "vaccine-code"): "plain",
        ("Immunization", "date"): "plain",
        ("Immunization", "status"): "plain",
        ("DiagnosticReport", "patient"): "plain",
        ("DiagnosticReport", "subject"): "plain",
        ("DiagnosticReport", "code"): "plain",
        ("DiagnosticReport", "date"): "plain",
        ("DiagnosticReport", "category"): "plain",
        ("DiagnosticReport", "status"): "plain",
        ("DiagnosticReport", "encounter"): "plain",
        ("DocumentReference", "patient"): "plain",
        ("DocumentReference", "subject"): "plain",
        ("DocumentReference", "type"): "plain",
        ("DocumentReference", "date"): "plain",
        ("DocumentReference", "category"): "plain",
        ("DocumentReference", "status"): "plain",
        ("DocumentReference", "encounter"): "plain",
        ("CarePlan", "patient"): "plain",
        ("CarePlan", "subject"): "plain",
        ("CarePlan", "date"): "plain",
        ("CarePlan", "category"): "plain",
        ("CarePlan", "status"): "plain",
        ("CarePlan", "intent"): "plain",
        ("CarePlan", "encounter"): "plain",
        ("CareTeam", "patient"): "plain",
        ("CareTeam", "subject"): "plain",
        ("CareTeam", "date"): "plain",
        ("CareTeam", "category"): "plain",
        ("CareTeam", "status"): "plain",
        ("CareTeam", "encounter"): "plain",
        ("CareTeam", "participant"): "plain",
        ("Consent", "patient"): "plain",
        ("Consent", "date"): "plain",
        ("Consent", "category"): "plain",
        ("Consent", "status"): "plain",
    }
)

# Resource type -> supported parameter codes (the common ones excluded), derived from the table.
SUPPORTED_PARAMS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        resource_type: tuple(code for (rt, code) in SENSITIVITY if rt == resource_type)
        for resource_type in dict.fromkeys(rt for (rt, _) in SENSITIVITY if rt != COMMON)
    }
)
COMMON_PARAMS: Final[tuple[str, ...]] = tuple(code for (rt, code) in SENSITIVITY if rt == COMMON)

_KINDS: Final = frozenset({"token", "string", "date", "reference"})
DATE_PREFIXES: Final = frozenset({"eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap"})
MAX_SEARCH_VALUE = 4096  # characters; longer search values are refused


class SearchParameterError(ValueError):
    """A search parameter value is malformed or unsupported (generic message, no echo)."""

    def __init__(self, message: str = "Invalid search parameter value") -> None:
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One supported search parameter of one resource type, with its official meaning."""

    resource_type: str  # the concrete type (or "Resource" for the common parameters)
    code: str
    kind: ParamKind
    sensitivity: Sensitivity
    expressions: tuple[str, ...]  # official FHIRPath parts for this type
    targets: tuple[str, ...]  # reference target types (reference parameters)
    url: str  # canonical URL of the official definition

    @property
    def phi(self) -> bool:
        """True when values of this parameter may be stored only as blind indexes."""
        return self.sensitivity == "phi"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One index value of a resource: parameter code, kind, values (see the module
    docstring for their shape per kind) and whether it is PHI (blind-index only)."""

    param: str
    kind: ParamKind
    values: tuple[Any, ...]
    phi: bool

    @property
    def keys(self) -> tuple[str, ...]:
        """Exact-match keys: token match keys, the string itself, ``"Type/id"`` (or the raw
        reference), PHI-date canonical strings; empty for plain dates (use `values`)."""
        if self.kind == "token":
            return token_keys(self.values[0], self.values[1])
        if self.kind == "reference":
            ref_type, ref = self.values
            return (f"{ref_type}/{ref}" if ref_type else ref,)
        if self.kind == "date" and not self.phi:
            return ()
        return tuple(self.values)


# --- the parameter table ----------------------------------------------------------------


@cache
def _all_params() -> Mapping[tuple[str, str], SearchParam]:
    table: dict[tuple[str, str], SearchParam] = {}
    for (resource_type, code), sensitivity in SENSITIVITY.items():
        definition = search_parameter(resource_type, code)
        if definition.type not in _KINDS:
            raise RuntimeError(f"unsupported search parameter type for {resource_type}.{code}")
        expressions = definition.expressions_for(resource_type)
        if not expressions:
            raise RuntimeError(f"no official expression for {resource_type}.{code}")
        table[(resource_type, code)] = SearchParam(
            resource_type=resource_type,
            code=code,
            kind=definition.type,  # type: ignore[arg-type]
            sensitivity=sensitivity,
            expressions=expressions,
            targets=definition.targets,
            url=definition.url,
        )
    return MappingProxyType(table)


def search_param(resource_type: str, code: str) -> SearchParam | None:
    """The supported parameter `code` of `resource_type` (common ones included), or None."""
    table = _all_params()
    return table.get((resource_type, code)) or table.get((COMMON, code))


@lru_cache(maxsize=512)  # bounded: the type may come from a request URL
def search_params_for(resource_type: str) -> Mapping[str, SearchParam]:
    """All supported parameters of `resource_type`, by code, the common ones included."""
    table = _all_params()
    found = {code: table[(COMMON, code)] for code in COMMON_PARAMS}
    for code in SUPPORTED_PARAMS.get(resource_type, ()):
        found[code] = table[(resource_type, code)]
    return MappingProxyType(found)


@lru_cache(maxsize=512)
def _compiled(resource_type: str) -> tuple[tuple[SearchParam, tuple[PathExpression, ...]], ...]:
    return tuple(
        (param, tuple(compile_path(expr, resource_type) for expr in param.expressions))
        for param in search_params_for(resource_type).values()
    )


# --- extraction ----------------------------------------------------------------------------


def extract_index(resource: Mapping[str, Any]) -> list[IndexEntry]:
    """The index entries of a (validated) resource for every supported parameter of its type,
    without duplicates, in parameter order. Raises FhirPathError only if an official
    expression cannot be evaluated at all (so that nothing is stored half-indexed)."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        return []
    entries: dict[IndexEntry, None] = {}
    for param, paths in _compiled(resource_type):
        for path in paths:
            for node in path.evaluate(resource):
                for entry in _entries(param, path, node):
                    entries.setdefault(entry, None)
    return list(entries)


def _entries(param: SearchParam, path: PathExpression, node: Node) -> Iterable[IndexEntry]:
    if param.kind == "token":
        for system, code in _tokens(node.value):
            yield IndexEntry(param.code, "token", (system, code), param.phi)
    elif param.kind == "string":
        for text in _strings(node.value, node.type):
            yield IndexEntry(param.code, "string", (text,), param.phi)
    elif param.kind == "date":
        for value in _date_values(node.value):
            yield from _date_entries(param, value)
    else:
        ref = _reference(node.value, path.resolve_is)
        if ref is not None:
            yield IndexEntry(param.code, "reference", ref, param.phi)


def _tokens(value: Any) -> list[tuple[str | None, str | None]]:
    if isinstance(value, bool):
        return [(None, "true" if value else "false")]
    if isinstance(value, str | int):
        return [(None, str(value))] if str(value) else []
    if not isinstance(value, Mapping):
        return []
    if "coding" in value:  # CodeableConcept (its text is for :text searches, not indexed)
        return [t for coding in value.get("coding") or () for t in _tokens(coding)]
    system = value.get("system") if isinstance(value.get("system"), str) else None
    if "value" in value:  # Identifier (system|value) or ContactPoint (phone|+1 555 ...)
        code = value.get("value")
    else:  # Coding
        code = value.get("code")
    code = code if isinstance(code, str) and code else None
    return [(system, code)] if system or code else []


_HUMAN_NAME_PARTS = ("text", "family", "given", "prefix", "suffix")
_ADDRESS_PARTS = ("text", "line", "city", "district", "state", "postalCode", "country")


def _strings(value: Any, type_name: str | None) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, Mapping):
        return []
    # HumanName and Address: FHIR string search matches any of their parts. The type comes
    # from fhirpathpy; the fallback walker does not know it, so the shape decides.
    if type_name == "HumanName":
        parts = _HUMAN_NAME_PARTS
    elif type_name == "Address":
        parts = _ADDRESS_PARTS
    elif any(key in value for key in ("family", "given", "prefix", "suffix")):
        parts = _HUMAN_NAME_PARTS
    else:
        parts = _ADDRESS_PARTS
    found: list[str] = []
    for key in parts:
        item = value.get(key)
        for text in item if isinstance(item, list) else [item]:
            if isinstance(text, str) and text:
                found.append(text)
    return found


def _date_values(value: Any) -> list[str | tuple[str | None, str | None]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        if "start" in value or "end" in value:  # Period
            start, end = value.get("start"), value.get("end")
            return [(_str_or_none(start), _str_or_none(end))]
        if "event" in value:  # Timing
            return [e for e in value.get("event") or () if isinstance(e, str)]
    return []


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _date_entries(
    param: SearchParam, value: str | tuple[str | None, str | None]
) -> Iterable[IndexEntry]:
    if param.phi:
        # blind-indexable canonical strings (a Period's start stands for a PHI date)
        text = value[0] if isinstance(value, tuple) else value
        keys = _date_keys(text) if text else None
        if keys:
            yield IndexEntry(param.code, "date", keys, True)
        return
    if isinstance(value, tuple):  # Period: open ends are unbounded
        start, end = value
        start_bounds = _parse_date(start) if start else (float("-inf"), float("-inf"))
        end_bounds = _parse_date(end) if end else (float("inf"), float("inf"))
        if start_bounds is None or end_bounds is None:
            return  # malformed (cannot happen for validated resources): index nothing
        yield IndexEntry(param.code, "date", (start_bounds[0], end_bounds[1]), False)
        return
    bounds = _parse_date(value)
    if bounds is not None:
        yield IndexEntry(param.code, "date", bounds, False)


def _reference(value: Any, resolve_is: str | None) -> tuple[str | None, str] | None:
    if not isinstance(value, Mapping):
        return None
    ref = value.get("reference")
    declared = value.get("type") if isinstance(value.get("type"), str) else None
    if not isinstance(ref, str) or not ref or ref.startswith("#"):
        return None  # no literal reference, or a contained resource
    relative = parse_relative_reference(ref)
    if relative is not None:
        if resolve_is and relative[0] != resolve_is:
            return None
        return relative
    if resolve_is:
        # `.where(resolve() is X)` without a resolver: keep an absolute URL only when it
        # ends in /X/<id>, a urn: reference only when its declared type is absent or X
        if ref.startswith("urn:"):
            if declared not in (None, resolve_is):
                return None
        else:
            absolute = split_absolute_reference(ref)
            if absolute is None or absolute[1] != resolve_is:
                return None
    return (None, ref)


# --- tokens ------------------------------------------------------------------------------


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def token_keys(system: str | None, code: str | None) -> tuple[str, ...]:
    """Match keys of an indexed token: ``system|code``, ``system|`` and ``code`` for a coded
    value with a system; ``|code`` and ``code`` without one. ``|`` and ``\\`` inside the parts
    are escaped so that different (system, code) pairs never share a key."""
    keys: list[str] = []
    if system and code:
        keys += [f"{_escape(system)}|{_escape(code)}", f"{_escape(system)}|", _escape(code)]
    elif code:
        keys += [f"|{_escape(code)}", _escape(code)]
    elif system:
        keys.append(f"{_escape(system)}|")
    return tuple(keys)


def token_search_key(system: str | None, code: str | None) -> str:
    """The single key to look up for a parsed token search (`parse_token_search` output):
    (None, c) -> any system; ("", c) -> no system; (s, None) -> any code in s."""
    if code is None:
        if not system:
            raise SearchParameterError()
        return f"{_escape(system)}|"
    if system is None:
        return _escape(code)
    return f"{_escape(system)}|{_escape(code)}"


def split_search_values(value: str) -> list[str]:
    """Split a search value at unescaped commas (FHIR OR-lists); escapes are kept for the
    per-value parsers."""
    _check_search_text(value)
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_token_search(value: str) -> tuple[str | None, str | None]:
    """Parse a token search value into (system, code).

    ``code`` -> (None, code): any system; ``system|code`` -> (system, code); ``|code`` ->
    ("", code): explicitly no system; ``system|`` -> (system, None). FHIR escapes (``\\|``,
    ``\\,``, ``\\$``, ``\\\\``) are honoured. SearchParameterError for empty or malformed input.
    """
    _check_search_text(value)
    parts: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise SearchParameterError()
            current.append(nxt)
        elif ch == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    if len(parts) == 1:
        if not parts[0]:
            raise SearchParameterError()
        return None, parts[0]
    if len(parts) != 2 or not (parts[0] or parts[1]):
        raise SearchParameterError()
    system, code = parts
    return system, (code or None)


def _check_search_text(value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_SEARCH_VALUE:
        raise SearchParameterError()
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise SearchParameterError()


# --- dates -------------------------------------------------------------------------------

_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+\- ]\d{2}:\d{2})?)?)?)?$",
    re.ASCII,  # \d must not match other scripts' digits (int() would accept them)
)
_MIN_WIDTH = 1e-6  # finer fractions than a microsecond are below float resolution here


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (any year; no datetime,
    which stops at 9999 and would fail on the upper bound of year 9999)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _parse_date(text: str | None) -> tuple[float, float] | None:
    """[low, high) epoch seconds of a FHIR date/dateTime/instant (or search value without
    prefix) at its precision; None when malformed. No timezone = UTC. A space in place of the
    ``+`` of an offset is accepted: an unencoded ``+`` in a query string decodes as a space."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    match = _DATE.fullmatch(text)
    if not match:
        return None
    g = match.groupdict()
    year = int(g["y"])
    month = int(g["m"]) if g["m"] else 1
    day = int(g["d"]) if g["d"] else 1
    if year < 1 or not 1 <= month <= 12 or not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    if g["H"] is None:  # date precision: a whole year, month or day, in UTC
        low_day = _days_from_civil(year, month, day)
        if g["d"]:
            high_day = low_day + 1
        elif g["m"]:
            high_day = _days_from_civil(year + month // 12, month % 12 + 1, 1)
        else:
            high_day = _days_from_civil(year + 1, 1, 1)
        return float(low_day * 86400), float(high_day * 86400)
    hour, minute = int(g["H"]), int(g["M"])
    second = int(g["S"]) if g["S"] else 0
    if hour > 23 or minute > 59 or second > 60:  # 60: FHIR allows a leap second
        return None
    offset = 0
    tz = g["tz"]
    if tz and tz != "Z":
        tz_hours, tz_minutes = int(tz[1:3]), int(tz[4:6])
        if tz_hours > 14 or tz_minutes > 59:
            return None
        offset = (tz_hours * 3600 + tz_minutes * 60) * (-1 if tz[0] == "-" else 1)
    low = float(_days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second)
    if g["f"]:
        low += int(g["f"]) / 10 ** len(g["f"])
        width = max(10.0 ** -len(g["f"]), _MIN_WIDTH)
    elif g["S"]:
        width = 1.0
    else:
        width = 60.0
    low -= offset
    return low, low + width


def _date_keys(text: str) -> tuple[str, ...] | None:
    """("YYYY", "YYYY-MM", "YYYY-MM-DD") up to the value's precision (dates as written, no
    timezone conversion), or None when malformed."""
    if _parse_date(text) is None:
        return None
    date = text.split("T", 1)[0]
    keys = [date[:4]]
    if len(date) >= 7:
        keys.append(date[:7])
    if len(date) >= 10:
        keys.append(date[:10])
    return tuple(keys)


def date_range(value: str) -> tuple[float, float]:
    """[low, high) UTC epoch seconds covered by a FHIR date/dateTime/instant at its
    precision; SearchParameterError when malformed."""
    bounds = _parse_date(value)
    if bounds is None:
        raise SearchParameterError()
    return bounds


def parse_date_search(value: str) -> tuple[str, float, float]:
    """Parse a date search value: optional prefix (eq ne lt gt le ge sa eb ap; default eq)
    followed by YYYY, YYYY-MM, YYYY-MM-DD or a dateTime with optional seconds, fraction and
    timezone. Returns (prefix, low, high) with [low, high) the value's range in UTC epoch
    seconds; SearchParameterError (generic message) for anything malformed."""
    _check_search_text(value)
    prefix = "eq"
    if value[:2] in DATE_PREFIXES:
        prefix, value = value[:2], value[2:]
    bounds = _parse_date(value)
    if bounds is None:
        raise SearchParameterError()
    return prefix, bounds[0], bounds[1]


def phi_date_search_key(value: str) -> str:
    """The blind-index key for an equality search on a PHI date parameter (birthdate):
    ``1980``, ``1980-02`` or ``1980-02-03`` (optionally prefixed ``eq``). Other prefixes and
    time precision cannot be answered from blind indexes: SearchParameterError."""
    _check_search_text(value)
    if value.startswith("eq"):
        value = value[2:]
    if "T" in value or len(value) not in (4, 7, 10):
        raise SearchParameterError("Only equality on a date (year, month or day) is supported")
    keys = _date_keys(value)
    if keys is None:
        raise SearchParameterError()
    return keys[-1]

"""Access to the official FHIR R4 definitions shipped in `carevault/fhir/data/`.

The Patient CompartmentDefinition and the SearchParameter bundle are the source of truth for
"which patient does this resource belong to" and "where does a search parameter's value live".
This module loads them once (importlib.resources, so it works from a wheel as well as from a
checkout), keeps only the fields carevault needs, and splits the shared multi-resource FHIRPath
expressions (``"AllergyIntolerance.patient | CarePlan.subject.where(...) | ..."``) into the
part(s) for one resource type.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

COMPARTMENT_FILE = "compartmentdefinition-patient.json"
SEARCH_PARAMETERS_FILE = "search-parameters.json"

# Search parameters defined on these bases apply to every resource type.
ABSTRACT_BASES = ("Resource", "DomainResource")


class DefinitionError(RuntimeError):
    """The shipped definition files are missing or do not say what carevault relies on."""


@dataclass(frozen=True, slots=True)
class SearchParameterDefinition:
    """One official SearchParameter, reduced to what carevault uses."""

    url: str
    code: str
    type: str  # FHIR search-param-type: token, string, date, reference, ...
    bases: tuple[str, ...]
    expression: str  # the whole official expression (all bases)
    targets: tuple[str, ...]  # reference targets; empty for other types

    def expressions_for(self, resource_type: str) -> tuple[str, ...]:
        """The parts of `expression` that apply to `resource_type`.

        Official expressions shared by several bases are unions, one part per base; a part
        belongs to a type when its path starts with that type (``"(Type.x.ofType(Y))"`` with its
        outer parentheses removed). For parameters defined on Resource/DomainResource the parts
        start with that abstract type and apply to every resource type.
        """
        wanted = (resource_type, *ABSTRACT_BASES)
        return tuple(part for part in split_union(self.expression) if root_type(part) in wanted)


def _read_json(name: str) -> Any:
    try:
        text = resources.files("carevault.fhir").joinpath("data").joinpath(name).read_text("utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise DefinitionError(f"FHIR definition file {name} is missing") from exc
    return json.loads(text)


@cache
def compartment_params() -> MappingProxyType[str, tuple[str, ...]]:
    """Patient compartment: resource type -> the search parameter codes that link it."""
    data = _read_json(COMPARTMENT_FILE)
    if data.get("resourceType") != "CompartmentDefinition" or data.get("code") != "Patient":
        raise DefinitionError("the compartment file is not the Patient CompartmentDefinition")
    table: dict[str, tuple[str, ...]] = {}
    for entry in data.get("resource", []):
        params = tuple(entry.get("param", ()))
        if params:
            table[entry["code"]] = params
    return MappingProxyType(table)


@cache
def search_parameters() -> MappingProxyType[tuple[str, str], SearchParameterDefinition]:
    """(base type, code) -> official definition, for every base of every SearchParameter."""
    data = _read_json(SEARCH_PARAMETERS_FILE)
    if data.get("resourceType") != "Bundle":
        raise DefinitionError("the search parameter file is not a Bundle")
    table: dict[tuple[str, str], SearchParameterDefinition] = {}
    for entry in data.get("entry", []):
        res = entry.get("resource") or {}
        if res.get("resourceType") != "SearchParameter" or not res.get("expression"):
            continue  # e.g. _text/_content: no expression, nothing to evaluate
        definition = SearchParameterDefinition(
            url=res["url"],
            code=res["code"],
            type=res["type"],
            bases=tuple(res.get("base", ())),
            expression=res["expression"],
            targets=tuple(res.get("target", ())),
        )
        for base in definition.bases:
            # first definition wins; the official bundle has one per (base, code)
            table.setdefault((base, definition.code), definition)
    return MappingProxyType(table)


def search_parameter(resource_type: str, code: str) -> SearchParameterDefinition:
    """The official definition of `code` on `resource_type` (falling back to Resource and
    DomainResource for the common parameters such as ``_id``); DefinitionError if none."""
    table = search_parameters()
    for base in (resource_type, *ABSTRACT_BASES):
        found = table.get((base, code))
        if found is not None:
            return found
    raise DefinitionError(f"no official search parameter {code!r} for {resource_type}")


def split_union(expression: str) -> list[str]:
    """Split a FHIRPath expression at its top-level ``|`` operators (not inside parentheses
    or string literals), stripping whitespace and one level of enclosing parentheses."""
    parts: list[str] = []
    depth = 0
    quoted = False
    current: list[str] = []
    for ch in expression:
        if ch == "'":
            quoted = not quoted
        elif not quoted:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif ch == "|" and depth == 0:
                parts.append(_unwrap("".join(current)))
                current = []
                continue
        current.append(ch)
    parts.append(_unwrap("".join(current)))
    return [p for p in parts if p]


def _unwrap(part: str) -> str:
    part = part.strip()
    while part.startswith("(") and part.endswith(")") and _balanced(part[1:-1]):
        part = part[1:-1].strip()
    return part


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


_ROOT = re.compile(r"[A-Z][A-Za-z]*")


def root_type(part: str) -> str | None:
    """The resource type an expression part starts with (``"Observation.code"`` ->
    ``"Observation"``), or None when it does not start with a type name."""
    match = _ROOT.match(part)
    return match.group(0) if match else None

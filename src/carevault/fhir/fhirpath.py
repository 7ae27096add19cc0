"""FHIRPath evaluation of the official search-parameter expressions, compiled once.

Search parameters and compartment links are defined by FHIRPath expressions such as
``Observation.effective``, ``(MedicationRequest.medication.ofType(CodeableConcept))`` or
``Observation.subject.where(resolve() is Patient)``. `compile_path` turns one expression (one
part of an official union, see `definitions.split_union`) into a `PathExpression` that is
evaluated with fhirpathpy (R4 model, so choice elements like ``effective[x]`` resolve) and cached.

Two things fhirpathpy cannot do, handled here and documented because they change meaning:

* ``resolve()`` needs a resolver (a server round-trip). We never resolve: a trailing
  ``.where(resolve() is X)`` is removed from the evaluated path and returned as
  `PathExpression.resolve_is`, and the caller decides from the reference *text* whether it
  points at an X (see `compartment.reference_target`).
* A path rooted at an abstract type (``Resource.id``, ``Resource.meta.lastUpdated``) evaluates
  to nothing in fhirpathpy, because it does not know that a Patient is a Resource; we root such
  paths at the concrete resource type instead.

If fhirpathpy cannot compile or evaluate an expression, a small path walker takes over. It
understands exactly the subset the official expressions we use are written in: dotted element
names (with ``[x]`` choice elements found by prefix, e.g. ``effective`` -> ``effectiveDateTime``),
``ofType(T)`` and ``where(element = 'literal')``. Anything else makes the walker unavailable and
evaluation raises `FhirPathError`, so that callers fail closed instead of silently dropping a
compartment link.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import fhirpathpy
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as _fhirpath_models

from carevault.fhir.definitions import ABSTRACT_BASES, root_type

_R4_MODEL = _fhirpath_models["r4"]

# FHIR primitive type names (lower camel case); choice-element suffixes map back to these.
PRIMITIVE_TYPES = frozenset(
    {
        "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
        "instant", "integer", "markdown", "oid", "positiveInt", "string", "time",
        "unsignedInt", "uri", "url", "uuid", "xhtml",
    }
)  # fmt: skip

_RESOLVE_FILTER = re.compile(
    r"^(?P<path>.+)\.where\(\s*resolve\(\)\s+is\s+(?P<type>[A-Z][A-Za-z]*)\s*\)$"
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OF_TYPE = re.compile(r"^ofType\(\s*(?P<type>[A-Za-z][A-Za-z0-9]*)\s*\)$")
_WHERE_EQ = re.compile(
    r"^where\(\s*(?P<name>[A-Za-z][A-Za-z0-9]*)\s*=\s*'(?P<value>[^'\\]*)'\s*\)$"
)


class FhirPathError(Exception):
    """An expression could be evaluated neither by fhirpathpy nor by the fallback walker."""


@dataclass(frozen=True, slots=True)
class Node:
    """One value an expression selected: its FHIR type name when known (``"Reference"``,
    ``"CodeableConcept"``, ``"dateTime"``, ...; None when unknown) and its JSON value."""

    type: str | None
    value: Any


@dataclass(frozen=True, slots=True)
class _Step:
    kind: str  # "child" | "of_type" | "where_eq"
    name: str
    value: str = ""


@dataclass(frozen=True, slots=True)
class PathExpression:
    """A compiled expression part: evaluate it with `evaluate(resource)`."""

    source: str  # the official expression part
    path: str  # what is evaluated: `source` without the resolve() filter, concrete root
    resolve_is: str | None  # X of a trailing `.where(resolve() is X)`, else None
    _compiled: Callable[..., list[Any]] | None
    _steps: tuple[_Step, ...] | None

    @property
    def uses_fallback(self) -> bool:
        """True when fhirpathpy could not compile the path and the walker is used."""
        return self._compiled is None

    def evaluate(self, resource: Mapping[str, Any]) -> list[Node]:
        """The nodes the path selects in `resource` (a FHIR JSON dict); FhirPathError if it
        cannot be evaluated at all."""
        if self._compiled is not None:
            try:
                raw = self._compiled(resource)
            except Exception:  # noqa: BLE001 - any engine failure: try the walker
                raw = None
            if raw is not None:
                return _from_fhirpathpy(raw)
        if self._steps is not None:
            return walk(self._steps, resource)
        raise FhirPathError("expression could not be evaluated")


@lru_cache(maxsize=4096)
def compile_path(expression: str, resource_type: str | None = None) -> PathExpression:
    """Compile one expression part (cached). `resource_type` roots paths written against
    Resource/DomainResource at the concrete type (see the module docstring)."""
    path = expression.strip()
    resolve_is = None
    match = _RESOLVE_FILTER.fullmatch(path)
    if match:
        path, resolve_is = match.group("path").strip(), match.group("type")
    root = root_type(path)
    if resource_type and root in ABSTRACT_BASES:
        path = resource_type + path[len(root) :]
    try:
        compiled = fhirpathpy.compile(path, model=_R4_MODEL, options={"returnRawData": True})
    except Exception:  # noqa: BLE001 - the parser raises assorted exception types
        compiled = None
    steps = parse_steps(path)
    if compiled is None and steps is None:
        raise FhirPathError("expression is not supported")
    return PathExpression(expression, path, resolve_is, compiled, steps)


def _from_fhirpathpy(raw: Iterable[Any]) -> list[Node]:
    nodes: list[Node] = []
    for item in raw:
        if isinstance(item, ResourceNode):
            value = item.data
            type_name = _type_from_node_path(item.path)
        else:
            value, type_name = item, None
        if value is None:
            continue  # a primitive that has only an extension (`_field`) has no value
        nodes.append(Node(type_name, value))
    return nodes


def _type_from_node_path(path: str | None) -> str | None:
    if not path:
        return None
    if path.startswith("System."):
        system = path[len("System.") :]
        return system[:1].lower() + system[1:]
    if "." in path:
        return None  # a backbone element such as "Observation.component"
    return path


# --- fallback walker ---------------------------------------------------------------------


def parse_steps(path: str) -> tuple[_Step, ...] | None:
    """Parse `path` into walker steps, or None when it uses anything beyond the subset the
    walker understands (dotted names, ``ofType(T)``, ``where(name = 'literal')``)."""
    tokens = _split_dots(path)
    if not tokens:
        return None
    steps: list[_Step] = []
    for index, token in enumerate(tokens):
        if _IDENT.fullmatch(token):
            if index == 0 and token[0].isupper():
                steps.append(_Step("root", token))
            else:
                steps.append(_Step("child", token))
            continue
        match = _OF_TYPE.fullmatch(token)
        if match:
            steps.append(_Step("of_type", match.group("type")))
            continue
        match = _WHERE_EQ.fullmatch(token)
        if match:
            steps.append(_Step("where_eq", match.group("name"), match.group("value")))
            continue
        return None
    return tuple(steps)


def _split_dots(path: str) -> list[str]:
    tokens: list[str] = []
    depth = 0
    quoted = False
    current: list[str] = []
    for ch in path:
        if ch == "'":
            quoted = not quoted
        elif not quoted:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif ch == "." and depth == 0:
                tokens.append("".join(current).strip())
                current = []
                continue
        current.append(ch)
    tokens.append("".join(current).strip())
    return tokens if all(tokens) else []


def walk(steps: Iterable[_Step], resource: Mapping[str, Any]) -> list[Node]:
    """Evaluate parsed steps over a FHIR JSON dict (the documented fallback)."""
    nodes = [Node(resource.get("resourceType"), resource)]
    for step in steps:
        if step.kind == "root":
            # `Patient.name` on a Patient selects its names; on anything else, nothing
            nodes = [n for n in nodes if n.type == step.name]
        elif step.kind == "child":
            nodes = [child for n in nodes for child in _children(n, step.name)]
        elif step.kind == "of_type":
            nodes = [n for n in nodes if n.type == step.name]
        else:  # where_eq
            nodes = [
                n
                for n in nodes
                if isinstance(n.value, Mapping) and n.value.get(step.name) == step.value
            ]
    return nodes


def _children(node: Node, name: str) -> list[Node]:
    value = node.value
    if not isinstance(value, Mapping):
        return []
    if name in value:
        return [Node(None, v) for v in _as_list(value[name]) if v is not None]
    # a choice element `name[x]`: the key is name + a type name starting with a capital
    found: list[Node] = []
    for key, child in value.items():
        if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
            suffix = key[len(name) :]
            lowered = suffix[:1].lower() + suffix[1:]
            type_name = lowered if lowered in PRIMITIVE_TYPES else suffix
            found.extend(Node(type_name, v) for v in _as_list(child) if v is not None)
    return found


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]

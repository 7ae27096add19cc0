"""The Patient compartment: which patient(s) a resource belongs to.

This decides whose data key encrypts a resource and which patient's access rules apply, so it
is computed from the official definitions, not from a hand-written table: the Patient
CompartmentDefinition names, per resource type, the search parameters that link a resource to
a patient (Observation: subject, performer; Claim: patient, payee; ...), and each parameter's
official FHIRPath expression (search-parameters.json) says where that link lives
(``Observation.subject``, ``Account.subject.where(resolve() is Patient)``, ...).

A resource is in a patient's compartment when one of those expressions selects a reference to
that Patient. We have no resolver, so "points to a Patient" is decided from the reference
itself (`reference_target`):

* ``"Patient/<id>"`` (relative, optionally ``/_history/<v>``) -> Patient <id>;
* an absolute URL ending in ``/Patient/<id>`` (optionally ``/_history/<v>``) -> Patient <id>,
  for any base unless `PatientCompartment(local_bases=...)` restricts the accepted bases;
* ``{"type": "Patient", "reference": "<id>"}`` (a bare id typed as Patient) -> Patient <id>;
* ``"urn:uuid:..."`` / ``"urn:oid:..."`` (a transaction-local placeholder), when the Reference's
  ``type`` is absent or ``"Patient"``, is *unresolved*: `patient_references` returns it so that
  the transaction can map it to a real id and ask again;
* contained references (``"#id"``), references to other types, logical references (only an
  ``identifier``) and anything else are ignored.

Every linking expression is filtered to Patient targets, not only those written with
``.where(resolve() is Patient)``: the compartment is by definition about references "to the
patient resource that defines the compartment", so ``Observation.subject`` pointing at a Group
does not put the Observation in any patient's compartment.

A Patient belongs to its own compartment (its own `id`). The definition also links a Patient
through ``Patient.link.other``; we deliberately do *not* follow it: linking patients is a merge
decision, and honouring a client-written link would let any writer attach one patient's record
to another patient's compartment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from carevault.fhir.definitions import compartment_params, search_parameter
from carevault.fhir.fhirpath import PathExpression, compile_path

PATIENT = "Patient"

# FHIR id: 1-64 of [A-Za-z0-9-.]
_ID = r"[A-Za-z0-9\-.]{1,64}"
_TYPE = r"[A-Z][A-Za-z]{0,63}"
_RELATIVE = re.compile(rf"^(?P<type>{_TYPE})/(?P<id>{_ID})(?:/_history/{_ID})?$")
_TYPE_ONLY = re.compile(rf"^{_TYPE}$")
_BARE_ID = re.compile(rf"^{_ID}$")
_PLACEHOLDER = re.compile(r"^urn:(?:uuid|oid):\S+$")


@dataclass(frozen=True, slots=True)
class ReferenceTarget:
    """What a Reference points at, as far as its text says: `type`/`id` for a resolved
    literal reference, or `placeholder` for a transaction-local ``urn:`` reference."""

    type: str | None
    id: str | None
    placeholder: str | None = None


def parse_relative_reference(reference: str) -> tuple[str, str] | None:
    """(type, id) of a relative literal reference ``"Type/id"`` (a ``/_history/<v>`` suffix
    is dropped), else None."""
    match = _RELATIVE.fullmatch(reference)
    return (match.group("type"), match.group("id")) if match else None


def reference_target(
    reference: Mapping[str, Any], local_bases: tuple[str, ...] | None = None
) -> ReferenceTarget | None:
    """Classify a FHIR Reference dict (see the module docstring); None when it cannot point
    at a resource on this server (contained, logical-only, foreign absolute URL, malformed)."""
    ref = reference.get("reference")
    declared = reference.get("type")
    if not isinstance(ref, str) or not ref:
        return None
    if ref.startswith("#"):
        return None  # contained resource: part of this resource, not a link
    match = _RELATIVE.fullmatch(ref)
    if match:
        return ReferenceTarget(match.group("type"), match.group("id"))
    if _PLACEHOLDER.fullmatch(ref):
        return ReferenceTarget(declared if isinstance(declared, str) else None, None, ref)
    absolute = split_absolute_reference(ref)
    if absolute is not None:
        base, target_type, target_id = absolute
        if local_bases is not None and base not in local_bases:
            return None
        return ReferenceTarget(target_type, target_id)
    if isinstance(declared, str) and _BARE_ID.fullmatch(ref):
        return ReferenceTarget(declared, ref)
    return None


def split_absolute_reference(ref: str) -> tuple[str, str, str] | None:
    """(base, type, id) of an absolute reference ``<http(s) base>/<Type>/<id>[/_history/<v>]``,
    else None. Split on "/" rather than matched with one regex: an unanchored base followed by a
    type/id pattern backtracks quadratically on long crafted strings."""
    if not ref.startswith(("http://", "https://")):
        return None
    parts = ref.split("/")
    if len(parts) >= 7 and parts[-2] == "_history" and _BARE_ID.fullmatch(parts[-1]):
        parts = parts[:-2]
    if len(parts) < 5:  # "https:", "", host, Type, id
        return None
    target_type, target_id = parts[-2], parts[-1]
    if not (_TYPE_ONLY.fullmatch(target_type) and _BARE_ID.fullmatch(target_id)):
        return None
    return "/".join(parts[:-2]).rstrip("/"), target_type, target_id


class PatientCompartment:
    """The Patient compartment as data, with membership evaluation (thread-safe, immutable)."""

    def __init__(self, local_bases: Iterable[str] | None = None) -> None:
        """`local_bases`: when given, absolute references count only when they start with one
        of these base URLs (e.g. ``"https://ehr.example/fhir"``); None accepts any base."""
        self._local_bases = (
            None if local_bases is None else tuple(b.rstrip("/") for b in local_bases)
        )
        self._params = dict(compartment_params())
        self._paths: dict[str, tuple[PathExpression, ...]] = {}
        for resource_type, params in self._params.items():
            paths: list[PathExpression] = []
            for code in params:
                definition = search_parameter(resource_type, code)
                for part in definition.expressions_for(resource_type):
                    paths.append(compile_path(part, resource_type))
            self._paths[resource_type] = tuple(paths)

    def params_for(self, resource_type: str) -> tuple[str, ...]:
        """The compartment's search parameter codes for `resource_type` (empty if none)."""
        return self._params.get(resource_type, ())

    def expressions_for(self, resource_type: str) -> tuple[str, ...]:
        """The official FHIRPath expression parts behind `params_for(resource_type)`."""
        return tuple(p.source for p in self._paths.get(resource_type, ()))

    def in_compartment_types(self) -> frozenset[str]:
        """Resource types that can belong to a Patient compartment (including Patient)."""
        return frozenset(self._params) | {PATIENT}

    def patient_ids(self, resource: Mapping[str, Any]) -> set[str]:
        """Ids of the Patients `resource` belongs to; for a Patient, its own id (if it has
        one yet). Unresolved ``urn:`` references are not included: see `patient_references`."""
        resource_type = resource.get("resourceType")
        if resource_type == PATIENT:
            own = resource.get("id")
            return {own} if isinstance(own, str) and own else set()
        ids: set[str] = set()
        for target in self._targets(resource):
            if target.placeholder is None and target.type == PATIENT and target.id:
                ids.add(target.id)
        return ids

    def patient_references(self, resource: Mapping[str, Any]) -> set[str]:
        """Unresolved references (``urn:uuid:...``, ``urn:oid:...``) in the compartment links
        of `resource` that may denote a Patient (their Reference ``type`` is absent or
        Patient); a transaction maps them to ids and then calls `patient_ids` again."""
        if resource.get("resourceType") == PATIENT:
            return set()
        return {
            target.placeholder
            for target in self._targets(resource)
            if target.placeholder is not None and target.type in (None, PATIENT)
        }

    def _targets(self, resource: Mapping[str, Any]) -> list[ReferenceTarget]:
        targets: list[ReferenceTarget] = []
        resource_type = resource.get("resourceType")
        if not isinstance(resource_type, str):
            return targets
        for path in self._paths.get(resource_type, ()):
            for node in path.evaluate(resource):
                if not isinstance(node.value, Mapping):
                    continue
                target = reference_target(node.value, self._local_bases)
                if target is not None:
                    targets.append(target)
        return targets

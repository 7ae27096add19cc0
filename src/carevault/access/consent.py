"""A patient's FHIR Consent resources as deny rules the decision point enforces.

Only `deny` provisions are enforced (a permit never widens what the policy allows). Each deny
provision, at any nesting depth, becomes one `DenyRule` on its own criteria: actor (a
Practitioner or Organization reference), purpose of use, resource class (resource type codes)
and security label; a criterion it leaves out matches everything, so a bare deny closes the
record to everyone but the patient. Nested provisions are read as deny rules of their own
rather than as exceptions of their parent: when in doubt, the door stays shut.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from carevault.fhir.search_params import SearchParameterError, parse_date_search

MAX_DEPTH = 8  # nested provisions followed; deeper ones are read as a bare deny


@dataclass(frozen=True, slots=True)
class DenyRule:
    actors: frozenset[str] = frozenset()  # "Practitioner/<id>", "Organization/<id>"
    purposes: frozenset[str] = frozenset()
    resource_types: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()
    start: float = float("-inf")
    end: float = float("inf")

    def matches(
        self,
        *,
        actor_refs: frozenset[str],
        purpose: str,
        resource_type: str,
        labels: frozenset[str],
        now: float,
    ) -> bool:
        return (
            self.start <= now < self.end
            and (not self.actors or bool(self.actors & actor_refs))
            and (not self.purposes or purpose in self.purposes)
            and (not self.resource_types or resource_type in self.resource_types)
            and (not self.labels or bool(self.labels & labels))
        )


def deny_rules(consent: Mapping[str, Any]) -> tuple[DenyRule, ...]:
    """The deny rules of one Consent; none unless it is active."""
    if consent.get("resourceType") != "Consent" or consent.get("status") != "active":
        return ()
    provision = consent.get("provision")
    if not isinstance(provision, Mapping):
        return ()
    return tuple(_walk(provision, 0))


def _walk(provision: Mapping[str, Any], depth: int) -> Iterable[DenyRule]:
    if depth >= MAX_DEPTH:
        yield DenyRule()
        return
    if provision.get("type") == "deny":
        yield _rule(provision)
    for nested in _list(provision.get("provision")):
        if isinstance(nested, Mapping):
            yield from _walk(nested, depth + 1)


def _rule(provision: Mapping[str, Any]) -> DenyRule:
    actors = frozenset(
        ref
        for actor in _list(provision.get("actor"))
        if isinstance(actor, Mapping)
        for ref in [_reference(actor.get("reference"))]
        if ref
    )
    if _list(provision.get("actor")) and not actors:
        actors = frozenset({"*unresolvable*"})  # names actors we can't read: none of ours
    start, end = _period(provision.get("period"))
    return DenyRule(
        actors=actors,
        purposes=_codes(provision.get("purpose")),
        resource_types=_codes(provision.get("class")),
        labels=_codes(provision.get("securityLabel")),
        start=start,
        end=end,
    )


def _reference(value: Any) -> str | None:
    """``Type/id`` of a reference, also from a versioned (``.../_history/n``) or absolute one:
    a deny must not be lost to the way its actor was written (it can only deny more)."""
    if not isinstance(value, Mapping):
        return None
    ref = value.get("reference")
    if not isinstance(ref, str):
        return None
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-2] or not parts[-1]:
        return None
    return f"{parts[-2]}/{parts[-1]}"


def _codes(codings: Any) -> frozenset[str]:
    return frozenset(
        c["code"]
        for c in _list(codings)
        if isinstance(c, Mapping) and isinstance(c.get("code"), str)
    )


def _period(period: Any) -> tuple[float, float]:
    if not isinstance(period, Mapping):
        return float("-inf"), float("inf")
    start = _instant(period.get("start"), low=True)
    end = _instant(period.get("end"), low=False)
    return start, end


def _instant(value: Any, *, low: bool) -> float:
    if not isinstance(value, str):
        return float("-inf") if low else float("inf")
    try:
        _prefix, lo, hi = parse_date_search(value)
    except SearchParameterError:
        return float("-inf") if low else float("inf")  # unreadable bound: widest deny
    return lo if low else hi


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []

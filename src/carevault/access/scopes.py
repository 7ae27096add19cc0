"""SMART on FHIR scopes (v2 ``patient/Observation.rs``, ``user/*.cruds``, ``system/Patient.r``;
v1 ``.read`` / ``.write`` / ``.*``) as a grant of actions per resource type.

A scope can only narrow what the role allows: `decision.decide` permits an action only when
both the role and a scope allow it. Scopes this server does not understand grant nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# v2 letters in their required order; v1 suffixes mapped onto them
SCOPE_PATTERN = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{1,63})\."
    r"(?P<actions>c?r?u?d?s?|read|write|\*)$"
)
V1_LETTERS = {"read": "rs", "write": "cud", "*": "cruds"}
LETTERS = {"create": "c", "read": "r", "update": "u", "delete": "d", "search": "s"}


@dataclass(frozen=True, slots=True)
class ScopeGrant:
    context: str  # patient | user | system
    resource_type: str  # a type, or "*"
    letters: frozenset[str]


@dataclass(frozen=True, slots=True)
class Scopes:
    grants: tuple[ScopeGrant, ...]

    def granting_contexts(self, action: str, resource_type: str) -> frozenset[str]:
        """The contexts (patient, user, system) of the scopes that allow the action."""
        letter = LETTERS[action]
        return frozenset(
            g.context
            for g in self.grants
            if letter in g.letters and g.resource_type in ("*", resource_type)
        )

    @property
    def contexts(self) -> frozenset[str]:
        return frozenset(g.context for g in self.grants)


def parse_scopes(scopes: Iterable[str]) -> Scopes:
    grants = []
    for scope in scopes:
        match = SCOPE_PATTERN.fullmatch(scope)
        if match is None:
            continue  # openid, fhirUser, launch/..., or unknown: no resource access
        letters = V1_LETTERS.get(match["actions"], match["actions"])
        if not letters:
            continue  # "patient/Observation." grants nothing
        grants.append(ScopeGrant(match["context"], match["type"], frozenset(letters)))
    return Scopes(tuple(grants))

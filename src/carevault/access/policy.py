"""The access policy as data: per role, which actions on which resource classes, for which
patients, under which purposes of use. Loaded from TOML and validated at start-up
(`default_policy.toml`, or `Settings.access_policy_file`); a policy that names an unknown role,
class, type, purpose or label is refused before the server serves anything.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carevault.access.labels import ALL_LABELS
from carevault.fhir.compartment import PatientCompartment
from carevault.fhir.validation import supported_types
from carevault.identity.roles import Role

DEFAULT_POLICY = Path(__file__).with_name("default_policy.toml")

PURPOSES = frozenset({"TREAT", "ETREAT", "HPAYMT", "HOPERAT", "PUBHLTH"})
DEFAULT_PURPOSE = "TREAT"
ACTIONS = ("read", "search", "create", "update", "delete")

DEMOGRAPHICS = frozenset({"Patient", "RelatedPerson", "Person"})
ADMINISTRATIVE = frozenset(
    {
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "OrganizationAffiliation",
        "Location",
        "HealthcareService",
        "Endpoint",
    }
)
FINANCIAL = frozenset(
    {
        "Account",
        "ChargeItem",
        "Claim",
        "ClaimResponse",
        "Coverage",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "EnrollmentRequest",
        "EnrollmentResponse",
        "ExplanationOfBenefit",
        "Invoice",
        "PaymentNotice",
        "PaymentReconciliation",
    }
)
CLASSES = ("clinical", "demographics", "administrative", "financial", "consent", "reference")

PatientsMode = Literal["care", "organization", "own", "any", "none"]
# Roles that may never break the glass, whatever a policy file says.
NEVER_BREAK_GLASS = frozenset({Role.admin, Role.billing})


class RolePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    read: frozenset[str] = frozenset()
    search: frozenset[str] = frozenset()
    create: frozenset[str] = frozenset()
    update: frozenset[str] = frozenset()
    delete: frozenset[str] = frozenset()
    patients: PatientsMode = "none"
    purposes: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()
    label_grants: bool = False
    break_glass: bool = False
    redact: Mapping[str, frozenset[str]] = Field(default_factory=dict)

    @field_validator("read", "search", "create", "update", "delete")
    @classmethod
    def _known_targets(cls, value: frozenset[str]) -> frozenset[str]:
        for item in value:
            if item != "*" and item not in CLASSES and item not in supported_types():
                raise ValueError(f"{item!r} is neither a resource class nor a resource type")
        return value

    @field_validator("purposes")
    @classmethod
    def _known_purposes(cls, value: frozenset[str]) -> frozenset[str]:
        if unknown := value - PURPOSES:
            raise ValueError(f"unknown purposes of use: {sorted(unknown)}")
        return value

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, value: frozenset[str]) -> frozenset[str]:
        if unknown := value - ALL_LABELS:
            raise ValueError(f"unknown security labels: {sorted(unknown)}")
        return value

    @field_validator("redact")
    @classmethod
    def _known_redactions(cls, value: Mapping[str, frozenset[str]]) -> Mapping[str, frozenset[str]]:
        for resource_type in value:
            if resource_type not in supported_types():
                raise ValueError(f"redact names an unknown resource type {resource_type!r}")
        return value

    def allows(self, action: str, resource_type: str, resource_class: str) -> bool:
        granted: frozenset[str] = getattr(self, action)
        return "*" in granted or resource_type in granted or resource_class in granted


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    organization_boundary: bool = False
    denied_status: Literal[403, 404] = 404
    break_glass_overrides_labels: bool = False
    roles: Mapping[Role, RolePolicy]

    @model_validator(mode="after")
    def _never_break_glass(self) -> Policy:
        for role in NEVER_BREAK_GLASS:
            rules = self.roles.get(role)
            if rules is not None and rules.break_glass:
                raise ValueError(f"{role}: break_glass may never be granted to this role")
        return self

    @model_validator(mode="after")
    def _writes_are_reads(self) -> Policy:
        # Whoever may write a record must be able to read it back: the store answers a write
        # with the stored resource, which would otherwise leak what the role may not read.
        for role, rules in self.roles.items():
            for action in ("create", "update", "delete"):
                for item in getattr(rules, action):
                    if not (item in rules.read or "*" in rules.read or _within(item, rules.read)):
                        raise ValueError(f"{role}: {action} {item!r} without read of it")
        return self

    def for_role(self, role: str) -> RolePolicy | None:
        try:
            return self.roles.get(Role(role))
        except ValueError:
            return None


def _within(item: str, granted: frozenset[str]) -> bool:
    return item in supported_types() and resource_class(item) in granted


def load_policy(path: Path | None = None) -> Policy:
    with (path or DEFAULT_POLICY).open("rb") as handle:
        return Policy.model_validate(tomllib.load(handle))


@functools.cache
def _compartment_types() -> frozenset[str]:
    return PatientCompartment().in_compartment_types()


@functools.lru_cache(maxsize=512)
def resource_class(resource_type: str) -> str:
    if resource_type in DEMOGRAPHICS:
        return "demographics"
    if resource_type in ADMINISTRATIVE:
        return "administrative"
    if resource_type in FINANCIAL:
        return "financial"
    if resource_type == "Consent":
        return "consent"
    if resource_type in _compartment_types():
        return "clinical"
    return "reference"

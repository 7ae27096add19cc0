"""Sensitive security labels (`meta.security`) that hide a record from everyone who lacks an
explicit permission for that label.

Codes come from HL7 v3: the information-sensitivity policies of ActCode (PSY psychotherapy,
HIV, SUD substance use under 42 CFR Part 2, ETH substance abuse, SEX sexual and reproductive
health, ...) and the Confidentiality codes R (restricted) and V (very restricted). A label is
named here by its code alone (``"PSY"``, ``"R"``); the system must be the right one, so that a
local code that happens to read "R" does not count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from carevault.fhir.search_params import token_search_key

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"

SENSITIVE: Final[Mapping[str, frozenset[str]]] = {
    ACT_CODE: frozenset(
        {"PSY", "PSYTHPN", "HIV", "SUD", "ETH", "SEX", "STD", "SDV", "MST", "GDIS", "BH"}
    ),
    CONFIDENTIALITY: frozenset({"R", "V"}),
}
ALL_LABELS: Final[frozenset[str]] = frozenset().union(*SENSITIVE.values())


def sensitive_labels(resource: Mapping[str, Any]) -> frozenset[str]:
    """The sensitive label codes a resource carries in `meta.security`."""
    meta = resource.get("meta")
    security = meta.get("security") if isinstance(meta, Mapping) else None
    if not isinstance(security, list):
        return frozenset()
    return labels_of_codings(
        (c.get("system"), c.get("code")) for c in security if isinstance(c, Mapping)
    )


def labels_of_codings(codings: Iterable[tuple[Any, Any]]) -> frozenset[str]:
    return frozenset(
        code
        for system, code in codings
        if isinstance(system, str) and isinstance(code, str) and code in SENSITIVE.get(system, ())
    )


def index_keys(label: str) -> tuple[str, ...]:
    """The `_security` index keys (``system|code``) under which the store files a label."""
    return tuple(
        token_search_key(system, label) for system, codes in SENSITIVE.items() if label in codes
    )

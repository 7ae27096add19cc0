"""The one place FHIR routes ask whether a caller may act (replaced by access/ later).

Until the policy engine exists the rule is deliberately narrow: a valid access token of a
clinical staff role. Everyone else is refused before any record is looked up.
"""

from __future__ import annotations

from carevault.identity.principal import Principal
from carevault.identity.roles import Role

CLINICAL_STAFF = frozenset({Role.physician, Role.nurse})


def may_use_fhir(principal: Principal) -> bool:
    return bool(CLINICAL_STAFF.intersection(principal.roles))

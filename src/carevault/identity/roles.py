"""The fixed set of roles. Access control (later) gives each its permissions."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    admin = "admin"
    physician = "physician"
    nurse = "nurse"
    registrar = "registrar"
    billing = "billing"
    auditor = "auditor"
    patient = "patient"
    service = "service"


CLINICIAN_ROLES = frozenset({Role.physician, Role.nurse})

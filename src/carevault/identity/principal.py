"""`Principal`: who is calling, as the authenticate step hands it to everything after it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    client_id: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    amr: tuple[str, ...]
    auth_time: int
    session_id: str
    token_id: str
    token_expires_at: int
    acr: str | None = None
    patient: str | None = None  # SMART launch context: the patient `patient/` scopes reach

"""OAuth scopes as this server grants them: SMART App Launch 2 names (v1 names accepted and
rewritten to their v2 equivalents), which scopes a client may be given, and what each means in
plain language for the consent page.

A granted scope never gives more than the user's role: the access-control engine
(access/decision.py) intersects the two on every request.
"""

from __future__ import annotations

from collections.abc import Iterable

from carevault.access.scopes import SCOPE_PATTERN, V1_LETTERS

# Scopes without a resource: identity, launch context and refresh-token lifetime.
OPENID = "openid"
FHIR_USER = "fhirUser"
OFFLINE = "offline_access"
ONLINE = "online_access"
LAUNCH_PATIENT = "launch/patient"
CONTEXT_SCOPES = frozenset(
    {OPENID, FHIR_USER, "profile", OFFLINE, ONLINE, "launch", LAUNCH_PATIENT, "launch/encounter"}
)
MAX_SCOPE_CHARS = 2000
_V2_ORDER = "cruds"
_ACTION_WORDS = {
    "c": "create",
    "r": "read",
    "u": "update",
    "d": "delete",
    "s": "search",
}
_WHO = {
    "patient": "the selected patient's",
    "user": "every record you can reach:",
    "system": "any patient's (as a back-end service)",
}
_CONTEXT_WORDS = {
    OPENID: "Confirm who you are",
    FHIR_USER: "Know which person record (Patient or Practitioner) is yours",
    "profile": "See your user name",
    OFFLINE: "Keep access after you close the app, until you revoke it",
    ONLINE: "Keep access only while you use it (it asks again later)",
    "launch": "Know the context the app was launched in",
    LAUNCH_PATIENT: "Know which patient is selected",
    "launch/encounter": "Know which encounter is selected",
}


def split(scope: str | None) -> list[str]:
    """The distinct scopes of a space-separated string, in order."""
    return list(dict.fromkeys((scope or "").split()))


def normalize(scope: str) -> str | None:
    """The v2 form of one scope (`patient/Observation.read` -> `patient/Observation.rs`), the
    scope itself for a context scope, or None for anything this server does not grant."""
    if scope in CONTEXT_SCOPES:
        return scope
    match = SCOPE_PATTERN.fullmatch(scope)
    if match is None:
        return None
    letters = V1_LETTERS.get(match["actions"], match["actions"])
    if not letters:
        return None
    ordered = "".join(letter for letter in _V2_ORDER if letter in letters)
    return f"{match['context']}/{match['type']}.{ordered}"


def _parts(scope: str) -> tuple[str, str, frozenset[str]] | None:
    match = SCOPE_PATTERN.fullmatch(scope)
    if match is None:
        return None
    return match["context"], match["type"], frozenset(match["actions"])


def covered(scope: str, allowed: Iterable[str]) -> bool:
    """Whether the normalized `scope` is within one of the normalized `allowed` scopes (a
    wildcard type or more letters cover less)."""
    allowed = list(allowed)
    if scope in allowed:
        return True
    want = _parts(scope)
    if want is None:
        return False
    for other in allowed:
        have = _parts(other)
        if (
            have is not None
            and have[0] == want[0]
            and have[1] in ("*", want[1])
            and want[2] <= have[2]
        ):
            return True
    return False


def grantable(requested: str | None, allowed: Iterable[str]) -> list[str] | None:
    """The normalized requested scopes if every one is allowed, else None (invalid_scope)."""
    allowed_v2 = [s for s in (normalize(a) for a in allowed) if s is not None]
    granted = []
    for scope in split(requested):
        v2 = normalize(scope)
        if v2 is None or not covered(v2, allowed_v2):
            return None
        granted.append(v2)
    return list(dict.fromkeys(granted))


def resource_scopes(scopes: Iterable[str]) -> list[str]:
    return [s for s in scopes if _parts(s) is not None]


def describe(scope: str) -> str:
    """One line of plain language for the consent page."""
    if scope in _CONTEXT_WORDS:
        return _CONTEXT_WORDS[scope]
    parts = _parts(scope)
    if parts is None:
        return scope
    context, resource_type, letters = parts
    actions = [word for letter, word in _ACTION_WORDS.items() if letter in letters]
    what = "records of every kind" if resource_type == "*" else f"{resource_type} records"
    verbs = ", ".join(actions[:-1]) + (" and " if len(actions) > 1 else "") + actions[-1]
    return f"{verbs.capitalize()} {_WHO[context]} {what}"

"""SMART scopes (access/scopes.py): v2 letters, v1 suffixes, contexts; garbage grants nothing."""

from __future__ import annotations

import pytest

from carevault.access.scopes import LETTERS, ScopeGrant, parse_scopes

ALL = frozenset("cruds")


def letters(scope: str) -> frozenset[str] | None:
    grants = parse_scopes([scope]).grants
    assert len(grants) <= 1
    return grants[0].letters if grants else None


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("patient/Observation.rs", ScopeGrant("patient", "Observation", frozenset("rs"))),
        ("user/*.cruds", ScopeGrant("user", "*", ALL)),
        ("system/Patient.r", ScopeGrant("system", "Patient", frozenset("r"))),
        ("user/Encounter.c", ScopeGrant("user", "Encounter", frozenset("c"))),
        ("user/Encounter.ud", ScopeGrant("user", "Encounter", frozenset("ud"))),
        ("system/*.s", ScopeGrant("system", "*", frozenset("s"))),
    ],
)
def test_v2(scope: str, expected: ScopeGrant) -> None:
    assert parse_scopes([scope]).grants == (expected,)


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("patient/Observation.read", frozenset("rs")),
        ("user/Observation.write", frozenset("cud")),
        ("user/*.*", ALL),
        ("system/*.read", frozenset("rs")),
        ("patient/*.write", frozenset("cud")),
    ],
)
def test_v1_maps_onto_v2_letters(scope: str, expected: frozenset[str]) -> None:
    assert letters(scope) == expected


@pytest.mark.parametrize(
    "scope",
    [
        "openid",
        "fhirUser",
        "profile",
        "offline_access",
        "online_access",
        "launch",
        "launch/patient",
        "launch/encounter",
        "",
        " ",
        "user/Observation.",  # no letters
        "user/Observation",  # no permission part
        "user/Observation.sr",  # letters out of the v2 order
        "user/Observation.rr",  # repeated letter
        "user/Observation.x",
        "user/Observation.rsx",
        "user/Observation.READ",
        "user/Observation.Read",
        "user/Observation.rs?category=laboratory",  # finer-grained v2: not understood
        "user/observation.rs",  # not a resource type name
        "user/O.rs",  # too short to be a type
        "user/Obs1.rs",
        "User/Observation.rs",
        "practitioner/Observation.rs",
        "admin/*.cruds",
        "patient/*",
        "patient/**.rs",
        "patient//Observation.rs",
        "patient/Observation.rs ",
        " patient/Observation.rs",
        "patient/Observation.rs\n",
        "xpatient/Observation.rs",
        "patient/Observation.*.rs",
        "user/*.cruds/extra",
    ],
)
def test_garbage_grants_nothing(scope: str) -> None:
    scopes = parse_scopes([scope])
    assert scopes.grants == ()
    for action in LETTERS:
        assert scopes.granting_contexts(action, "Observation") == frozenset()


def test_a_bad_scope_does_not_spoil_the_good_ones() -> None:
    scopes = parse_scopes(["openid", "user/Observation.rr", "user/Observation.rs", "launch"])
    assert scopes.grants == (ScopeGrant("user", "Observation", frozenset("rs")),)


def test_granting_contexts() -> None:
    scopes = parse_scopes(
        ["patient/*.rs", "user/Observation.r", "system/Patient.cruds", "user/Encounter.s"]
    )
    assert scopes.granting_contexts("read", "Observation") == {"patient", "user"}
    assert scopes.granting_contexts("search", "Observation") == {"patient"}
    assert scopes.granting_contexts("read", "Patient") == {"patient", "system"}
    assert scopes.granting_contexts("delete", "Patient") == {"system"}
    assert scopes.granting_contexts("delete", "Observation") == frozenset()
    assert scopes.granting_contexts("search", "Encounter") == {"patient", "user"}
    assert scopes.granting_contexts("create", "Encounter") == frozenset()
    assert scopes.contexts == {"patient", "user", "system"}


def test_specific_type_does_not_grant_others() -> None:
    scopes = parse_scopes(["user/Observation.cruds"])
    for action in LETTERS:
        assert scopes.granting_contexts(action, "Observation") == {"user"}
        assert scopes.granting_contexts(action, "Condition") == frozenset()
        assert scopes.granting_contexts(action, "*") == frozenset()


@pytest.mark.parametrize("action", sorted(LETTERS))
def test_each_letter_grants_exactly_its_action(action: str) -> None:
    scopes = parse_scopes([f"user/Observation.{LETTERS[action]}"])
    for other in LETTERS:
        expected = {"user"} if other == action else frozenset()
        assert scopes.granting_contexts(other, "Observation") == expected


def test_no_scopes() -> None:
    scopes = parse_scopes([])
    assert scopes.grants == ()
    assert scopes.contexts == frozenset()


def test_accepts_any_iterable() -> None:
    assert parse_scopes(iter(["user/*.r"])).grants == (ScopeGrant("user", "*", frozenset("r")),)
    assert parse_scopes(("user/*.r", "user/*.r")).granting_contexts("read", "X") == {"user"}


def test_unknown_action_is_an_error_not_a_grant() -> None:
    with pytest.raises(KeyError):
        parse_scopes(["user/*.cruds"]).granting_contexts("patch", "Observation")

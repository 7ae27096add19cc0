"""`visibility` (what a search may return, for a whole type) agrees with `decide` for `read`.

For many generated requesters, records and consents (fixed seeds, `random.Random`), a record is
permitted by `decide(..., read, ...)` exactly when the `Visibility` of its type admits it, as
the `Visibility` docstring describes it (evaluated here by `admits`, a small independent
reading of that docstring). With several roles `visibility` keeps to the first role that may
read the type, so there it may only be narrower than `decide`, never wider.
"""

from __future__ import annotations

import random
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from carevault.access.consent import DenyRule
from carevault.access.decision import (
    BREAK_GLASS,
    Action,
    PatientFacts,
    Requester,
    Target,
    Visibility,
    decide,
    visibility,
)
from carevault.access.policy import DEFAULT_POLICY, PURPOSES, Policy, resource_class
from carevault.access.scopes import parse_scopes
from carevault.identity.roles import Role
from tests.access.support import NOW, boundary_policy, default_policy

INF = float("inf")

# patient id -> managingOrganization
UNIVERSE: Mapping[str, str | None] = {
    "pat-care": "org-9",
    "pat-care2": "org-1",
    "pat-self": "org-9",
    "pat-other": "org-9",
    "pat-org1": "org-1",
    "pat-org2": "org-2",
    "pat-noorg": None,
}
COMPARTMENT_TYPES = (
    "Observation",
    "Condition",
    "Immunization",
    "Encounter",
    "CareTeam",
    "Patient",
    "RelatedPerson",
    "Consent",
    "Claim",
    "AuditEvent",
)
OUTSIDE_TYPES = ("Practitioner", "Organization", "Location", "Medication", "ValueSet")
ROLES = [role.value for role in Role] + ["janitor"]
SCOPE_POOL = (
    "user/*.cruds",
    "user/*.cruds",
    "system/*.cruds",
    "patient/*.rs",
    "patient/*.read",
    "user/Observation.rs",
    "patient/Observation.read",
    "user/*.r",
    "user/*.s",
    "system/Patient.r",
    "user/Observation.write",
    "user/Encounter.read",
    "openid",
)
LABEL_POOL = ("PSY", "HIV", "R", "SUD", "ETH")
ACTORS = (
    frozenset(),
    frozenset({"Practitioner/prac-1"}),
    frozenset({"Organization/org-1"}),
    frozenset({"Practitioner/prac-9"}),
    frozenset({"*unresolvable*"}),
)
PERIODS = ((-INF, INF), (-INF, NOW - 86400), (NOW + 86400, INF), (NOW - 10, NOW + 10))


def variant_policy() -> Policy:
    """The default policy with the knobs the default leaves off: role-wide labels, label
    grants for nurses, patient writes, a billing redaction on Encounter too."""
    with DEFAULT_POLICY.open("rb") as handle:
        data = tomllib.load(handle)
    roles = data["roles"]
    roles["physician"]["labels"] = ["R"]
    roles["nurse"]["labels"] = ["HIV"]
    roles["nurse"]["label_grants"] = True
    roles["patient"]["create"] = ["Observation"]
    roles["patient"]["labels"] = ["SUD"]
    roles["service"]["labels"] = ["PSY", "R"]
    roles["billing"]["redact"] = {"Patient": ["identifier"], "Encounter": ["period"]}
    return Policy.model_validate(data)


def admits(vis: Visibility, target: Target) -> bool:
    """Does `vis` admit this record? A direct reading of the `Visibility` docstring."""
    if not vis.permitted:
        return False
    if target.labels & vis.hidden_labels:
        return False
    for patient in target.patients:
        if vis.only_patient is not None and patient.id != vis.only_patient:
            return False
        reachable = (
            vis.all_patients
            or patient.id in vis.patients
            or (vis.organization is not None and patient.organization == vis.organization)
        )
        if not reachable:
            return False
        for excluded, labels in vis.consent_exclusions:
            if excluded == patient.id and (not labels or labels & target.labels):
                return False
    return True


@dataclass(frozen=True)
class World:
    policy: Policy
    consents: Mapping[str, tuple[DenyRule, ...]]


def random_rule(rng: random.Random) -> DenyRule:
    start, end = rng.choice(PERIODS)
    return DenyRule(
        actors=rng.choice(ACTORS),
        purposes=rng.choice(
            (frozenset(), frozenset(), frozenset({"TREAT"}), frozenset({"HPAYMT"}))
        ),
        resource_types=rng.choice(
            (frozenset(), frozenset(), frozenset({"Observation"}), frozenset({"Patient", "Claim"}))
        ),
        labels=rng.choice((frozenset(), frozenset(), frozenset({"PSY"}), frozenset({"HIV", "R"}))),
        start=start,
        end=end,
    )


def random_world(rng: random.Random, policies: list[Policy]) -> World:
    consents = {}
    for patient_id in UNIVERSE:
        if rng.random() < 0.3:
            consents[patient_id] = tuple(random_rule(rng) for _ in range(rng.randint(1, 2)))
    return World(rng.choice(policies), consents)


def subset(rng: random.Random, pool: tuple[str, ...] | list[str], p: float) -> frozenset[str]:
    return frozenset(item for item in pool if rng.random() < p)


def random_requester(rng: random.Random, n_roles: int, policy: Policy) -> Requester:
    roles = tuple(rng.sample(ROLES, n_roles))
    rules = policy.for_role(roles[0])
    if rules is not None and rules.purposes and rng.random() < 0.7:
        purpose = rng.choice(sorted(rules.purposes))  # mostly a purpose the role may use
    else:
        purpose = rng.choice([*sorted(PURPOSES), "RESEARCH"])
    scopes = rng.sample(SCOPE_POOL, rng.randint(0, 3))
    if rng.random() < 0.4:
        scopes.append(rng.choice(("user/*.cruds", "system/*.cruds")))
    return Requester(
        user_id="user-1",
        roles=roles,
        scopes=parse_scopes(scopes),
        purpose=purpose,
        practitioner_id=rng.choice((None, "prac-1", "prac-1")),
        organization_id=rng.choice((None, "org-1", "org-1", "org-2")),
        patient_id=rng.choice((None, "pat-self", "pat-self", "pat-care")),
        label_grants=subset(rng, LABEL_POOL, 0.25),
        care_patients=subset(rng, list(UNIVERSE), 0.35),
        break_glass_patients=subset(rng, list(UNIVERSE), 0.2),
    )


def random_target(rng: random.Random, world: World) -> Target:
    labels = frozenset() if rng.random() < 0.7 else subset(rng, LABEL_POOL, 0.3)
    if rng.random() < 0.2:
        return Target(rng.choice(OUTSIDE_TYPES), (), labels)
    resource_type = rng.choice(COMPARTMENT_TYPES)
    ids = rng.sample(list(UNIVERSE), 1 if rng.random() < 0.75 else 2)
    patients = tuple(PatientFacts(pid, UNIVERSE[pid], world.consents.get(pid, ())) for pid in ids)
    return Target(resource_type, patients, labels)


def known_divergence(policy: Policy, requester: Requester, target: Target) -> bool:
    """Combinations where decide and visibility are known to disagree (see the xfail below)."""
    rules = policy.for_role(requester.roles[0])
    return (
        rules is not None
        and rules.patients == "own"
        and requester.patient_id is None
        and not target.patients
    )


def _policies() -> list[Policy]:
    return [default_policy(), boundary_policy(), variant_policy()]


def test_admits_reads_the_docstring() -> None:
    """The evaluator itself, on hand-made Visibility values."""
    p1 = PatientFacts("p1", "org-1")
    p2 = PatientFacts("p2", "org-2")
    obs = Target("Observation", (p1,))
    assert not admits(Visibility("Observation", permitted=False), obs)
    assert admits(Visibility("Practitioner", permitted=True), Target("Practitioner"))
    assert admits(Visibility("Observation", True, patients=frozenset({"p1"})), obs)
    assert not admits(Visibility("Observation", True, patients=frozenset({"p2"})), obs)
    assert admits(Visibility("Observation", True, organization="org-1"), obs)
    assert not admits(
        Visibility("Observation", True, organization="org-1"), Target("Observation", (p1, p2))
    )
    assert admits(Visibility("Observation", True, all_patients=True), obs)
    assert not admits(Visibility("Observation", True, all_patients=True, only_patient="p2"), obs)
    assert not admits(
        Visibility("Observation", True, all_patients=True, hidden_labels=frozenset({"PSY"})),
        Target("Observation", (p1,), frozenset({"PSY"})),
    )
    excl = Visibility(
        "Observation", True, all_patients=True, consent_exclusions=(("p1", frozenset({"HIV"})),)
    )
    assert admits(excl, obs)
    assert not admits(excl, Target("Observation", (p1,), frozenset({"HIV"})))
    bare = Visibility(
        "Observation", True, all_patients=True, consent_exclusions=(("p1", frozenset()),)
    )
    assert not admits(bare, obs)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_visibility_agrees_with_decide_for_one_role(seed: int) -> None:
    rng = random.Random(seed)
    policies = _policies()
    permits = denies = skipped = 0
    for i in range(4000):
        world = random_world(rng, policies)
        requester = random_requester(rng, 1, world.policy)
        target = random_target(rng, world)
        if known_divergence(world.policy, requester, target):
            skipped += 1
            continue
        decision = decide(world.policy, requester, Action.read, target, NOW)
        vis = visibility(world.policy, requester, target.resource_type, world.consents, NOW)
        context = f"seed={seed} case={i}\n{requester}\n{target}\n{decision}\n{vis}"
        assert decision.permit == admits(vis, target), context
        if decision.permit:
            permits += 1
            assert decision.role == vis.role, context
            assert decision.redact_to == vis.redact_to, context
            if BREAK_GLASS in decision.obligations:
                # the record is reached through a grant: its patients are among the grants
                assert any(p.id in requester.break_glass_patients for p in target.patients)
        else:
            denies += 1
    # the generator must reach both answers often enough for the comparison to mean something
    assert permits > 350 and denies > 350, (permits, denies, skipped)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_visibility_never_wider_than_decide_with_several_roles(seed: int) -> None:
    rng = random.Random(seed)
    policies = _policies()
    admitted = agree = 0
    for i in range(4000):
        world = random_world(rng, policies)
        requester = random_requester(rng, rng.choice((2, 2, 3)), world.policy)
        target = random_target(rng, world)
        decision = decide(world.policy, requester, Action.read, target, NOW)
        vis = visibility(world.policy, requester, target.resource_type, world.consents, NOW)
        visible = admits(vis, target)
        context = f"seed={seed} case={i}\n{requester}\n{target}\n{decision}\n{vis}"
        if visible:
            admitted += 1
            assert decision.permit, context
        agree += decision.permit == visible
    assert admitted > 300
    assert agree > 0.8 * 4000


def test_generator_reaches_every_patients_mode_and_scope_context() -> None:
    rng = random.Random(99)
    seen_modes: set[str] = set()
    only_patient = org = exclusions = 0
    policies = _policies()
    for _ in range(3000):
        world = random_world(rng, policies)
        requester = random_requester(rng, 1, world.policy)
        target = random_target(rng, world)
        vis = visibility(world.policy, requester, target.resource_type, world.consents, NOW)
        rules = world.policy.for_role(requester.roles[0])
        if vis.permitted and rules is not None:
            seen_modes.add(rules.patients)
            only_patient += vis.only_patient is not None
            org += vis.organization is not None
            exclusions += bool(vis.consent_exclusions)
    assert seen_modes == {"care", "organization", "own", "any", "none"}
    assert only_patient > 20 and org > 20 and exclusions > 20


def test_own_mode_without_linked_patient_outside_compartment() -> None:
    requester = Requester(
        user_id="u", roles=("patient",), scopes=parse_scopes(["user/*.rs"]), purpose="TREAT"
    )
    target = Target("Practitioner")
    decision = decide(default_policy(), requester, Action.read, target, NOW)
    vis = visibility(default_policy(), requester, "Practitioner", {}, NOW)
    assert decision.permit == admits(vis, target)


def test_break_glass_over_consent_is_flagged_in_search_too() -> None:
    rule = DenyRule(actors=frozenset({"Practitioner/prac-1"}))
    requester = Requester(
        user_id="u",
        roles=("physician",),
        scopes=parse_scopes(["user/*.cruds"]),
        purpose="ETREAT",
        practitioner_id="prac-1",
        care_patients=frozenset({"pat-care"}),
        break_glass_patients=frozenset({"pat-care"}),
    )
    target = Target("Observation", (PatientFacts("pat-care", None, (rule,)),))
    decision = decide(default_policy(), requester, Action.read, target, NOW)
    assert decision.permit and decision.break_glass
    vis = visibility(default_policy(), requester, "Observation", {"pat-care": (rule,)}, NOW)
    assert admits(vis, target)
    assert "pat-care" in vis.break_glass_patients


def test_break_glass_over_relationship_is_flagged_in_search() -> None:
    requester = Requester(
        user_id="u",
        roles=("nurse",),
        scopes=parse_scopes(["user/*.cruds"]),
        purpose="ETREAT",
        practitioner_id="prac-1",
        care_patients=frozenset({"pat-care"}),
        break_glass_patients=frozenset({"pat-other"}),
    )
    target = Target("Observation", (PatientFacts("pat-other"),))
    decision = decide(default_policy(), requester, Action.read, target, NOW)
    assert decision.permit and decision.break_glass
    vis = visibility(default_policy(), requester, "Observation", {}, NOW)
    assert admits(vis, target)
    assert vis.break_glass_patients == frozenset({"pat-other"})


def test_resource_classes_used_here() -> None:
    for resource_type in COMPARTMENT_TYPES:
        assert resource_class(resource_type) != "reference", resource_type
    for resource_type in OUTSIDE_TYPES:
        assert resource_class(resource_type) in ("administrative", "reference"), resource_type

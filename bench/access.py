"""Scenario set "access": what the access decision point costs a FHIR request, in one run.

On the `fhir` set's data set (seeded by `bench.fhir.seed_processes`, the bulk path) plus a care
relationship: a Practitioner `bench-physician` (a colleague too) and one active CareTeam per
patient for `--care-patients` patients (default 50, spread over the data set) listing both,
and as many CareTeams listing the colleague only (so the physician's care set is a strict
subset of the patients that have a care team). Two accounts, made by `carevault user add`:

* `bench.physician`, role physician, linked to Practitioner/bench-physician: patients "care",
  so reads are decided against the care set and searches are filtered in SQL;
* `bench.user`, role service: patients "any", every request still asks the decision point
  but no search needs a patient filter (the baseline).

Measured, in the same run, on the same resources (the Observations of the care patients):

1. in-process, µs per call (median over `--repeat` repetitions of per-call medians):
   `ResourceStore.read` (the baseline), the full per-request access overhead of a FHIR read
   (`fhir_caller` + `authorize(read)` + `redact`, exactly the functions `routes.read` calls,
   warm caches) and its pieces (`AccessControl.requester`, `AccessControl.decide` on the
   stored body, `target`, `decision.decide` alone, `search_condition`), the same overhead with
   every fact cache emptied (the first request after a CareTeam/Patient/Consent write), and
   the SQL search (`search.execute`) with the physician's filter against none;
2. over HTTP with wrk (`bench.load.WrkRunner`, the harness's duration/connection settings):
   read, search by patient and a broad search by code, as the physician against the same
   request as the service account, the service row of the same round being the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from bench.fhir import (
    RESOURCES_PER_PATIENT,
    ROTATE_SCRIPT,
    SEED,
    VITALS,
    _count_resources,
    create_pg_schema,
    drop_pg_schema,
    group_count,
    make_group,
    seed_processes,
    write_paths,
    wrk_and_stores,
)

DEFAULT_SIZE = 100_000
CARE_PATIENTS = 50
DECISION_SHARE_MAX = 0.05  # the access overhead of a read < 5% of the read's latency
PRACTITIONER_ID = "bench-physician"
COLLEAGUE_ID = "bench-colleague"
PHYSICIAN_USER = "bench.physician"
LOINC = "http://loinc.org"
CODES = tuple(v[0] for v in VITALS)  # the broad search rotates over these
BROAD_COUNT = 50
# The broad search takes 0.1-0.3 s of server time each at 100k: with 32 connections every
# request would wait behind 31 others, past wrk's 5 s timeout (no answer counted at all).
BROAD_CONNECTIONS = 4
PRINCIPALS = ("physician", "service")
UNFILTERED = "unfiltered"  # in-process search only: no access condition at all
# (scenario, principal, connections): each physician row's baseline is the service row
SCENARIOS = (
    "read",
    "search-patient",
    "search-code",
    "read-c1",
)


def scenario_names() -> list[str]:
    return [f"{s}:{p}" for s in SCENARIOS for p in PRINCIPALS]


# ---------------------------------------------------------------------------------- care facts


def care_indices(groups: int, care: int) -> tuple[list[int], list[int]]:
    """(the physician's patients, the colleague-only patients): group numbers spread evenly
    over the data set, disjoint."""
    care = max(1, min(care, groups // 2 if groups > 1 else 1))
    mine = sorted({i * groups // care for i in range(care)})
    taken = set(mine)
    others = []
    for i in range(care):
        j = (i * groups // care + max(1, groups // (2 * care))) % groups
        while j in taken:
            j = (j + 1) % groups
            if len(taken) >= groups:
                break
        if j not in taken:
            others.append(j)
            taken.add(j)
    return mine, sorted(others)


def practitioner(pid: str, family: str) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "id": pid,
        "active": True,
        "name": [{"family": family, "given": ["Bench"]}],
    }


def care_team(team_id: str, patient_id: str, members: list[str]) -> dict[str, Any]:
    roles = {PRACTITIONER_ID: ("309343006", "Physician"), COLLEAGUE_ID: ("106292003", "Nurse")}
    return {
        "resourceType": "CareTeam",
        "id": team_id,
        "status": "active",
        "subject": {"reference": f"Patient/{patient_id}"},
        "participant": [
            {
                "role": [
                    {
                        "coding": [
                            {
                                "system": "http://snomed.info/sct",
                                "code": roles[m][0],
                                "display": roles[m][1],
                            }
                        ]
                    }
                ],
                "member": {"reference": f"Practitioner/{m}"},
            }
            for m in members
        ],
    }


@dataclass
class CareSet:
    care_groups: list[int]  # group numbers of the physician's patients
    other_groups: list[int]  # colleague-only care teams
    care_patients: list[str]
    observations: list[str]  # ids of the care patients' Observations
    denied_observation: str  # an Observation of a patient outside the care set
    expected_code_totals: dict[str, int]  # code -> Observations of the care patients
    written: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def care_set(groups: int, care: int) -> CareSet:
    """What the care relationship covers, from the deterministic data set alone."""
    mine, others = care_indices(groups, care)
    patients, observations = [], []
    totals = dict.fromkeys(CODES, 0)
    for index in mine:
        group = make_group(index)
        patients.append(group.patient_id)
        for body in group.resources:
            if body["resourceType"] == "Observation":
                observations.append(body["id"])
                totals[body["code"]["coding"][0]["code"]] += 1
    outside = next(i for i in range(groups) if i not in set(mine)) if groups > len(mine) else None
    denied = ""
    if outside is not None:
        denied = next(
            b["id"] for b in make_group(outside).resources if b["resourceType"] == "Observation"
        )
    return CareSet(mine, others, patients, observations, denied, totals)


async def seed_care(services: Any, care: CareSet) -> CareSet:
    """The two Practitioners and the CareTeams, validated and written by
    `ResourceStore.write_many` (the HTTP write path: it moves the access generation)."""
    from carevault.fhir.store import WriteOperation
    from carevault.fhir.validation import validate_resource

    started = time.perf_counter()
    bodies = [practitioner(PRACTITIONER_ID, "Physician"), practitioner(COLLEAGUE_ID, "Colleague")]
    for index in care.care_groups:
        pid = make_group(index).patient_id
        bodies.append(care_team(f"bench-careteam-{index}", pid, [PRACTITIONER_ID, COLLEAGUE_ID]))
    for index in care.other_groups:
        pid = make_group(index).patient_id
        bodies.append(care_team(f"bench-careteam-{index}", pid, [COLLEAGUE_ID]))
    operations = []
    for body in bodies:
        valid = validate_resource(body, body["resourceType"])
        operations.append(WriteOperation("create", valid["resourceType"], valid["id"], valid))
    await services.store.write_many(operations)
    care.written = len(operations)
    care.seconds = time.perf_counter() - started
    care.extra = {
        "care_teams": len(care.care_groups) + len(care.other_groups),
        "colleague_only_care_teams": len(care.other_groups),
        "practitioners": 2,
    }
    return care


# ---------------------------------------------------------------------------------- in-process


def principal_of(user: Any) -> Any:
    """The `Principal` a bearer token of this account carries (first-party login scopes)."""
    from carevault.identity.authentication import FIRST_PARTY_CLIENT, first_party_scope
    from carevault.identity.principal import Principal

    now = int(time.time())
    return Principal(
        user_id=user.id,
        client_id=FIRST_PARTY_CLIENT,
        roles=tuple(str(r) for r in user.roles),
        scopes=tuple(first_party_scope(user).split()),
        amr=("pwd",),
        auth_time=now,
        session_id="bench-session",
        token_id="bench-token",
        token_expires_at=now + 3600,
    )


def _request_stub(services: Any) -> Any:
    """What `fhir_caller` and `authorize` read of a request: app.state.services and headers
    (no X-Purpose-Of-Use: the default purpose)."""
    return SimpleNamespace(
        app=SimpleNamespace(state=SimpleNamespace(services=services)), headers={}, scope={}
    )


def _clear_fact_caches(facts: Any) -> None:
    """What a move of the access generation does (any CareTeam, PractitionerRole, Patient or
    Consent write): every cached fact is forgotten."""
    facts._profiles.clear()
    facts._patients.clear()
    facts._grants.clear()
    facts._all_consents = None


DECISION_VARIANTS = {
    "read": "ResourceStore.read('Observation', id): SELECT + DEK (cache) + AEAD + JSON parse",
    "overhead": "fhir_caller (requester) + authorize(read, stored body) + redact: the access "
    "work of one FHIR read, warm caches",
    "requester": "AccessControl.requester: generation check + cached profile and grants + "
    "parse_scopes + Requester",
    "decision": "AccessControl.decide(read, body): patients_of + patient facts (cache) + "
    "labels + decide()",
    "target": "AccessControl.target(body): patients_of + patient facts (cache) + labels",
    "decide": "decision.decide() alone on a prepared Target",
    "search-condition": "AccessControl.search_condition(Observation): consents (cache) + "
    "visibility + SQL expression",
    "overhead-cold": "overhead with every fact cache emptied (first request after an access "
    "fact write: profile, CareTeams, patient facts loaded)",
    "timer": "an empty timed call (the timer's own cost, included in every figure)",
}


async def measure_decision_cost(
    services: Any,
    principals: dict[str, Any],
    observation_ids: list[str],
    *,
    samples: int = 500,
    cold_samples: int = 40,
    repeat: int = 5,
    advance: Callable[[int], None] | None = None,
    seed_value: int = SEED,
) -> dict[str, Any]:
    """µs per call (median over `repeat` of the per-call medians) of a store read and of the
    access work of a FHIR read, per principal, on random Observations of the care patients."""
    from carevault.access.control import redact
    from carevault.access.decision import Action, decide
    from carevault.fhir.authorization import authorize, fhir_caller

    store, access = services.store, services.access
    policy = access.policy
    rng = random.Random(seed_value)
    ids = [rng.choice(observation_ids) for _ in range(samples)]
    cold_ids = ids[: max(1, min(cold_samples, len(ids)))]
    bodies = {rid: (await store.read("Observation", rid)).body for rid in dict.fromkeys(ids)}
    request = _request_stub(services)
    requesters = {name: await access.requester(p, None) for name, p in principals.items()}
    targets = {rid: await access.target("Observation", body) for rid, body in bodies.items()}

    # Every measured decision must be a permit: timing the deny path would measure nothing
    # the read path pays.
    for name, principal in principals.items():
        caller = await fhir_caller(request, principal)
        for rid, body in bodies.items():
            decision = await authorize(request, caller, Action.read, "Observation", body)
            if not decision.permit:
                raise AssertionError(f"{name} may not read Observation/{rid}")

    async def read() -> list[float]:
        out = []
        for rid in ids:
            t0 = time.perf_counter()
            await store.read("Observation", rid)
            out.append(time.perf_counter() - t0)
        return out

    async def timer() -> list[float]:
        out = []
        for _rid in ids:
            t0 = time.perf_counter()
            out.append(time.perf_counter() - t0)
        return out

    def per_principal(name: str) -> dict[str, Callable[[], Any]]:
        principal = principals[name]
        requester = requesters[name]

        async def overhead() -> list[float]:
            out = []
            for rid in ids:
                body = bodies[rid]
                t0 = time.perf_counter()
                caller = await fhir_caller(request, principal)
                decision = await authorize(request, caller, Action.read, "Observation", body)
                redact(body, decision)
                out.append(time.perf_counter() - t0)
            return out

        async def overhead_cold() -> list[float]:
            out = []
            for rid in cold_ids:
                body = bodies[rid]
                _clear_fact_caches(access.facts)
                t0 = time.perf_counter()
                caller = await fhir_caller(request, principal)
                decision = await authorize(request, caller, Action.read, "Observation", body)
                redact(body, decision)
                out.append(time.perf_counter() - t0)
            return out

        async def requester_only() -> list[float]:
            out = []
            for _rid in ids:
                t0 = time.perf_counter()
                await access.requester(principal, None)
                out.append(time.perf_counter() - t0)
            return out

        async def decision() -> list[float]:
            out = []
            for rid in ids:
                body = bodies[rid]
                t0 = time.perf_counter()
                await access.decide(requester, Action.read, "Observation", body)
                out.append(time.perf_counter() - t0)
            return out

        async def target() -> list[float]:
            out = []
            for rid in ids:
                body = bodies[rid]
                t0 = time.perf_counter()
                await access.target("Observation", body)
                out.append(time.perf_counter() - t0)
            return out

        async def decide_only() -> list[float]:
            out = []
            for rid in ids:
                tgt = targets[rid]
                t0 = time.perf_counter()
                decide(policy, requester, Action.read, tgt, 1.0e9)
                out.append(time.perf_counter() - t0)
            return out

        async def search_condition() -> list[float]:
            out = []
            for _rid in ids:
                t0 = time.perf_counter()
                await access.search_condition(requester, "Observation")
                out.append(time.perf_counter() - t0)
            return out

        return {
            f"{name}:overhead": overhead,
            f"{name}:requester": requester_only,
            f"{name}:decision": decision,
            f"{name}:target": target,
            f"{name}:decide": decide_only,
            f"{name}:search-condition": search_condition,
            f"{name}:overhead-cold": overhead_cold,
        }

    variants: dict[str, Callable[[], Any]] = {"read": read, "timer": timer}
    for name in principals:
        variants.update(per_principal(name))
    names = list(variants)
    medians: dict[str, list[float]] = {n: [] for n in names}

    async def warm() -> None:
        for principal in principals.values():  # every fact cache filled, as in a steady server
            caller = await fhir_caller(request, principal)
            for body in bodies.values():
                await authorize(request, caller, Action.read, "Observation", body)
            await access.search_condition(caller.requester, "Observation")

    await read()  # the connection pool, DEK cache and page cache warm
    await warm()
    for round_no in range(repeat):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            await warm()
            gc.disable()
            try:
                times = await variants[name]()
            finally:
                gc.enable()
            medians[name].append(statistics.median(times) * 1e6)
            if advance:
                advance(1)
    await warm()
    result = {
        name: {
            "median_us": round(statistics.median(m), 2),
            "samples_us": [round(x, 2) for x in m],
            "what": DECISION_VARIANTS[name.split(":", 1)[-1]],
        }
        for name, m in medians.items()
    }
    read_us = result["read"]["median_us"]
    shares = {
        name: round(result[f"{name}:overhead"]["median_us"] / read_us, 4) if read_us else None
        for name in principals
    }
    return {
        "resource_type": "Observation",
        "samples": samples,
        "distinct_ids": len(bodies),
        "cold_samples": len(cold_ids),
        "repeat": repeat,
        "variants": result,
        "overhead_share_of_read": shares,
        "care_patients": {n: len(r.care_patients) for n, r in requesters.items()},
    }


async def measure_search_in_process(
    services: Any,
    principals: dict[str, Any],
    care: CareSet,
    *,
    repeat: int = 5,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """`search.execute` (the SQL of a search: the page of ids and the total) with each
    principal's access condition, ms per query (median over repeats of per-query medians):
    by patient (rotating over the care patients) and by code (rotating over the LOINC codes,
    _count=50). Totals are recorded: the physician's must be the care subset's.

    "unfiltered" is the same SQL with no access condition at all (`execute(..., None)`, what
    the server's own lookups run): no account has that, since even a role with patients "any"
    is filtered by the sensitive labels it may not see (the service role sees none of them)."""
    from carevault.access.decision import visibility
    from carevault.fhir.search import execute, parse_search

    access, blind, engine = services.access, services.blind_index, services.engine
    conditions: dict[str, Any] = {}
    filters: dict[str, Any] = {}
    consents = await access.facts.all_consent_rules()
    for name, principal in principals.items():
        requester = await access.requester(principal, None)
        conditions[name] = await access.search_condition(requester, "Observation")
        seen = visibility(access.policy, requester, "Observation", consents, time.time())
        filters[name] = {
            "all_patients": seen.all_patients,
            "patients": len(seen.patients),
            "hidden_labels": len(seen.hidden_labels),
            "consent_exclusions": len(seen.consent_exclusions),
        }
    conditions[UNFILTERED] = None
    filters[UNFILTERED] = None
    names = [*principals, UNFILTERED]
    queries: dict[str, list[list[tuple[str, str]]]] = {
        "search-patient": [[("patient", p)] for p in care.care_patients],
        "search-code": [[("code", f"{LOINC}|{c}"), ("_count", str(BROAD_COUNT))] for c in CODES],
    }
    out: dict[str, Any] = {}
    for query, pair_lists in queries.items():
        per: dict[str, list[float]] = {n: [] for n in names}
        totals: dict[str, list[int]] = {n: [] for n in names}
        for round_no in range(repeat):
            shift = round_no % len(names)
            order = names[shift:] + names[:shift]
            for name in order:
                times = []
                for pairs in pair_lists:
                    search = parse_search("Observation", pairs, blind)
                    t0 = time.perf_counter()
                    result = await execute(engine, search, conditions[name])
                    times.append(time.perf_counter() - t0)
                    if round_no == 0:
                        totals[name].append(int(result.total or 0))
                per[name].append(statistics.median(times) * 1e3)
                if advance:
                    advance(1)
        entry = {
            name: {
                "median_ms": round(statistics.median(per[name]), 3),
                "samples_ms": [round(x, 3) for x in per[name]],
                "totals": totals[name],
                "filter": filters[name],
            }
            for name in names
        }
        if "physician" in entry and "service" in entry:
            svc = entry["service"]["median_ms"]
            entry["ratio_physician_to_service"] = (
                round(entry["physician"]["median_ms"] / svc, 3) if svc else None
            )
            bare = entry[UNFILTERED]["median_ms"]
            entry["ratio_service_to_unfiltered"] = round(svc / bare, 3) if bare else None
        out[query] = entry
    phys = out["search-code"].get("physician", {}).get("totals")
    if phys is not None and phys != [care.expected_code_totals[c] for c in CODES]:
        raise AssertionError(
            f"physician's search totals {phys} are not the care subset's "
            f"{[care.expected_code_totals[c] for c in CODES]}"
        )
    return out


async def in_process(
    settings: Any,
    care: CareSet,
    *,
    seed_care_facts: bool,
    repeat: int,
    samples: int = 500,
    advance: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """(decision cost, in-process search, resources per type) on a running store."""
    from bench.server import BENCH_USER
    from carevault.runtime import build_services

    services = build_services(settings)
    await services.start()
    try:
        if seed_care_facts:
            await seed_care(services, care)
        principals = {}
        for name, username in (("physician", PHYSICIAN_USER), ("service", BENCH_USER)):
            user = await services.users.by_username(username)
            if user is None:
                raise RuntimeError(f"no account {username}")
            principals[name] = principal_of(user)
        counts = await _count_resources(services.engine)
        decision = await measure_decision_cost(
            services,
            principals,
            care.observations,
            samples=samples,
            repeat=repeat,
            advance=advance,
        )
        search = await measure_search_in_process(
            services, principals, care, repeat=repeat, advance=advance
        )
    finally:
        await services.close()
    return decision, search, counts


def in_process_steps(repeat: int) -> int:
    return repeat * (2 + 7 * len(PRINCIPALS)) + 2 * repeat * (len(PRINCIPALS) + 1)


# ---------------------------------------------------------------------------------- HTTP


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(server: Any, window: float = 0.3, limit: float = 60.0) -> float:
    """Wait until the server process has used under 10% of a CPU for two windows in a row
    (the requests a finished wrk left behind are answered); returns the seconds waited."""
    process = getattr(server, "_process", None)
    if process is None or _cpu_seconds(process.pid) is None:
        return 0.0
    started = time.monotonic()
    quiet = 0
    last = _cpu_seconds(process.pid) or 0.0
    while quiet < 2 and time.monotonic() - started < limit:
        time.sleep(window)
        now = _cpu_seconds(process.pid)
        if now is None:
            break
        quiet = quiet + 1 if now - last < 0.1 * window else 0
        last = now
    return time.monotonic() - started


def _login(server: Any, username: str, password: str) -> str:
    from bench.server import ServerError, _http

    body = json.dumps({"username": username, "password": password}).encode()
    status, _, data = _http(
        "POST",
        server.base_url + "/auth/login",
        body,
        {"Content-Type": "application/json"},
        timeout=30.0,
    )
    if status != 200:
        raise ServerError(f"login of {username} failed: HTTP {status} {data[:300]!r}")
    return f"Bearer {json.loads(data)['access_token']}"


def code_path(code: str) -> str:
    return f"/fhir/Observation?code={LOINC}%7C{code}&_count={BROAD_COUNT}"


async def verify_http(
    get: Callable[[str, str], Awaitable[tuple[int, bytes]]],
    auth: dict[str, str],
    care: CareSet,
    service_code_totals: list[int] | None = None,
) -> dict[str, Any]:
    """Every scenario's request answers as it must before it is timed: the physician reads a
    care patient's Observation (200, that record) and not one outside the care set (404),
    finds 10 by patient, and by code exactly the care subset's total, every entry a care
    patient's; the service account gets the same reads and the whole store's totals."""
    from bench.server import ServerError

    care_refs = {f"Patient/{p}" for p in care.care_patients}
    seen: dict[str, Any] = {"code_totals": {}, "code_entries": {}}
    for name, header in auth.items():
        status, body = await get(f"/fhir/Observation/{care.observations[0]}", header)
        if status != 200 or orjson.loads(body)["id"] != care.observations[0]:
            raise ServerError(f"{name}: read of a care patient's Observation: HTTP {status}")
        seen.setdefault("read_body_bytes", {})[name] = len(body)
        status, body = await get(f"/fhir/Observation?patient={care.care_patients[0]}", header)
        bundle = orjson.loads(body) if status == 200 else {}
        per_patient = RESOURCES_PER_PATIENT - 1 - 2 * 2  # 10 Observations per patient
        if status != 200 or bundle.get("total") != per_patient:
            raise ServerError(
                f"{name}: search by patient answered HTTP {status}, total {bundle.get('total')}"
            )
        totals, entries = [], []
        for code in CODES:
            status, body = await get(code_path(code), header)
            if status != 200:
                raise ServerError(f"{name}: search by code {code} answered HTTP {status}")
            bundle = orjson.loads(body)
            got = bundle.get("entry", [])
            totals.append(bundle.get("total"))
            entries.append(len(got))
            if not got:
                raise ServerError(f"{name}: search by code {code} has no entries")
            if name == "physician":
                subjects = {e["resource"]["subject"]["reference"] for e in got}
                if not subjects <= care_refs:
                    raise ServerError("physician's search returned a patient outside the care set")
        seen["code_totals"][name] = totals
        seen["code_entries"][name] = entries
    expected = [care.expected_code_totals[c] for c in CODES]
    if "physician" in auth:
        if seen["code_totals"]["physician"] != expected:
            raise ServerError(
                f"physician's totals {seen['code_totals']['physician']} != care subset {expected}"
            )
        if care.denied_observation:
            status, _ = await get(f"/fhir/Observation/{care.denied_observation}", auth["physician"])
            if status != 404:
                raise ServerError(f"physician read outside the care set answered HTTP {status}")
            seen["physician_outside_care_set_status"] = status
    if service_code_totals is not None and "service" in auth:
        if seen["code_totals"]["service"] != service_code_totals:
            raise ServerError(
                f"service totals {seen['code_totals']['service']} != in-process "
                f"{service_code_totals}"
            )
    seen["expected_physician_code_totals"] = expected
    return seen


@dataclass
class AccessRun:
    store: str
    size: int
    resources_in_store: dict[str, int]
    seed: dict[str, Any]
    care: dict[str, Any]
    decision: dict[str, Any]
    search: dict[str, Any]
    chosen: dict[str, Any]  # scenario:principal -> LoadResult (median round by ratio)
    ratios: dict[str, float]  # scenario -> physician req/s / service req/s (same round)
    p99_ratios: dict[str, float]
    p50_ratios: dict[str, float]
    rounds: list[dict[str, Any]]
    info: dict[str, Any]


def steps_per_store(args: Any) -> int:
    # init+users, seed, care facts + in-process, server start+verify, scenarios x rounds
    return 4 + len(scenario_names()) * args.rounds


def run_access_store(
    args: Any,
    runner: Any,
    steps: Any,
    store_name: str,
    pg_url: str | None,
    pin: bool,
) -> AccessRun:
    from bench.server import BenchServer
    from carevault.config import Settings

    size = args.size
    schema = database_url = None
    if pg_url:
        schema, database_url = create_pg_schema(pg_url)
    server = BenchServer(
        cpu=0 if pin else None, keep=args.keep, database_url=database_url, role="service"
    )
    label = f"{store_name} {size:,}"
    try:
        steps.begin(f"{label}: carevault init + user add (service, physician)", None)
        passwords = {"service": server.prepare()}
        import secrets

        passwords["physician"] = secrets.token_urlsafe(24) + "-Bench-9"
        server._cli(
            "user",
            "add",
            PHYSICIAN_USER,
            "--role",
            "physician",
            "--practitioner",
            PRACTITIONER_ID,
            "--password-stdin",
            stdin=(passwords["physician"] + "\n").encode(),
        )
        steps.done()
        settings_kwargs = {
            "data_dir": server.data_dir,
            "database_url": database_url,
            "signing_algorithm": server.algorithm,
        }
        groups = group_count(size)
        total = groups * RESOURCES_PER_PATIENT
        steps.begin(f"{label}: seed {total:,} (bench.fhir, {args.seed_workers} procs)", total)
        written, seconds, seed_extra = seed_processes(
            settings_kwargs,
            size,
            workers=args.seed_workers,
            method=args.seed_method,
            advance=steps.advance,
        )
        steps.done()
        care = care_set(groups, args.care_patients)
        steps.begin(
            f"{label}: CareTeams + decision cost and search in-process",
            in_process_steps(args.repeat),
        )
        decision, search, counts = asyncio.run(
            in_process(
                Settings(**settings_kwargs),
                care,
                seed_care_facts=True,
                repeat=args.repeat,
                advance=steps.advance,
            )
        )
        steps.done()
        seed_info = {
            "resources": written,
            "patients": groups,
            "seconds": round(seconds, 2),
            "per_second": round(written / seconds, 1) if seconds else None,
            "workers": args.seed_workers,
            **seed_extra,
        }
        care_info = {
            "care_patients": len(care.care_patients),
            "care_groups": care.care_groups,
            "care_observations": len(care.observations),
            "expected_physician_code_totals": care.expected_code_totals,
            "written": care.written,
            "seconds": round(care.seconds, 3),
            **care.extra,
        }
        service_totals = search["search-code"]["service"]["totals"]
        chosen, ratios, p99r, p50r, rounds, info = _measure_http(
            args, runner, steps, server, passwords, label, care, service_totals
        )
    finally:
        server.cleanup()
        if pg_url and schema and not args.keep:
            drop_pg_schema(pg_url, schema)
    return AccessRun(
        store_name,
        size,
        counts,
        seed_info,
        care_info,
        decision,
        search,
        chosen,
        ratios,
        p99r,
        p50r,
        rounds,
        info,
    )


def _measure_http(
    args: Any,
    runner: Any,
    steps: Any,
    server: Any,
    passwords: dict[str, str],
    label: str,
    care: CareSet,
    service_totals: list[int],
) -> tuple[Any, ...]:
    from bench.server import _http

    single = None
    try:
        steps.begin(f"{label}: start server, log in, check every request", None)
        server.start(timeout=120)
        server.login(passwords["service"])
        auth = {
            "physician": _login(server, PHYSICIAN_USER, passwords["physician"]),
            "service": server.auth_header,
        }

        async def get(path: str, header: str) -> tuple[int, bytes]:
            status, _, body = _http(
                "GET", server.base_url + path, headers={"Authorization": header}
            )
            return status, body

        checks = asyncio.run(verify_http(get, auth, care, service_totals))
        steps.done()
        root = server.static_body_file.parent
        files = {
            "read": write_paths(
                root / "access-read.txt", [f"/fhir/Observation/{i}" for i in care.observations]
            ),
            "search-patient": write_paths(
                root / "access-search-patient.txt",
                [f"/fhir/Observation?patient={p}" for p in care.care_patients],
            ),
            "search-code": write_paths(
                root / "access-search-code.txt", [code_path(c) for c in CODES]
            ),
        }
        files["read-c1"] = files["read"]
        single = type(runner)(runner.binary, 1, 1, runner.cpu)
        broad = type(runner)(
            runner.binary, 1, min(runner.connections, BROAD_CONNECTIONS), runner.cpu
        )
        drained: list[float] = []
        names = scenario_names()
        rounds: list[dict[str, Any]] = []
        for round_no in range(args.rounds):
            # pairs stay adjacent (physician and service of a scenario back to back), the
            # order within a pair and of the pairs rotating from round to round
            pairs = [list(PRINCIPALS) if round_no % 2 == 0 else list(PRINCIPALS)[::-1]]
            shift = round_no % len(SCENARIOS)
            order = [f"{s}:{p}" for s in SCENARIOS[shift:] + SCENARIOS[:shift] for p in pairs[0]]
            measured: dict[str, Any] = {}
            for name in order:
                scenario, principal = name.split(":")
                steps.begin(f"{label}: {name} (round {round_no + 1})", args.warmup + args.duration)
                load = {"read-c1": single, "search-code": broad}.get(scenario, runner)
                env = {"BENCH_PATHS_FILE": str(files[scenario])}
                url = server.base_url + "/"
                if args.warmup > 0:
                    load.run(url, args.warmup, auth[principal], steps.tick_to, ROTATE_SCRIPT, env)
                    drained.append(wait_idle(server))
                measured[name] = load.run(
                    url,
                    args.duration,
                    auth[principal],
                    lambda t: steps.tick_to(args.warmup + t),
                    ROTATE_SCRIPT,
                    env,
                )
                # requests wrk abandoned are still being answered: none may spill into the
                # next measurement
                drained.append(wait_idle(server))
                steps.done()
            rounds.append(measured)
        info = {
            "port": server.port,
            "read_ids": len(care.observations),
            "checks": checks,
            "connections": {
                "read": runner.connections,
                "search-patient": runner.connections,
                "search-code": broad.connections,
                "read-c1": 1,
            },
            "drain_seconds_max": round(max(drained, default=0.0), 2),
            "drain_seconds_total": round(sum(drained), 2),
            "log_tail": server.log_tail(1000),
        }
        assert len(names) == len(rounds[0])
    finally:
        if single is not None:
            single.close()
        server.stop()
    chosen: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    p99_ratios: dict[str, float] = {}
    p50_ratios: dict[str, float] = {}
    for scenario in SCENARIOS:
        phys, svc = f"{scenario}:physician", f"{scenario}:service"
        order = sorted(
            range(len(rounds)),
            key=lambda i: rounds[i][phys].rps / max(rounds[i][svc].rps, 1e-9),
        )
        pick = rounds[order[len(order) // 2]]
        chosen[phys], chosen[svc] = pick[phys], pick[svc]
        ratios[scenario] = pick[phys].rps / max(pick[svc].rps, 1e-9)
        p99_ratios[scenario] = pick[phys].latency_us["p99"] / max(pick[svc].latency_us["p99"], 1e-9)
        p50_ratios[scenario] = pick[phys].latency_us["p50"] / max(pick[svc].latency_us["p50"], 1e-9)
    return (
        chosen,
        ratios,
        p99_ratios,
        p50_ratios,
        [{k: v.as_dict() for k, v in r.items()} for r in rounds],
        info,
    )


# ---------------------------------------------------------------------------------- report


def run_passed(run: AccessRun) -> bool:
    share = run.decision["overhead_share_of_read"].get("physician")
    errors = any(r.error_count or not r.requests for r in run.chosen.values())
    return share is not None and share < DECISION_SHARE_MAX and not errors


def _fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def tables(runs: list[AccessRun]) -> list[Any]:
    from rich.table import Table

    micro = Table(
        title="Access decision cost in-process, µs per call (median); baseline = "
        "ResourceStore.read of the same Observations",
        caption="overhead = fhir_caller + authorize(read) + redact (warm caches) = requester + "
        "decide(body) [= target + decide()]; cold = the same after an access-fact write",
    )
    for col in (
        "store / N",
        "principal",
        "store.read",
        "overhead",
        "requester",
        "decide(body)",
        "target",
        "decide()",
        "search cond.",
        "cold overhead",
        "overhead/read",
        "target",
        "result",
    ):
        micro.add_column(col, justify="left" if col in ("store / N", "principal") else "right")
    for run in runs:
        v = {k: x["median_us"] for k, x in run.decision["variants"].items()}
        for name in PRINCIPALS:
            share = run.decision["overhead_share_of_read"][name]
            ok = share < DECISION_SHARE_MAX
            target = f"< {100 * DECISION_SHARE_MAX:.0f}%" if name == "physician" else ""
            verdict = ("[green]PASS[/green]" if ok else "[red]FAIL[/red]") if target else "info"
            micro.add_row(
                f"{run.store} {run.size:,}",
                name,
                f"{v['read']:.1f}",
                f"{v[f'{name}:overhead']:.1f}",
                f"{v[f'{name}:requester']:.1f}",
                f"{v[f'{name}:decision']:.1f}",
                f"{v[f'{name}:target']:.1f}",
                f"{v[f'{name}:decide']:.2f}",
                f"{v[f'{name}:search-condition']:.1f}",
                f"{v[f'{name}:overhead-cold']:,.0f}",
                f"{100 * share:.2f}%",
                target,
                verdict,
            )
        micro.add_section()

    search = Table(
        title="Search SQL in-process (search.execute: page of ids + total), ms per query (median)",
        caption="no condition = execute(search, None), which no account gets; service = the "
        "hidden-labels filter only (patients any); physician = labels + care-set compartment "
        "filter",
    )
    for col in (
        "store / N",
        "query",
        "no condition ms",
        "service ms",
        "physician ms",
        "ratio service/none",
        "ratio phys/service",
        "service totals",
        "physician totals",
    ):
        search.add_column(col, justify="left" if col in ("store / N", "query") else "right")
    for run in runs:
        for query, entry in run.search.items():
            search.add_row(
                f"{run.store} {run.size:,}",
                query,
                f"{entry[UNFILTERED]['median_ms']:.2f}",
                f"{entry['service']['median_ms']:.2f}",
                f"{entry['physician']['median_ms']:.2f}",
                f"{entry['ratio_service_to_unfiltered']:.2f}",
                f"{entry['ratio_physician_to_service']:.2f}",
                _totals(entry["service"]["totals"]),
                _totals(entry["physician"]["totals"]),
            )
    http = Table(
        title="HTTP (wrk): physician (care-set filter) vs service account (patients any), "
        "same round"
    )
    for col, justify in (
        ("store / N", "left"),
        ("scenario", "left"),
        ("principal", "left"),
        ("conns", "right"),
        ("req/s", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("errors", "right"),
        ("req/s ratio phys/service", "right"),
        ("p50 ratio", "right"),
        ("p99 ratio", "right"),
    ):
        http.add_column(col, justify=justify)  # type: ignore[arg-type]
    for run in runs:
        for scenario in SCENARIOS:
            for principal in PRINCIPALS:
                r = run.chosen[f"{scenario}:{principal}"]
                phys = principal == "physician"
                http.add_row(
                    f"{run.store} {run.size:,}",
                    scenario.removesuffix("-c1"),
                    principal,
                    str(r.connections),
                    f"{r.rps:,.0f}",
                    _fmt_ms(r.latency_us["p50"]),
                    _fmt_ms(r.latency_us["p99"]),
                    f"[red]{r.error_count}[/red]" if r.error_count else "0",
                    f"{run.ratios[scenario]:.2f}" if phys else "1.00",
                    f"{run.p50_ratios[scenario]:.2f}" if phys else "1.00",
                    f"{run.p99_ratios[scenario]:.2f}" if phys else "1.00",
                )
        http.add_section()
    return [micro, search, http]


def _totals(totals: list[int]) -> str:
    if len(totals) <= 8:
        return ",".join(str(t) for t in totals)
    return f"{min(totals)}-{max(totals)} ({len(totals)} queries)"


def report(
    args: Any,
    started: dt.datetime,
    machine: dict[str, Any],
    stores: list[tuple[str, str | None]],
    skipped: dict[str, str],
    runs: list[AccessRun],
    complete: bool,
    error: str | None,
) -> dict[str, Any]:
    return {
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "command": [sys.executable, "-m", "bench", *sys.argv[1:]],
        "scenario_set": "access",
        "machine": machine,
        "parameters": {
            "size": args.size,
            "stores": [s for s, _ in stores],
            "skipped_stores": skipped,
            "care_patients": args.care_patients,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "rounds": args.rounds,
            "in_process_repeat": args.repeat,
            "seed_workers": args.seed_workers,
            "seed_method": args.seed_method,
            "pinned": machine.get("pinned"),
            "accounts": {
                "physician": {
                    "username": PHYSICIAN_USER,
                    "role": "physician",
                    "practitioner": PRACTITIONER_ID,
                    "patients": "care",
                },
                "service": {"username": "bench.user", "role": "service", "patients": "any"},
            },
            "server": {"factory": "bench.app:create_bench_app", "workers": 1},
        },
        "targets": {
            "overhead_share_of_read_max": DECISION_SHARE_MAX,
            "measured_on": "physician: (fhir_caller + authorize(read) + redact) / "
            "ResourceStore.read, in-process, warm caches, medians",
        },
        "results": {
            "access": [
                {
                    "store": run.store,
                    "size": run.size,
                    "resources_in_store": run.resources_in_store,
                    "seed": run.seed,
                    "care": run.care,
                    "decision_cost": run.decision,
                    "search_in_process": run.search,
                    "http": {name: run.chosen[name].as_dict() for name in scenario_names()},
                    "http_ratios_physician_to_service": {
                        s: {
                            "rps": round(run.ratios[s], 4),
                            "p50": round(run.p50_ratios[s], 4),
                            "p99": round(run.p99_ratios[s], 4),
                        }
                        for s in SCENARIOS
                    },
                    "rounds": run.rounds,
                    "server": run.info,
                    "passed": run_passed(run),
                }
                for run in runs
            ]
        },
        "complete": complete,
        "error": error,
        "passed": all(run_passed(r) for r in runs) if complete and runs else None,
    }


def access_main(
    args: argparse.Namespace,
    started: dt.datetime,
    cpus: int,
    pin: bool,
    console: Any,
    machine_info: Callable[[str | None], dict[str, Any]],
    steps_class: Any,
) -> int:
    """`python -m bench access`: the harness's entry point for this set."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    args.size = args.size or DEFAULT_SIZE
    prepared = wrk_and_stores(args, pin, "access", console.print)
    if prepared is None:
        return 2
    runner, stores, skipped = prepared
    machine = machine_info(runner.name)
    machine["pinned"] = pin
    console.print(
        f"[bold]carevault bench[/bold] access: {args.size:,} resources, "
        f"{args.care_patients} care patients, stores {[s for s, _ in stores]}, "
        f"{machine['cpu_count']} CPUs, {runner.name}, pinned: {pin}, "
        f"load average {machine['loadavg_at_start']}",
        highlight=False,
    )
    runs: list[AccessRun] = []
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}-access.json"

    def write(complete: bool, error: str | None = None) -> None:
        data = report(args, started, machine, stores, skipped, runs, complete, error)
        path.write_text(json.dumps(data, indent=2) + "\n")

    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as progress:
            steps = steps_class(progress, steps_per_store(args) * len(stores))
            for store, pg_url in stores:
                runs.append(run_access_store(args, runner, steps, store, pg_url, pin))
                write(False)
            steps.finish()
    except BaseException as err:
        machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        write(False, f"{type(err).__name__}: {err}"[:2000])
        console.print(f"[red]stopped: partial results in {_display(path)}[/red]")
        raise
    finally:
        runner.close()
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    for table in tables(runs):
        console.print(table)
    for run in runs:
        variants = run.decision["variants"]
        console.print(
            f"{run.store} {run.size:,}: timer overhead {variants['timer']['median_us']:.2f} µs "
            "per timed call (included in every in-process figure)",
            highlight=False,
        )
        checks = run.info["checks"]
        console.print(
            f"{run.store} {run.size:,}: {sum(run.resources_in_store.values()):,} resources "
            f"({run.resources_in_store}); physician's care set {run.care['care_patients']} "
            f"patients ({run.care['care_observations']} Observations); by-code totals "
            f"physician {checks['code_totals']['physician']} (care subset "
            f"{checks['expected_physician_code_totals']}), service "
            f"{checks['code_totals']['service']}; seeded {run.seed['resources']:,} in "
            f"{run.seed['seconds']:.0f} s",
            highlight=False,
        )
    for store, reason in skipped.items():
        console.print(f"[yellow]{store} skipped: {reason}[/yellow]")
    write(True)
    passed = all(run_passed(r) for r in runs)
    console.print(
        f"load average at start {machine['loadavg_at_start']}, at end "
        f"{machine['loadavg_at_end']} ({cpus} CPUs)",
        highlight=False,
    )
    console.print(
        f"results written to [bold]{_display(path)}[/bold]; target (physician's access "
        f"overhead < {100 * DECISION_SHARE_MAX:.0f}% of a store read) "
        f"{'met' if passed else 'NOT met'}"
    )
    return 1 if args.strict and not passed else 0


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)

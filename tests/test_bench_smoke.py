"""The JWT micro benchmark's code paths are correct (no timing here: speed is `python -m bench`).

The baseline of `bench/jwt_verify.py` is a raw `cryptography` signature check; a benchmark whose
baseline accepted anything, or whose product path rejected its own token, would report nonsense.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from bench.jwt_verify import (
    MicroFixture,
    RawVerifier,
    b64url_decode,
    build_variants,
    jose_to_der,
    run_micro,
    split_token,
)
from carevault.tokens.access import InvalidTokenError


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _tamper_payload(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims["roles"] = ["admin"]
    return ".".join([header, _b64(json.dumps(claims, separators=(",", ":")).encode()), signature])


def _tamper_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[len(raw) // 2] ^= 0x01
    return ".".join([header, payload, _b64(bytes(raw))])


@pytest.fixture(params=["ES256", "EdDSA", "PS256"])
async def fixture(request: pytest.FixtureRequest) -> MicroFixture:
    micro = MicroFixture(request.param, unrelated_revocations=4)
    await micro.start()
    yield micro
    await micro.close()


async def test_raw_baseline_accepts_the_token_and_rejects_tampering(fixture: MicroFixture) -> None:
    raw = fixture.raw
    assert isinstance(raw, RawVerifier)
    assert raw.check_token(fixture.token)
    assert not raw.check_token(_tamper_payload(fixture.token))
    assert not raw.check_token(_tamper_signature(fixture.token))
    assert not raw.check_token(fixture.token.rsplit(".", 1)[0] + ".")


async def test_full_path_accepts_the_token_and_rejects_tampering(fixture: MicroFixture) -> None:
    assert await fixture.full_check(fixture.token)
    for forged in (_tamper_payload(fixture.token), _tamper_signature(fixture.token)):
        with pytest.raises(InvalidTokenError):
            await fixture.full_check(forged)


async def test_revoked_token_is_refused_by_the_full_path(fixture: MicroFixture) -> None:
    claims = fixture.services.verifier.verify(fixture.token)
    await fixture.services.revocations.revoke_token(claims.jti, claims.exp)
    assert not await fixture.full_check(fixture.token)


async def test_every_variant_accepts_the_token(fixture: MicroFixture) -> None:
    for variant in build_variants(fixture):
        result = variant.sync() if variant.sync else await variant.coro()
        assert result not in (False, None), variant.name


def test_jose_to_der_round_trips_and_checks_length() -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = 0x1234, (1 << 255) + 7
    der = jose_to_der(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    assert decode_dss_signature(der) == (r, s)
    with pytest.raises(ValueError):
        jose_to_der(b"\x00" * 63)


def test_split_token_separates_signing_input_and_signature() -> None:
    signing_input, signature = split_token("aGVhZA.cGF5bG9hZA.c2ln")
    assert signing_input == b"aGVhZA.cGF5bG9hZA"
    assert signature == b"sig"


async def test_run_micro_reports_every_variant_with_ratios() -> None:
    result = await run_micro("ES256", iterations=5, repeat=2)
    assert set(result["variants"]) == {"raw", "joserfc", "verify", "full", "full-repeat"}
    assert result["variants"]["raw"]["ratio_to_raw"] == 1.0
    assert all(len(v["samples_us"]) == 2 for v in result["variants"].values())


# --- the "fhir" set: data set, seeding through the store, read-path measurement -------------


def test_fhir_data_set_is_deterministic_and_valid() -> None:
    from bench.fhir import RESOURCES_PER_PATIENT, make_group, patient_groups
    from carevault.fhir.validation import validate_resource

    n = 3 * RESOURCES_PER_PATIENT
    first = list(patient_groups(n))
    assert first == list(patient_groups(n))
    assert len(first) == 3
    # random access: a bigger data set is the smaller one plus more groups (growing 10k->100k)
    assert list(patient_groups(2 * n))[:3] == first
    assert list(patient_groups(2 * n, start=3))[0] == make_group(3)
    for group in first:
        assert len(group.resources) == RESOURCES_PER_PATIENT
        assert group.resources[0]["id"] == group.patient_id
        assert {r["resourceType"] for r in group.resources} == {
            "Patient",
            "Encounter",
            "Observation",
            "Condition",
        }
        for body in group.resources:
            # in normal form already: seeding may skip validating most groups
            assert validate_resource(body, body["resourceType"]) == body
            if body["resourceType"] != "Patient":
                assert body["subject"] == {"reference": f"Patient/{group.patient_id}"}


def test_fhir_create_body_and_prefixes() -> None:
    import orjson

    from bench.fhir import create_body, search_prefixes
    from carevault.fhir.validation import validate_resource

    body = validate_resource(orjson.loads(create_body("p1")), "Observation")
    assert body["subject"]["reference"] == "Patient/p1"
    assert search_prefixes(["Lindqvist", "Lindgren", "Berg"]) == ["berg", "lind"]


async def _rows_of(services: Any, ids: list[str]) -> dict[str, Any]:
    """Every store row of the given resource ids; the write's time and ciphertexts left out."""
    from sqlalchemy import select

    from carevault.db.engine import read_connection
    from carevault.db.tables import (
        fhir_compartments,
        fhir_index_dates,
        fhir_index_keys,
        fhir_resources,
        fhir_versions,
    )

    out: dict[str, Any] = {}
    async with read_connection(services.engine) as conn:
        for table in (
            fhir_resources,
            fhir_versions,
            fhir_compartments,
            fhir_index_keys,
            fhir_index_dates,
        ):
            rows = (await conn.execute(select(table).where(table.c.id.in_(ids)))).mappings()
            out[table.name] = sorted(
                sorted((k, v) for k, v in row.items() if k not in ("last_updated", "body"))
                for row in rows
                if row.get("param") != "_lastUpdated"  # the write's time, like last_updated
            )
    return out


async def _delete_rows(services: Any, ids: list[str]) -> None:
    from sqlalchemy import delete

    from carevault.db.engine import write_transaction
    from carevault.db.tables import (
        fhir_compartments,
        fhir_index_dates,
        fhir_index_keys,
        fhir_resources,
        fhir_versions,
    )

    async with write_transaction(services.engine) as conn:
        for table in (
            fhir_index_dates,
            fhir_index_keys,
            fhir_compartments,
            fhir_versions,
            fhir_resources,
        ):
            await conn.execute(delete(table).where(table.c.id.in_(ids)))


async def test_fhir_bulk_seed_writes_the_rows_write_many_writes(services: Any) -> None:
    """The fast seeding path stores exactly what `ResourceStore.write_many` stores."""
    from bench.fhir import RESOURCES_PER_PATIENT, make_group, seed

    ids = [r["id"] for i in range(2) for r in make_group(i).resources]
    await seed(services, 2 * RESOURCES_PER_PATIENT, method="write_many")
    by_store = await _rows_of(services, ids)
    bodies = {i: (await services.store.read(t, i)).body for t, i in _typed(ids)}
    await _delete_rows(services, ids)
    assert await _rows_of(services, ids) == {k: [] for k in by_store}
    seeded = await seed(services, 2 * RESOURCES_PER_PATIENT, method="bulk", batch_groups=1)
    assert seeded.resources == len(ids)
    assert await _rows_of(services, ids) == by_store
    for t, i in _typed(ids):
        body = (await services.store.read(t, i)).body
        assert body is not None
        assert _no_time(body) == _no_time(bodies[i])
    assert all(len(rows) > 0 for rows in by_store.values())


def _typed(ids: list[str]) -> list[tuple[str, str]]:
    from bench.fhir import make_group

    types = {r["id"]: r["resourceType"] for i in range(2) for r in make_group(i).resources}
    return [(types[i], i) for i in ids]


def _no_time(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "meta": {k: v for k, v in body["meta"].items() if k != "lastUpdated"}}


async def test_fhir_seed_and_read_path_measurement(services: Any) -> None:
    from bench.fhir import (
        RESOURCES_PER_PATIENT,
        _select_row,
        explain_queries,
        measure_read_path,
        search_prefixes,
        seed,
    )

    seeded = await seed(services, 3 * RESOURCES_PER_PATIENT, batch_groups=2)
    assert seeded.resources == 3 * RESOURCES_PER_PATIENT
    assert len(seeded.patient_ids) == 3
    # growing: the next groups only
    more = await seed(services, 5 * RESOURCES_PER_PATIENT, start_group=3)
    assert more.resources == 2 * RESOURCES_PER_PATIENT
    assert not set(more.patient_ids) & set(seeded.patient_ids)
    stored = await services.store.read("Patient", seeded.patient_ids[0])
    assert stored.body["name"][0]["family"] == seeded.families[0]
    patients = await services.store.read_many("Patient", seeded.patient_ids)
    assert set(patients) == set(seeded.patient_ids)

    result = await measure_read_path(
        services, seeded.patient_ids, samples=6, repeat=1, cold_samples=2
    )
    assert set(result["variants"]) == {
        "full",
        "sql+parse",
        "dek+aead",
        "aead",
        "dek-cold",
        "unwrap",
    }
    assert all(v["median_us"] > 0 for v in result["variants"].values())
    assert 0.0 <= result["encryption_share"] <= 1.0
    assert result["encryption_share_direct"] > 0.0
    # The harness's own SELECT reads the same row the store decrypts (the measurement is not
    # of an empty result).
    row = await _select_row(services.engine, "Patient", seeded.patient_ids[0])
    assert row is not None and row.id == seeded.patient_ids[0] and row.body

    # the searches the HTTP scenarios run find the seeded data, and their plans are captured
    plans = await explain_queries(
        services, seeded.patient_ids[0], search_prefixes(seeded.families)[0]
    )
    assert set(plans) == {"read", "search-patient", "search-name"}
    assert all(plans[q] and all(s["plan"] for s in plans[q]) for q in plans)


def test_fhir_seed_processes_and_pg_probe(tmp_path: Any) -> None:
    """Seeding in spawned processes on a fresh SQLite data directory (the harness's path)."""
    import asyncio

    from bench.fhir import RESOURCES_PER_PATIENT, pg_unavailable, seed_processes
    from carevault.config import Settings
    from carevault.db import migrate
    from carevault.runtime import build_services

    settings = Settings(data_dir=tmp_path / "var")
    migrate.upgrade(settings)
    ticks: list[int] = []
    written, _, extra = seed_processes(
        {"data_dir": settings.data_dir},
        4 * RESOURCES_PER_PATIENT,
        workers=2,
        advance=ticks.append,
    )
    assert written == sum(ticks) == 4 * RESOURCES_PER_PATIENT
    assert extra["method"] == "bulk"  # the store still has what the fast path mirrors

    async def count() -> int:
        services = build_services(settings)
        try:
            return len(await services.store.read_many("Patient", _patient_ids(4)))
        finally:
            await services.close()

    assert asyncio.run(count()) == 4
    assert pg_unavailable("postgresql://nobody@127.0.0.1:1/none") is not None


def _patient_ids(n: int) -> list[str]:
    from bench.fhir import make_group

    return [make_group(i).patient_id for i in range(n)]


# --- the "access" set: care relationship, decision cost, filtered searches ------------------


def test_access_care_set_is_deterministic_disjoint_and_spread() -> None:
    from bench.access import CODES, care_indices, care_set

    mine, others = care_indices(6666, 50)
    assert len(mine) == len(others) == 50
    assert not set(mine) & set(others)
    assert min(mine) == 0 and max(mine) > 6000  # spread over the whole data set
    assert care_indices(6666, 50) == (mine, others)
    small = care_set(8, 2)
    assert len(small.care_patients) == 2 and len(small.observations) == 20
    assert sum(small.expected_code_totals.values()) == 20
    assert set(small.expected_code_totals) == set(CODES)
    assert small.denied_observation and small.denied_observation not in small.observations


def test_access_scenario_set_is_registered() -> None:
    from bench.__main__ import SCENARIO_SETS, parse_args

    assert SCENARIO_SETS["access"] == ("access",)
    args = parse_args(["access", "--size", "150", "--care-patients", "3"])
    assert (args.size, args.care_patients, args.duration, args.rounds) == (150, 3, 8.0, 2)


async def test_access_set_measures_permitted_reads_and_filtered_searches(harness: Any) -> None:
    """At a tiny size, on both stores: the care facts give the physician exactly the care
    patients, every timed decision is a permit, the in-process searches count the care subset
    (physician) and everything (service), and the HTTP checks that run before wrk pass against
    the real app (a read outside the care set answers 404)."""
    from bench.access import (
        CODES,
        PHYSICIAN_USER,
        PRACTITIONER_ID,
        care_set,
        measure_decision_cost,
        measure_search_in_process,
        principal_of,
        seed_care,
        verify_http,
    )
    from bench.fhir import RESOURCES_PER_PATIENT, seed
    from carevault.identity.roles import Role

    services = harness.services
    await seed(services, 8 * RESOURCES_PER_PATIENT, batch_groups=4)
    care = await seed_care(services, care_set(8, 2))
    assert care.written == 2 + 2 + 2  # 2 Practitioners, 2 physician + 2 colleague-only teams
    users = {
        "physician": await harness.add_user(
            PHYSICIAN_USER, Role.physician, practitioner_id=PRACTITIONER_ID
        ),
        "service": await harness.add_user("bench.user", Role.service),
    }
    principals = {name: principal_of(user) for name, user in users.items()}

    cost = await measure_decision_cost(
        services, principals, care.observations, samples=6, cold_samples=2, repeat=1
    )
    per_principal = {
        "overhead",
        "requester",
        "decision",
        "target",
        "decide",
        "search-condition",
        "overhead-cold",
    }
    assert set(cost["variants"]) == {"read", "timer"} | {
        f"{p}:{v}" for p in principals for v in per_principal
    }
    assert all(v["median_us"] > 0 for v in cost["variants"].values())
    assert set(cost["overhead_share_of_read"]) == {"physician", "service"}
    assert cost["care_patients"] == {"physician": 2, "service": 0}

    search = await measure_search_in_process(services, principals, care, repeat=1)
    expected = [care.expected_code_totals[c] for c in CODES]
    assert search["search-code"]["physician"]["totals"] == expected
    service_totals = search["search-code"]["service"]["totals"]
    assert sum(service_totals) == 8 * 10 > sum(expected)  # 10 Observations per patient
    assert search["search-patient"]["physician"]["totals"] == [10, 10]
    assert search["search-code"]["unfiltered"]["totals"] == service_totals  # nothing labelled
    assert search["search-code"]["service"]["filter"]["all_patients"] is True
    assert search["search-code"]["physician"]["filter"]["patients"] == 2

    auth = {}
    for name, user in users.items():
        token = (await harness.login(user.username))["access_token"]
        auth[name] = f"Bearer {token}"

    async def get(path: str, header: str) -> tuple[int, bytes]:
        response = await harness.client.get(path, headers={"Authorization": header})
        return response.status_code, response.content

    checks = await verify_http(get, auth, care, service_totals)
    assert checks["code_totals"]["physician"] == expected
    assert checks["physician_outside_care_set_status"] == 404


# --- the "audit" set: no-op writer server, append throughput, seeded trail that verifies ----


def test_audit_scenario_set_is_registered() -> None:
    from bench.__main__ import SCENARIO_SETS, parse_args

    assert SCENARIO_SETS["audit"] == ("audit",)
    args = parse_args(["audit", "--quick", "--verify-entries", "50", "--append-concurrency", "1,4"])
    assert (args.verify_entries, args.append_concurrency, args.append_seconds) == (50, [1, 4], 1.0)
    assert args.audit_parts == ["http", "append", "verify"]
    assert parse_args(["audit"]).verify_entries == 1_000_000


async def _audit_app_client(stack: Any, settings: Any, *, noop: bool) -> tuple[Any, Any]:
    import httpx

    from bench.audit import bench_app

    app = bench_app(settings, noop=noop)
    await stack.enter_async_context(app.router.lifespan_context(app))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    await stack.enter_async_context(client)
    return app, client


async def test_audit_noop_factory_replaces_only_the_writer(settings: Any) -> None:
    """The two servers of the audit-cost measurement, in-process on one database: the audited
    one commits an entry per read through `AuditWriter`; the other answers the same bytes
    through `NoopAuditWriter` and adds nothing to the trail."""
    import contextlib

    from bench.audit import NoopAuditWriter, observation_ids
    from bench.fhir import RESOURCES_PER_PATIENT, seed
    from carevault.audit.writer import AuditWriter
    from carevault.identity.roles import Role
    from tests.conftest import STRONG_PASSWORD

    async with contextlib.AsyncExitStack() as stack:
        audited, client = await _audit_app_client(stack, settings, noop=False)
        services = audited.state.services
        assert type(services.audit_writer) is AuditWriter
        await seed(services, 2 * RESOURCES_PER_PATIENT)
        await services.accounts.add_user("bench.user", STRONG_PASSWORD, Role.service)
        noop_app, noop_client = await _audit_app_client(stack, settings, noop=True)
        assert isinstance(noop_app.state.services.audit_writer, NoopAuditWriter)

        rid = observation_ids(2 * RESOURCES_PER_PATIENT, limit=3)[0]
        bodies, stats = {}, {}
        for name, c in (("audited", client), ("noop", noop_client)):
            login = await c.post(
                "/auth/login", json={"username": "bench.user", "password": STRONG_PASSWORD}
            )
            header = {"Authorization": f"Bearer {login.json()['access_token']}"}
            before = (await c.get("/bench/audit-stats")).json()
            response = await c.get(f"/fhir/Observation/{rid}", headers=header)
            assert response.status_code == 200
            bodies[name] = response.content
            stats[name] = (before, (await c.get("/bench/audit-stats")).json())
        assert bodies["audited"] == bodies["noop"]
        before, after = stats["audited"]
        assert after["writer"] == "AuditWriter"
        assert (after["size"] - before["size"], after["batches"] - before["batches"]) == (1, 1)
        before, after = stats["noop"]
        assert after["writer"] == "NoopAuditWriter"
        assert after["size"] == before["size"]
        assert after["writes"] - before["writes"] == 1


def test_audit_append_measurement_keeps_a_valid_trail(settings: Any) -> None:
    import asyncio

    from bench.audit import _audit_keys, append_part, time_verify

    result = asyncio.run(append_part(settings, [1, 4], 0.2))
    runs = {(r["writer"], r["concurrency"]): r for r in result["runs"]}
    assert set(runs) == {("group", 1), ("per-entry", 1), ("group", 4), ("per-entry", 4)}
    for run in runs.values():
        assert run["entries"] > 0 and run["errors"] == 0
        assert run["entries_in_trail"] == run["entries"]
    assert runs[("per-entry", 4)]["commits"] == runs[("per-entry", 4)]["entries"]
    assert set(result["group_to_per_entry_ratio"]) == {"1", "4"}
    report = time_verify(settings.sqlalchemy_url, _audit_keys(settings))
    assert report["ok"], report["problem"]
    assert report["entries"] == sum(r["entries"] for r in runs.values())
    assert report["checkpoints"] >= 1


async def test_audit_seeded_trail_is_the_products_and_verifies(
    settings: Any, tmp_path: Any
) -> None:
    """The bulk-seeded trail verifies (MACs, blocks, checkpoint roots and signatures), its
    checkpoint roots are the ones `AuditLog` computes, `AuditLog.append` chains on after it, and
    the same trail fails under another audit key (the verify measured is not vacuous)."""
    from bench.audit import _audit_keys, cli_verify, seed_trail, time_verify
    from carevault.audit.entry import AuditEntry, Outcome
    from carevault.audit.merkle import BLOCK
    from carevault.config import Settings
    from carevault.runtime import build_services, ensure_key_material

    n = 2 * BLOCK + 52  # two stored blocks, checkpoints at 1000, 2000 and n
    keys = _audit_keys(settings)
    ticks: list[int] = []
    seeded = seed_trail(settings.sqlalchemy_url, keys, n, batch=700, advance=ticks.append)
    assert (seeded["entries"], seeded["checkpoints"], seeded["blocks"]) == (n, 3, 2)
    assert sum(ticks) == n
    report = time_verify(settings.sqlalchemy_url, keys)
    assert report["ok"], report["problem"]
    assert (report["entries"], report["checkpoints"], report["macs_checked"]) == (n, 3, True)

    services = build_services(settings)
    try:
        for size in (1000, 2000, n):
            assert (await services.audit.checkpoint_at(size)).root == await services.audit.root(
                size
            )
        assert await services.audit.append([AuditEntry("fhir.read", Outcome.permit)]) == n + 1
    finally:
        await services.close()
    assert time_verify(settings.sqlalchemy_url, keys)["ok"]

    other = Settings(data_dir=tmp_path / "other-keys")
    ensure_key_material(other)
    wrong = time_verify(settings.sqlalchemy_url, _audit_keys(other))
    assert not wrong["ok"] and wrong["problem"]["seq"] == 1

    cli = cli_verify({"data_dir": settings.data_dir, "database_url": settings.database_url})
    assert cli["ok"], cli["stdout_tail"] + cli["stderr_tail"]
    assert cli["reported_entries_per_second"]


# --- the "suite" set (issue 8, the default): data set, load files, the harness end to end ----


def test_suite_is_the_default_scenario_set() -> None:
    from bench.__main__ import SCENARIO_SETS, parse_args

    assert SCENARIO_SETS["suite"] == ("suite",)
    args = parse_args([])
    assert args.scenarios == "suite"
    assert args.stores == ["sqlite", "postgresql"]  # PostgreSQL skipped with a reason if absent
    assert (args.server_workers, args.patients, args.duration) == ([1, 2], 10_000, 10.0)
    assert (args.warmup, args.rounds, args.rate_limit, args.warm_reads) == (2.0, 2, "off", 3)
    quick = parse_args(["--quick"])
    assert (quick.patients, quick.duration, quick.warmup, quick.rounds) == (1000, 3.0, 1.0, 1)
    assert quick.warm_reads == 1 and parse_args(["--warm-reads", "0"]).warm_reads == 0
    assert parse_args(["auth", "--stores", "sqlite"]).stores == ["sqlite"]  # the others stay


def test_steal_share_is_the_stolen_part_of_the_cpu_time_between_readings() -> None:
    from bench.suite import cpu_ticks, steal_share

    assert steal_share((1000, 10), (1400, 110)) == 0.25
    assert steal_share((1000, 10), (1000, 10)) is None  # no time passed: no share
    assert steal_share(None, (1400, 110)) is None
    total, stolen = cpu_ticks() or (0, 0)  # this machine's own counters (Linux)
    assert total > 0 and 0 <= stolen <= total


def test_suite_data_set_is_deterministic_valid_and_realistic() -> None:
    import orjson

    from bench.suite import (
        OBSERVATIONS_PER_PATIENT,
        create_body,
        family_name,
        patient_group,
    )
    from carevault.fhir.validation import validate_resource

    assert [patient_group(i) for i in range(3)] == [patient_group(i) for i in range(3)]
    names = [family_name(i) for i in range(10_000)]
    assert len(set(names)) == len(names)  # Patient?name=<family> has exactly one hit
    assert len({len(n) for n in names}) == 1  # so no name is a prefix of another
    for i in (0, 1, 777):
        group = patient_group(i)
        patient = group.resources[0]
        assert patient["id"] == group.patient_id and group.family == names[i]
        assert 1000 <= len(orjson.dumps(patient)) <= 1200  # ~1.1 KiB, like the Medplum reference
        assert len(group.resources) == 1 + OBSERVATIONS_PER_PATIENT
        for body in group.resources:
            assert validate_resource(body, body["resourceType"]) == body  # normal form
        for obs in group.resources[1:]:
            assert obs["subject"] == {"reference": f"Patient/{group.patient_id}"}
    new = orjson.loads(create_body(10_000))
    assert "id" not in new and validate_resource(new, "Patient") == new


def test_loadgen_rotates_paths_and_bodies(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.loadgen import build_requests

    paths = tmp_path / "paths.txt"
    paths.write_text("/fhir/Patient/a\n/fhir/Patient/b\n")
    monkeypatch.setenv("BENCH_PATHS_FILE", str(paths))
    requests = build_requests("http://127.0.0.1:9/x", "Bearer t")
    assert [r.split(b" ")[1] for r in requests] == [b"/fhir/Patient/a", b"/fhir/Patient/b"]
    assert all(b"Authorization: Bearer t\r\n" in r for r in requests)
    monkeypatch.delenv("BENCH_PATHS_FILE")
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text('{"a":1}\n{"b":22}\n')
    monkeypatch.setenv("BENCH_BODIES_FILE", str(bodies))
    monkeypatch.setenv("BENCH_METHOD", "POST")
    monkeypatch.setenv("BENCH_CONTENT_TYPE", "application/json")
    requests = build_requests("http://127.0.0.1:9/auth/login", "")
    assert requests[1].startswith(b"POST /auth/login HTTP/1.1\r\n")
    assert requests[1].endswith(b'Content-Length: 8\r\n\r\n{"b":22}')
    assert b"Content-Type: application/json\r\n" in requests[0]
    assert b"Authorization" not in requests[0]


def test_suite_skips_a_postgresql_that_does_not_answer() -> None:
    from bench.__main__ import parse_args
    from bench.suite import stores_to_run

    said: list[str] = []
    args = parse_args(["--pg", "postgresql://nobody@127.0.0.1:1/none"])
    stores, skipped = stores_to_run(args, said.append)
    assert stores == [("sqlite", None)]
    assert "127.0.0.1:1/none" in skipped["postgresql"] and "SKIPPED postgresql" in said[0]


def test_suite_runs_end_to_end(tmp_path: Any) -> None:
    """The whole harness, briefly, on SQLite with the Python load generator (no wrk, no apt):
    init, login accounts, seeding, the server, every scenario with the login storm, the JSON
    and the chart. Nothing about time: only that every scenario answered, without errors."""
    import json

    from bench.__main__ import main
    from bench.suite import SCENARIOS

    code = main(
        [
            "suite",
            "--stores",
            "sqlite",
            "--server-workers",
            "1",
            "--patients",
            "20",
            "--seed-workers",
            "1",
            "--login-accounts",
            "4",
            "--connections",
            "2",
            "--storm-connections",
            "2",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--loadgen",
            "python",
            "--no-pin",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    [path] = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert report["complete"] and report["scenario_set"] == "suite"
    assert (tmp_path / report["chart"]).stat().st_size > 0
    [run] = report["results"]
    assert (run["store"], run["workers"], run["patients"]) == ("sqlite", 1, 20)
    assert list(run["scenarios"]) == list(SCENARIOS)
    for name, scenario in run["scenarios"].items():
        assert scenario["requests"] > 0, name
        assert scenario["error_count"] == 0, name
        assert 0 <= scenario["extra"]["cpu_steal_share"] <= 1, name  # Linux: /proc/stat
    assert 0 <= report["machine"]["cpu_steal_share"] <= 1
    storm = run["scenarios"]["read-during-login-storm"]["storm_logins"]
    assert storm["requests"] > 0 and storm["error_count"] == 0
    assert run["server"]["checks"]["search_name_entries"] == [1] * 10
    assert run["server"]["checks"]["search_patient_entries"] == 5
    warm = run["server"]["warm_pass"]  # every patient read 3 times before the rounds
    assert warm["reads_wanted"] == 60 and warm["reads"] >= 60 and warm["cold_read_rps"] > 0
    assert 1000 < run["server"]["patient_body_bytes"] < 1300
    assert set(run["scenarios"]["fhir-read"]["vs_medplum"]) >= {"rps_ratio", "p99_lower"}

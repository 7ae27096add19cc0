"""Scenario set "fhir": FHIR REST on a seeded data set, and the encryption share of a read.

* `generate(n)` yields a deterministic data set of about `n` resources of realistic shape:
  per patient one Patient (names, identifiers, birth date, gender, address), five Observations
  (vital signs and labs with LOINC codes), one Encounter and one Condition referencing it.
* `seed(settings, n)` writes it straight through the product's `ResourceStore.write_many`
  (validated, encrypted and indexed exactly as an HTTP write would be), in-process, on the data
  directory / database the server then serves: much faster than HTTP.
* `measure_read_path(services, ids)` times, on the same data and in the same process,
  `store.read()` (SQL + DEK cache + AEAD decrypt + JSON parse) against the same SELECT + JSON
  parse of the already-decrypted bytes (no AEAD, no DEK lookup), the DEK lookup + AEAD alone,
  and a cold-cache DEK unwrap. Encryption is never switched off: the "no AEAD" path is only
  the harness running the store's SELECT itself.
* `run_fhir_http(...)` starts the real server on that data and measures, with wrk, a static
  baseline of a Patient's bytes against read, two searches and create.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import and_, select

from carevault.db.engine import read_connection
from carevault.db.tables import fhir_resources, fhir_versions
from carevault.fhir.store import WriteOperation, associated_data
from carevault.fhir.validation import validate_resource

RESOURCES_PER_PATIENT = 8  # Patient + 5 Observation + Encounter + Condition
SEED = 20261123

FAMILIES = (
    "Andersson Johansson Karlsson Nilsson Eriksson Larsson Olsson Persson Svensson Gustafsson "
    "Pettersson Jonsson Jansson Hansson Bengtsson Lindberg Lindqvist Lindgren Berg Axelsson "
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill "
    "Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Muller Schmidt "
    "Schneider Fischer Weber Meyer Wagner Becker Schulz Hoffmann Dubois Moreau Laurent Simon "
    "Michel Lefebvre Leroy Roux David Bertrand Rossi Russo Ferrari Esposito Bianchi Romano Colombo"
).split()
GIVEN = (
    "Astrid Nils Elsa Lars Ingrid Karl Maja Erik Alice Oskar Emma Liam Olivia Noah Ava Lucas Mia "
    "Hugo Sofia Leo Anna Jonas Marie Paul Julia Felix Clara Louis Chloe Marco Giulia Sara Omar "
    "Fatima Yusuf Amina Chen Wei Hana Kenji"
).split()
CITIES = ("Uppsala", "Lund", "Boston", "Leeds", "Lyon", "Bremen", "Turin", "Austin", "Porto")
# (LOINC code, display, unit, low, high)
VITALS = (
    ("8867-4", "Heart rate", "/min", 50, 110),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 95, 170),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 55, 105),
    ("29463-7", "Body weight", "kg", 45, 120),
    ("8310-5", "Body temperature", "Cel", 36, 39),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 70, 180),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 10, 17),
)
CONDITIONS = (
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195967001", "Asthma"),
    ("35489007", "Depressive disorder"),
    ("13645005", "Chronic obstructive lung disease"),
)


@dataclass
class PatientGroup:
    patient_id: str
    family: str
    resources: list[dict[str, Any]]  # Patient first


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def patient_groups(n: int, seed: int = SEED) -> Iterator[PatientGroup]:
    """Deterministic groups of RESOURCES_PER_PATIENT resources, about `n` resources in all."""
    rng = random.Random(seed)
    for index in range(max(1, n // RESOURCES_PER_PATIENT)):
        pid = _uuid(rng)
        family = rng.choice(FAMILIES)
        given = rng.choice(GIVEN)
        year, month, day = rng.randint(1930, 2020), rng.randint(1, 12), rng.randint(1, 28)
        patient = {
            "resourceType": "Patient",
            "id": pid,
            "identifier": [
                {
                    "system": "urn:oid:2.16.840.1.113883.4.1",
                    "value": f"{rng.randint(100, 899):03d}-{rng.randint(10, 99)}-{index:04d}",
                },
                {"system": "https://carevault.example/mrn", "value": f"MRN{index:08d}"},
            ],
            "active": True,
            "name": [{"use": "official", "family": family, "given": [given, rng.choice(GIVEN)]}],
            "telecom": [{"system": "phone", "value": f"+46 70 {rng.randint(1000000, 9999999)}"}],
            "gender": rng.choice(("female", "male")),
            "birthDate": f"{year:04d}-{month:02d}-{day:02d}",
            "address": [
                {
                    "line": [f"{rng.randint(1, 200)} {rng.choice(FAMILIES)} Street"],
                    "city": rng.choice(CITIES),
                    "postalCode": f"{rng.randint(10000, 99999)}",
                }
            ],
        }
        subject = {"reference": f"Patient/{pid}"}
        enc_id = _uuid(rng)
        start = f"20{rng.randint(15, 25):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        encounter = {
            "resourceType": "Encounter",
            "id": enc_id,
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "AMB",
                "display": "ambulatory",
            },
            "subject": subject,
            "period": {"start": f"{start}T09:00:00Z", "end": f"{start}T09:30:00Z"},
        }
        resources: list[dict[str, Any]] = [patient, encounter]
        for code, display, unit, low, high in rng.sample(VITALS, 5):
            resources.append(
                {
                    "resourceType": "Observation",
                    "id": _uuid(rng),
                    "status": "final",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "observation-category",
                                    "code": "vital-signs",
                                }
                            ]
                        }
                    ],
                    "code": {
                        "coding": [{"system": "http://loinc.org", "code": code, "display": display}]
                    },
                    "subject": subject,
                    "encounter": {"reference": f"Encounter/{enc_id}"},
                    "effectiveDateTime": f"{start}T09:{rng.randint(0, 29):02d}:00Z",
                    "valueQuantity": {
                        "value": round(rng.uniform(low, high), 1),
                        "unit": unit,
                        "system": "http://unitsofmeasure.org",
                        "code": unit,
                    },
                }
            )
        snomed, condition = rng.choice(CONDITIONS)
        resources.append(
            {
                "resourceType": "Condition",
                "id": _uuid(rng),
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active",
                        }
                    ]
                },
                "code": {
                    "coding": [
                        {"system": "http://snomed.info/sct", "code": snomed, "display": condition}
                    ]
                },
                "subject": subject,
                "encounter": {"reference": f"Encounter/{enc_id}"},
                "onsetDateTime": f"{start}T09:00:00Z",
            }
        )
        yield PatientGroup(pid, family, resources)


@dataclass
class SeedResult:
    resources: int
    patient_ids: list[str]
    families: list[str]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.resources / self.seconds if self.seconds else 0.0


async def seed(
    services: Any,
    n: int,
    *,
    batch_groups: int = 25,
    advance: Callable[[int], None] | None = None,
) -> SeedResult:
    """Write the data set through `ResourceStore.write_many`, `batch_groups` patients per
    transaction (every body validated as the HTTP layer would)."""
    store = services.store
    started = time.perf_counter()
    patient_ids: list[str] = []
    families: list[str] = []
    batch: list[WriteOperation] = []
    written = 0

    async def flush() -> None:
        nonlocal written, batch
        if batch:
            await store.write_many(batch)
            written += len(batch)
            if advance:
                advance(len(batch))
            batch = []

    for index, group in enumerate(patient_groups(n)):
        patient_ids.append(group.patient_id)
        families.append(group.family)
        for body in group.resources:
            valid = validate_resource(body, body["resourceType"])
            batch.append(WriteOperation("create", body["resourceType"], body["id"], valid))
        if (index + 1) % batch_groups == 0:
            await flush()
    await flush()
    return SeedResult(written, patient_ids, families, time.perf_counter() - started)


# ---------------------------------------------------------------------------------- read path


def _current_select(resource_type: str, resource_id: str) -> Any:
    """The SELECT `ResourceStore.read` runs (current version joined to its row)."""
    return (
        select(fhir_versions)
        .join(
            fhir_resources,
            and_(
                fhir_resources.c.resource_type == fhir_versions.c.resource_type,
                fhir_resources.c.id == fhir_versions.c.id,
                fhir_resources.c.version == fhir_versions.c.version,
            ),
        )
        .where(
            and_(
                fhir_resources.c.resource_type == resource_type,
                fhir_resources.c.id == resource_id,
            )
        )
    )


async def _select_row(engine: Any, resource_type: str, resource_id: str) -> Any:
    async with read_connection(engine) as conn:
        return (await conn.execute(_current_select(resource_type, resource_id))).first()


async def measure_read_path(
    services: Any,
    patient_ids: list[str],
    *,
    samples: int = 500,
    repeat: int = 5,
    cold_samples: int = 200,
    advance: Callable[[int], None] | None = None,
    seed_value: int = SEED,
) -> dict[str, Any]:
    """Per-call µs (median of per-repeat medians) of the read path's pieces on random Patients.

    full         `store.read("Patient", id)`: SELECT + DEK (cache) + AEAD decrypt + JSON parse
    sql+parse    the same SELECT + `orjson.loads` of the id's plaintext (decrypted beforehand)
    dek+aead     `envelope._dek(scope)` from a warm cache + `_aead_decrypt`, row preloaded
    aead         `_aead_decrypt` alone
    dek-cold     cache cleared, then `_dek(scope)`: data_keys SELECT + KEK unwrap of the DEK
    unwrap       `_unwrap` alone of a preloaded wrapped DEK (KEK AEAD + keyset parse)
    """
    store, envelope, engine = services.store, services.envelope, services.engine
    rng = random.Random(seed_value)
    ids = [rng.choice(patient_ids) for _ in range(samples)]
    rows: dict[str, Any] = {}
    plain: dict[str, bytes] = {}
    deks: dict[str, Any] = {}
    for rid in dict.fromkeys(ids):
        row = await _select_row(engine, "Patient", rid)
        rows[rid] = row
        ad = associated_data("Patient", rid, row.version)
        plain[rid] = await envelope.decrypt(row.scope, row.body, ad)
        deks[rid] = await envelope._dek(row.scope, create=False)
    cold_ids = list(dict.fromkeys(rng.choice(patient_ids) for _ in range(cold_samples)))
    wrapped = {}
    for rid in cold_ids:
        scope = f"patient:{rid}"
        wrapped[rid] = (scope, await envelope._load_row(scope))

    async def full() -> list[float]:
        out = []
        for rid in ids:
            t0 = time.perf_counter()
            await store.read("Patient", rid)
            out.append(time.perf_counter() - t0)
        return out

    async def sql_parse() -> list[float]:
        out = []
        for rid in ids:
            t0 = time.perf_counter()
            row = await _select_row(engine, "Patient", rid)
            orjson.loads(plain[row.id])
            out.append(time.perf_counter() - t0)
        return out

    async def dek_aead() -> list[float]:
        out = []
        for rid in ids:
            row = rows[rid]
            ad = associated_data("Patient", rid, row.version)
            t0 = time.perf_counter()
            dek = await envelope._dek(row.scope, create=False)
            envelope._aead_decrypt(dek, row.body, ad)
            out.append(time.perf_counter() - t0)
        return out

    async def aead_only() -> list[float]:
        out = []
        for rid in ids:
            row = rows[rid]
            ad = associated_data("Patient", rid, row.version)
            dek = deks[rid]
            t0 = time.perf_counter()
            envelope._aead_decrypt(dek, row.body, ad)
            out.append(time.perf_counter() - t0)
        return out

    async def dek_cold() -> list[float]:
        out = []
        for rid in cold_ids:
            scope = wrapped[rid][0]
            envelope._cache.clear()
            t0 = time.perf_counter()
            await envelope._dek(scope, create=False)
            out.append(time.perf_counter() - t0)
        return out

    async def unwrap() -> list[float]:
        out = []
        for rid in cold_ids:
            scope, row = wrapped[rid]
            t0 = time.perf_counter()
            envelope._unwrap(scope, row.wrapped, row.kek_key_id)
            out.append(time.perf_counter() - t0)
        return out

    variants: dict[str, Callable[[], Any]] = {
        "full": full,
        "sql+parse": sql_parse,
        "dek+aead": dek_aead,
        "aead": aead_only,
        "dek-cold": dek_cold,
        "unwrap": unwrap,
    }
    medians: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    await full()  # warm the cache, the connection pool and SQLite's page cache
    for round_no in range(repeat):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            if name not in ("dek-cold", "unwrap"):
                for row in rows.values():  # warm: as the server's cache would be
                    await envelope._dek(row.scope, create=False)
            gc.disable()
            try:
                times = await variants[name]()
            finally:
                gc.enable()
            medians[name].append(statistics.median(times) * 1e6)
            if advance:
                advance(1)
    result = {
        name: {"median_us": round(statistics.median(m), 2), "samples_us": [round(x, 2) for x in m]}
        for name, m in medians.items()
    }
    full_us = result["full"]["median_us"]
    share_diff = (full_us - result["sql+parse"]["median_us"]) / full_us if full_us else 0.0
    share_direct = result["dek+aead"]["median_us"] / full_us if full_us else 0.0
    return {
        "samples": samples,
        "distinct_ids": len(rows),
        "cold_samples": len(cold_ids),
        "repeat": repeat,
        "variants": result,
        "encryption_share": round(max(share_diff, 0.0), 4),
        "encryption_share_direct": round(share_direct, 4),
        "patient_body_bytes": round(statistics.mean(len(p) for p in plain.values())),
    }


def measure_read_path_sync(services: Any, patient_ids: list[str], **kwargs: Any) -> dict[str, Any]:
    return asyncio.run(measure_read_path(services, patient_ids, **kwargs))


# ---------------------------------------------------------------------------------- wrk scripts

# Each thread reads the path list once and starts at a random place in it.
ROTATE_SCRIPT = r"""
local paths = {}
local counter = 0
function init(args)
  for line in io.lines(os.getenv("BENCH_PATHS_FILE")) do
    paths[#paths + 1] = line
  end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  counter = math.random(1, #paths)
end
function request()
  counter = counter % #paths + 1
  return wrk.format(nil, paths[counter])
end
"""

POST_SCRIPT = r"""
local f = io.open(os.getenv("BENCH_BODY_FILE"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/fhir+json"
"""


def write_paths(path: Path, paths: list[str]) -> Path:
    path.write_text("\n".join(paths) + "\n")
    return path


def search_prefixes(families: list[str]) -> list[str]:
    """Name prefixes to search: the first 4 letters of each family name in the data set."""
    return sorted({family[:4].lower() for family in families})


def create_body(patient_id: str) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": "2026-11-23T06:00:00Z",
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org"},
        }
    )


# ---------------------------------------------------------------------------------- HTTP run

READ_IDS_MAX = 5000  # distinct ids the read and search-by-patient scenarios rotate through
SCENARIOS = (
    "baseline",
    "fhir-read",
    "fhir-search-patient",
    "fhir-search-name",
    "fhir-create",
    # one connection: latency without queueing behind the others (the p99 target's row)
    "baseline-c1",
    "fhir-read-c1",
)


def baseline_of(scenario: str) -> str:
    return "baseline-c1" if scenario.endswith("-c1") else "baseline"


def create_pg_schema(pg_url: str) -> tuple[str, str]:
    """A fresh schema for one run: (schema name, database URL that uses it)."""
    import psycopg

    name = f"cvbench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')  # our own name
    sep = "&" if "?" in pg_url else "?"
    return name, f"{pg_url}{sep}options=-csearch_path%3D{name}"


def drop_pg_schema(pg_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def seed_and_measure(
    settings: Any,
    n: int,
    *,
    seed_advance: Callable[[int], None] | None = None,
    measure_advance: Callable[[int], None] | None = None,
    samples: int = 500,
    repeat: int = 5,
    cold_samples: int = 200,
) -> tuple[SeedResult, dict[str, Any]]:
    """Seed through a `build_services` of `settings`, then measure the read path on it."""
    from carevault.runtime import build_services

    services = build_services(settings)
    await services.start()
    try:
        seeded = await seed(services, n, advance=seed_advance)
        read_path = await measure_read_path(
            services,
            seeded.patient_ids,
            samples=samples,
            repeat=repeat,
            cold_samples=cold_samples,
            advance=measure_advance,
        )
    finally:
        await services.close()
    return seeded, read_path


@dataclass
class FhirRun:
    store: str
    size: int
    seeded: SeedResult
    read_path: dict[str, Any]
    chosen: dict[str, Any]  # scenario -> LoadResult (median round by ratio)
    ratios: dict[str, float]  # scenario -> req/s ratio to the baseline of the same round
    p99_ratios: dict[str, float]
    rounds: list[dict[str, Any]]
    info: dict[str, Any]


def run_fhir_http(
    args: Any,
    runner: Any,
    steps: Any,
    size: int,
    pin: bool,
    pg_url: str | None,
) -> FhirRun:
    from bench.server import BenchServer, ServerError, _http
    from carevault.config import Settings

    store_name = "postgresql" if pg_url else "sqlite"
    schema = database_url = None
    if pg_url:
        schema, database_url = create_pg_schema(pg_url)
    server = BenchServer(cpu=0 if pin else None, keep=args.keep, database_url=database_url)
    label = f"{store_name} {size:,}"
    try:
        steps.begin(f"{label}: carevault init + user add", None)
        password = server.prepare()
        steps.done()
        settings = Settings(
            data_dir=server.data_dir,
            database_url=database_url,
            signing_algorithm=server.algorithm,
        )
        total = max(1, size // RESOURCES_PER_PATIENT) * RESOURCES_PER_PATIENT
        progress = steps.progress
        seed_task = progress.add_task(f"{label}: seed through the store", total=total)
        measure_task = progress.add_task(f"{label}: read path in-process", total=6 * args.repeat)
        seeded, read_path = asyncio.run(
            seed_and_measure(
                settings,
                size,
                seed_advance=lambda k: progress.advance(seed_task, k),
                measure_advance=lambda k: progress.advance(measure_task, k),
                repeat=args.repeat,
            )
        )
        progress.remove_task(seed_task)
        progress.remove_task(measure_task)
        steps.progress.advance(steps.overall, 2)

        steps.begin(f"{label}: start server, log in", None)
        server.start(timeout=120)
        server.login(password)
        auth = {"Authorization": server.auth_header}
        first = seeded.patient_ids[0]
        status, _, patient_bytes = _http(
            "GET", f"{server.base_url}/fhir/Patient/{first}", headers=auth
        )
        if status != 200:
            raise ServerError(f"GET /fhir/Patient failed: HTTP {status}")
        server.static_body_file.write_bytes(patient_bytes)
        steps.done()

        root = server.static_body_file.parent
        rng = random.Random(SEED + 1)
        ids = rng.sample(seeded.patient_ids, min(READ_IDS_MAX, len(seeded.patient_ids)))
        prefixes = search_prefixes(seeded.families)
        (root / "create.json").write_bytes(create_body(first))
        files = {
            "fhir-read": write_paths(root / "read.txt", [f"/fhir/Patient/{i}" for i in ids]),
            "fhir-search-patient": write_paths(
                root / "search-patient.txt", [f"/fhir/Observation?patient={i}" for i in ids]
            ),
            "fhir-search-name": write_paths(
                root / "search-name.txt", [f"/fhir/Patient?name={p}" for p in prefixes]
            ),
        }
        # Each scenario answers 2xx before it is loaded (errors under load are then real).
        checks = {
            "baseline": ("GET", "/bench/static", None),
            "fhir-read": ("GET", f"/fhir/Patient/{ids[0]}", None),
            "fhir-search-patient": ("GET", f"/fhir/Observation?patient={ids[0]}", None),
            "fhir-search-name": ("GET", f"/fhir/Patient?name={prefixes[0]}", None),
            "fhir-create": ("POST", "/fhir/Observation", create_body(first)),
        }
        search_sizes = {}
        for name, (method, path, body) in checks.items():
            headers = dict(auth)
            if body is not None:
                headers["Content-Type"] = "application/fhir+json"
            status, _, answer = _http(method, server.base_url + path, body, headers)
            if status not in (200, 201):
                raise ServerError(f"{name}: {method} {path} answered HTTP {status}")
            if name.startswith("fhir-search"):
                search_sizes[name] = len(orjson.loads(answer).get("entry", []))
        _, _, static = _http("GET", server.base_url + "/bench/static")
        if static != patient_bytes:
            raise ServerError("/bench/static does not serve the Patient's bytes")

        scenario_args: dict[str, tuple[str | None, str | None, dict[str, str]]] = {
            "baseline": ("/bench/static", None, {}),
            "fhir-read": ("/", ROTATE_SCRIPT, {"BENCH_PATHS_FILE": str(files["fhir-read"])}),
            "fhir-search-patient": (
                "/",
                ROTATE_SCRIPT,
                {"BENCH_PATHS_FILE": str(files["fhir-search-patient"])},
            ),
            "fhir-search-name": (
                "/",
                ROTATE_SCRIPT,
                {"BENCH_PATHS_FILE": str(files["fhir-search-name"])},
            ),
            "fhir-create": (
                "/fhir/Observation",
                POST_SCRIPT,
                {"BENCH_BODY_FILE": str(root / "create.json")},
            ),
        }
        scenario_args["baseline-c1"] = scenario_args["baseline"]
        scenario_args["fhir-read-c1"] = scenario_args["fhir-read"]
        single = type(runner)(runner.binary, 1, 1, runner.cpu)
        rounds: list[dict[str, Any]] = []
        for round_no in range(args.rounds):
            shift = round_no % len(SCENARIOS)
            order = list(SCENARIOS[shift:] + SCENARIOS[:shift])
            measured: dict[str, Any] = {}
            for name in order:
                path, script, script_env = scenario_args[name]
                url = server.base_url + (path or "/")
                steps.begin(f"{label}: {name} (round {round_no + 1})", args.warmup + args.duration)
                header = None if name.startswith("baseline") else server.auth_header
                load = single if name.endswith("-c1") else runner
                if args.warmup > 0:
                    load.run(url, args.warmup, header, steps.tick_to, script, script_env)
                measured[name] = load.run(
                    url,
                    args.duration,
                    header,
                    lambda t: steps.tick_to(args.warmup + t),
                    script,
                    script_env,
                )
                steps.done()
            rounds.append(measured)
        info = {
            "port": server.port,
            "patient_body_bytes": len(patient_bytes),
            "read_ids": len(ids),
            "name_prefixes": len(prefixes),
            "entries_in_first_search_page": search_sizes,
            "log_tail": server.log_tail(1000),
        }
    finally:
        if "single" in locals():
            single.close()
        server.cleanup()
        if pg_url and schema and not args.keep:
            drop_pg_schema(pg_url, schema)
    chosen: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    p99_ratios: dict[str, float] = {}
    for name in SCENARIOS:
        base = baseline_of(name)
        order = sorted(
            range(len(rounds)),
            key=lambda i, n=name, b=base: rounds[i][n].rps / max(rounds[i][b].rps, 1e-9),
        )
        pick = rounds[order[len(order) // 2]]
        chosen[name] = pick[name]
        ratios[name] = pick[name].rps / max(pick[base].rps, 1e-9)
        p99_ratios[name] = pick[name].latency_us["p99"] / max(pick[base].latency_us["p99"], 1e-9)
    return FhirRun(
        store_name,
        size,
        seeded,
        read_path,
        chosen,
        ratios,
        p99_ratios,
        [{k: v.as_dict() for k, v in r.items()} for r in rounds],
        info,
    )

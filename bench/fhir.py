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
from sqlalchemy import and_, insert, select

from carevault.db.engine import read_connection, read_engines, write_transaction
from carevault.db.tables import (
    fhir_compartments,
    fhir_index_dates,
    fhir_index_keys,
    fhir_resources,
    fhir_versions,
)
from carevault.fhir.store import WriteOperation, associated_data
from carevault.fhir.validation import validate_resource

# Per patient: the Patient, then per encounter 1 Encounter, 5 Observations, 1 Condition. Synthea's
# records have far more of everything per patient; this keeps its proportions roughly (most
# rows Observations, then Encounters, few Conditions) with enough patients for the name and
# patient searches to have many distinct keys.
ENCOUNTERS_PER_PATIENT = 2
RESOURCES_PER_PATIENT = 1 + ENCOUNTERS_PER_PATIENT * 7  # 15
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


def group_count(n: int) -> int:
    """Patients (groups of RESOURCES_PER_PATIENT resources) in a data set of about `n`."""
    return max(1, n // RESOURCES_PER_PATIENT)


def patient_groups(n: int, seed: int = SEED, start: int = 0) -> Iterator[PatientGroup]:
    """Deterministic groups of RESOURCES_PER_PATIENT resources, about `n` resources in all,
    from group number `start` on. Each group has its own random stream (seeded by the data set
    seed and its number), so a data set of 100,000 is the one of 10,000 plus 90,000 more."""
    for index in range(start, group_count(n)):
        yield make_group(index, seed)


def make_group(index: int, seed: int = SEED) -> PatientGroup:
    """Patient group number `index`: the same for a given (index, seed) in every run."""
    rng = random.Random(f"{seed}:{index}")
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
    resources: list[dict[str, Any]] = [patient]
    for _ in range(ENCOUNTERS_PER_PATIENT):
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
        resources.append(encounter)
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
    return PatientGroup(pid, family, resources)


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


SEED_METHODS = ("bulk", "write_many")
VALIDATE_ALL_GROUPS = 50  # the first groups have every body validated; then 1 group in 10


def _validated(group: PatientGroup) -> list[dict[str, Any]]:
    """Every body through `validate_resource`, as the HTTP layer would; the generator's dicts
    must already be in normal form (same JSON), so unvalidated groups store the same data."""
    out = []
    for body in group.resources:
        valid = validate_resource(body, body["resourceType"])
        if valid != body:
            raise AssertionError(f"bench data set: {body['resourceType']} is not in normal form")
        out.append(valid)
    return out


def bulk_unsupported(store: Any) -> str | None:
    """Why `_write_bulk` cannot mirror this store's write path (None: it can)."""
    missing = [
        name
        for name in ("_stamp", "patients_of", "_scope", "_index_rows", "_envelope", "_clock")
        if not hasattr(store, name)
    ]
    return f"ResourceStore has no {', '.join(missing)}" if missing else None


DEK_BULK_PIECES = ("_cache", "_engine", "_custody", "_monotonic", "_clock", "_generation")


async def _create_deks(envelope: Any, scopes: list[str]) -> int:
    """Create the data keys of the scopes that have none yet in ONE vault transaction (the
    envelope's `_create` uses one per scope: half of the seeding time), built as `_create`
    builds them (a new tink AES-256-GCM keyset, wrapped by the current KEK primary with the
    scope as associated data), and put them in the envelope's cache as `_dek` would. Seeding
    processes own disjoint patients, so there is no creation race to resolve. Returns how many
    were created (0 when the envelope lacks a piece this mirrors: then `encrypt` creates them
    one by one, as in production)."""
    import tink
    from sqlalchemy import select as sa_select
    from tink import aead

    from carevault.crypto import envelope as envelope_module
    from carevault.db.tables import data_keys

    template = getattr(envelope_module, "DEK_TEMPLATE", None)
    wrap = getattr(envelope_module, "_wrap", None)
    if template is None or wrap is None or not all(hasattr(envelope, a) for a in DEK_BULK_PIECES):
        return 0
    if envelope._generation != (envelope._signal.read() if envelope._signal is not None else 0):
        return 0  # a destroy was signalled: let `_dek` clear its cache first
    now = envelope._monotonic()
    wanted = [s for s in dict.fromkeys(scopes) if envelope._cache.get(s, now) is None]
    if not wanted:
        return 0
    async with read_connection(envelope._engine) as conn:
        rows = await conn.execute(sa_select(data_keys.c.scope).where(data_keys.c.scope.in_(wanted)))
        existing = {r.scope for r in rows}
    kek = envelope._custody.current_kek()
    created, rows_out = {}, []
    for scope in wanted:
        if scope in existing:
            continue  # `_dek` loads and unwraps it
        handle = tink.new_keyset_handle(template)
        created[scope] = handle.primitive(aead.Aead)
        rows_out.append(
            {
                "scope": scope,
                "wrapped": wrap(handle, kek, scope),
                "kek_key_id": kek.primary_id,
                "created_at": envelope._clock(),
                "destroyed_at": None,
            }
        )
    if rows_out:
        async with write_transaction(envelope._engine) as conn:
            await conn.execute(insert(data_keys), rows_out)
        for scope, primitive in created.items():
            envelope._cache.put(scope, primitive, now)
    return len(rows_out)


async def _write_bulk(services: Any, bodies: list[dict[str, Any]], now: float) -> None:
    """Create `bodies` (new ids) the way `ResourceStore.write_many` does, rows built by the
    store's own code (`_stamp`, `patients_of`, `_scope`, `_index_rows`) and encrypted by its
    envelope, but inserted with one executemany per table in ONE transaction instead of ~8
    statements per resource (the data set's bodies are new: no compare-and-swap to do). Like
    write_many, a transaction that writes an access fact (Patient, CareTeam, ...) moves the
    access generation once."""
    store, envelope = services.store, services.envelope
    resources: list[dict[str, Any]] = []
    versions: list[dict[str, Any]] = []
    compartments: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    dates: list[dict[str, Any]] = []
    prepared = []
    for body in bodies:
        rtype, rid = body["resourceType"], body["id"]
        stamped = store._stamp(body, rid, 1, now)
        patients = store.patients_of(stamped)
        prepared.append((rtype, rid, stamped, patients, store._scope(rtype, patients)))
    await _create_deks(envelope, [p[4] for p in prepared])
    for rtype, rid, stamped, patients, scope in prepared:
        ciphertext = await envelope.encrypt(
            scope, orjson.dumps(stamped), associated_data(rtype, rid, 1)
        )
        row = {
            "resource_type": rtype,
            "id": rid,
            "version": 1,
            "last_updated": now,
            "deleted": False,
            "scope": scope,
        }
        resources.append(row)
        versions.append({**row, "body": ciphertext})
        compartments.extend({"resource_type": rtype, "id": rid, "patient_id": p} for p in patients)
        key_rows, date_rows = store._index_rows(stamped)
        keys.extend(key_rows)
        dates.extend(date_rows)
    generation = getattr(store, "_access_generation", None)
    bump = None
    if generation is not None:
        from carevault.access.generation import ACCESS_FACT_TYPES, bump_in

        if any(b["resourceType"] in ACCESS_FACT_TYPES for b in bodies):
            bump = bump_in
    async with write_transaction(services.engine) as conn:
        for table, rows in (
            (fhir_resources, resources),
            (fhir_versions, versions),
            (fhir_compartments, compartments),
            (fhir_index_keys, keys),
            (fhir_index_dates, dates),
        ):
            if rows:
                await conn.execute(insert(table), rows)
        if bump is not None:
            await bump(conn)
    if bump is not None:
        generation.changed()


async def seed(
    services: Any,
    n: int,
    *,
    start_group: int = 0,
    stop_group: int | None = None,
    step: int = 1,
    method: str = "bulk",
    batch_groups: int = 25,
    advance: Callable[[int], None] | None = None,
    maker: Callable[[int], PatientGroup] | None = None,
    validate_every: int = 10,
) -> SeedResult:
    """Write patient groups `start_group`, `start_group + step`, ... (below `stop_group`, by
    default all of a data set of about `n`) into the store, `batch_groups` patients per
    transaction.

    method "write_many": through `ResourceStore.write_many`, the path of HTTP and Bundle writes.
    method "bulk" (default, ~5x faster): `_write_bulk`, the same rows built by the store's code
    (tested equal to write_many's in tests/test_bench_smoke.py). Either way every body is
    encrypted under its patient's own data key (bulk: the keys of a transaction's new patients
    are created together in one vault transaction, `_create_deks`; write_many: on first use, as
    in production), compartment rows and blind indexes are real. Bodies of the first
    VALIDATE_ALL_GROUPS groups and of every `validate_every`-th after are checked with
    `validate_resource` (the data set is generated in normal form; a body that is not stops the
    run). `maker(index)` builds group `index` (default `make_group`; the "suite" set passes its
    own data set's).
    """
    make = maker or make_group
    if method not in SEED_METHODS:
        raise ValueError(f"seed method must be one of {SEED_METHODS}")
    fallback = bulk_unsupported(services.store) if method == "bulk" else None
    if fallback:  # the store changed under the benchmark: the slow path, said so
        method = "write_many"
    stop = group_count(n) if stop_group is None else stop_group
    started = time.perf_counter()
    patient_ids: list[str] = []
    families: list[str] = []
    batch: list[dict[str, Any]] = []
    written = 0

    async def flush() -> None:
        nonlocal written, batch
        if not batch:
            return
        if method == "bulk":
            await _write_bulk(services, batch, services.store._clock())
        else:
            await services.store.write_many(
                [WriteOperation("create", b["resourceType"], b["id"], b) for b in batch]
            )
        written += len(batch)
        if advance:
            advance(len(batch))
        batch = []

    for count, index in enumerate(range(start_group, stop, step)):
        group = make(index)
        patient_ids.append(group.patient_id)
        families.append(group.family)
        if index < VALIDATE_ALL_GROUPS or index % validate_every == 0:
            batch.extend(_validated(group))
        else:
            batch.extend(group.resources)
        if (count + 1) % batch_groups == 0:
            await flush()
    await flush()
    extra = {"method": method, **({"bulk_fallback": fallback} if fallback else {})}
    return SeedResult(written, patient_ids, families, time.perf_counter() - started, extra)


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

# POST one body per line of BENCH_BODIES_FILE in turn (each for another patient).
POST_SCRIPT = r"""
local bodies = {}
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/fhir+json"
function init(args)
  for line in io.lines(os.getenv("BENCH_BODIES_FILE")) do
    bodies[#bodies + 1] = line
  end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  counter = math.random(1, #bodies)
end
function request()
  counter = counter % #bodies + 1
  return wrk.format("POST", nil, nil, bodies[counter])
end
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


# ---------------------------------------------------------------------------------- seeding


def _seed_worker(
    settings_kwargs: dict[str, Any],
    n: int,
    start_group: int,
    stop_group: int,
    step: int,
    method: str,
    queue: Any,
    maker: Callable[[int], PatientGroup] | None = None,
    validate_every: int = 10,
) -> None:
    """One seeding process (spawned): its own `build_services` on the same database."""
    import traceback

    from carevault.config import Settings
    from carevault.runtime import build_services

    async def run() -> tuple[int, dict[str, Any]]:
        services = build_services(Settings(**settings_kwargs))
        await services.start()
        try:
            result = await seed(
                services,
                n,
                start_group=start_group,
                stop_group=stop_group,
                step=step,
                method=method,
                advance=lambda k: queue.put(("tick", k)),
                maker=maker,
                validate_every=validate_every,
            )
        finally:
            await services.close()
        return result.resources, result.extra

    try:
        queue.put(("done", asyncio.run(run())))
    except BaseException:  # reported to the harness, which stops the run
        queue.put(("error", traceback.format_exc()[-3000:]))


def seed_processes(
    settings_kwargs: dict[str, Any],
    n: int,
    *,
    start_group: int = 0,
    workers: int = 2,
    method: str = "bulk",
    advance: Callable[[int], None] | None = None,
    stop_group: int | None = None,
    maker: Callable[[int], PatientGroup] | None = None,
    validate_every: int = 10,
) -> tuple[int, float, dict[str, Any]]:
    """Seed groups `start_group` .. of a data set of about `n` with `workers` processes (group
    i goes to process i mod workers: validation, index extraction and encryption are CPU-bound
    and run in parallel; SQLite serialises the short write transactions). Returns (resources
    written, seconds, what `seed` reported: the method used). `stop_group` (default: the groups
    of a data set of about `n`) and `maker` (a module-level function, it goes to spawned
    processes) are for data sets other than this module's."""
    import multiprocessing
    import queue as queue_module

    stop_group = group_count(n) if stop_group is None else stop_group
    started = time.perf_counter()
    if stop_group <= start_group:
        return 0, 0.0, {"method": method}
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    processes = [
        context.Process(
            target=_seed_worker,
            args=(
                settings_kwargs,
                n,
                start_group + w,
                stop_group,
                workers,
                method,
                messages,
                maker,
                validate_every,
            ),
            daemon=True,
        )
        for w in range(max(1, workers))
    ]
    for process in processes:
        process.start()
    written = finished = 0
    extra: dict[str, Any] = {}
    try:
        while finished < len(processes):
            try:
                kind, value = messages.get(timeout=1.0)
            except queue_module.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a seeding process died (exit {dead[0].exitcode})"
                    ) from None
                continue
            if kind == "tick":
                written += value
                if advance:
                    advance(value)
            elif kind == "done":
                finished += 1
                extra.update(value[1])
            else:
                raise RuntimeError(f"a seeding process failed:\n{value}")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()  # our own child
    return written, time.perf_counter() - started, extra


# ---------------------------------------------------------------------------------- in-process


async def _count_resources(engine: Any) -> dict[str, int]:
    from sqlalchemy import func

    async with read_connection(engine) as conn:
        rows = await conn.execute(
            select(fhir_resources.c.resource_type, func.count()).group_by(
                fhir_resources.c.resource_type
            )
        )
        return {str(t): int(c) for t, c in rows}


async def explain_queries(services: Any, patient_id: str, prefix: str) -> dict[str, Any]:
    """The data-database statements of a read, a search by patient and a search by name, as the
    product issues them (captured while running them in-process), with their plans: EXPLAIN
    (ANALYZE, BUFFERS) on PostgreSQL, EXPLAIN QUERY PLAN on SQLite."""
    from sqlalchemy import event

    from carevault.db import key_reads
    from carevault.fhir.search import execute, parse_search

    engine = services.engine
    captured: list[tuple[str, Any]] = []

    def listener(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "EXPLAIN", "SELECT 1")):
            captured.append((statement, parameters))

    # Hot reads run on the read engines (`run_read`), writes and the rest on the async one.
    watched = (engine.sync_engine, *read_engines(engine))

    # Reads by key and searches go to the drivers directly (db/key_reads.py): on PostgreSQL
    # watched at psycopg's fetch ...
    driver_fetch = key_reads._fetch

    async def watched_fetch(conn: Any, sql: str, params: Any) -> Any:
        captured.append((sql, params))
        return await driver_fetch(conn, sql, params)

    # ... and on SQLite to the driver's cursor of the read connection, past SQLAlchemy's events.
    sqlite_rows = key_reads._sqlite_rows

    def watched_rows(dbapi_connection: Any, sql: str, values: tuple[Any, ...]) -> Any:
        captured.append((sql, values))
        return sqlite_rows(dbapi_connection, sql, values)

    async def run(name: str, action: Callable[[], Any]) -> list[dict[str, Any]]:
        captured.clear()
        for watched_engine in watched:
            event.listen(watched_engine, "before_cursor_execute", listener)
        key_reads._fetch, key_reads._sqlite_rows = watched_fetch, watched_rows
        try:
            await action()
        finally:
            key_reads._fetch, key_reads._sqlite_rows = driver_fetch, sqlite_rows
            for watched_engine in watched:
                event.remove(watched_engine, "before_cursor_execute", listener)
        statements = [(s, p) for s, p in captured if "data_keys" not in s]
        out = []
        postgres = engine.dialect.name == "postgresql"
        async with read_connection(engine) as conn:
            for statement, parameters in statements:
                prefix_sql = "EXPLAIN (ANALYZE, BUFFERS) " if postgres else "EXPLAIN QUERY PLAN "
                rows = (await conn.exec_driver_sql(prefix_sql + statement, parameters)).all()
                plan = [str(r[0]) if postgres else " ".join(str(x) for x in r) for r in rows]
                out.append({"sql": " ".join(statement.split()), "plan": plan})
        return out

    blind = services.blind_index
    return {
        "read": await run("read", lambda: services.store.read("Patient", patient_id)),
        "search-patient": await run(
            "search-patient",
            lambda: execute(engine, parse_search("Observation", [("patient", patient_id)], blind)),
        ),
        "search-name": await run(
            "search-name",
            lambda: execute(engine, parse_search("Patient", [("name", prefix)], blind)),
        ),
    }


async def measure_in_process(
    settings: Any,
    patient_ids: list[str],
    families: list[str],
    *,
    repeat: int = 5,
    samples: int = 500,
    cold_samples: int = 200,
    advance: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """(read-path measurement, resources per type in the store, query plans)."""
    from carevault.runtime import build_services

    services = build_services(settings)
    await services.start()
    try:
        counts = await _count_resources(services.engine)
        read_path = await measure_read_path(
            services,
            patient_ids,
            samples=samples,
            repeat=repeat,
            cold_samples=cold_samples,
            advance=advance,
        )
        rng = random.Random(SEED + 2)
        plans = await explain_queries(
            services, rng.choice(patient_ids), search_prefixes(families)[0]
        )
    finally:
        await services.close()
    return read_path, counts, plans


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
STORES = ("sqlite", "postgresql")
# The benchmark user's role. Since FHIR sits behind the access decision point, a physician sees
# only patients whose CareTeam lists them (a denied read answers 404); "service" (patients: any,
# every resource class) reads every seeded patient while every request still goes through the
# decision point.
FHIR_ROLE = "service"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def baseline_of(scenario: str) -> str:
    return "baseline-c1" if scenario.endswith("-c1") else "baseline"


def pg_unavailable(pg_url: str) -> str | None:
    """Why PostgreSQL at `pg_url` cannot be used (None: it answers)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(pg_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as err:  # any failure to connect is a reason to skip
        return f"{pg_url.split('@')[-1]} does not answer: {type(err).__name__}: {err}".strip()[:300]
    return None


def wrk_and_stores(
    args: Any, pin: bool, what: str, say: Callable[[str], None]
) -> tuple[Any, list[tuple[str, str | None]], dict[str, str]] | None:
    """The wrk runner and the stores to measure (PostgreSQL skipped, with its reason, when it
    does not answer) of a scenario set that needs wrk; None (after saying why) without wrk."""
    from bench.load import WrkRunner, ensure_wrk

    wrk = None
    if args.loadgen in ("auto", "wrk"):
        wrk = ensure_wrk(not args.no_install, lambda m: say(f"[yellow]{m}[/yellow]"))
    if wrk is None:
        say(f"[red]the {what} set needs wrk (Lua scripts rotate ids and POST bodies)[/red]")
        return None
    runner = WrkRunner(wrk, args.threads, args.connections, 1 if pin else None)
    skipped: dict[str, str] = {}
    stores: list[tuple[str, str | None]] = []
    for store in args.stores:
        if store == "postgresql":
            reason = pg_unavailable(args.pg)
            if reason:
                skipped[store] = reason
                say(f"[yellow]SKIPPED postgresql: {reason}[/yellow]")
                continue
            stores.append((store, args.pg))
        else:
            stores.append((store, None))
    return runner, stores, skipped


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


@dataclass
class FhirRun:
    store: str
    size: int
    seeded: SeedResult  # cumulative: every patient of the data set; seconds: this growth step
    resources_in_store: dict[str, int]  # per type, before the HTTP load (creates add more)
    read_path: dict[str, Any]
    plans: dict[str, Any]
    chosen: dict[str, Any]  # scenario -> LoadResult (median round by ratio)
    ratios: dict[str, float]  # scenario -> req/s ratio to the baseline of the same round
    p99_ratios: dict[str, float]
    rounds: list[dict[str, Any]]
    info: dict[str, Any]


def steps_per_store(sizes: list[int], rounds: int) -> int:
    # init; per size: seed, in-process, server start, every scenario x rounds
    return 1 + len(sizes) * (3 + len(SCENARIOS) * rounds)


def run_fhir_store(
    args: Any,
    runner: Any,
    steps: Any,
    store_name: str,
    pg_url: str | None,
    pin: bool,
    on_run: Callable[[FhirRun], None] | None = None,
) -> list[FhirRun]:
    """One store: a fresh database, seeded to each size in turn (growing: 10,000 then 90,000
    more for 100,000), measured in-process and over HTTP at each size."""
    from bench.server import BenchServer
    from carevault.config import Settings

    schema = database_url = None
    if pg_url:
        schema, database_url = create_pg_schema(pg_url)
    server = BenchServer(
        cpu=0 if pin else None,
        keep=args.keep,
        database_url=database_url,
        role=getattr(args, "fhir_role", FHIR_ROLE),
    )
    runs: list[FhirRun] = []
    try:
        steps.begin(f"{store_name}: carevault init + user add", None)
        password = server.prepare()
        steps.done()
        settings_kwargs = {
            "data_dir": server.data_dir,
            "database_url": database_url,
            "signing_algorithm": server.algorithm,
        }
        settings = Settings(**settings_kwargs)
        have_groups = 0
        for size in sorted(args.sizes):
            label = f"{store_name} {size:,}"
            groups = group_count(size)
            total = (groups - have_groups) * RESOURCES_PER_PATIENT
            steps.begin(
                f"{label}: seed {total:,} more through the store ({args.seed_workers} procs)",
                total,
            )
            written, seconds, seed_extra = seed_processes(
                settings_kwargs,
                size,
                start_group=have_groups,
                workers=args.seed_workers,
                method=args.seed_method,
                advance=steps.advance,
            )
            steps.done()
            have_groups = groups
            every = [make_group(i) for i in range(groups)]
            seeded = SeedResult(
                written,
                [g.patient_id for g in every],
                [g.family for g in every],
                seconds,
                {**seed_extra, "workers": args.seed_workers},
            )
            steps.begin(f"{label}: read path in-process, query plans", 6 * args.repeat)
            read_path, counts, plans = asyncio.run(
                measure_in_process(
                    settings,
                    seeded.patient_ids,
                    seeded.families,
                    repeat=args.repeat,
                    advance=steps.advance,
                )
            )
            steps.done()
            run = _measure_http(
                args,
                runner,
                steps,
                server,
                password,
                label,
                store_name,
                size,
                seeded,
                counts,
                read_path,
                plans,
            )
            runs.append(run)
            if on_run is not None:
                on_run(run)  # the harness writes the results so far
    finally:
        server.cleanup()
        if pg_url and schema and not args.keep:
            drop_pg_schema(pg_url, schema)
    return runs


def _measure_http(
    args: Any,
    runner: Any,
    steps: Any,
    server: Any,
    password: str,
    label: str,
    store_name: str,
    size: int,
    seeded: SeedResult,
    counts: dict[str, int],
    read_path: dict[str, Any],
    plans: dict[str, Any],
) -> FhirRun:
    from bench.server import ServerError, _http

    single = None
    try:
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
        bodies = root / "create.jsonl"
        bodies.write_bytes(b"\n".join(create_body(i) for i in ids) + b"\n")
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
            "fhir-create": ("POST", "/fhir/Observation", create_body(ids[0])),
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

        scenario_args: dict[str, tuple[str, str | None, dict[str, str]]] = {
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
            "fhir-create": ("/fhir/Observation", POST_SCRIPT, {"BENCH_BODIES_FILE": str(bodies)}),
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
                url = server.base_url + path
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
        if single is not None:
            single.close()
        server.stop()
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
        counts,
        read_path,
        plans,
        chosen,
        ratios,
        p99_ratios,
        [{k: v.as_dict() for k, v in r.items()} for r in rounds],
        info,
    )

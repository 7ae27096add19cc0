"""Scenario set "suite" (issue 8): the default of `python -m bench` and `make bench`.

One command measures the real server (`bench.server`, the product app plus the baseline route of
`bench/app.py`) on embedded SQLite and on PostgreSQL (skipped, with the reason printed, when it
does not answer), with 1 and then 2 uvicorn workers, on a seeded data set of realistic shape
(default 10,000 patients, each a ~1.1 KiB Patient and 5 Observations), under load from a
separate process (wrk with a Lua script, or `bench/loadgen.py`), for a bounded time, on
127.0.0.1 only.

Every scenario is reported as requests/s, p50, p99 and errors, and as a ratio to `baseline`
(the static bytes of one Patient, no authentication) measured by the same server in the same
round. `read-during-login-storm` is `fhir-read` while a second load process logs in as fast as
it can: its p99 against fhir-read's p99 at rest shows whether password hashing (Argon2id, on
its own thread pool) holds up the event loop. Reference figures of Medplum, measured elsewhere,
are shown next to the read and name-search rows.

The data set (`patient_group`) is deterministic with random access, like the `fhir` set's, and
is written by `bench.fhir.seed_processes`: the store's own row builders, encryption under each
patient's data key, blind indexes, in parallel processes, with a progress bar.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.fhir import VITALS, PatientGroup
from bench.load import LoadResult

SEED = 20261203
OBSERVATIONS_PER_PATIENT = 5
RESOURCES_PER_PATIENT = 1 + OBSERVATIONS_PER_PATIENT
DEFAULT_PATIENTS = 10_000
QUICK_PATIENTS = 1_000

# Family names are made of three consonant-vowel syllables (all of one length, so that no name
# is a prefix of another): 18 x 5 = 90 syllables, 729,000 names, each patient its own (the
# index goes through a permutation of the name space so that neighbours do not look alike).
# `Patient?name=<family>` then has exactly one hit.
_CONSONANTS = "bdfghjklmnprstvwyz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
_NAME_SPACE = len(_SYLLABLES) ** 3
_NAME_STRIDE = 524_287  # prime, coprime with 729,000: index -> name is one-to-one

GIVEN = (
    "Astrid Nils Elsa Lars Ingrid Karl Maja Erik Alice Oskar Emma Liam Olivia Noah Ava Lucas Mia "
    "Hugo Sofia Leo Anna Jonas Marie Paul Julia Felix Clara Louis Chloe Marco Giulia Sara Omar "
    "Fatima Yusuf Amina Chen Wei Hana Kenji"
).split()
STREETS = "Storgatan Kungsgatan Drottninggatan Vasagatan Parkvagen Skolgatan Kyrkogatan".split()
# (city, district, state, postal code prefix)
CITIES = (
    ("Uppsala", "Fjardingen", "Uppsala lan", "752"),
    ("Lund", "Centrum", "Skane lan", "223"),
    ("Goteborg", "Majorna", "Vastra Gotalands lan", "414"),
    ("Malmo", "Mollevangen", "Skane lan", "214"),
    ("Umea", "Haga", "Vasterbottens lan", "903"),
    ("Orebro", "Vaster", "Orebro lan", "702"),
)
MARITAL = (("M", "Married"), ("S", "Never Married"), ("D", "Divorced"), ("W", "Widowed"))
LANGUAGES = (("sv", "Swedish"), ("en", "English"), ("ar", "Arabic"), ("fi", "Finnish"))


def family_name(index: int) -> str:
    """The family name of patient `index`: unique for index < 729,000."""
    n = (index * _NAME_STRIDE + 7919) % _NAME_SPACE
    a, rest = divmod(n, len(_SYLLABLES) ** 2)
    b, c = divmod(rest, len(_SYLLABLES))
    return (_SYLLABLES[a] + _SYLLABLES[b] + _SYLLABLES[c]).capitalize()


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_patient(index: int, rng: random.Random, pid: str | None) -> dict[str, Any]:
    """A Patient of about 1.1 KiB as served (names, identifiers, telecom, address, birth date,
    marital status, language), in FHIR normal form (what `validate_resource` returns)."""
    family = family_name(index)
    given = [rng.choice(GIVEN), rng.choice(GIVEN)]
    gender = rng.choice(("female", "male"))
    year, month, day = rng.randint(1930, 2020), rng.randint(1, 12), rng.randint(1, 28)
    city, district, state, postal = rng.choice(CITIES)
    marital_code, marital_display = rng.choice(MARITAL)
    lang_code, lang_display = rng.choice(LANGUAGES)
    phone = f"+46 70 {rng.randint(100, 999)} {rng.randint(10, 99)} {rng.randint(10, 99)}"
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if pid is not None:
        patient["id"] = pid
    patient.update(
        {
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "SS",
                            }
                        ]
                    },
                    "system": "urn:oid:1.2.752.129.2.1.3.1",
                    "value": f"{year:04d}{month:02d}{day:02d}{rng.randint(1000, 9999)}",
                },
                {
                    "use": "usual",
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "MR",
                            }
                        ]
                    },
                    "system": "https://carevault.example/mrn",
                    "value": f"MRN{index:08d}",
                },
            ],
            "active": True,
            "name": [{"use": "official", "family": family, "given": given}],
            "telecom": [
                {"system": "phone", "value": phone, "use": "mobile"},
                {
                    "system": "email",
                    "value": f"{given[0].lower()}.{family.lower()}@example.org",
                    "use": "home",
                },
            ],
            "gender": gender,
            "birthDate": f"{year:04d}-{month:02d}-{day:02d}",
            "address": [
                {
                    "use": "home",
                    "line": [f"{rng.choice(STREETS)} {rng.randint(1, 120)}"],
                    "city": city,
                    "district": district,
                    "state": state,
                    "postalCode": f"{postal} {rng.randint(10, 99)}",
                    "country": "SE",
                }
            ],
            "maritalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                        "code": marital_code,
                        "display": marital_display,
                    }
                ]
            },
            "communication": [
                {
                    "language": {
                        "coding": [
                            {
                                "system": "urn:ietf:bcp:47",
                                "code": lang_code,
                                "display": lang_display,
                            }
                        ]
                    },
                    "preferred": True,
                }
            ],
        }
    )
    return patient


def patient_group(index: int, seed: int = SEED) -> PatientGroup:
    """Patient number `index` and its Observations: the same for a given (index, seed)."""
    rng = random.Random(f"suite:{seed}:{index}")
    pid = _uuid(rng)
    patient = make_patient(index, rng, pid)
    subject = {"reference": f"Patient/{pid}"}
    resources: list[dict[str, Any]] = [patient]
    for code, display, unit, low, high in rng.sample(VITALS, OBSERVATIONS_PER_PATIENT):
        day = f"20{rng.randint(18, 26):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
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
                "effectiveDateTime": f"{day}T{rng.randint(7, 17):02d}:{rng.randint(0, 59):02d}:00Z",
                "valueQuantity": {
                    "value": round(rng.uniform(low, high), 1),
                    "unit": unit,
                    "system": "http://unitsofmeasure.org",
                    "code": unit,
                },
            }
        )
    return PatientGroup(pid, patient["name"][0]["family"], resources)


def create_body(index: int) -> bytes:
    """A new Patient (no id: the server assigns one) for the `fhir-create` scenario; its
    index is past the seeded ones, so its name is new too."""
    rng = random.Random(f"suite-create:{SEED}:{index}")
    return orjson.dumps(make_patient(index, rng, None))


# ---------------------------------------------------------------------------------- scenarios

SCENARIOS = (
    "baseline",
    "auth",
    "fhir-read",
    "fhir-search-patient",
    "fhir-search-name",
    "fhir-create",
    "login",
    "read-during-login-storm",
)
REQUESTS = {
    "baseline": "GET /bench/static (the bytes of one Patient, no authentication)",
    "auth": "GET /auth/me (bearer token)",
    "fhir-read": "GET /fhir/Patient/{id}, ids in random order over every seeded patient",
    "fhir-search-patient": "GET /fhir/Observation?patient={id} (5 hits)",
    "fhir-search-name": "GET /fhir/Patient?name={family} (1 hit: every family name is unique)",
    "fhir-create": "POST /fhir/Patient (a new ~1.1 KiB Patient each time)",
    "login": "POST /auth/login (Argon2id verify, tokens, refresh family, audit)",
    "read-during-login-storm": "fhir-read while another load process runs `login`",
}
READ_RATIO_MIN = 0.5  # fhir-read req/s >= 0.5 x baseline req/s
STORM_P99_RATIO_MAX = 3.0  # fhir-read p99 during the login storm <= 3 x its p99 at rest
STORM_LEAD_S = 1.0  # the storm runs this long before the read load starts
CREATE_BODIES = 2000
# Seeding checks the first 50 patients' bodies and every 100th patient's after with
# `validate_resource` (~4 ms a body: every 10th, as the fhir set does, would add a minute).
VALIDATE_EVERY = 100
# `login` rotates over this many accounts: the login throttle lets at most
# `login_max_failures` (5) attempts per account be in flight at once (a burst of parallel
# guesses gets no more tries than a sequence would), so one account would answer most of 32
# concurrent logins with 401. A storm of logins is many people logging in.
LOGIN_ACCOUNTS = 64
LOGIN_ROLE = "physician"  # a person's account (MFA is off for the run: see bench/server.py)
SERVER_START_TIMEOUT_S = 300  # two workers importing the app on a loaded 2-core machine: ~50 s
NAME_CHECKS = 10  # name searches checked to have exactly one hit before the load
# The warm pass (`warm_pass`) reads in pieces of at most WARM_PIECE_S, for at most WARM_MAX_S.
WARM_PIECE_S = 5.0
WARM_MAX_S = 120.0

# Reference figures, NOT measured in this run: Medplum 5.1 (packages/server), one Node.js
# process, PostgreSQL + Redis, its audit off, `wrk -t1 -c32 -d10s`, authenticated requests.
MEDPLUM = {
    "label": "Medplum 5.1 reference (measured elsewhere, not in this run)",
    "setup": "one Node.js process, PostgreSQL + Redis, audit off; wrk -t1 -c32 -d10s, "
    "authenticated; another machine and run: compare orders of magnitude, not percentages",
    "scenarios": {
        "fhir-read": {"rps": 1000.0, "p99_ms": 72.0, "request": "GET Patient/{id} (~1.1 KiB)"},
        "fhir-search-name": {"rps": 700.0, "p99_ms": 140.0, "request": "Patient?name= (1 hit)"},
    },
    # carevault's target (policy, durable audit and decryption on): req/s at least this many
    # times the reference with N workers, and a lower p99.
    "target_rps_ratio": {"1": 1.0, "2": 2.0},
}

# wrk script: GET one path, or rotate over BENCH_PATHS_FILE (one path a line), or send the
# bodies of BENCH_BODIES_FILE in turn; BENCH_METHOD and BENCH_CONTENT_TYPE as named. Each thread
# starts at a random line. `bench/loadgen.py` reads the same variables.
SUITE_SCRIPT = r"""
local paths = nil
local bodies = nil
local counter = 0
local method = os.getenv("BENCH_METHOD")
if method == nil or method == "" then method = "GET" end
wrk.method = method
local ctype = os.getenv("BENCH_CONTENT_TYPE")
if ctype ~= nil and ctype ~= "" then
  wrk.headers["Content-Type"] = ctype
end
local function lines(variable)
  local name = os.getenv(variable)
  if name == nil or name == "" then return nil end
  local out = {}
  for line in io.lines(name) do
    if line ~= "" then out[#out + 1] = line end
  end
  return out
end
function init(args)
  paths = lines("BENCH_PATHS_FILE")
  bodies = lines("BENCH_BODIES_FILE")
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  counter = math.random(1, 1000003)
end
function request()
  counter = counter + 1
  local path = nil
  local body = nil
  if paths then path = paths[counter % #paths + 1] end
  if bodies then body = bodies[counter % #bodies + 1] end
  return wrk.format(method, path, nil, body)
end
"""


@dataclass(frozen=True)
class Load:
    """What one scenario's load process sends."""

    path: str  # the URL path (a placeholder when a paths file rotates)
    authorized: bool
    env: dict[str, str]


def write_lines(path: Path, lines: list[str] | list[bytes]) -> Path:
    data = [x if isinstance(x, bytes) else x.encode() for x in lines]
    path.write_bytes(b"\n".join(data) + b"\n")
    return path


def login_usernames(count: int = LOGIN_ACCOUNTS) -> list[str]:
    return [f"bench.login{i:03d}" for i in range(count)]


def add_login_accounts(
    settings_kwargs: dict[str, Any], password: str, count: int = LOGIN_ACCOUNTS
) -> list[str]:
    """The accounts `login` rotates over, created in-process by `accounts.add_user` (what
    `carevault user add` calls; one Argon2 hash each, much faster than one CLI run each)."""
    import asyncio

    from carevault.config import Settings
    from carevault.identity.roles import Role
    from carevault.runtime import build_services

    names = login_usernames(count)

    async def run() -> None:
        services = build_services(Settings(**settings_kwargs))
        try:
            await services.start()
            for name in names:
                await services.accounts.add_user(name, password, Role(LOGIN_ROLE))
        finally:
            await services.close()

    asyncio.run(run())
    return names


def scenario_loads(root: Path, groups: list[PatientGroup], logins: list[bytes]) -> dict:
    """The files the load processes read, written once per store: every seeded patient, in one
    random order per scenario; `logins` the JSON bodies of POST /auth/login."""
    rng = random.Random(SEED + 1)
    ids = [g.patient_id for g in groups]
    families = [g.family for g in groups]
    rng.shuffle(ids)
    rng.shuffle(families)
    reads = write_lines(root / "read.txt", [f"/fhir/Patient/{i}" for i in ids])
    by_patient = write_lines(
        root / "search-patient.txt", [f"/fhir/Observation?patient={i}" for i in ids[::-1]]
    )
    by_name = write_lines(root / "search-name.txt", [f"/fhir/Patient?name={f}" for f in families])
    creates = write_lines(
        root / "create.jsonl", [create_body(len(groups) + i) for i in range(CREATE_BODIES)]
    )
    login = write_lines(root / "login.jsonl", logins)
    fhir_post = {"BENCH_METHOD": "POST", "BENCH_CONTENT_TYPE": "application/fhir+json"}
    read = Load("/fhir/Patient", True, {"BENCH_PATHS_FILE": str(reads)})
    return {
        "baseline": Load("/bench/static", False, {}),
        "auth": Load("/auth/me", True, {}),
        "fhir-read": read,
        "fhir-search-patient": Load(
            "/fhir/Observation", True, {"BENCH_PATHS_FILE": str(by_patient)}
        ),
        "fhir-search-name": Load("/fhir/Patient", True, {"BENCH_PATHS_FILE": str(by_name)}),
        "fhir-create": Load(
            "/fhir/Patient", True, {**fhir_post, "BENCH_BODIES_FILE": str(creates)}
        ),
        "login": Load(
            "/auth/login",
            False,
            {
                "BENCH_METHOD": "POST",
                "BENCH_CONTENT_TYPE": "application/json",
                "BENCH_BODIES_FILE": str(login),
            },
        ),
        "read-during-login-storm": read,
    }


def runner_with(runner: Any, connections: int) -> Any:
    """A load runner of the same kind and CPU as `runner` with another connection count."""
    from bench.load import PythonLoadRunner, WrkRunner

    if isinstance(runner, WrkRunner):
        return WrkRunner(runner.binary, 1, connections, runner.cpu)
    return PythonLoadRunner(connections, runner.cpu)


def cpu_ticks() -> tuple[int, int] | None:
    """(all CPU time, the part stolen by the hypervisor), in ticks since boot, from the first
    line of /proc/stat; None where there is none. On a virtual machine whose host is busy, the
    guest's CPUs run slower in every respect: a round measured while the host took a fifth of
    the time is not comparable with one measured while it took none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[7]


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the CPUs' time the hypervisor took between two `cpu_ticks` readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


STEAL_WARN = 0.05  # a chosen round with more than this share stolen is flagged under the table


@dataclass
class Measured:
    load: LoadResult
    storm: LoadResult | None = None  # the logins that ran during the read (storm only)

    @property
    def error_count(self) -> int:
        return self.load.error_count + (self.storm.error_count if self.storm else 0)

    def as_dict(self) -> dict[str, Any]:
        out = self.load.as_dict()
        if self.storm is not None:
            out["storm_logins"] = self.storm.as_dict()
        return out


@dataclass
class ServerRun:
    """One server (store x workers): every scenario, the chosen round's figures and ratios."""

    store: str
    workers: int
    patients: int
    chosen: dict[str, Measured]
    ratios: dict[str, float]  # req/s / baseline req/s (same round)
    p99_ratios: dict[str, float]  # p99 / baseline p99 (same round)
    storm_p99_ratio: float  # read p99 during the storm / fhir-read p99 at rest (same round)
    rounds: list[dict[str, Any]]
    info: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.store} w{self.workers}"

    def medplum(self, name: str) -> dict[str, Any] | None:
        ref = MEDPLUM["scenarios"].get(name)
        if ref is None:
            return None
        load = self.chosen[name].load
        ratio = load.rps / ref["rps"]
        target = MEDPLUM["target_rps_ratio"].get(str(self.workers), float(self.workers))
        p99_ms = load.latency_us["p99"] / 1000
        return {
            "reference_rps": ref["rps"],
            "reference_p99_ms": ref["p99_ms"],
            "rps_ratio": round(ratio, 3),
            "target_rps_ratio_min": target,
            "p99_ms": round(p99_ms, 2),
            "p99_lower": p99_ms < ref["p99_ms"],
            "met": ratio >= target and p99_ms < ref["p99_ms"],
        }

    def verdicts(self) -> dict[str, bool]:
        storm = self.chosen["read-during-login-storm"]
        return {
            "fhir_read_ratio": self.ratios["fhir-read"] >= READ_RATIO_MIN,
            # a storm under which no read completed has no p99: that is a failure, not 0x
            "storm_p99_ratio": storm.load.requests > 0
            and self.storm_p99_ratio <= STORM_P99_RATIO_MAX,
            "zero_errors": all(m.error_count == 0 for m in self.chosen.values()),
            "every_scenario_answered": all(
                m.load.requests > 0 and (m.storm is None or m.storm.requests > 0)
                for m in self.chosen.values()
            ),
        }

    @property
    def passed(self) -> bool:
        return all(self.verdicts().values())


def choose(rounds: list[dict[str, Measured]]) -> tuple[dict[str, Measured], dict[str, Any]]:
    """Per scenario, the median round (of an even count, the less favourable of the middle
    two): by req/s ratio to that round's baseline; the storm by its p99 ratio to that round's
    fhir-read. The baseline shown is the one of fhir-read's round."""

    def ratio(r: dict[str, Measured], name: str) -> float:
        return r[name].load.rps / max(r["baseline"].load.rps, 1e-9)

    def storm(r: dict[str, Measured]) -> float:
        rest = r["fhir-read"].load.latency_us["p99"]
        return r["read-during-login-storm"].load.latency_us["p99"] / max(rest, 1e-9)

    picks: dict[str, int] = {}
    for name in SCENARIOS:
        if name == "read-during-login-storm":
            order = sorted(range(len(rounds)), key=lambda i: -storm(rounds[i]))
        else:
            order = sorted(range(len(rounds)), key=lambda i, n=name: ratio(rounds[i], n))
        picks[name] = order[(len(order) - 1) // 2]
    picks["baseline"] = picks["fhir-read"]
    return {name: rounds[i][name] for name, i in picks.items()}, picks


def measure_server(
    args: Any,
    runner: Any,
    steps: Any,
    server: Any,
    password: str,
    store: str,
    groups: list[PatientGroup],
    loads: dict[str, Load] | None,
    logins: list[bytes],
) -> tuple[ServerRun, dict[str, Load]]:
    """Start `server` (its data seeded), check every scenario answers, then measure them all,
    `args.rounds` times in rotating order; the server is stopped afterwards."""
    from bench.server import ServerError, _http

    label = f"{store} w{server.workers}"
    login_runner = storm_runner = None
    try:
        steps.begin(f"{label}: start the server, log in", None)
        server.start(timeout=SERVER_START_TIMEOUT_S)
        server.login(password)
        auth = {"Authorization": server.auth_header}
        status, _, patient_bytes = _http(
            "GET", f"{server.base_url}/fhir/Patient/{groups[0].patient_id}", headers=auth
        )
        if status != 200:
            raise ServerError(f"GET /fhir/Patient/{{id}} answered HTTP {status}")
        server.static_body_file.write_bytes(patient_bytes)  # the baseline's bytes
        root = server.static_body_file.parent
        if loads is None:
            loads = scenario_loads(root, groups, logins)
        checks = check_scenarios(server, loads, patient_bytes, groups)
        steps.done()
        warm = None
        if args.warm_reads:
            steps.begin(f"{label}: warm pass (every patient read ~{args.warm_reads}x)", None)
            warm = warm_pass(args, runner, server, loads["fhir-read"], len(groups))
            steps.done()

        login_runner = runner_with(runner, args.connections)
        storm_runner = runner_with(runner, args.storm_connections)
        rounds: list[dict[str, Measured]] = []
        for round_no in range(args.rounds):
            shift = round_no % len(SCENARIOS)
            measured: dict[str, Measured] = {}
            for name in SCENARIOS[shift:] + SCENARIOS[:shift]:
                load = loads[name]
                url = server.base_url + load.path
                header = server.auth_header if load.authorized else None
                lead = STORM_LEAD_S if name == "read-during-login-storm" else 0.0
                total = lead + args.warmup + args.duration
                steps.begin(f"{label}: {name} (round {round_no + 1}/{args.rounds})", total)
                waited = wait_quiet(server)
                storm = None
                if lead:
                    logins = loads["login"]
                    storm = storm_runner.start(
                        server.base_url + logins.path,
                        total + 1.0,
                        None,
                        SUITE_SCRIPT,
                        logins.env,
                    )
                try:
                    if lead:
                        _sleep(lead, steps.tick_to)
                    if args.warmup > 0:
                        runner.run(
                            url,
                            args.warmup,
                            header,
                            lambda t, s=lead: steps.tick_to(s + t),
                            SUITE_SCRIPT,
                            load.env,
                        )
                    ticks = cpu_ticks()
                    result = runner.run(
                        url,
                        args.duration,
                        header,
                        lambda t, s=lead + args.warmup: steps.tick_to(s + t),
                        SUITE_SCRIPT,
                        load.env,
                    )
                    stolen = steal_share(ticks, cpu_ticks())
                except BaseException:
                    if storm is not None:
                        storm.kill()
                    raise
                measured[name] = Measured(result, storm.wait() if storm is not None else None)
                measured[name].load.extra["waited_for_quiet_s"] = round(waited, 2)
                measured[name].load.extra["cpu_steal_share"] = (
                    None if stolen is None else round(stolen, 4)
                )
                steps.done()
            rounds.append(measured)
        info = {
            "port": server.port,
            "patient_body_bytes": len(patient_bytes),
            "checks": checks,
            "warm_pass": warm,
            "log_tail": server.log_tail(1000),
        }
    finally:
        for extra in (login_runner, storm_runner):
            if extra is not None:
                extra.close()
        server.stop()
    info["problems"] = server.problem_lines()
    chosen, picks = choose(rounds)
    ratios, p99_ratios = {}, {}
    for name in SCENARIOS:
        base = rounds[picks[name]]["baseline"].load
        ratios[name] = chosen[name].load.rps / max(base.rps, 1e-9)
        p99_ratios[name] = chosen[name].load.latency_us["p99"] / max(base.latency_us["p99"], 1e-9)
    storm_round = rounds[picks["read-during-login-storm"]]
    storm_p99_ratio = storm_round["read-during-login-storm"].load.latency_us["p99"] / max(
        storm_round["fhir-read"].load.latency_us["p99"], 1e-9
    )
    info["chosen_rounds"] = {name: i + 1 for name, i in picks.items()}
    run = ServerRun(
        store,
        server.workers,
        len(groups),
        chosen,
        ratios,
        p99_ratios,
        storm_p99_ratio,
        [{k: v.as_dict() for k, v in r.items()} for r in rounds],
        info,
    )
    return run, loads


def warm_pass(args: Any, runner: Any, server: Any, read: Load, patients: int) -> dict[str, Any]:
    """Bring the server to its steady state before it is measured: the read load until it has
    sent `args.warm_reads` reads per seeded patient. A restarted server unwraps each patient's
    data key (~75 us: its row, tink's keyset parse and primitive) and loads its access facts on
    the first read; 2 s of warm-up reach ~2,000 of 10,000 patients, so without this pass the
    first round measured a read ~10% slower than the second (runs L and M, 7 of 8 servers) and
    was the one reported. The first piece's rate is kept: the cold-cache read."""
    wanted = args.warm_reads * patients
    piece = min(WARM_PIECE_S, max(args.duration, 1.0))
    sent, seconds, pieces = 0, 0.0, []
    url = server.base_url + read.path
    while sent < wanted and seconds < WARM_MAX_S:
        result = runner.run(url, piece, server.auth_header, None, SUITE_SCRIPT, read.env)
        sent += result.requests
        seconds += result.duration_s
        pieces.append(round(result.rps, 1))
        if result.requests == 0:
            break  # the server answers nothing: the scenarios will say so
    return {
        "reads": sent,
        "reads_wanted": wanted,
        "seconds": round(seconds, 2),
        "rps_per_piece": pieces,
        "cold_read_rps": pieces[0] if pieces else None,
    }


def _server_cpu_seconds(server: Any) -> float | None:
    """CPU seconds (every thread) of the server process and its worker processes."""
    from bench.access import _cpu_seconds

    process = getattr(server, "_process", None)
    if process is None:
        return None
    pids = [process.pid]
    try:
        for task in Path(f"/proc/{process.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    except OSError:
        pass
    times = [_cpu_seconds(pid) for pid in pids]
    return sum(t for t in times if t is not None) if times[0] is not None else None


def wait_quiet(server: Any, window: float = 0.3, limit: float = 30.0) -> float:
    """Wait until the server (all its workers) used under 10% of a CPU for two windows in a
    row, so that requests a finished load process left queued (logins behind the hash pool)
    are not answered during the next scenario; returns the seconds waited."""
    started = time.monotonic()
    last = _server_cpu_seconds(server)
    if last is None:
        return 0.0
    quiet = 0
    while quiet < 2 and time.monotonic() - started < limit:
        time.sleep(window)
        now = _server_cpu_seconds(server)
        if now is None:
            break
        quiet = quiet + 1 if now - last < 0.1 * window else 0
        last = now
    return time.monotonic() - started


def _sleep(seconds: float, tick: Any) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        tick(seconds - left)
        time.sleep(min(0.1, left))


def check_scenarios(
    server: Any, loads: dict[str, Load], patient_bytes: bytes, groups: list[PatientGroup]
) -> dict[str, Any]:
    """Each scenario answers 2xx once before it is loaded (so errors under load are real), the
    baseline serves the Patient's exact bytes, and name searches have exactly one hit."""
    from bench.server import ServerError, _http

    auth = {"Authorization": server.auth_header}
    out: dict[str, Any] = {}
    first_line = {}
    for name, load in loads.items():
        for variable in ("BENCH_PATHS_FILE", "BENCH_BODIES_FILE"):
            if variable in load.env:
                with open(load.env[variable], "rb") as f:
                    first_line[(name, variable)] = f.readline().rstrip(b"\n")
    for name in ("baseline", "auth", "fhir-read", "fhir-search-patient", "fhir-create", "login"):
        load = loads[name]
        path = load.path
        if (name, "BENCH_PATHS_FILE") in first_line:
            path = first_line[(name, "BENCH_PATHS_FILE")].decode()
        body = first_line.get((name, "BENCH_BODIES_FILE"))
        headers = dict(auth) if load.authorized else {}
        if body is not None:
            headers["Content-Type"] = load.env["BENCH_CONTENT_TYPE"]
        method = load.env.get("BENCH_METHOD", "GET")
        status, _, answer = _http(method, server.base_url + path, body, headers, timeout=30.0)
        if status not in (200, 201):
            raise ServerError(f"{name}: {method} {path} answered HTTP {status}: {answer[:300]!r}")
        if name == "fhir-search-patient":
            out["search_patient_entries"] = len(orjson.loads(answer).get("entry", []))
    _, _, static = _http("GET", server.base_url + "/bench/static")
    if static != patient_bytes:
        raise ServerError("/bench/static does not serve the Patient's bytes")
    hits = []
    for group in groups[:NAME_CHECKS]:
        path = f"/fhir/Patient?name={group.family}"
        status, _, answer = _http("GET", server.base_url + path, headers=auth)
        entries = orjson.loads(answer).get("entry", []) if status == 200 else []
        if status != 200 or len(entries) != 1:
            raise ServerError(f"GET {path}: HTTP {status}, {len(entries)} entries (1 expected)")
        hits.append(len(entries))
    out["search_name_entries"] = hits
    return out


# ---------------------------------------------------------------------------------- stores


def steps_per_store(args: Any) -> int:
    # init + user add; seed; per worker count: start, warm pass, every scenario x rounds
    warm = 1 if args.warm_reads else 0
    return 2 + len(args.server_workers) * (1 + warm + len(SCENARIOS) * args.rounds)


def run_store(
    args: Any,
    runner: Any,
    steps: Any,
    store: str,
    pg_url: str | None,
    pin: bool,
    on_run: Any = None,
    on_failure: Any = None,
) -> dict[str, Any]:
    """One store: a fresh database (PostgreSQL: a fresh schema, dropped afterwards), seeded
    once, then measured with each worker count in turn on the same data. A server that does
    not start or a load generator that fails is reported to `on_failure(label, message)` and
    the next worker count runs."""
    from bench.fhir import create_pg_schema, drop_pg_schema, seed_processes
    from bench.load import LoadError
    from bench.server import BenchServer, ServerError

    schema = database_url = None
    if pg_url:
        schema, database_url = create_pg_schema(pg_url)
    extra_env = {}
    if args.rate_limit == "high":
        extra_env = {
            "CAREVAULT_RATE_LIMIT_ENABLED": "true",
            "CAREVAULT_RATE_LIMIT_PER_ADDRESS": "10000000/minute",
            "CAREVAULT_RATE_LIMIT_PER_PRINCIPAL": "10000000/minute",
            "CAREVAULT_RATE_LIMIT_AUTH_PER_ADDRESS": "10000000/minute",
        }
    server = BenchServer(
        cpu=0 if pin and args.pin_server else None,
        keep=args.keep,
        database_url=database_url,
        role="service",
        extra_env=extra_env,
    )
    seeded: dict[str, Any] = {}
    try:
        steps.begin(
            f"{store}: carevault init + user add, {args.login_accounts} login accounts", None
        )
        password = server.prepare()
        settings_kwargs = {
            "data_dir": server.data_dir,
            "database_url": database_url,
            "signing_algorithm": server.algorithm,
        }
        names = add_login_accounts(settings_kwargs, password, args.login_accounts)
        logins = [orjson.dumps({"username": n, "password": password}) for n in names]
        steps.done()
        total = args.patients * RESOURCES_PER_PATIENT
        steps.begin(
            f"{store}: seed {args.patients:,} patients ({total:,} resources, "
            f"{args.seed_workers} processes)",
            total,
        )
        written, seconds, extra = seed_processes(
            settings_kwargs,
            total,
            workers=args.seed_workers,
            method=args.seed_method,
            advance=steps.advance,
            stop_group=args.patients,
            maker=patient_group,
            validate_every=VALIDATE_EVERY,
        )
        steps.done()
        groups = [patient_group(i) for i in range(args.patients)]
        sizes = [len(orjson.dumps(g.resources[0])) for g in groups]
        seeded = {
            "patients": args.patients,
            "resources": written,
            "observations_per_patient": OBSERVATIONS_PER_PATIENT,
            "seconds": round(seconds, 2),
            "resources_per_second": round(written / seconds, 1) if seconds else None,
            "processes": args.seed_workers,
            "patient_json_bytes_mean": round(sum(sizes) / len(sizes), 1),
            "patient_json_bytes_min": min(sizes),
            "patient_json_bytes_max": max(sizes),
            **extra,
        }
        loads = None
        for workers in args.server_workers:
            server.workers = workers
            try:
                run, loads = measure_server(
                    args, runner, steps, server, password, store, groups, loads, logins
                )
            except (ServerError, LoadError) as err:
                if on_failure is None:
                    raise
                on_failure(f"{store} w{workers}", f"{type(err).__name__}: {err}"[:3000])
                continue
            run.info["seed"] = seeded
            if on_run is not None:
                on_run(run)
    finally:
        server.cleanup()
        if pg_url and schema and not args.keep:
            drop_pg_schema(pg_url, schema)
    return seeded


# ---------------------------------------------------------------------------------- report


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _errors(m: Measured) -> str:
    """The error count, with "timeouts" when every one was wrk's 5 s timeout (a queue, not a
    failed request: a 4xx/5xx is counted under "status")."""
    loads = [m.load] + ([m.storm] if m.storm is not None else [])
    total = m.error_count
    timeouts = sum(int(x.errors.get("timeout", 0)) for x in loads)
    return f"{total} timeouts" if total and timeouts == total else str(total)


def _verdict(ok: bool) -> str:
    return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"


def table(runs: list[ServerRun]) -> Any:
    from rich.table import Table

    out = Table(
        title="carevault benchmark suite: ratios to `baseline` (static bytes of one Patient, "
        "no auth) of the same server and round",
        caption="vs Medplum: req/s / the reference's (fhir-read 1,000 req/s, p99 72 ms; "
        "fhir-search-name 700 req/s, p99 140 ms), target >= 1x with 1 worker and >= 2x with 2, "
        f"p99 ours/theirs lower. {MEDPLUM['label']}: {MEDPLUM['setup']}. errors of the storm row "
        "include its logins'. On 2 cores, 2 workers and the load generator share the CPUs.",
    )
    for col, justify in (
        ("server", "left"),
        ("scenario", "left"),
        ("req/s", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("errors", "right"),
        ("ratio", "right"),
        ("p99 ratio", "right"),
        ("target", "left"),
        ("result", "center"),
        ("vs Medplum (reference)", "left"),
    ):
        out.add_column(col, justify=justify)  # type: ignore[arg-type]
    for run in runs:
        for name in SCENARIOS:
            m = run.chosen[name]
            load = m.load
            target, verdict = "", "info"
            if name == "baseline":
                verdict = "baseline"
            elif name == "fhir-read":
                target = f"ratio >= {READ_RATIO_MIN:.2f}"
                verdict = _verdict(run.ratios[name] >= READ_RATIO_MIN)
            elif name == "read-during-login-storm":
                target = f"p99 {run.storm_p99_ratio:.2f}x rest (<= {STORM_P99_RATIO_MAX:.0f}x)"
                verdict = _verdict(run.verdicts()["storm_p99_ratio"])
            if m.error_count:
                verdict = "[red]ERRORS[/red]"
            if load.requests == 0 or (m.storm is not None and m.storm.requests == 0):
                verdict = "[red]NO ANSWER[/red]"
            medplum = run.medplum(name)
            vs = ""
            if medplum:
                colour = "green" if medplum["met"] else "red"
                vs = (
                    f"[{colour}]{medplum['rps_ratio']:.2f}x[/{colour}] "
                    f"(>= {medplum['target_rps_ratio_min']:.0f}x), "
                    f"p99 {medplum['p99_ms']:.0f}/{medplum['reference_p99_ms']:.0f} ms"
                )
            out.add_row(
                run.label,
                name,
                f"{load.rps:,.0f}",
                _ms(load.latency_us["p50"]),
                _ms(load.latency_us["p99"]),
                _errors(m),
                f"{run.ratios[name]:.2f}",
                f"{run.p99_ratios[name]:.2f}",
                target,
                verdict,
                vs,
            )
        out.add_section()
    return out


def chart(runs: list[ServerRun], path: Path) -> Path | None:
    """A PNG next to the JSON: req/s ratio to baseline per scenario and server; req/s of read
    and name search against the Medplum reference; read p99 at rest and during the storm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not runs:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [3, 1.3, 1.3]})
    names = [n for n in SCENARIOS if n != "baseline"]
    width = 0.8 / len(runs)
    ax = axes[0]
    for k, run in enumerate(runs):
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [run.ratios[n] for n in names], width, label=run.label)
    ax.axhline(READ_RATIO_MIN, color="red", linestyle="--", linewidth=1)
    ax.text(
        len(names) - 0.5,
        READ_RATIO_MIN,
        f" read target {READ_RATIO_MIN}x",
        color="red",
        va="bottom",
        ha="right",
        fontsize=8,
    )
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("req/s / baseline req/s (same server, same round)")
    ax.set_title("Ratio to baseline (static Patient bytes, no auth)")
    ax.legend(fontsize=8)

    ax = axes[1]
    refs = list(MEDPLUM["scenarios"])
    width2 = 0.8 / len(runs)
    for k, run in enumerate(runs):
        xs = [i + (k - (len(runs) - 1) / 2) * width2 for i in range(len(refs))]
        ax.bar(xs, [run.chosen[n].load.rps for n in refs], width2, label=run.label)
    for i, n in enumerate(refs):
        ref = MEDPLUM["scenarios"][n]["rps"]
        ax.hlines(ref, i - 0.45, i + 0.45, color="black", linestyle="--", linewidth=1)
        ax.text(i, ref, f"Medplum {ref:,.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(refs)), refs, fontsize=8)
    ax.set_ylabel("req/s")
    ax.set_title("vs Medplum reference (measured elsewhere)", fontsize=10)

    ax = axes[2]
    labels = [run.label for run in runs]
    rest = [run.chosen["fhir-read"].load.latency_us["p99"] / 1000 for run in runs]
    storm = [run.chosen["read-during-login-storm"].load.latency_us["p99"] / 1000 for run in runs]
    xs = range(len(runs))
    ax.bar([x - 0.2 for x in xs], rest, 0.4, label="fhir-read at rest")
    ax.bar([x + 0.2 for x in xs], storm, 0.4, label="during login storm")
    for x, run in zip(xs, runs, strict=True):
        ax.text(
            x + 0.2, storm[x], f"{run.storm_p99_ratio:.1f}x", ha="center", va="bottom", fontsize=8
        )
    ax.set_xticks(list(xs), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("p99 ms")
    ax.set_title(f"Read p99: storm / rest (target <= {STORM_P99_RATIO_MAX:.0f}x)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(
    args: Any,
    started: dt.datetime,
    machine: dict[str, Any],
    stores: list[tuple[str, str | None]],
    skipped: dict[str, str],
    runs: list[ServerRun],
    complete: bool,
    error: str | None,
    chart_path: Path | None,
) -> dict[str, Any]:
    return {
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "command": [sys.executable, "-m", "bench", *sys.argv[1:]],
        "scenario_set": "suite",
        "machine": machine,
        "parameters": {
            "stores": [s for s, _ in stores],
            "skipped_stores": skipped,
            "server_workers": args.server_workers,
            "patients": args.patients,
            "observations_per_patient": OBSERVATIONS_PER_PATIENT,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "warm_reads_per_patient": args.warm_reads,
            "connections": args.connections,
            "storm_connections": args.storm_connections,
            "login_accounts": args.login_accounts,
            "storm_lead_s": STORM_LEAD_S,
            "threads": args.threads,
            "rounds": args.rounds,
            "seed_workers": args.seed_workers,
            "seed_method": args.seed_method,
            "user_role": "service",
            "rate_limits": "off (CAREVAULT_RATE_LIMIT_ENABLED=false)"
            if args.rate_limit == "off"
            else "on, 10,000,000/minute per address, principal and auth address",
            "pinned": machine.get("pinned"),
            "server_pinned_to_cpu0": bool(machine.get("pinned") and args.pin_server),
            "quick": args.quick,
            "server": {"factory": "bench.app:create_bench_app", "host": "127.0.0.1"},
            "requests": REQUESTS,
        },
        "targets": {
            "fhir_read_rps_ratio_min": READ_RATIO_MIN,
            "storm_read_p99_ratio_max": STORM_P99_RATIO_MAX,
            "errors": 0,
        },
        "medplum_reference": MEDPLUM,
        "results": [
            {
                "store": run.store,
                "workers": run.workers,
                "patients": run.patients,
                "scenarios": {
                    name: {
                        **run.chosen[name].as_dict(),
                        "rps_ratio": round(run.ratios[name], 4),
                        "p99_ratio": round(run.p99_ratios[name], 4),
                        **(
                            {"p99_ratio_to_read_at_rest": round(run.storm_p99_ratio, 4)}
                            if name == "read-during-login-storm"
                            else {}
                        ),
                        **({"vs_medplum": run.medplum(name)} if run.medplum(name) else {}),
                    }
                    for name in SCENARIOS
                },
                "verdicts": run.verdicts(),
                "passed": run.passed,
                "medplum_targets_met": all(
                    (run.medplum(n) or {}).get("met", True) for n in MEDPLUM["scenarios"]
                ),
                "rounds": run.rounds,
                "server": run.info,
            }
            for run in runs
        ],
        "chart": chart_path.name if chart_path else None,
        "complete": complete,
        "error": error,
        "passed": all(run.passed for run in runs) if complete and runs else None,
    }


# ---------------------------------------------------------------------------------- main


def load_runner(args: Any, pin: bool, say: Any) -> Any:
    """wrk (installed from Debian's package when missing and root), else the Python load
    generator, on CPU 1 when pinned."""
    from bench.load import PythonLoadRunner, WrkRunner, ensure_wrk

    cpu = 1 if pin else None
    wrk = None
    if args.loadgen in ("auto", "wrk"):
        wrk = ensure_wrk(not args.no_install, lambda m: say(f"[yellow]{m}[/yellow]"))
        if wrk is None and args.loadgen == "wrk":
            return None
    if wrk:
        return WrkRunner(wrk, args.threads, args.connections, cpu)
    say(
        "[yellow]using the Python load generator: on a 2-core machine its own CPU use lowers "
        "every req/s figure; ratios stay comparable[/yellow]"
    )
    return PythonLoadRunner(args.connections, cpu)


def stores_to_run(args: Any, say: Any) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    from bench.fhir import pg_unavailable

    stores: list[tuple[str, str | None]] = []
    skipped: dict[str, str] = {}
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
    return stores, skipped


def suite_main(
    args: Any,
    started: dt.datetime,
    cpus: int,
    pin: bool,
    console: Any,
    machine_info: Any,
    steps_class: Any,
) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    runner = load_runner(args, pin, console.print)
    if runner is None:
        console.print("[red]wrk is not available[/red]")
        return 2
    stores, skipped = stores_to_run(args, console.print)
    machine = machine_info(runner.name)
    machine["pinned"] = pin
    console.print(
        f"[bold]carevault bench[/bold] suite: {args.patients:,} patients, stores "
        f"{[s for s, _ in stores]}, workers {args.server_workers}, {args.duration:g} s of load "
        f"after {args.warmup:g} s of warm-up, {args.rounds} round(s); {machine['cpu_count']} "
        f"CPUs, load generator {runner.name} (on CPU 1: {pin}), server on CPU 0: "
        f"{pin and args.pin_server}, load average "
        f"{machine['loadavg_at_start']}",
        highlight=False,
    )
    runs: list[ServerRun] = []
    failures: dict[str, str] = {}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = started.strftime("%Y%m%dT%H%M%SZ")
    path = args.output_dir / f"{stem}.json"
    png = args.output_dir / f"{stem}.png"

    def write(complete: bool, error: str | None = None, chart_path: Path | None = None) -> None:
        """The JSON so far: rewritten after every server, so a failure keeps what ran."""
        data = report(args, started, machine, stores, skipped, runs, complete, error, chart_path)
        data["failures"] = failures
        if failures:
            data["passed"] = False
        path.write_text(json.dumps(data, indent=2) + "\n")

    def on_run(run: ServerRun) -> None:
        runs.append(run)
        write(False)

    def on_failure(label: str, message: str) -> None:
        failures[label] = message
        console.print(f"[red]{label} FAILED: {message[:600]}[/red]")
        write(False)

    wall = time.monotonic()
    ticks_at_start = cpu_ticks()
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
                run_store(
                    args, runner, steps, store, pg_url, pin, on_run=on_run, on_failure=on_failure
                )
            steps.finish()
    except BaseException as err:
        machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        write(False, f"{type(err).__name__}: {err}"[:2000])
        console.print(f"[red]stopped: partial results in {_display(path)}[/red]")
        raise
    finally:
        runner.close()
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine["wall_seconds"] = round(time.monotonic() - wall, 1)
    stolen = steal_share(ticks_at_start, cpu_ticks())
    machine["cpu_steal_share"] = None if stolen is None else round(stolen, 4)
    chart_path = chart(runs, png)
    write(True, chart_path=chart_path)
    if runs:
        console.print(table(runs))
    for run in runs:
        seed = run.info["seed"]
        if run.workers == args.server_workers[0]:
            console.print(
                f"{run.store}: seeded {seed['patients']:,} patients ({seed['resources']:,} "
                f"resources) in {seed['seconds']:.1f} s ({seed['resources_per_second']:,.0f}/s); "
                f"Patient {run.info['patient_body_bytes']} bytes as served (JSON of the seeded "
                f"Patients: {seed['patient_json_bytes_mean']:.0f} bytes on average)",
                highlight=False,
            )
        warm = run.info.get("warm_pass")
        if warm:
            console.print(
                f"{run.label} warm pass: {warm['reads']:,} reads in {warm['seconds']:.0f} s "
                f"before the rounds; cold-cache read (its first piece) {warm['cold_read_rps']:,.0f}"
                f" req/s, steady-state fhir-read {run.chosen['fhir-read'].load.rps:,.0f} req/s",
                highlight=False,
            )
        storm = run.chosen["read-during-login-storm"].storm
        if storm is not None:
            console.print(
                f"{run.label} login storm: {storm.rps:,.0f} logins/s over "
                f"{args.storm_connections} connections and {args.login_accounts} accounts, p99 "
                f"{_ms(storm.latency_us['p99'])} ms, {storm.error_count} errors",
                highlight=False,
            )
        for name, measured in run.chosen.items():
            share = measured.load.extra.get("cpu_steal_share")
            if share is not None and share > STEAL_WARN:
                console.print(
                    f"[yellow]note: {run.label} {name}: the hypervisor took {share:.0%} of the "
                    "CPUs' time while it was measured; its figures are not comparable with "
                    "those of an undisturbed round[/yellow]"
                )
    for store, reason in skipped.items():
        console.print(f"[yellow]{store} skipped: {reason}[/yellow]")
    passed = bool(runs) and not failures and all(run.passed for run in runs)
    for label, message in failures.items():
        console.print(f"[red]{label} failed: {message[:300]}[/red]")
    load = machine["loadavg_at_start"]
    steal = machine["cpu_steal_share"]
    console.print(
        f"load average at start {load}, at end {machine['loadavg_at_end']} ({cpus} CPUs); "
        f"{machine['wall_seconds'] / 60:.1f} minutes"
        + (f"; CPU time taken by the hypervisor {steal:.1%}" if steal is not None else ""),
        highlight=False,
    )
    if load and load[0] > 0.5 * cpus:
        console.print(
            f"[yellow]note: load average was {load[0]:.2f} on {cpus} CPUs at the start: "
            "other work was running; compare ratios, not absolute figures[/yellow]"
        )
    console.print(
        f"results written to [bold]{_display(path)}[/bold]"
        + (f" and [bold]{_display(chart_path)}[/bold]" if chart_path else "")
        + f"; targets {'all met' if passed else 'NOT all met'}"
    )
    return 1 if args.strict and not passed else 0


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)

"""What `make run` does, by hand: `carevault init --demo`, then `carevault serve`, in a fresh
directory with the default data directory (./var), MFA on for staff as shipped (the demo staff
log in with the code `carevault demo totp` prints). And production mode refusing to start."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import bearer, clean_env, free_port, run_cli

pytestmark = [pytest.mark.slow]

ROLES = ("admin", "physician", "nurse", "registrar", "billing", "auditor", "patient", "service")


def _demo_table(stdout: str) -> dict[str, tuple[str, str]]:
    """{username: (role, password)} from the table `init --demo` prints (box or ASCII rules)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line)]
        cells = [c for c in cells if c]
        if len(cells) == 3 and cells[0].startswith("demo-"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _words(text: str) -> str:
    """The text with every run of whitespace (the console's line wrapping included) as one space."""
    return " ".join(text.split())


def test_init_demo_then_serve_and_log_in(tmp_path, serve_factory):
    env = clean_env()  # no CAREVAULT_DATA_DIR: the default ./var, as `make run` uses it
    first = run_cli(["init", "--demo"], env, tmp_path)

    accounts = _demo_table(first.stdout)
    assert set(accounts) == {f"demo-{role}" for role in ROLES}, first.stdout
    for username, (role, password) in accounts.items():
        assert username == f"demo-{role}"
        assert re.fullmatch(r"[A-Za-z0-9_-]{16,}", password), password
    assert len({password for _, password in accounts.values()}) == len(ROLES)

    data_dir = tmp_path / "var"
    assert (data_dir / "carevault.db").is_file()
    keys = data_dir / "keys"
    assert _mode(keys) == 0o700
    key_files = [p for p in keys.iterdir()]
    assert key_files and all(p.is_file() for p in key_files)
    assert {p.name: _mode(p) for p in key_files} == {p.name: 0o600 for p in key_files}

    second = run_cli(["init", "--demo"], env, tmp_path)
    for _, password in accounts.values():
        assert password not in second.stdout
        assert password not in second.stderr
    assert _demo_table(second.stdout) == {}

    server = serve_factory(env, tmp_path, data_dir)
    client = server.client()
    # staff must have MFA (the default): the demo physician's password alone is not a login,
    # the code `carevault demo totp` prints finishes it
    first_step = client.post(
        "/auth/login",
        json={"username": "demo-physician", "password": accounts["demo-physician"][1]},
    )
    assert first_step.status_code == 200, first_step.text
    assert first_step.json()["mfa_required"] is True and "access_token" not in first_step.json()
    quick_start = _words(first.stdout)
    assert "/auth/mfa/verify" in quick_start, first.stdout
    assert "carevault demo totp demo-physician" in quick_start, first.stdout
    code = run_cli(["demo", "totp", "demo-physician"], env, tmp_path).stdout.strip()
    assert re.fullmatch(r"\d{6}", code), code
    login = client.post(
        "/auth/mfa/verify",
        json={"mfa_token": first_step.json()["mfa_token"], "method": "totp", "code": code},
    )
    assert login.status_code == 200, login.text
    me = client.get("/auth/me", headers=bearer(login.json()["access_token"]))
    assert me.status_code == 200, me.text
    assert me.json()["username"] == "demo-physician"
    assert me.json()["roles"] == ["physician"]
    wrong = client.post(
        "/auth/login", json={"username": "demo-physician", "password": accounts["demo-nurse"][1]}
    )
    assert wrong.status_code == 401
    # codes are shown for demo accounts only, and only for those with a factor
    run_cli(["user", "add", "not.demo", "--role", "physician"], env, tmp_path)
    refused = run_cli(["demo", "totp", "not.demo"], env, tmp_path, check=False)
    assert refused.returncode == 1 and "not a demo account" in _words(refused.stderr)
    assert not re.search(r"\b\d{6}\b", refused.stdout)
    no_factor = run_cli(["demo", "totp", "demo-registrar"], env, tmp_path, check=False)
    assert no_factor.returncode == 1 and "no TOTP factor" in _words(no_factor.stderr)

    # the printed quick start: a FHIR read and a search as demo-physician (the demo patients'
    # care teams list the physician's practitioner), against the running server
    token = login.json()["access_token"]
    read_path = re.search(r"curl -s http://[^/\s]+(/fhir/Patient/demo-patient-1) ", first.stdout)
    search_path = re.search(r'curl -s "http://[^/\s]+(/fhir/Observation\?[^"\s]+)"', first.stdout)
    assert read_path and search_path, first.stdout
    read = client.get(read_path.group(1), headers=bearer(token))
    assert read.status_code == 200, read.text
    assert read.json()["id"] == "demo-patient-1"
    found = client.get(search_path.group(1), headers=bearer(token))
    assert found.status_code == 200, found.text
    entries = found.json()["entry"]
    assert entries and all(
        e["resource"]["subject"]["reference"] == "Patient/demo-patient-1" for e in entries
    )
    # the demo patient reads their own record, and nobody else's
    own = client.post(
        "/auth/login",
        json={"username": "demo-patient", "password": accounts["demo-patient"][1]},
    )
    assert own.status_code == 200, own.text
    mine = client.get("/fhir/Patient/demo-patient-1", headers=bearer(own.json()["access_token"]))
    assert mine.status_code == 200, mine.text
    theirs = client.get("/fhir/Patient/demo-patient-2", headers=bearer(own.json()["access_token"]))
    assert theirs.status_code == 404


def test_production_mode_refuses_unsafe_start(tmp_path):
    env = clean_env()
    run_cli(["init", "--demo"], env, tmp_path)
    port = free_port()
    production = clean_env(CAREVAULT_ENVIRONMENT="production")
    args = ["serve", "--host", "0.0.0.0", "--port", str(port)]

    refused = run_cli(args, production, tmp_path, check=False, timeout=30)
    message = _words(refused.stderr)
    assert refused.returncode != 0, refused.stdout
    assert "Refusing to start in production mode" in message
    assert "0.0.0.0 without TLS" in message and "CAREVAULT_TLS_CERT" in message
    assert "8 demo account(s) exist" in message
    assert "signing.json" not in message  # the key files are private so far
    with pytest.raises(httpx.TransportError):  # and nothing was left listening
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)

    key_file = tmp_path / "var" / "keys" / "signing.json"
    key_file.chmod(0o644)
    refused = run_cli(args, production, tmp_path, check=False, timeout=30)
    message = _words(refused.stderr)
    assert refused.returncode != 0
    assert "var/keys/signing.json is readable by other users (mode 0644)" in message
    assert "chmod 600 var/keys/signing.json" in message

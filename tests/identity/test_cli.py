"""`carevault user ...`, `keys rotate`, `init --demo` and `demo totp` through the real command
line (typer runner)."""

from __future__ import annotations

import asyncio
import json
import re

import pyotp
import pytest
from typer.testing import CliRunner

from carevault.cli import app
from carevault.config import Settings
from tests.conftest import make_settings

PASSWORD = "correct-Horse-battery-staple-91"


@pytest.fixture
def cli(settings, monkeypatch):
    monkeypatch.setenv("CAREVAULT_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CAREVAULT_DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("CAREVAULT_DATABASE_URL", raising=False)
    runner = CliRunner()

    def run(*args: str, stdin: str | None = None):
        return runner.invoke(app, list(args), input=stdin)

    return run


async def test_user_lifecycle(cli, harness_factory, settings):
    added = await asyncio.to_thread(
        cli,
        "user",
        "add",
        "dr.cli",
        "--role",
        "physician",
        "--org",
        "org-7",
        "--practitioner",
        "prac-7",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert added.exit_code == 0, added.output
    info = json.loads(added.output[added.output.index("{") : added.output.rindex("}") + 1])
    assert info["username"] == "dr.cli" and info["roles"] == ["physician"]
    assert PASSWORD not in added.output

    assert (await asyncio.to_thread(cli, "user", "disable", "dr.cli")).exit_code == 0
    assert (await asyncio.to_thread(cli, "user", "enable", "dr.cli")).exit_code == 0
    assert (await asyncio.to_thread(cli, "user", "set-role", "dr.cli", "nurse")).exit_code == 0
    reset = await asyncio.to_thread(cli, "user", "reset-password", "dr.cli")
    assert reset.exit_code == 0 and "shown once" in reset.output
    new_password = reset.output.rsplit(":", 1)[1].strip()
    h = await harness_factory(settings)
    me = (await h.me((await h.login("dr.cli", new_password))["access_token"])).json()
    assert me["roles"] == ["nurse"] and me["organization"] == "org-7"


async def test_cli_created_user_logs_in_over_http(cli, harness_factory, settings):
    added = await asyncio.to_thread(
        cli,
        "user",
        "add",
        "pat.one",
        "--role",
        "patient",
        "--patient",
        "p-1",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert added.exit_code == 0, added.output
    h = await harness_factory(settings)
    me = (await h.me((await h.login("pat.one"))["access_token"])).json()
    assert me["patient"] == "p-1" and me["roles"] == ["patient"]


@pytest.mark.parametrize(
    "args,stdin,message",
    [
        (
            ["user", "add", "weak.pw", "--role", "nurse", "--password-stdin"],
            "password1234\n",
            "breached",
        ),
        (
            ["user", "add", "short.pw", "--role", "nurse", "--password-stdin"],
            "short\n",
            "at least 12",
        ),
        (
            ["user", "add", "p.nolink", "--role", "patient", "--password-stdin"],
            PASSWORD + "\n",
            "must link to its Patient",
        ),
        (
            ["user", "add", "bad id", "--role", "nurse", "--password-stdin"],
            PASSWORD + "\n",
            "username must be",
        ),
        (
            ["user", "add", "x.org", "--role", "nurse", "--org", "a/b", "--password-stdin"],
            PASSWORD + "\n",
            "FHIR id",
        ),
        (["user", "disable", "no.such.user"], None, "no such user"),
        (
            ["user", "add", "r.bad", "--role", "superuser", "--password-stdin"],
            PASSWORD + "\n",
            "superuser",
        ),
    ],
)
def test_cli_errors_are_clear_and_never_echo_the_password(cli, args, stdin, message):
    result = cli(*args, stdin=stdin)
    assert result.exit_code != 0
    assert message in result.output
    if stdin:
        assert stdin.strip() not in result.output or stdin.strip() in args


def test_duplicate_username_is_refused(cli):
    assert (
        cli(
            "user", "add", "twice", "--role", "billing", "--password-stdin", stdin=PASSWORD + "\n"
        ).exit_code
        == 0
    )
    again = cli(
        "user", "add", "TWICE", "--role", "billing", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert again.exit_code != 0 and "already exists" in again.output


async def test_cli_disable_ends_live_sessions(cli, harness_factory, settings):
    h = await harness_factory(settings)
    await h.add_user("live.session")
    grant = await h.login("live.session")
    assert (await asyncio.to_thread(cli, "user", "disable", "live.session")).exit_code == 0
    assert (await h.me(grant["access_token"])).status_code == 401


async def test_cli_key_rotation_keeps_live_tokens_valid(cli, harness_factory, settings):
    h = await harness_factory(settings)
    await h.add_user("rotating")
    grant = await h.login("rotating")
    result = await asyncio.to_thread(cli, "keys", "rotate")
    assert result.exit_code == 0, result.output
    assert (await h.me(grant["access_token"])).status_code == 200
    # The server notices the new key file within its reload interval (0.05 s here).
    for _ in range(100):
        jwks = (await h.client.get("/.well-known/jwks.json")).json()
        if len(jwks["keys"]) == 3:  # previous, current, next
            break
        await asyncio.sleep(0.02)
    assert len(jwks["keys"]) == 3
    fresh = await h.login("rotating")
    assert (await h.me(fresh["access_token"])).status_code == 200


# --- MFA: reset, and the demo's TOTP codes ---------------------------------------------------


async def test_cli_mfa_reset_removes_factors_and_ends_sessions(cli, harness_factory, settings):
    from carevault.identity.mfa.totp import STEP_SECONDS, TotpResult
    from tests.audit.trail import audit_documents

    h = await harness_factory(settings)
    user = await h.add_user("lost.factor")
    grant = await h.login("lost.factor")  # MFA is required of no role here: one step
    enrollment = await h.services.mfa.totp.enroll(user.id, user.username)
    authenticator = pyotp.parse_uri(enrollment.otpauth_uri)
    code = authenticator.at(h.services.clock() - STEP_SECONDS)
    assert await h.services.mfa.totp.confirm(user.id, code) is TotpResult.ok
    await h.services.mfa.recovery.generate(user.id)
    assert (await h.login("lost.factor"))["mfa_required"] is True

    result = await asyncio.to_thread(cli, "user", "mfa-reset", "lost.factor")

    assert result.exit_code == 0, result.output
    assert await h.services.mfa.totp.factors(user.id) == []
    assert await h.services.mfa.recovery.remaining(user.id) == 0
    assert (await h.me(grant["access_token"])).status_code == 401
    assert (await h.refresh(grant["refresh_token"])).status_code == 401
    assert "access_token" in await h.login("lost.factor")  # no factor left: one step again
    (event,) = await audit_documents(h.services.engine, "security.mfa_reset")
    assert event["user"] == user.id and event["detail"]["by"] == "cli"

    unknown = await asyncio.to_thread(cli, "user", "mfa-reset", "no.such.user")
    assert unknown.exit_code == 1 and "no such user" in unknown.output


async def test_demo_staff_log_in_with_the_code_demo_totp_prints(cli, harness_factory, settings):
    """`init --demo` as `make run` runs it (MFA required of staff, the default): the staff
    accounts get a TOTP factor, and `carevault demo totp` shows the code that finishes their
    login; it refuses accounts that are not demo accounts."""
    init = await asyncio.to_thread(cli, "init", "--demo")
    assert init.exit_code == 0, init.output
    printed = " ".join(init.output.split())
    assert "/auth/mfa/verify" in printed and "carevault demo totp demo-physician" in printed
    assert "/auth/step-up" in printed
    passwords = dict(re.findall(r"(demo-[a-z]+)\s*[│|┃]\s*[a-z]+\s*[│|┃]\s*(\S+)", init.output))
    assert len(passwords) == 8, init.output

    # the server as the demo runs it: MFA required of staff
    shipped = make_settings(
        settings.data_dir, settings.database_url, mfa_required_roles=Settings().mfa_required_roles
    )
    h = await harness_factory(shipped)
    for name in ("demo-admin", "demo-physician", "demo-nurse", "demo-auditor"):
        user = await h.services.users.by_username(name)
        assert len(await h.services.mfa.totp.factors(user.id)) == 1
        assert await h.services.mfa.recovery.remaining(user.id) == 10
    for name in ("demo-registrar", "demo-billing", "demo-patient", "demo-service"):
        user = await h.services.users.by_username(name)
        assert await h.services.mfa.totp.factors(user.id) == []

    first = await h.login("demo-physician", passwords["demo-physician"])
    assert first["mfa_required"] is True and "access_token" not in first
    shown = await asyncio.to_thread(cli, "demo", "totp", "demo-physician")
    assert shown.exit_code == 0, shown.output
    code = shown.output.strip()
    assert re.fullmatch(r"\d{6}", code), shown.output
    done = await h.client.post(
        "/auth/mfa/verify", json={"mfa_token": first["mfa_token"], "method": "totp", "code": code}
    )
    assert done.status_code == 200, done.text
    assert (await h.me(done.json()["access_token"])).json()["username"] == "demo-physician"
    # a patient still logs in with a password alone
    assert "access_token" in await h.login("demo-patient", passwords["demo-patient"])

    await h.add_user("real.doctor")
    for name, message in (
        ("real.doctor", "not a demo account"),
        ("no.such.user", "not a demo account"),
        ("demo-registrar", "no TOTP factor"),
    ):
        refused = await asyncio.to_thread(cli, "demo", "totp", name)
        assert refused.exit_code == 1, refused.output
        assert message in " ".join(refused.output.split())
        assert not re.search(r"\b\d{6}\b", refused.output)

    # run again, nothing is re-enrolled (the code of the authenticator app stays valid)
    again = await asyncio.to_thread(cli, "init", "--demo")
    assert again.exit_code == 0, again.output
    user = await h.services.users.by_username("demo-physician")
    assert len(await h.services.mfa.totp.factors(user.id)) == 1

"""`carevault user ...` and `keys rotate` through the real command line (typer runner)."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from carevault.cli import app

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

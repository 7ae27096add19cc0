"""The OAuth client registry (oauth/clients.py): every registration rule, the secret kept only
as a keyed hash, `carevault client ...` through the real command line, and `/admin/clients`
(admins with step-up; disabling cuts off the client's tokens). On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from carevault.cli import app as cli_app
from carevault.config import Settings
from carevault.crypto.instance_secrets import InstanceSecrets
from carevault.db.tables import oauth_clients, refresh_families
from carevault.identity.roles import Role
from carevault.oauth.clients import (
    ClientError,
    ClientRegistry,
    disable_client,
    register_client,
    validate_redirect_uri,
)
from carevault.runtime import Services
from tests.audit.trail import audit_documents
from tests.conftest import FakeClock
from tests.identity.mfa.conftest import bearer, enroll_totp

APP = "https://app.example.org/callback"


def public_key(kid: str | None = "k1") -> dict[str, Any]:
    key = ECKey.generate_key("P-256").as_dict(private=False)
    return {**key, "kid": kid} if kid else key


def jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys) or [public_key()]}


async def add_public(clients: ClientRegistry, **overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "auth_method": "none",
        "redirect_uris": [APP],
        "scope": "openid fhirUser launch/patient offline_access patient/Observation.rs",
        **overrides,
    }
    return await clients.add("Patient app", **fields)


@pytest.fixture(scope="module")
def offline() -> ClientRegistry:
    """A registry whose database is never reached: the refusals come before any write."""
    engine = create_async_engine("sqlite+aiosqlite://")
    return ClientRegistry(engine, InstanceSecrets.generate())


async def rows(services: Services) -> list[dict[str, Any]]:
    async with services.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(select(oauth_clients))).mappings()]


# --- registry -------------------------------------------------------------------------------


async def test_public_client_defaults(services: Services) -> None:
    client, secret = await add_public(services.clients)
    assert secret is None and client.public and client.enabled
    assert client.id.startswith("cv_") and len(client.id) <= 64
    assert client.grant_types == ("authorization_code", "refresh_token")
    assert client.allows_grant("authorization_code") and not client.allows_grant(
        "client_credentials"
    )
    assert "patient/Observation.rs" in client.allowed_scopes()
    assert client.secret_hash is None and client.jwks is None
    assert await services.clients.get(client.id) == client
    other, _ = await add_public(services.clients)
    assert other.id != client.id
    assert [c.id for c in await services.clients.list()] == [client.id, other.id]


async def test_confidential_defaults_follow_redirect_uris(services: Services) -> None:
    keys = jwks(public_key("a"), public_key("b"))
    web, secret = await services.clients.add(
        "EHR", auth_method="private_key_jwt", redirect_uris=[APP], scope="user/*.rs", jwks=keys
    )
    assert secret is None and not web.public
    assert web.grant_types == ("authorization_code", "refresh_token")
    assert web.jwks == keys
    backend, _ = await services.clients.add(
        "Bulk export",
        auth_method="private_key_jwt",
        redirect_uris=[],
        scope="system/Patient.rs system/Observation.read",
        jwks=jwks(),
        require_dpop=True,
    )
    assert backend.grant_types == ("client_credentials",) and backend.require_dpop
    assert (await services.clients.get(backend.id)) == backend


async def test_secret_is_stored_only_as_a_keyed_hash(services: Services) -> None:
    client, secret = await services.clients.add(
        "Billing",
        auth_method="client_secret_basic",
        redirect_uris=[],
        scope="system/Claim.rs",
    )
    assert secret and len(secret) >= 43  # 256 random bits
    (row,) = await rows(services)
    assert row["secret_hash"] and len(row["secret_hash"]) == 64
    for value in row.values():
        assert secret not in json.dumps(value, default=str)
    assert services.clients.check_secret(client, secret)
    stored = await services.clients.get(client.id)
    assert stored is not None and services.clients.check_secret(stored, secret)
    for wrong in ("", secret[:-1], secret + "x", secret.upper(), "x" * 10_000):
        assert not services.clients.check_secret(client, wrong)
    public, _ = await add_public(services.clients)
    assert not services.clients.check_secret(public, secret)


def test_same_secret_hashes_differently_per_instance() -> None:
    # a keyed hash: a copy of the table is no oracle for another instance's secrets
    engine = create_async_engine("sqlite+aiosqlite://")
    a, b = (ClientRegistry(engine, InstanceSecrets.generate()) for _ in range(2))
    assert a._secret_hash("x") != b._secret_hash("x")


@pytest.mark.parametrize(
    "uri",
    [
        "https://app.example.org/*",
        "https://*.example.org/cb",
        "https://app.example.org/cb#fragment",
        "https://app.example.org/cb#",
        "http://app.example.org/cb",
        "http://10.0.0.1/cb",
        "http://127.0.0.1.nip.io/cb",
        "https://user:pw@app.example.org/cb",
        "https://user@app.example.org/cb",
        "/relative/cb",
        "app.example.org/cb",
        "https:///cb",
        "javascript:alert(1)",
        "data:text/html,x",
        "com.example.app:/callback",
        "ftp://app.example.org/cb",
        "HTTPS://app.example.org/cb",
        "https://app.example.org/c b",
        "https://app.example.org\\@evil.example/cb",
        "https://evil.example\\.app.example.org/cb",
        "https://app.example.org/cb?x=<script>",
        "https://app.example.org/\u00e9",
        "https://app.example.org:99999/cb",
        "https://app.example.org/" + "a" * 500,
        "",
    ],
)
async def test_redirect_uri_refused(offline: ClientRegistry, uri: str) -> None:
    with pytest.raises(ClientError):
        validate_redirect_uri(uri)
    with pytest.raises(ClientError):
        await add_public(offline, redirect_uris=[uri])


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1/cb",
        "http://127.0.0.1:53121/callback",
        "http://[::1]:8080/cb",
        "http://localhost:3000/cb",
        "https://app.example.org/cb?tenant=7",
        "https://app.example.org:8443/cb",
    ],
)
def test_redirect_uri_accepted_unchanged(uri: str) -> None:
    assert validate_redirect_uri(uri) == uri


async def test_redirect_uri_limits(services: Services) -> None:
    many = [f"https://app.example.org/cb/{i}" for i in range(11)]
    with pytest.raises(ClientError):
        await add_public(services.clients, redirect_uris=many)
    client, _ = await add_public(services.clients, redirect_uris=many[:10] + many[:2])
    assert client.redirect_uris == tuple(many[:10])  # stored as given, repeats dropped


def _private_ec() -> dict[str, Any]:
    return {**ECKey.generate_key("P-256").as_dict(), "kid": "p"}


@pytest.mark.parametrize(
    "bad_jwks",
    [
        pytest.param(lambda: {"keys": [_private_ec()]}, id="private-ec"),
        pytest.param(lambda: {"keys": [RSAKey.generate_key(2048).as_dict()]}, id="private-rsa"),
        pytest.param(lambda: {"keys": [OctKey.generate_key(256).as_dict()]}, id="oct"),
        pytest.param(lambda: {"keys": [{**public_key(), "d": "AAAA"}]}, id="d-member"),
        pytest.param(
            lambda: {"keys": [RSAKey.generate_key(1024).as_dict(private=False)]}, id="rsa-1024"
        ),
        pytest.param(lambda: {"keys": []}, id="empty"),
        pytest.param(lambda: {"keys": [public_key(f"k{i}") for i in range(11)]}, id="too-many"),
        pytest.param(lambda: {"keys": [public_key(None), public_key(None)]}, id="no-kids"),
        pytest.param(lambda: {"keys": [public_key("same"), public_key("same")]}, id="dup-kids"),
        pytest.param(lambda: {"keys": [{**public_key(), "alg": "HS256"}]}, id="alg-hs256"),
        pytest.param(lambda: {"keys": [{**public_key(), "alg": "none"}]}, id="alg-none"),
        pytest.param(lambda: {"keys": [{**public_key(), "use": "enc"}]}, id="use-enc"),
        pytest.param(lambda: {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA"}]}, id="broken"),
        pytest.param(lambda: {"keys": [{"kty": "XYZ"}]}, id="unknown-kty"),
        pytest.param(lambda: {"keys": ["not a key"]}, id="not-an-object"),
        pytest.param(lambda: {"keys": "nope"}, id="keys-not-list"),
        pytest.param(lambda: [public_key()], id="bare-list"),
        pytest.param(lambda: public_key(), id="bare-key"),
    ],
)
async def test_jwks_refused(offline: ClientRegistry, bad_jwks: Any) -> None:
    with pytest.raises(ClientError):
        await offline.add(
            "Backend",
            auth_method="private_key_jwt",
            redirect_uris=[],
            scope="system/Patient.rs",
            jwks=bad_jwks(),
        )


async def test_jwks_key_types_accepted(services: Services) -> None:
    keys = jwks(
        public_key("ec"),
        {**RSAKey.generate_key(2048).as_dict(private=False), "kid": "rsa", "alg": "PS256"},
        {**OKPKey.generate_key("Ed25519").as_dict(private=False), "kid": "ed", "use": "sig"},
    )
    client, _ = await services.clients.add(
        "Backend", auth_method="private_key_jwt", redirect_uris=[], scope="system/*.rs", jwks=keys
    )
    assert client.jwks == keys


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"scope": "patient/Observation.rs superpowers"}, "unknown scope"),
        ({"scope": "patient/observation.rs"}, "lower-case type"),
        ({"scope": "patient/Observation."}, "no action letters"),
        ({"scope": "patient/Observation.sr"}, "letters out of order"),
        ({"scope": "patient/Observation.rs?category=lab"}, "query scopes not supported"),
        ({"scope": "system/Patient.rs"}, "system scope on a public client"),
        ({"scope": ""}, "empty"),
        ({"scope": "   "}, "blank"),
        ({"scope": "openid\tprofile"}, "tab"),
        ({"scope": "openid\nprofile"}, "newline"),
        ({"scope": "openid " * 300}, "too long"),
        ({"scope": 'openid "x"'}, "quote"),
        ({"grant_types": ["authorization_code", "client_credentials"]}, "cc on public"),
        ({"grant_types": ["client_credentials"]}, "cc on public"),
        ({"grant_types": ["password"]}, "unknown grant"),
        ({"grant_types": ["implicit"]}, "unknown grant"),
        ({"grant_types": []}, "no grant"),
        ({"grant_types": ["refresh_token"]}, "refresh without code"),
        ({"redirect_uris": []}, "code without redirect URI"),
        ({"auth_method": "client_secret_post"}, "unknown auth method"),
        ({"auth_method": "None"}, "unknown auth method"),
        ({"jwks": {"keys": [public_key()]}}, "jwks on a public client"),
        ({"require_dpop": "yes"}, "not a bool"),
    ],
)
async def test_public_registration_refused(
    offline: ClientRegistry, fields: dict[str, Any], why: str
) -> None:
    with pytest.raises(ClientError) as err:
        await add_public(offline, **fields)
    assert str(err.value), why


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"scope": "system/Patient.rs"}, "system scope without client_credentials"),
        (
            {"redirect_uris": [], "grant_types": ["client_credentials"], "scope": "openid"},
            "openid without a user",
        ),
        (
            {"redirect_uris": [], "scope": "patient/Observation.rs"},
            "patient scope on a client_credentials client",
        ),
        ({"grant_types": ["client_credentials"]}, "redirect URIs without authorization_code"),
        ({"jwks": None}, "private_key_jwt without keys"),
        ({"auth_method": "client_secret_basic"}, "jwks with a secret"),
        ({"name": ""}, "empty name"),
        ({"name": "x" * 129}, "long name"),
        ({"name": "bad\x00name"}, "control character"),
    ],
)
async def test_confidential_registration_refused(
    offline: ClientRegistry, fields: dict[str, Any], why: str
) -> None:
    values: dict[str, Any] = {
        "name": "EHR",
        "auth_method": "private_key_jwt",
        "redirect_uris": [APP],
        "scope": "user/*.rs",
        "jwks": jwks(),
        **fields,
    }
    name = values.pop("name")
    with pytest.raises(ClientError, match=".") as err:
        await offline.add(name, **values)
    assert "Traceback" not in str(err.value), why


async def test_a_refused_registration_stores_nothing(services: Services) -> None:
    for fields in (
        {"redirect_uris": ["https://app.example.org/*"]},
        {"scope": "system/Patient.rs"},
        {"grant_types": ["client_credentials"]},
        {"jwks": {"keys": [_private_ec()]}},
    ):
        with pytest.raises(ClientError):
            await add_public(services.clients, **fields)
    assert await services.clients.list() == [] and await rows(services) == []


async def test_scope_forms_accepted(services: Services) -> None:
    scope = (
        "openid fhirUser profile offline_access online_access launch launch/patient "
        "launch/encounter patient/*.read user/Observation.write patient/Patient.* "
        "user/Encounter.cruds patient/Condition.s"
    )
    client, _ = await add_public(services.clients, scope=scope + "  openid")
    assert client.scope == scope  # normalised: single spaces, no repeats
    both, _ = await services.clients.add(
        "Hybrid",
        auth_method="private_key_jwt",
        redirect_uris=[APP],
        grant_types=["client_credentials", "authorization_code", "client_credentials"],
        scope="system/*.rs user/*.rs openid",
        jwks=jwks(),
    )
    assert both.grant_types == ("authorization_code", "client_credentials")


async def test_get_of_any_string_is_none(services: Services) -> None:
    for client_id in (
        *("", "cv_nope", "x" * 64, "x" * 65, "x" * 10_000, "cv_\x00", "cv_\u00e9", "cv nope"),
        *("' OR 1=1 --", "%", "cv_%", "\ud800"),
    ):
        assert await services.clients.get(client_id) is None, client_id
        assert await services.clients.disable(client_id) is False, client_id


async def test_disable(services: Services) -> None:
    client, _ = await add_public(services.clients)
    assert await services.clients.disable(client.id) is True
    assert await services.clients.disable(client.id) is False
    stored = await services.clients.get(client.id)
    assert stored is not None and stored.enabled is False
    (row,) = await rows(services)
    assert row["disabled_at"] is not None


async def test_events_never_hold_the_secret(services: Services) -> None:
    client, secret = await register_client(
        services.clients,
        services.events,
        "Billing",
        auth_method="client_secret_basic",
        redirect_uris=[],
        scope="system/Claim.rs",
    )
    assert secret is not None
    await services.audit_writer.drain()
    (event,) = await audit_documents(services.engine, "security.client_registered")
    assert event["client"] == client.id and event["detail"]["auth_method"] == "client_secret_basic"
    assert secret not in json.dumps(await audit_documents(services.engine))
    assert client.secret_hash not in json.dumps(await audit_documents(services.engine))


async def test_disable_client_revokes_its_families_and_tokens(services: Services) -> None:
    client, _ = await add_public(services.clients)
    other, _ = await add_public(services.clients)
    user = await services.accounts.add_user(
        "pat.app", "correct-Horse-battery-staple-91", Role.patient, patient_id="p-1"
    )
    now = int(time.time())
    families = []
    for owner in (client, client, other):
        family, _ = await services.refresh.start_family(
            user_id=user.id, client_id=owner.id, scope="openid", amr=["pwd"], auth_time=now
        )
        families.append(family)
    _, claims = services.issuer.issue(
        subject=user.id,
        session_id=families[0].id,
        client_id=client.id,
        scope="openid",
        roles=["patient"],
        amr=["pwd"],
        auth_time=now,
    )
    _, others_claims = services.issuer.issue(
        subject=user.id,
        session_id=families[2].id,
        client_id=other.id,
        scope="openid",
        roles=["patient"],
        amr=["pwd"],
        auth_time=now,
    )
    assert not await services.revocations.is_revoked(claims)

    disabled = await disable_client(
        client.id,
        clients=services.clients,
        revocations=services.revocations,
        events=services.events,
        settings=services.settings,
    )

    assert disabled is not None and disabled.enabled is False
    async with services.engine.connect() as conn:
        states = {
            r.id: (r.revoked_at, r.revoked_reason)
            for r in await conn.execute(select(refresh_families))
        }
    for family in families[:2]:
        assert states[family.id][0] is not None and states[family.id][1] == "client_disabled"
    assert states[families[2].id] == (None, None)  # another client's session is untouched
    assert await services.revocations.is_revoked(claims)
    assert not await services.revocations.is_revoked(others_claims)
    (event,) = await audit_documents(services.engine, "security.client_disabled")
    assert event["client"] == client.id and event["detail"]["sessions"] == 2
    # repeatable; an unknown id is None
    assert (
        await disable_client(
            client.id,
            clients=services.clients,
            revocations=services.revocations,
            events=services.events,
            settings=services.settings,
        )
    ) is not None
    assert (
        await disable_client(
            "cv_unknown",
            clients=services.clients,
            revocations=services.revocations,
            events=services.events,
            settings=services.settings,
        )
    ) is None


# --- command line ---------------------------------------------------------------------------


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("CAREVAULT_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CAREVAULT_DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("CAREVAULT_DATABASE_URL", raising=False)
    runner = CliRunner()

    async def run(*args: str) -> Any:
        return await asyncio.to_thread(runner.invoke, cli_app, list(args))

    return run


async def test_cli_add_public(cli: Any) -> None:
    result = await cli(
        "client",
        "add",
        "Patient app",
        "--public",
        "--redirect-uri",
        APP,
        "--redirect-uri",
        "http://127.0.0.1:8765/cb",
        "--scope",
        "openid launch/patient patient/*.rs",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert out["client_id"].startswith("cv_") and out["name"] == "Patient app"
    assert out["auth_method"] == "none" and "client_secret" not in out
    assert out["redirect_uris"] == [APP, "http://127.0.0.1:8765/cb"]
    assert out["grant_types"] == ["authorization_code", "refresh_token"]
    assert out["scope"] == "openid launch/patient patient/*.rs" and out["require_dpop"] is False


async def test_cli_add_confidential(cli: Any, tmp_path: Path) -> None:
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps(jwks()))
    pkj = await cli(
        "client",
        "add",
        "Backend",
        "--confidential",
        "--jwks",
        str(keys),
        "--grant-type",
        "client_credentials",
        "--scope",
        "system/Patient.rs",
        "--require-dpop",
    )
    assert pkj.exit_code == 0, pkj.output
    out = json.loads(pkj.stdout)
    assert out["auth_method"] == "private_key_jwt" and out["grant_types"] == ["client_credentials"]
    assert out["require_dpop"] is True and "client_secret" not in out

    basic = await cli(
        "client",
        "add",
        "Billing",
        "--confidential",
        "--auth-method",
        "client_secret_basic",
        "--scope",
        "system/Claim.rs",
    )
    assert basic.exit_code == 0, basic.output
    secret = json.loads(basic.stdout)["client_secret"]
    assert len(secret) >= 43

    listed = await cli("client", "list")
    assert listed.exit_code == 0, listed.output
    clients = json.loads(listed.stdout)
    assert [c["name"] for c in clients] == ["Backend", "Billing"]
    assert secret not in listed.stdout
    assert '"client_secret"' not in listed.stdout and "secret_hash" not in listed.stdout

    disabled = await cli("client", "disable", out["client_id"])
    assert disabled.exit_code == 0, disabled.output
    listed = json.loads((await cli("client", "list")).stdout)
    assert [c["enabled"] for c in listed] == [False, True]
    assert (await cli("client", "disable", "cv_nope")).exit_code != 0


CLI_REFUSALS = [
    ["--redirect-uri", APP, "--scope", "openid"],  # neither --public nor --confidential
    ["--public", "--confidential", "--redirect-uri", APP, "--scope", "openid"],
    ["--public", "--redirect-uri", "http://evil.example/cb", "--scope", "openid"],
    ["--public", "--redirect-uri", "https://app.example.org/*", "--scope", "openid"],
    ["--public", "--redirect-uri", APP, "--scope", "openid root"],
    ["--public", "--redirect-uri", APP, "--scope", "system/Patient.rs"],
    ["--public", "--grant-type", "client_credentials", "--scope", "system/Patient.rs"],
    ["--public", "--auth-method", "client_secret_basic", "--redirect-uri", APP, "--scope", "x"],
    ["--public", "--redirect-uri", APP],  # no --scope
    ["--confidential", "--redirect-uri", APP, "--scope", "user/*.rs"],  # no --jwks
    ["--confidential", "--auth-method", "magic", "--scope", "system/*.rs"],
    ["--confidential", "--jwks", "/no/such/file.json", "--scope", "system/*.rs"],
]


async def test_cli_errors_exit_and_create_nothing(cli: Any) -> None:
    for args in CLI_REFUSALS:
        result = await cli("client", "add", "Bad", *args)
        assert result.exit_code != 0, args
        assert "Traceback" not in result.output and "cv_" not in result.stdout, args
    assert json.loads((await cli("client", "list")).stdout) == []


async def test_cli_refuses_a_private_jwks_file(cli: Any, tmp_path: Path) -> None:
    for name, content in [
        ("private.json", json.dumps({"keys": [_private_ec()]})),
        ("oct.json", json.dumps({"keys": [OctKey.generate_key(256).as_dict()]})),
        ("garbage.json", "{not json"),
        ("list.json", "[]"),
    ]:
        path = tmp_path / name
        path.write_text(content)
        result = await cli(
            "client", "add", "B", "--confidential", "--jwks", str(path), "--scope", "system/*.rs"
        )
        assert result.exit_code != 0 and "error" in result.stderr, name
    assert json.loads((await cli("client", "list")).stdout) == []


# --- admin API ------------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/admin/clients", {"name": "x", "auth_method": "none", "scope": "openid"}),
    ("GET", "/admin/clients", None),
    ("GET", "/admin/clients/cv_x", None),
    ("POST", "/admin/clients/cv_x/disable", None),
]
SECRET_BODY = {
    "name": "Billing",
    "auth_method": "client_secret_basic",
    "scope": "system/Claim.rs",
    "grant_types": ["client_credentials"],
}


@pytest.fixture
def admin_clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
async def h(harness_factory: Any, settings_factory: Any, admin_clock: FakeClock) -> Any:
    settings = settings_factory(
        mfa_required_roles=list(Settings().mfa_required_roles),
        issuer_url="https://testserver",  # OAuth is offered over https only
    )
    return await harness_factory(settings, admin_clock)


async def admin_token(h: Any, clock: FakeClock) -> str:
    await h.add_user("the.admin", Role.admin)
    return str((await enroll_totp(h, "the.admin", clock))["access_token"])


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and "Traceback" not in response.text
    return body


async def test_api_without_token_401(h: Any) -> None:
    for method, path, body in ADMIN_ROUTES:
        problem(await h.client.request(method, path, json=body), 401)


async def test_api_non_admin_403(h: Any, admin_clock: FakeClock) -> None:
    await h.add_user("front.desk", Role.registrar)
    desk = (await h.login("front.desk"))["access_token"]
    for method, path, body in ADMIN_ROUTES:
        problem(await h.client.request(method, path, json=body, headers=bearer(desk)), 403)
    assert await h.services.clients.list() == []
    denied = await audit_documents(h.services.engine, "security.admin_api")
    assert len(denied) == len(ADMIN_ROUTES)


async def test_api_changes_need_step_up(h: Any, admin_clock: FakeClock) -> None:
    token = await admin_token(h, admin_clock)
    admin_clock.advance(301)  # still a valid token, no longer a recent second factor
    for method, path, body in ADMIN_ROUTES:
        response = await h.client.request(method, path, json=body, headers=bearer(token))
        if method == "POST":
            assert problem(response, 401)["acr_values"] == "urn:carevault:mfa"
            assert "insufficient_user_authentication" in response.headers["www-authenticate"]
        else:  # reading the registry needs the role only
            assert response.status_code in (200, 404), response.text
    assert await h.services.clients.list() == []


async def test_api_register_list_get(h: Any, admin_clock: FakeClock) -> None:
    headers = bearer(await admin_token(h, admin_clock))
    created = await h.client.post("/admin/clients", json=SECRET_BODY, headers=headers)
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    body = created.json()
    secret = body["client_secret"]
    assert body["auth_method"] == "client_secret_basic" and "secret_hash" not in body
    stored = await h.services.clients.get(body["client_id"])
    assert stored is not None and h.services.clients.check_secret(stored, secret)

    public = await h.client.post(
        "/admin/clients",
        json={
            "name": "Patient app",
            "auth_method": "none",
            "redirect_uris": [APP],
            "scope": "openid launch/patient patient/*.rs",
            "require_dpop": True,
        },
        headers=headers,
    )
    assert public.status_code == 201, public.text
    assert "client_secret" not in public.json()
    assert public.json()["grant_types"] == ["authorization_code", "refresh_token"]

    listed = await h.client.get("/admin/clients", headers=headers)
    assert listed.status_code == 200
    assert sorted(c["name"] for c in listed.json()) == ["Billing", "Patient app"]
    assert secret not in listed.text
    assert '"client_secret"' not in listed.text and "secret_hash" not in listed.text
    one = await h.client.get(f"/admin/clients/{body['client_id']}", headers=headers)
    assert one.status_code == 200 and one.json()["client_id"] == body["client_id"]
    assert secret not in one.text
    assert '"client_secret"' not in one.text and "secret_hash" not in one.text
    for unknown in ("cv_nope", "x" * 300, "%00", "%C3%A9"):
        problem(await h.client.get(f"/admin/clients/{unknown}", headers=headers), 404)
        problem(await h.client.post(f"/admin/clients/{unknown}/disable", headers=headers), 404)
    registered = await audit_documents(h.services.engine, "security.client_registered")
    assert [e["client"] for e in registered if e["outcome"] == "permit"] == [
        body["client_id"],
        public.json()["client_id"],
    ]
    assert secret not in json.dumps(await audit_documents(h.services.engine))


API_REFUSALS: list[tuple[Any, int]] = [
    ({**SECRET_BODY, "auth_method": "magic"}, 422),
    ({**SECRET_BODY, "scope": "system/Claim.rs root"}, 422),
    ({**SECRET_BODY, "unexpected": 1}, 422),
    ({**SECRET_BODY, "grant_types": ["password"]}, 422),
    (
        {"name": "x", "auth_method": "none", "redirect_uris": [APP + "#f"], "scope": "openid"},
        422,
    ),
    (
        {
            "name": "x",
            "auth_method": "none",
            "redirect_uris": ["http://a.example"],
            "scope": "openid",
        },
        422,
    ),
    ({"name": "x", "auth_method": "none", "redirect_uris": [APP], "scope": "system/*.rs"}, 422),
    (
        {
            "name": "x",
            "auth_method": "private_key_jwt",
            "scope": "system/*.rs",
            "jwks": {"keys": [_private_ec()]},
        },
        422,
    ),
    ({"name": "x", "auth_method": "none", "scope": 7}, 422),
    ({"name": "\x00", "auth_method": "none", "redirect_uris": [APP], "scope": "openid"}, 422),
    ({}, 422),
    ("[1, 2", 400),
    ({**SECRET_BODY, "redirect_uris": [APP] * 50}, 422),
]


async def test_api_bad_input(h: Any, admin_clock: FakeClock) -> None:
    headers = bearer(await admin_token(h, admin_clock))
    for body, status in API_REFUSALS:
        if isinstance(body, str):
            response = await h.client.post(
                "/admin/clients",
                content=body,
                headers={**headers, "Content-Type": "application/json"},
            )
        else:
            response = await h.client.post("/admin/clients", json=body, headers=headers)
        problem(response, status)
    assert await h.services.clients.list() == []
    refused = await audit_documents(h.services.engine, "security.client_registered")
    assert refused and all(e["outcome"] != "permit" for e in refused)


async def test_api_disable_cuts_off_the_client(h: Any, admin_clock: FakeClock) -> None:
    headers = bearer(await admin_token(h, admin_clock))
    created = await h.client.post(
        "/admin/clients",
        json={
            "name": "Patient app",
            "auth_method": "none",
            "redirect_uris": [APP],
            "scope": "openid patient/*.rs",
        },
        headers=headers,
    )
    client_id = created.json()["client_id"]
    services = h.services
    user = await h.add_user("pat.app", Role.patient)
    now = int(admin_clock())
    family, _ = await services.refresh.start_family(
        user_id=user.id,
        client_id=client_id,
        scope="openid patient/*.rs",
        amr=["pwd"],
        auth_time=now,
    )
    token, _ = services.issuer.issue(
        subject=user.id,
        session_id=family.id,
        client_id=client_id,
        scope="openid patient/*.rs",
        roles=["patient"],
        amr=["pwd"],
        auth_time=now,
    )
    _, machine = services.issuer.issue(  # a client-credentials token: `sub` is the client
        subject=client_id,
        session_id=str(uuid.uuid4()),
        client_id=client_id,
        scope="system/*.rs",
        roles=["service"],
        amr=[],
        auth_time=now,
    )
    # an app's token reaches the FHIR API (and userinfo), not carevault's own account API
    userinfo = {"Authorization": f"Bearer {token}"}
    assert (await h.client.get("/oauth/userinfo", headers=userinfo)).status_code == 200
    assert not await services.revocations.is_revoked(machine)

    response = await h.client.post(f"/admin/clients/{client_id}/disable", headers=headers)

    assert response.status_code == 200, response.text
    assert response.json()["enabled"] is False
    async with services.engine.connect() as conn:
        row = (
            await conn.execute(select(refresh_families).where(refresh_families.c.id == family.id))
        ).one()
    assert row.revoked_at is not None and row.revoked_reason == "client_disabled"
    assert (await h.client.get("/oauth/userinfo", headers=userinfo)).status_code == 401
    assert await services.revocations.is_revoked(machine)
    (event,) = await audit_documents(services.engine, "security.client_disabled")
    assert event["client"] == client_id and "user" not in event
    assert event["detail"]["by"] == (await services.users.by_username("the.admin")).id
    again = await h.client.post(f"/admin/clients/{client_id}/disable", headers=headers)
    assert again.status_code == 200 and again.json()["enabled"] is False
    shown = await h.client.get(f"/admin/clients/{client_id}", headers=headers)
    assert shown.json()["enabled"] is False

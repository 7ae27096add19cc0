"""The `carevault` command (typer): init, serve, import, user ..., keys ..., demo ..., client ..."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import pyotp
import typer
from rich.console import Console
from rich.table import Table

from carevault.audit.commands import audit_app
from carevault.audit.events import SecurityEvent
from carevault.config import Settings, UnsafeSettingsError, check_production
from carevault.db import migrate
from carevault.identity.accounts import AccountError, User
from carevault.identity.admin import generate_password
from carevault.identity.authentication import RequestContext
from carevault.identity.mfa.policy import mfa_required
from carevault.identity.mfa.totp import STEP_SECONDS, TotpResult
from carevault.identity.password_policy import PasswordPolicyError
from carevault.identity.roles import Role
from carevault.oauth.clients import ClientError, disable_client, register_client
from carevault.runtime import Services, build_services, ensure_key_material
from carevault.tokens.keys import rotate_keyset

app = typer.Typer(no_args_is_help=True, add_completion=False, help="carevault server and admin.")
user_app = typer.Typer(no_args_is_help=True, help="Manage user accounts.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage signing keys.")
app.add_typer(user_app, name="user")
app.add_typer(keys_app, name="keys")
patient_app = typer.Typer(no_args_is_help=True, help="Patient records (erasure).")
app.add_typer(patient_app, name="patient")
app.add_typer(audit_app, name="audit")
demo_app = typer.Typer(no_args_is_help=True, help="Demo accounts (made by init --demo).")
app.add_typer(demo_app, name="demo")

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

DEMO_ACCOUNTS: list[tuple[str, Role, dict[str, str]]] = [
    ("demo-admin", Role.admin, {}),
    (
        "demo-physician",
        Role.physician,
        {"organization_id": "demo-hospital", "practitioner_id": "demo-practitioner-1"},
    ),
    (
        "demo-nurse",
        Role.nurse,
        {"organization_id": "demo-hospital", "practitioner_id": "demo-practitioner-2"},
    ),
    ("demo-registrar", Role.registrar, {"organization_id": "demo-hospital"}),
    ("demo-billing", Role.billing, {"organization_id": "demo-hospital"}),
    ("demo-auditor", Role.auditor, {}),
    ("demo-patient", Role.patient, {"patient_id": "demo-patient-1"}),
    ("demo-service", Role.service, {"organization_id": "demo-hospital"}),
]


def _run(settings: Settings, work: Callable[[Services], Awaitable[T]]) -> T:
    async def runner() -> T:
        services = build_services(settings)
        try:
            await services.start()
            return await work(services)
        finally:
            await services.close()

    return asyncio.run(runner())


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _read_password_stdin() -> str:
    data = sys.stdin.readline()
    return data[:-1] if data.endswith("\n") else data


def _initialise(settings: Settings) -> None:
    ensure_key_material(settings)
    migrate.upgrade(settings)


@app.command()
def init(
    demo: Annotated[bool, typer.Option(help="Create one demo account per role.")] = False,
) -> None:
    """Create the data directory, keys and database schema (idempotent)."""
    settings = Settings()
    _initialise(settings)
    console.print(f"carevault initialised in [bold]{settings.data_dir}[/bold]")
    if demo:
        created, seeded = _run(settings, _create_demo)
        if seeded is not None:
            console.print(f"demo data set seeded: {seeded} FHIR resources", highlight=False)
        _print_demo(settings, created)


DEMO_CLIENT = "demo-smart-app"
DEMO_REDIRECT = "http://127.0.0.1:8765/callback"  # a loopback native app (RFC 8252 §7.3)


async def _create_demo(services: Services) -> tuple[list[tuple[str, str, str]], int | None]:
    from carevault.fhir.demo_data import seed

    created = await _create_demo_accounts(services)
    await _demo_client(services)
    return created, await seed(services.store)


async def _demo_client(services: Services) -> str:
    """A public SMART app (PKCE) for the quick start's OAuth example; its client_id."""
    for client in await services.clients.list():
        if client.name == DEMO_CLIENT and client.enabled:
            return client.id
    client, _ = await services.clients.add(
        DEMO_CLIENT,
        auth_method="none",
        redirect_uris=[DEMO_REDIRECT],
        scope="openid fhirUser launch/patient offline_access patient/*.rs user/*.rs",
    )
    return client.id


async def _create_demo_accounts(services: Services) -> list[tuple[str, str, str]]:
    created = []
    for username, role, links in DEMO_ACCOUNTS:
        user = await services.users.by_username(username)
        if user is None:
            password = generate_password()
            user = await services.accounts.add_user(username, password, role, is_demo=True, **links)
            created.append((username, str(role), password))
        if user.is_demo and mfa_required(services.settings, user.roles):
            await _enroll_demo_totp(services, user)
    return created


async def _enroll_demo_totp(services: Services, user: User) -> None:
    """A confirmed TOTP factor (and recovery codes) for a demo account that must have MFA and
    has none, so that `make run` stays one command: `carevault demo totp` shows its codes."""
    totp = services.mfa.totp
    if await totp.factors(user.id):
        return
    enrollment = await totp.enroll(user.id, user.username)
    # Confirmed with the previous step's code: the current one stays unused for the first login.
    code = pyotp.parse_uri(enrollment.otpauth_uri).at(services.clock() - STEP_SECONDS)
    if await totp.confirm(user.id, code) is not TotpResult.ok:
        raise _fail(f"could not enroll a TOTP factor for {user.username}")
    await services.mfa.recovery.generate(user.id)
    await services.events.record(
        SecurityEvent(
            "mfa_enrolled", "success", user_id=user.id, details={"method": "totp", "by": "demo"}
        )
    )


def _print_demo(settings: Settings, created: list[tuple[str, str, str]]) -> None:
    base = f"http://{settings.host}:{settings.port}"
    password = "<the password shown when the account was created>"  # noqa: S105 - a placeholder
    if created:
        table = Table(title="Demo accounts (passwords are shown once)")
        for column in ("username", "role", "password"):
            table.add_column(column)
        for username, role, secret in created:
            table.add_row(username, role, secret)
        console.print(table)
        password = next((c[2] for c in created if c[0] == "demo-physician"), password)
    else:
        console.print(
            "Demo accounts already exist; their passwords were shown when they were "
            "created. Set a new one with: carevault user reset-password demo-physician",
            highlight=False,
        )
    console.print(
        "\nQuick start (in another terminal, once the server below is up):\n\n"
        + _quick_start_login(settings, base, password)
        + f'  curl -s {base}/auth/me -H "Authorization: Bearer $TOKEN"\n'
        f'  curl -s {base}/fhir/Patient/demo-patient-1 -H "Authorization: Bearer $TOKEN"\n'
        f'  curl -s "{base}/fhir/Observation?patient=demo-patient-1&code=http://loinc.org%7C8867-4"'
        ' -H "Authorization: Bearer $TOKEN"\n'
        "\nAccess is denied unless the policy permits it (a record you may not see answers 404):"
        "\n  demo-physician, demo-nurse: the patients whose active CareTeam lists their"
        " practitioner (every demo patient's does)\n"
        "  demo-patient: only their own records (demo-patient-1)\n"
        "  demo-registrar: Patients and administrative resources; demo-admin: administrative"
        " resources only\n"
        "  demo-billing: Patients (identifiers only) and Encounters, with the header"
        " X-Purpose-Of-Use: HPAYMT\n"
        "  demo-service: everything its scopes allow\n"
        "\nEvery one of those requests is in the audit trail. demo-auditor reads it at"
        f" {base}/audit and {base}/audit/AuditEvent; the demo patient's own access report is"
        f" {base}/fhir/Patient/demo-patient-1/$access-report. Check the trail's integrity"
        " with: .venv/bin/carevault audit verify\n"
        + _quick_start_step_up(settings, base)
        + _quick_start_oauth(settings, base),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _quick_start_oauth(settings: Settings, base: str) -> str:
    """A SMART standalone launch by hand: the demo app's authorization URL, with a PKCE pair
    made here (a real app makes its own for every authorization)."""
    import base64
    import hashlib
    import secrets
    from urllib.parse import urlencode

    client_id = _run(settings, _demo_client)
    verifier = secrets.token_urlsafe(32)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": DEMO_REDIRECT,
            "scope": "openid fhirUser launch/patient patient/*.rs",
            "state": secrets.token_urlsafe(8),
            "aud": f"{base}/fhir",
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
    )
    return (
        "\nOAuth / SMART on FHIR: discovery at "
        f"{base}/.well-known/smart-configuration. The demo app {DEMO_CLIENT} "
        f"(client_id {client_id}) can run a standalone launch: open\n"
        f"  {base}/oauth/authorize?{query}"
        "\nsign in as demo-patient, allow, and copy `code` from the address the browser is sent to"
        f" ({DEMO_REDIRECT}?code=...; nothing listens there). Then:\n"
        f"  curl -s -X POST {base}/oauth/token -d grant_type=authorization_code "
        f"-d client_id={client_id} -d redirect_uri={DEMO_REDIRECT} -d code_verifier={verifier}"
        " -d code=CODE\n(the code is valid for 60 seconds.)\n"
    )


def _quick_start_login(settings: Settings, base: str, password: str) -> str:
    """The shell lines that leave demo-physician's access token in $TOKEN."""
    to_json = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"{}\"])'"
    login = (
        f"curl -s -X POST {base}/auth/login -H 'content-type: application/json' \\\n"
        f'    -d \'{{"username":"demo-physician","password":"{password}"}}\' \\\n'
    )
    if not mfa_required(settings, [Role.physician]):
        return f"  TOKEN=$({login}    | {to_json.format('access_token')})\n"
    code = "$(.venv/bin/carevault demo totp demo-physician)"
    return (
        "  # staff log in in two steps: the password gives an mfa_token, a TOTP code finishes\n"
        f"  MFA_TOKEN=$({login}    | {to_json.format('mfa_token')})\n"
        f"  TOKEN=$(curl -s -X POST {base}/auth/mfa/verify -H 'content-type: application/json' \\\n"
        f'    -d "{{\\"mfa_token\\":\\"$MFA_TOKEN\\",\\"method\\":\\"totp\\",'
        f'\\"code\\":\\"{code}\\"}}" \\\n'
        f"    | {to_json.format('access_token')})\n"
    )


def _quick_start_step_up(settings: Settings, base: str) -> str:
    if not mfa_required(settings, [Role.physician]):
        return ""
    code = "$(.venv/bin/carevault demo totp demo-physician)"
    staff = ", ".join(n for n, role, _ in DEMO_ACCOUNTS if mfa_required(settings, [role]))
    return (
        "\nHigh-risk actions (a patient's whole record with $everything, break-glass, patient"
        " erasure, the /admin API) need a second factor proved in the last"
        f" {settings.step_up_max_age_seconds} seconds: the two-step login counts for that"
        " long, then step up with a new code (a code is accepted once: wait for the next"
        " 30-second step):\n"
        f'  TOKEN=$(curl -s -X POST {base}/auth/step-up -H "Authorization: Bearer $TOKEN" \\\n'
        "    -H 'content-type: application/json' \\\n"
        f'    -d "{{\\"method\\":\\"totp\\",\\"code\\":\\"{code}\\"}}" \\\n'
        "    | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')\n"
        f"  curl -s {base}/fhir/Patient/demo-patient-1/\\$everything"
        ' -H "Authorization: Bearer $TOKEN"\n'
        f"The demo accounts that must have MFA ({staff}) have a TOTP factor;"
        " `.venv/bin/carevault demo totp NAME` prints its current code.\n"
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    tls_cert: Annotated[str | None, typer.Option(help="TLS certificate chain (PEM).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_client_ca: Annotated[
        str | None,
        typer.Option(help="CA bundle (PEM) for optional client certificates (mTLS)."),
    ] = None,
) -> None:
    """Apply migrations and serve HTTP(S); SIGTERM stops gracefully (in-flight requests finish,
    the audit trail is flushed) and exits 0."""
    from carevault.edge.server import run, uvicorn_config
    from carevault.edge.tls import TlsConfigurationError, server_context

    for name, value in (
        ("HOST", host),
        ("PORT", port),
        ("TLS_CERT", tls_cert),
        ("TLS_KEY", tls_key),
        ("TLS_CLIENT_CA", tls_client_ca),
    ):
        if value is not None:
            os.environ[f"CAREVAULT_{name}"] = str(value)  # so that worker processes agree
    try:
        settings = Settings()
    except ValueError as err:
        raise _fail(str(err), 2) from None
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:  # fail here, with a message, rather than in every worker
            server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        except TlsConfigurationError as err:
            raise _fail(str(err), 2) from None
    _initialise(settings)
    demo_count = _run(settings, lambda s: s.users.count_demo())
    try:
        check_production(settings, bind_host=settings.host, demo_accounts=demo_count)
    except UnsafeSettingsError as err:
        raise _fail(str(err), 2) from None
    from carevault.edge.metrics import prepare_workers
    from carevault.logs import configure

    configure(settings.log_level)
    prepare_workers(settings, workers)  # several workers: one multiprocess metrics directory
    scheme = "https" if settings.tls_enabled else "http"
    console.print(
        f"carevault serving on {scheme}://{settings.host}:{settings.port} "
        f"({workers} worker{'s' if workers > 1 else ''}); try "
        f"{scheme}://{settings.host}:{settings.port}/healthz",
        highlight=False,
    )
    run(uvicorn_config(settings, workers))


@app.command("dev-cert")
def dev_cert(
    out: Annotated[Path, typer.Option(help="Directory for the files.")] = Path("./var/tls"),
    hosts: Annotated[
        str, typer.Option(help="Comma-separated names and addresses the server answers as.")
    ] = ",".join(("localhost", "127.0.0.1", "::1")),
    client: Annotated[
        str | None, typer.Option(help="Also make a client certificate with this name (mTLS).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Make a local development CA and a server certificate signed by it (never for
    production: the CA key sits next to the certificates)."""
    from carevault.edge.tls import DevFiles, write_dev_certificates

    names = [h.strip() for h in hosts.split(",") if h.strip()]
    if not names:
        raise _fail("--hosts needs at least one name or address")
    if client is not None and (not client or "/" in client or client.startswith(".")):
        raise _fail("--client must be a plain name")
    files = DevFiles(out, client)
    try:
        write_dev_certificates(files, names, force=force)
    except FileExistsError as err:
        raise _fail(f"{err} exists; pass --force to replace the development certificates") from None
    lines = [
        f"development CA:     {files.ca_cert} (key {files.ca_key})",
        f"server certificate: {files.server_cert} (key {files.server_key}) for {', '.join(names)}",
    ]
    if files.client_cert is not None:
        lines.append(f"client certificate: {files.client_cert} (key {files.client_key})")
    host = names[0] if ":" not in names[0] else f"[{names[0]}]"
    lines += [
        "",
        "Serve HTTPS with:",
        f"  carevault serve --tls-cert {files.server_cert} --tls-key {files.server_key}"
        + (f" --tls-client-ca {files.ca_cert}" if files.client_cert else ""),
        "and trust the CA in clients (not system-wide):",
        f"  curl --cacert {files.ca_cert} https://{host}:8000/healthz",
    ]
    if files.client_cert is not None:
        lines.append(
            f"  curl --cacert {files.ca_cert} --cert {files.client_cert} "
            f"--key {files.client_key} https://{host}:8000/healthz"
        )
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


@user_app.command("add")
def user_add(
    name: str,
    role: Annotated[Role, typer.Option(help="The user's role.")],
    org: Annotated[str | None, typer.Option(help="FHIR Organization id.")] = None,
    practitioner: Annotated[str | None, typer.Option(help="FHIR Practitioner id.")] = None,
    patient: Annotated[str | None, typer.Option(help="FHIR Patient id (patients).")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
) -> None:
    """Create a user. Without --password-stdin a random password is generated and shown once."""
    settings = Settings()
    _initialise(settings)
    password = _read_password_stdin() if password_stdin else generate_password()
    try:
        user = _run(
            settings,
            lambda s: s.accounts.add_user(
                name,
                password,
                role,
                organization_id=org,
                practitioner_id=practitioner,
                patient_id=patient,
            ),
        )
    except (PasswordPolicyError, AccountError) as err:
        raise _fail(err.message) from None
    console.print_json(data={"id": user.id, "username": user.username, "roles": list(user.roles)})
    if not password_stdin:
        console.print(f"generated password (shown once): {password}", highlight=False)


def _account_change(work: Callable[[Services], Awaitable[object]]) -> None:
    settings = Settings()
    _initialise(settings)
    try:
        _run(settings, work)
    except (PasswordPolicyError, AccountError) as err:
        raise _fail(err.message) from None


@user_app.command("disable")
def user_disable(name: str) -> None:
    """Disable a user and end all their sessions at once."""
    _account_change(lambda s: s.accounts.set_enabled(name, False))
    console.print(f"disabled {name}; all sessions ended")


@user_app.command("enable")
def user_enable(name: str) -> None:
    """Enable a disabled user."""
    _account_change(lambda s: s.accounts.set_enabled(name, True))
    console.print(f"enabled {name}")


@user_app.command("set-role")
def user_set_role(name: str, role: Role) -> None:
    """Replace a user's role and end all their sessions at once."""
    _account_change(lambda s: s.accounts.set_role(name, role))
    console.print(f"{name} is now {role}; all sessions ended")


@user_app.command("reset-password")
def user_reset_password(
    name: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
) -> None:
    """Set a new password (generated unless --password-stdin) and end all sessions."""
    password = _read_password_stdin() if password_stdin else generate_password()
    _account_change(lambda s: s.accounts.reset_password(name, password))
    console.print(f"password of {name} reset; all sessions ended")
    if not password_stdin:
        console.print(f"new password (shown once): {password}", highlight=False)


@user_app.command("mfa-reset")
def user_mfa_reset(name: str) -> None:
    """Remove every second factor and recovery code of a user and end all their sessions; their
    next login enrolls a factor again (a lost or stolen authenticator)."""

    async def work(services: Services) -> None:
        user = await services.accounts.find(name)
        await services.mfa.reset(user, RequestContext(), by="cli")

    _account_change(work)
    console.print(f"second factors of {name} removed; all sessions ended", highlight=False)


@demo_app.command("totp")
def demo_totp(name: str) -> None:
    """Print the current TOTP code of a demo account (what its authenticator app would show).
    Refused for every account that is not a demo account."""
    settings = Settings()
    _initialise(settings)

    async def work(services: Services) -> str | None:
        try:
            user = await services.accounts.find(name)
        except AccountError:
            user = None
        if user is None or not user.is_demo:
            return None
        code = await services.mfa.totp.current_code(user.id)
        if code is not None:
            await services.events.record(
                SecurityEvent("demo_totp_shown", "success", user_id=user.id)
            )
        return code or ""

    code = _run(settings, work)
    if code is None:
        raise _fail(f"{name} is not a demo account: codes are shown for demo accounts only")
    if not code:
        raise _fail(f"{name} has no TOTP factor")
    print(code)


def _label_change(name: str, label: str, grant: bool) -> bool:
    from carevault.access.label_grants import UnknownLabel, grant_label, revoke_label

    async def work(services: Services) -> bool:
        user = await services.users.by_username(name)
        if user is None:
            raise _fail(f"no user {name}")
        change = grant_label if grant else revoke_label
        return await change(services.engine, services.access_generation, user.id, label)

    try:
        return _run(Settings(), work)
    except UnknownLabel as err:
        raise _fail(str(err)) from None


@user_app.command("grant-label")
def user_grant_label(name: str, label: str) -> None:
    """Let a user see records carrying a sensitive label (PSY, HIV, SUD, ...), where the
    user's role accepts per-user label grants; takes effect on the user's next request."""
    changed = _label_change(name, label.upper(), grant=True)
    console.print(f"{name} may see {label.upper()} records" + ("" if changed else " (already)"))


@user_app.command("revoke-label")
def user_revoke_label(name: str, label: str) -> None:
    """Withdraw a label grant; takes effect on the user's next request."""
    changed = _label_change(name, label.upper(), grant=False)
    console.print(
        f"{name} may no longer see {label.upper()} records" + ("" if changed else " (had no grant)")
    )


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Promote the next signing key to current; the old one verifies until its tokens expire."""
    settings = Settings()
    _initialise(settings)
    retire_after = settings.access_token_ttl_seconds + settings.clock_leeway_seconds
    kid = rotate_keyset(settings.keys_dir, settings.signing_algorithm, retire_after, time.time())

    async def record(services: Services) -> None:
        await services.events.record(SecurityEvent("key_rotation", "success", details={"kid": kid}))

    _run(settings, record)
    console.print(f"signing key rotated; current kid {kid}", highlight=False)


@keys_app.command("rotate-kek")
def keys_rotate_kek(
    batch_size: Annotated[
        int, typer.Option(min=1, max=100_000, help="Data keys re-wrapped per transaction.")
    ] = 500,
) -> None:
    """Rotate the data-at-rest KEK: new primary, re-wrap every data key, drop the old keys.

    Safe while the server runs. Resumable: when old KEK keys are still present (an earlier run
    was interrupted), this continues that rotation instead of adding yet another key.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    settings = Settings()
    _initialise(settings)

    async def rotate(services: Services) -> tuple[int, bool, int, list[int], int]:
        kek = services.custody.current_kek()
        resumed = len(kek.key_ids) > 1
        primary = kek.primary_id if resumed else services.custody.rotate_kek()
        with Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("re-wrapping data keys", total=None)
            result = await services.envelope.rewrap_all(
                batch_size, lambda p: bar.update(task, total=p.total, completed=p.processed)
            )
            bar.update(task, total=max(result.total, 1), completed=max(result.total, 1))
        dropped = await services.envelope.retire_unused_kek_keys(batch_size)
        left = len(services.custody.current_kek().key_ids) - 1
        details = {
            "primary_key_id": primary,
            "rewrapped": result.rewrapped,
            "dropped_key_ids": dropped,
            "resumed": resumed,
        }
        if result.failed or left:
            # Counts only: scopes name patients.
            await services.events.record(
                SecurityEvent(
                    "kek_rotation",
                    "failure",
                    details={
                        **details,
                        "unwrap_failures": len(result.failed),
                        "old_keys_left": left,
                    },
                )
            )
        else:
            await services.events.record(SecurityEvent("kek_rotation", "success", details=details))
        return primary, resumed, result.rewrapped, dropped, len(result.failed) or left

    primary, resumed, rewrapped, dropped, problems = _run(settings, rotate)
    verb = "resumed" if resumed else "rotated"
    console.print(
        f"KEK {verb}; primary key {primary}; {rewrapped} data key(s) re-wrapped; "
        f"{len(dropped)} old KEK key(s) dropped",
        highlight=False,
        soft_wrap=True,
    )
    if problems:
        raise _fail(
            "some data keys are still wrapped under old KEK keys (or could not be "
            "unwrapped); the old keys were kept. Re-run `carevault keys rotate-kek` to "
            "continue"
        )


@patient_app.command("erase")
def patient_erase(
    patient_id: Annotated[str, typer.Argument(metavar="ID", help="FHIR Patient id.")],
    yes: Annotated[bool, typer.Option("--yes", help="Really erase (irreversible).")] = False,
) -> None:
    """Crypto-shred a patient: every version of every resource under the patient's data key
    becomes unreadable for good, here and in every copy of the database. Re-runnable."""
    from carevault.fhir.erasure import (
        ErasureError,
        ErasureFailed,
        ErasureReport,
        erase_patient,
        plan_erasure,
    )

    settings = Settings()
    _initialise(settings)

    def counts(report: ErasureReport, title: str) -> Table:
        table = Table(title=title)
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_row("resources to erase" if not yes else "resources erased", str(report.erased))
        table.add_row("resources erased earlier", str(report.already_erased))
        table.add_row("stored versions shredded", str(report.versions_shredded))
        table.add_row(
            "shared resources under another patient's key (links removed, left readable)",
            str(report.shared_other_scope),
        )
        return table

    try:
        if not yes:
            plan = _run(settings, lambda s: plan_erasure(s, patient_id))
            console.print(counts(plan, "Would erase (nothing changed)"))
            raise _fail("irreversible: re-run with --yes to erase")
        report = _run(settings, lambda s: erase_patient(s, patient_id))
    except ErasureFailed as err:
        raise _fail(f"{err} (search rows are already removed)") from None
    except ErasureError as err:
        raise _fail(str(err)) from None
    console.print(counts(report, "Patient erased"))
    console.print("data key destroyed; every version under it is unreadable", highlight=False)


@app.command("import")
def import_bundles(
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="FILE_OR_DIR...",
            exists=True,
            help="Bundle files (transaction or batch), or directories of *.json files.",
        ),
    ],
) -> None:
    """Load transaction and batch Bundles (e.g. Synthea output): ids and references kept,
    per-entry errors reported without stopping the rest. Exit code 1 if any entry failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from carevault.fhir.importer import ImportProgress, ImportReport, import_paths, ordered_files

    settings = Settings()
    _initialise(settings)
    files = ordered_files(paths)

    async def work(services: Services) -> ImportReport:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=False,
        ) as bar:
            file_task = bar.add_task("files", total=len(files))
            entry_task = bar.add_task("entries", total=0)

            class Shown(ImportProgress):
                def file_started(self, name: str, entries: int) -> None:
                    bar.advance(file_task)
                    total = (bar.tasks[entry_task].total or 0) + entries
                    bar.update(entry_task, total=total)

                def advance(self, entries: int) -> None:
                    bar.advance(entry_task, entries)

            report = await import_paths(services, files, Shown())
            bar.update(file_task, completed=len(files))
        await services.events.record(
            SecurityEvent(
                "import",
                "failure" if report.errors else "success",
                details={
                    "files": len(report.files),
                    "created": report.total("created"),
                    "updated": report.total("updated"),
                    "errors": len(report.errors),
                },
            )
        )
        return report

    report = _run(settings, work)
    table = Table(title="Imported resources")
    for column in ("type", "created", "updated", "already present"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for resource_type in sorted(report.counts):
        c = report.counts[resource_type]
        table.add_row(resource_type, str(c["created"]), str(c["updated"]), str(c["existing"]))
    table.add_row(
        "total",
        str(report.total("created")),
        str(report.total("updated")),
        str(report.total("existing")),
        style="bold",
    )
    console.print(table)
    files_table = Table(title="Files")
    for column in ("file", "bundle", "written", "entries", "loaded", "failed"):
        files_table.add_column(column)
    for result in report.files:
        files_table.add_row(
            result.name,
            result.bundle_type or "-",
            result.mode,
            str(result.entries),
            str(result.loaded),
            str(result.failed),
        )
    console.print(files_table)
    if report.errors:
        errors = Table(title=f"Errors ({len(report.errors)})")
        for column in ("file", "entry", "error"):
            errors.add_column(column)
        for error in report.errors:
            errors.add_row(
                error.file, "-" if error.index is None else str(error.index), error.message
            )
        console.print(errors)
        raise _fail(f"{len(report.errors)} error(s); everything else was imported")
    console.print("all entries imported", highlight=False)


client_app = typer.Typer(no_args_is_help=True, help="Manage OAuth clients.")
app.add_typer(client_app, name="client")
MAX_JWKS_FILE_BYTES = 256 * 1024


def _print_json(data: object) -> None:
    # Plain stdout, not rich: a long value must not be wrapped inside the JSON.
    typer.echo(json.dumps(data, indent=2))


def _read_jwks(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JWKS_FILE_BYTES + 1)
    except OSError:
        raise _fail(f"cannot read the JWKS file {path}") from None
    if len(raw) > MAX_JWKS_FILE_BYTES:
        raise _fail("the JWKS file is too large")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _fail("the JWKS file is not JSON") from None
    if not isinstance(data, dict):
        raise _fail('the JWKS file must hold a JWK set: {"keys": [...]}')
    return data


@client_app.command("add")
def client_add(
    name: str,
    scope: Annotated[str, typer.Option(help="Space-separated scopes it may ask for.")],
    public: Annotated[
        bool, typer.Option("--public", help="A browser or native app (no secret; PKCE).")
    ] = False,
    confidential: Annotated[
        bool, typer.Option("--confidential", help="A client that authenticates itself.")
    ] = False,
    redirect_uri: Annotated[
        list[str] | None,
        typer.Option("--redirect-uri", help="Exact redirect URI (repeatable)."),
    ] = None,
    auth_method: Annotated[
        str | None,
        typer.Option(
            "--auth-method",
            help="Confidential only: private_key_jwt (default) or client_secret_basic.",
        ),
    ] = None,
    jwks: Annotated[
        Path | None, typer.Option("--jwks", help="private_key_jwt: file of the public JWK set.")
    ] = None,
    grant_type: Annotated[
        list[str] | None, typer.Option("--grant-type", help="Grant type (repeatable).")
    ] = None,
    require_dpop: Annotated[
        bool, typer.Option("--require-dpop", help="Its tokens must be DPoP-bound.")
    ] = False,
) -> None:
    """Register an OAuth client; print it as JSON (with a client_secret, shown once, for
    client_secret_basic)."""
    if public == confidential:
        raise _fail("choose exactly one of --public and --confidential")
    if public and auth_method is not None:
        raise _fail("--auth-method is for confidential clients (a public client has none)")
    method = "none" if public else auth_method or "private_key_jwt"
    if method not in ("none", "private_key_jwt", "client_secret_basic"):
        raise _fail("--auth-method must be private_key_jwt or client_secret_basic")
    if method == "private_key_jwt" and jwks is None:
        raise _fail("private_key_jwt needs --jwks FILE (the client's public keys)")
    if jwks is not None and method != "private_key_jwt":
        raise _fail("--jwks is only for private_key_jwt clients")
    key_set = _read_jwks(jwks) if jwks is not None else None
    settings = Settings()
    _initialise(settings)
    try:
        client, secret = _run(
            settings,
            lambda s: register_client(
                s.clients,
                s.events,
                name,
                auth_method=method,
                redirect_uris=list(redirect_uri or []),
                scope=scope,
                grant_types=list(grant_type) if grant_type else None,
                jwks=key_set,
                require_dpop=require_dpop,
            ),
        )
    except ClientError as err:
        raise _fail(str(err)) from None
    out = client.describe()
    if secret is not None:
        out["client_secret"] = secret
    _print_json(out)


@client_app.command("list")
def client_list() -> None:
    """Every registered client as a JSON list (never a secret)."""
    settings = Settings()
    _initialise(settings)
    clients = _run(settings, lambda s: s.clients.list())
    _print_json([c.describe() for c in clients])


@client_app.command("disable")
def client_disable(client_id: Annotated[str, typer.Argument(metavar="CLIENT_ID")]) -> None:
    """Disable a client and revoke every token it holds (repeatable)."""
    settings = Settings()
    _initialise(settings)
    client = _run(
        settings,
        lambda s: disable_client(
            client_id,
            clients=s.clients,
            revocations=s.revocations,
            events=s.events,
            settings=s.settings,
        ),
    )
    if client is None:
        raise _fail("no such client")
    _print_json(client.describe())


def main() -> None:
    app()


if __name__ == "__main__":
    main()

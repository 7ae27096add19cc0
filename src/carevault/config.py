"""One `Settings` object for the whole process (env `CAREVAULT_*`, optional `.env`).

`check_production` refuses settings that would be unsafe outside a developer's machine; each
refusal names the setting and how to fix it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# OWASP Password Storage Cheat Sheet, Argon2id minimum: m=19456 KiB, t=2, p=1.
OWASP_ARGON2_MEMORY_KIB = 19456
OWASP_ARGON2_TIME_COST = 2
OWASP_ARGON2_PARALLELISM = 1

# RFC 9068 access tokens are bearer credentials; an hour is the longest we allow them to live.
MAX_ACCESS_TOKEN_TTL_SECONDS = 3600
# RFC 7519 leeway for clock skew; the issue allows at most 60 s.
MAX_CLOCK_LEEWAY_SECONDS = 60

SIGNING_ALGORITHMS = ("ES256", "EdDSA", "PS256", "RS256")

KEY_VAULT_FILE = "data-keys.db"  # the embedded key vault, in the keys directory


class Environment(StrEnum):
    development = "development"
    production = "production"


class UnsafeSettingsError(Exception):
    """Raised when production mode meets a setting that must not be used there."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "Refusing to start in production mode:\n" + "\n".join(f"  - {p}" for p in problems)
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CAREVAULT_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    environment: Environment = Environment.development
    debug: bool = False
    data_dir: Path = Path("./var")
    database_url: str | None = None
    redis_url: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # Defaults to the URL the server binds (http(s)://host:port); set it to the public URL.
    issuer_url: str | None = Field(None, alias="CAREVAULT_ISSUER")
    audience: str = "carevault"
    signing_algorithm: str = "ES256"
    access_token_ttl_seconds: int = Field(600, ge=30, le=MAX_ACCESS_TOKEN_TTL_SECONDS)
    clock_leeway_seconds: int = Field(30, ge=0, le=MAX_CLOCK_LEEWAY_SECONDS)
    max_token_bytes: int = Field(8192, ge=1024, le=8192)

    refresh_absolute_ttl_seconds: int = Field(12 * 3600, ge=60)
    refresh_idle_ttl_seconds: int = Field(30 * 60, ge=60)
    # Two tabs refreshing at once must not log the user out (Keycloak users' most common
    # complaint); 0 turns the grace window off and every reuse is treated as theft.
    refresh_grace_seconds: float = Field(5.0, ge=0, le=60)

    argon2_memory_kib: int = Field(OWASP_ARGON2_MEMORY_KIB, ge=OWASP_ARGON2_MEMORY_KIB)
    argon2_time_cost: int = Field(OWASP_ARGON2_TIME_COST, ge=OWASP_ARGON2_TIME_COST)
    argon2_parallelism: int = Field(OWASP_ARGON2_PARALLELISM, ge=1, le=16)
    password_hash_threads: int = Field(0, ge=0, le=64)  # 0: one per CPU core

    login_max_failures: int = Field(5, ge=1, le=100)
    login_lockout_seconds: int = Field(15 * 60, ge=1)
    login_backoff_base_seconds: float = Field(1.0, ge=0)
    login_backoff_max_seconds: float = Field(30.0, ge=0)
    login_max_failures_per_address: int = Field(50, ge=1)
    login_address_window_seconds: int = Field(15 * 60, ge=1)

    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    key_reload_interval_seconds: float = Field(1.0, ge=0.05)
    # Data at rest (crypto/custody.py, crypto/envelope.py). The master key, when given here
    # (base64 of tink's JSON keyset), replaces keys/master.key; it never appears in repr/logs.
    master_key: SecretStr | None = None
    dek_cache_size: int = Field(10000, ge=0)  # 0: unwrap the data key on every call
    dek_cache_ttl_seconds: float = Field(300, ge=0)  # bounds a destroy seen by other hosts
    # The key vault: where the wrapped data keys live, apart from the data they open, so that a
    # copy of the database never carries the keys that an erasure destroys (fhir/erasure.py).
    # Unset: an SQLite file in the keys directory. Multi-host deployments point it at a shared
    # database that is not the data database (production refuses the same URL).
    key_database_url: str | None = None
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # FHIR update (fhir/routes.py): when true, PUT and DELETE without If-Match answer 428.
    fhir_require_if_match: bool = False
    # User ids (token `sub`) allowed update-as-create (PUT to an id that does not exist yet);
    # off for everyone else, since it would reveal whether an id exists. Comma-separated.
    fhir_update_create_users: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Largest inline attachment (decoded bytes of one `Attachment.data`) a FHIR write may carry.
    fhir_max_attachment_bytes: int = Field(512 * 1024, ge=0)

    # Access control (access/). The policy file replaces access/default_policy.toml.
    access_policy_file: Path | None = None
    # PostgreSQL: how often a process re-reads the shared access generation, i.e. how long a
    # care-team, consent or grant change made on ANOTHER host may take to reach this one
    # (changes on this host reach every worker at once). 0: on every request (~1 ms each).
    access_generation_poll_seconds: float = Field(1.0, ge=0, le=30)
    break_glass_default_minutes: int = Field(60, ge=1, le=240)
    break_glass_max_minutes: int = Field(240, ge=1, le=240)
    break_glass_max_auth_age_seconds: int = Field(300, ge=30, le=3600)  # fresh login required
    # Break-glass alerts always go to the log; also POSTed here when set (retried).
    alert_webhook_url: str | None = None
    # Audit checkpoints (signed tree heads): after this many new entries, and at least this
    # often while entries arrive.
    audit_checkpoint_entries: int = Field(1000, ge=1, le=1000)
    audit_checkpoint_seconds: float = Field(60.0, gt=0, le=60)
    # Alert when one actor is refused this many times within the window (0: never).
    audit_denial_burst: int = Field(20, ge=0)
    audit_denial_window_seconds: float = Field(60.0, gt=0)
    # The patient access report names the people who looked (else: role and organization).
    access_report_names: bool = False
    # Multi-factor authentication. Roles that must have a second factor (empty: none): after
    # the password such an account without one gets only an enrollment-scoped token.
    mfa_required_roles: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["admin", "physician", "nurse", "auditor"]
    )
    mfa_token_ttl_seconds: int = Field(300, ge=30, le=600)  # between password and factor
    mfa_max_failures: int = Field(5, ge=1, le=20)  # wrong codes before a factor locks
    # High-risk actions need an MFA authentication at most this old (RFC 9470 max_age).
    step_up_max_age_seconds: int = Field(300, ge=30, le=3600)
    totp_issuer: str = "carevault"
    # RFC 9449 §8-9: require a server-provided nonce in every DPoP proof (one more round trip
    # for the client; limits a proof made ahead of time to the nonce's few minutes).
    dpop_nonce_required: bool = False
    # WebAuthn relying party: the id is a registrable domain of the origins allowed.
    webauthn_rp_id: str = "localhost"
    webauthn_rp_name: str = "carevault"
    webauthn_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["https://localhost:8000", "http://localhost:8000"]
    )
    # Browser sessions (the web portal): server-side, cookie `__Host-carevault-session`.
    session_idle_seconds: int = Field(15 * 60, ge=60)
    session_absolute_seconds: int = Field(12 * 3600, ge=300)

    # --- The HTTP edge (edge/) ----------------------------------------------------------
    log_level: str = "INFO"
    # Browser origins allowed to call the API from script (CORS); none by default, never "*".
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cors_max_age_seconds: int = Field(600, ge=0, le=7200)  # how long a preflight is cached
    # Rate limits (edge/rate_limit.py) in the `limits` notation ("N/second|minute|hour"),
    # moving windows. Stored in this process's memory, or in Redis (shared by every worker and
    # host) when `rate_limit_storage_url` or else `redis_url` is set.
    rate_limit_enabled: bool = True
    rate_limit_storage_url: str | None = None
    rate_limit_per_address: str = "1200/minute"
    rate_limit_per_principal: str = "1200/minute"
    rate_limit_auth_per_address: str = "60/minute"  # /auth/* and /oauth/*
    # Request limits (edge/limits.py), checked while the request streams in.
    # As deep as FHIR validation allows (fhir/validation.py MAX_DEPTH): a deep Questionnaire is
    # legitimate; the limit is against parsers recursing without bound.
    max_json_depth: int = Field(100, ge=2, le=512)
    max_json_array_items: int = Field(10_000, ge=1)
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    request_timeout_seconds: float = Field(30.0, gt=0)
    keep_alive_timeout_seconds: int = Field(5, ge=1, le=300)  # idle connections are closed
    # Prometheus exposition at /metrics: only to these peer addresses, or with this token.
    metrics_allowed_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"]
    )
    metrics_token: SecretStr | None = None
    # TLS client certificates (mTLS): the CA bundle that signs service clients' certificates.
    # Set, a certificate is asked for (optional) and verified; it is not required.
    tls_client_ca: Path | None = None
    # SIGTERM: in-flight requests get this long to finish before the server stops anyway.
    shutdown_timeout_seconds: float = Field(10.0, ge=0, le=300)

    @field_validator(
        "trusted_proxies",
        "fhir_update_create_users",
        "mfa_required_roles",
        "webauthn_origins",
        "cors_origins",
        "metrics_allowed_addresses",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        return [cors_origin(origin) for origin in value]

    @field_validator("mfa_required_roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        from carevault.identity.roles import Role

        unknown = sorted(set(value) - {str(r) for r in Role})
        if unknown:
            raise ValueError(f"mfa_required_roles: unknown roles {', '.join(unknown)}")
        return value

    @field_validator("signing_algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        if value not in SIGNING_ALGORITHMS:
            raise ValueError(f"signing_algorithm must be one of {', '.join(SIGNING_ALGORITHMS)}")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs TLS: set tls_cert and tls_key too")
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {item!r} is not an IP address or network (CIDR)"
                ) from None
        return value

    @model_validator(mode="after")
    def _vault_apart(self) -> Settings:
        # Not only a production rule: the data database's own migrations would drop the
        # vault's table, and every copy of the database would carry the keys it should not.
        if self.key_database_url and self.key_vault_url == self.sqlalchemy_url:
            raise ValueError(
                "key_database_url must name another database than database_url: the key vault "
                "is kept apart so that no copy of the data database carries its keys"
            )
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """Async SQLAlchemy URL: PostgreSQL through psycopg 3, else the embedded SQLite file."""
        if self.database_url:
            return to_async_url(self.database_url)
        return f"sqlite+aiosqlite:///{self.data_dir.resolve() / 'carevault.db'}"

    @property
    def key_vault_url(self) -> str:
        """Async SQLAlchemy URL of the key vault (see `key_database_url`)."""
        if self.key_database_url:
            return to_async_url(self.key_database_url)
        return f"sqlite+aiosqlite:///{self.keys_dir.resolve() / KEY_VAULT_FILE}"

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def issuer(self) -> str:
        if self.issuer_url:
            return self.issuer_url.rstrip("/")
        scheme = "https" if self.tls_cert is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


# An origin as a browser serializes it (RFC 6454 §6.2): scheme, host and port only.
_ORIGIN = re.compile(
    r"(https?)://([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::(\d{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def cors_origin(value: str) -> str:
    """A CORS origin exactly as browsers send it in `Origin`: lower case, the default port
    left out. Anything else (a wildcard, a path, a trailing slash, credentials) is refused:
    the API sends credentials to these origins, so each must be one site, spelled out."""
    match = _ORIGIN.fullmatch(value.strip().lower())
    if match is None:
        raise ValueError(
            f"cors_origins: {value!r} is not an origin; list each one as scheme://host[:port] "
            "(http or https, no wildcard, no path, no trailing slash)"
        )
    scheme, host, port = match.groups()
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"cors_origins: {value!r} has an invalid port")
    if port is None or int(port) == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


def to_async_url(url: str) -> str:
    """Accept the usual spellings of a database URL and select the async driver for them."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_private(host: str) -> bool:
    """A single private (RFC 1918, RFC 4193 ...) or loopback address; never a wildcard bind
    such as 0.0.0.0 or ::, which also listens on public interfaces."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return is_loopback(host)
    return address.is_loopback or (address.is_private and not address.is_unspecified)


def secret_files(settings: Settings) -> list[Path]:
    """Every file in the data directory that holds key material or credentials."""
    keys = settings.keys_dir
    return sorted(p for p in keys.glob("*") if p.is_file()) if keys.is_dir() else []


def exposed_secret_files(settings: Settings) -> list[tuple[Path, int]]:
    """Secret files (and the keys directory) that users other than the owner may read."""
    exposed: list[tuple[Path, int]] = []
    candidates = [settings.keys_dir, *secret_files(settings)]
    db_file = settings.data_dir / "carevault.db"
    if settings.database_url is None and db_file.exists():
        candidates.append(db_file)
    for path in candidates:
        if path.exists():
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & 0o077:
                exposed.append((path, mode))
    return exposed


def check_production(settings: Settings, *, bind_host: str, demo_accounts: int) -> None:
    """Refuse unsafe settings in production mode; list every problem with its fix."""
    if settings.environment is not Environment.production:
        return
    problems: list[str] = []
    if not settings.tls_enabled and not (
        is_loopback(bind_host) or (settings.trusted_proxies and is_private(bind_host))
    ):
        problems.append(
            f"binding to {bind_host} without TLS. Fix: set CAREVAULT_TLS_CERT and "
            "CAREVAULT_TLS_KEY (or pass --tls-cert/--tls-key), or, behind a TLS-terminating "
            "proxy, bind to 127.0.0.1 or to a private address and list the proxy in "
            "CAREVAULT_TRUSTED_PROXIES"
        )
    if settings.debug:
        problems.append("debug is on. Fix: unset CAREVAULT_DEBUG (or set it to false)")
    if demo_accounts:
        problems.append(
            f"{demo_accounts} demo account(s) exist. Fix: remove them with "
            "`carevault user disable NAME`, or start from a fresh data directory"
        )
    for path, mode in exposed_secret_files(settings):
        problems.append(
            f"{path} is readable by other users (mode {mode:04o}). Fix: chmod "
            f"{'700' if path.is_dir() else '600'} {path}"
        )
    if settings.issuer.startswith("http://") and not is_loopback_url(settings.issuer):
        problems.append(
            f"issuer {settings.issuer} is not https. Fix: set CAREVAULT_ISSUER to the https URL "
            "clients use"
        )
    if problems:
        raise UnsafeSettingsError(problems)


def is_loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    return is_loopback(urlsplit(url).hostname or "")

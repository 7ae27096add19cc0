"""Table definitions (SQLAlchemy Core). Migrations in `migrations/versions` mirror these."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)  # the data database
# The key vault (`Settings.key_database_url`), a database of its own: see `data_keys`.
vault_metadata = MetaData(naming_convention=NAMING_CONVENTION)

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),  # opaque UUID: the token `sub`
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("roles", JSON, nullable=False),
    Column("organization_id", String(64)),
    Column("practitioner_id", String(64)),
    Column("patient_id", String(64)),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("is_demo", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# One row per login: every refresh token descended from that login belongs to the family.
refresh_families = Table(
    "refresh_families",
    metadata,
    Column("id", String(36), primary_key=True),  # also the access tokens' `sid`
    Column("user_id", String(36), ForeignKey("users.id"), nullable=False, index=True),
    Column("client_id", String(128), nullable=False),
    Column("scope", Text, nullable=False),
    Column("amr", JSON, nullable=False),
    Column("auth_time", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # absolute lifetime
    Column("revoked_at", Float),
    Column("revoked_reason", String(32)),
    # What `GET /auth/sessions` shows (migration 0010): how strong the login was, from where.
    Column("acr", String(40)),
    Column("address", String(64)),
    Column("device", String(128)),
    Column("last_used_at", Float),
    # OAuth (migration 0011): the SMART launch patient of the grant, and the DPoP key a public
    # client's refresh tokens are bound to (RFC 9449 §5: its JWK SHA-256 thumbprint).
    Column("patient", String(64)),
    Column("dpop_jkt", String(64)),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),  # SHA-256 of the opaque token
    Column("family_id", String(36), ForeignKey("refresh_families.id"), nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("idle_expires_at", Float, nullable=False),
    Column("used_at", Float),  # high resolution: a same-second replay is still a replay
    Column("successor_hash", String(64)),
    Index("ix_refresh_tokens_family_id", "family_id"),
)

# Denials checked on every request. Rows expire once no token they could match is alive.
revocations = Table(
    "revocations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(8), nullable=False),  # jti | sid | user
    Column("value", String(64), nullable=False),
    Column("not_before", Float),  # kind=user: tokens issued before this are dead
    Column("expires_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_revocations_expires_at", "expires_at"),
)

login_throttle = Table(
    "login_throttle",
    metadata,
    Column("key", String(80), primary_key=True),  # acct:<keyed hash> | addr:<address>
    Column("failures", Integer, nullable=False),
    Column("window_started_at", Float, nullable=False),
    Column("last_failure_at", Float, nullable=False),
    Column("locked_until", Float),
    Column("in_flight", Integer, nullable=False, default=0),  # attempts being checked now
    Column("in_flight_at", Float),
)

# --- FHIR record store --------------------------------------------------------------------
# Bodies exist only as AEAD ciphertext (crypto/envelope.py); these tables hold nothing a raw
# dump could read as PHI. Search values are plain only where fhir/search_params.SENSITIVITY
# says "plain"; PHI search values are keyed blind-index hashes.

fhir_resources = Table(
    "fhir_resources",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("last_updated", Float, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("scope", String(100), nullable=False),  # DEK scope: patient:<id> | type:<Type>
    Column("erased_at", Float),  # crypto-shredded (fhir/erasure.py): reads answer 410 for good
    Index("ix_fhir_resources_last_updated", "last_updated"),
)

fhir_versions = Table(
    "fhir_versions",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("last_updated", Float, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("scope", String(100), nullable=False),
    Column("body", LargeBinary, nullable=False),  # ciphertext; empty for a deletion
    Index("ix_fhir_versions_last_updated", "last_updated"),
)

# Patients a resource belongs to (the Patient compartment), for access control and erasure.
fhir_compartments = Table(
    "fhir_compartments",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("patient_id", String(64), primary_key=True),
    Index("ix_fhir_compartments_patient_id", "patient_id"),
)

fhir_index_keys = Table(
    "fhir_index_keys",
    metadata,
    Column("resource_type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("key", String(512), nullable=False),  # plain token/reference key, or blind hash
    Index("ix_fhir_index_keys_lookup", "resource_type", "param", "key"),
    Index("ix_fhir_index_keys_resource", "resource_type", "id"),
)

fhir_index_dates = Table(
    "fhir_index_dates",
    metadata,
    Column("resource_type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    Index("ix_fhir_index_dates_lookup", "resource_type", "param", "low"),
    Index("ix_fhir_index_dates_resource", "resource_type", "id"),
)

# Idempotency-Key of FHIR creates (fhir/idempotency.py). Neither the raw key nor the body is
# stored: `key_hash` is SHA-256 of the caller's user id and the key, `body_hash` SHA-256 of the
# raw request body. A row without `status` is a create in progress (it claims the key).
fhir_idempotency = Table(
    "fhir_idempotency",
    metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("body_hash", String(64), nullable=False),
    Column("resource_type", String(64)),
    Column("resource_id", String(64)),
    Column("version", Integer),
    Column("status", Integer),  # 201 (created) or 200 (If-None-Exist matched); NULL: pending
    Column("created_at", Float, nullable=False),
    Index("ix_fhir_idempotency_created_at", "created_at"),
)


# --- Key vault ------------------------------------------------------------------------------
# One data key (DEK) per scope ("patient:<id>", "type:<resource type>"), a tink keyset wrapped by
# the KEK (crypto/envelope.py). Destroying a scope empties `wrapped` for good (crypto-shredding).
# It lives in the key vault, not beside the ciphertexts: a copy of the data database never holds
# a key, so an erasure reaches every copy (backups, replicas, a stolen file) at once.
data_keys = Table(
    "data_keys",
    vault_metadata,
    Column("scope", String(100), primary_key=True),
    Column("wrapped", LargeBinary, nullable=False),  # empty once destroyed
    # tink key id (uint32, hence 64-bit) of the KEK primary that wrapped it: rotation progress
    Column("kek_key_id", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("destroyed_at", Float),
    Index("ix_data_keys_kek_key_id", "kek_key_id"),
)


# --- FHIR Idempotency-Key responses ---------------------------------------------------------
# The recorded response of a transaction/batch Bundle POSTed with an Idempotency-Key (its claim
# is the `fhir_idempotency` row of the same key_hash): AEAD ciphertext (envelope, scope
# "type:Bundle") of the response without any resource body (fhir/idempotency.py). Rows expire
# with their claim (24 h, same created_at).
fhir_idempotency_responses = Table(
    "fhir_idempotency_responses",
    metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("response", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_fhir_idempotency_responses_created_at", "created_at"),
)


# --- Access control ---------------------------------------------------------------------------
# Emergency access (access/break_glass.py): one row per grant. The reason a clinician gives can
# hold PHI, so it is stored only as AEAD ciphertext under the patient's data key (erasing the
# patient erases it too); everything else is opaque ids and times.
break_glass_grants = Table(
    "break_glass_grants",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id"), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("reason", LargeBinary, nullable=False),  # ciphertext
    Column("purpose", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("revoked_at", Float),
    Column("revoked_by", String(36)),
    Index("ix_break_glass_grants_user_id", "user_id", "expires_at"),
    Index("ix_break_glass_grants_created_at", "created_at"),
)

# Per-user permissions beyond the role: sensitive labels a user may see (PSY, HIV, ...), for
# roles whose policy accepts per-user grants.
user_label_grants = Table(
    "user_label_grants",
    metadata,
    Column("user_id", String(36), ForeignKey("users.id"), primary_key=True),
    Column("label", String(16), primary_key=True),
    Column("granted_at", Float, nullable=False),
)

# Bumped in the same transaction as every write that changes an access fact (CareTeam,
# PractitionerRole, Patient, Consent, grants): caches of those facts compare it per request.
access_generation = Table(
    "access_generation",
    metadata,
    Column("id", Integer, primary_key=True),  # always 1
    Column("generation", BigInteger, nullable=False),
)


# --- Multi-factor authentication (identity/mfa/) and browser sessions (identity/web/) -----

mfa_totp = Table(
    "mfa_totp",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id"), nullable=False, index=True),
    Column("secret", LargeBinary, nullable=False),  # AEAD ciphertext (scope mfa:<user id>)
    Column("created_at", Float, nullable=False),
    Column("confirmed_at", Float),  # null: enrolled, not confirmed yet, so not a factor
    Column("last_step", BigInteger, nullable=False),  # newest time step accepted: no replays
    Column("last_used_at", Float),
    Column("failures", Integer, nullable=False),  # wrong codes since the last right one
    Column("locked_until", Float),
)

webauthn_credentials = Table(
    "webauthn_credentials",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id"), nullable=False, index=True),
    Column("credential_id", String(1400), nullable=False, unique=True),  # base64url
    Column("public_key", LargeBinary, nullable=False),  # COSE key
    Column("sign_count", BigInteger, nullable=False),
    Column("transports", JSON, nullable=False),
    Column("aaguid", String(36)),
    Column("backed_up", Boolean, nullable=False),  # a synced passkey: amr swk, else hwk
    Column("user_verified", Boolean, nullable=False),
    Column("label", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Column("flagged_at", Float),  # the sign counter went back: possibly cloned, refused
)

recovery_codes = Table(
    "recovery_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),  # keyed hash of the code
    Column("user_id", String(36), ForeignKey("users.id"), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("used_at", Float),
)

# Single-use, short-lived proofs between steps: the mfa_token of a login attempt, WebAuthn
# challenges. Only a hash of the handed-out value is kept.
mfa_challenges = Table(
    "mfa_challenges",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("purpose", String(24), nullable=False),
    Column("user_id", String(36), ForeignKey("users.id"), nullable=False),
    Column("bound_to", String(64)),  # the login attempt or session this belongs to
    Column("challenge", LargeBinary),  # WebAuthn: the challenge the client signs
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),
    Index("ix_mfa_challenges_expires_at", "expires_at"),
)

browser_sessions = Table(
    "browser_sessions",
    metadata,
    Column("id", String(36), primary_key=True),  # listed and ended by this, never the cookie
    Column("token_hash", String(64), nullable=False, unique=True),  # SHA-256 of the cookie
    Column("user_id", String(36), ForeignKey("users.id"), index=True),  # null before login
    Column("state", String(16), nullable=False),  # anonymous | mfa_pending | active | ended
    Column("csrf_token", String(64), nullable=False),
    Column("mfa_attempt", String(64)),  # while mfa_pending: the login attempt's token hash
    Column("amr", JSON, nullable=False),
    Column("acr", String(40)),
    Column("auth_time", Integer),
    Column("created_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
    Column("absolute_expires_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("ended_reason", String(32)),
    Column("address", String(64)),
    Column("device", String(128)),
)


# --- OAuth 2.0 / OpenID Connect / SMART (oauth/) ------------------------------------------
oauth_clients = Table(
    "oauth_clients",
    metadata,
    Column("id", String(64), primary_key=True),  # the client_id
    Column("name", String(128), nullable=False),
    # none (public, PKCE) | private_key_jwt (RFC 7523) | client_secret_basic
    Column("auth_method", String(32), nullable=False),
    Column("secret_hash", String(64)),  # client_secret_basic: keyed hash of the secret
    Column("jwks", JSON),  # private_key_jwt: the client's registered public keys
    Column("redirect_uris", JSON, nullable=False),  # exact strings, compared exactly
    Column("grant_types", JSON, nullable=False),
    Column("scope", Text, nullable=False),  # the scopes it may ask for
    Column("require_dpop", Boolean, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("disabled_at", Float),
)

oauth_codes = Table(
    "oauth_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),  # SHA-256 of the code
    Column("client_id", String(64), ForeignKey("oauth_clients.id"), nullable=False),
    Column("user_id", String(36), ForeignKey("users.id"), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("scope", Text, nullable=False),
    Column("code_challenge", String(128), nullable=False),  # PKCE S256
    Column("nonce", String(512)),
    Column("patient", String(64)),  # launch context chosen at authorization
    Column("dpop_jkt", String(64)),  # RFC 9449 §10: the key the code is bound to, if any
    Column("amr", JSON, nullable=False),
    Column("acr", String(40)),
    Column("auth_time", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
    Column("used_at", Float),
    Column("family_id", String(36)),  # the session the code started: revoked on reuse
)

oauth_consents = Table(
    "oauth_consents",
    metadata,
    Column("user_id", String(36), ForeignKey("users.id"), primary_key=True),
    Column("client_id", String(64), ForeignKey("oauth_clients.id"), primary_key=True),
    Column("scope", Text, nullable=False),  # what the user approved, remembered until revoked
    Column("granted_at", Float, nullable=False),
)

# One-time values seen (DPoP proof and client assertion `jti`s) when no Redis is configured:
# a unique key inserted once; the insert that loses the race is the replay.
oauth_replay = Table(
    "oauth_replay",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)


# --- Audit trail (audit/) -----------------------------------------------------------------
# Append-only: triggers (db/append_only.py) refuse UPDATE and DELETE; only retention, through
# one audited command, removes whole checkpointed ranges. `entry` is the canonical JSON the
# chain MAC covers; the other columns repeat some of its fields for filtering, and
# `carevault audit verify` checks that they match it.

audit_entries = Table(
    "audit_entries",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at", String(27), nullable=False),  # UTC, fixed-width ISO 8601: sorts as text
    Column("action", String(48), nullable=False),
    Column("outcome", String(8), nullable=False),
    Column("user_id", String(64)),
    Column("patient_id", String(64)),
    Column("break_glass", Boolean, nullable=False),
    Column("entry", Text, nullable=False),
    Column("mac", LargeBinary, nullable=False),
    Index("ix_audit_entries_patient_id", "patient_id", "seq"),
    Index("ix_audit_entries_user_id", "user_id", "seq"),
    Index("ix_audit_entries_at", "at"),
)

# Signed tree heads: RFC 9162 root over entries 1..size, signed with the audit signing key.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("root", LargeBinary, nullable=False),
    Column("at", String(27), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("signature", LargeBinary, nullable=False),
)

# The subtree hash of each complete, aligned block of merkle.BLOCK entries.
audit_blocks = Table(
    "audit_blocks",
    metadata,
    Column("block", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary, nullable=False),
)

# Retention: entries 1..up_to were exported (file digest kept) and removed; the chain goes on
# from `last_mac`.
audit_retention = Table(
    "audit_retention",
    metadata,
    Column("up_to", BigInteger, primary_key=True, autoincrement=False),
    Column("last_mac", LargeBinary, nullable=False),
    Column("at", String(27), nullable=False),
    Column("export_sha256", String(64), nullable=False),
)

AUDIT_TABLES = ("audit_entries", "audit_checkpoints", "audit_blocks", "audit_retention")

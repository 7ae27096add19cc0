"""Multi-factor authentication (TOTP, WebAuthn credentials, recovery codes, single-use
challenges), browser sessions, and what the session list shows about refresh families.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def _user_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=f"fk_{table}_user_id_users")


def upgrade() -> None:
    with op.batch_alter_table("refresh_families") as batch:
        batch.add_column(sa.Column("acr", sa.String(40)))
        batch.add_column(sa.Column("address", sa.String(64)))
        batch.add_column(sa.Column("device", sa.String(128)))
        batch.add_column(sa.Column("last_used_at", sa.Float))

    op.create_table(
        "mfa_totp",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("secret", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("confirmed_at", sa.Float),
        sa.Column("last_step", sa.BigInteger, nullable=False),
        sa.Column("last_used_at", sa.Float),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.Float),
        sa.PrimaryKeyConstraint("id", name="pk_mfa_totp"),
        _user_fk("mfa_totp"),
    )
    op.create_index("ix_mfa_totp_user_id", "mfa_totp", ["user_id"])

    op.create_table(
        "webauthn_credentials",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("credential_id", sa.String(1400), nullable=False),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("sign_count", sa.BigInteger, nullable=False),
        sa.Column("transports", sa.JSON, nullable=False),
        sa.Column("aaguid", sa.String(36)),
        sa.Column("backed_up", sa.Boolean, nullable=False),
        sa.Column("user_verified", sa.Boolean, nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_used_at", sa.Float),
        sa.Column("flagged_at", sa.Float),
        sa.PrimaryKeyConstraint("id", name="pk_webauthn_credentials"),
        sa.UniqueConstraint("credential_id", name="uq_webauthn_credentials_credential_id"),
        _user_fk("webauthn_credentials"),
    )
    op.create_index("ix_webauthn_credentials_user_id", "webauthn_credentials", ["user_id"])

    op.create_table(
        "recovery_codes",
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float),
        sa.PrimaryKeyConstraint("code_hash", name="pk_recovery_codes"),
        _user_fk("recovery_codes"),
    )
    op.create_index("ix_recovery_codes_user_id", "recovery_codes", ["user_id"])

    op.create_table(
        "mfa_challenges",
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(24), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("bound_to", sa.String(64)),
        sa.Column("challenge", sa.LargeBinary),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float),
        sa.PrimaryKeyConstraint("id_hash", name="pk_mfa_challenges"),
        _user_fk("mfa_challenges"),
    )
    op.create_index("ix_mfa_challenges_expires_at", "mfa_challenges", ["expires_at"])

    op.create_table(
        "browser_sessions",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(36)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("mfa_attempt", sa.String(64)),
        sa.Column("amr", sa.JSON, nullable=False),
        sa.Column("acr", sa.String(40)),
        sa.Column("auth_time", sa.Integer),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_seen_at", sa.Float, nullable=False),
        sa.Column("absolute_expires_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("ended_reason", sa.String(32)),
        sa.Column("address", sa.String(64)),
        sa.Column("device", sa.String(128)),
        sa.PrimaryKeyConstraint("id", name="pk_browser_sessions"),
        sa.UniqueConstraint("token_hash", name="uq_browser_sessions_token_hash"),
        _user_fk("browser_sessions"),
    )
    op.create_index("ix_browser_sessions_user_id", "browser_sessions", ["user_id"])


def downgrade() -> None:
    for table in (
        "browser_sessions",
        "mfa_challenges",
        "recovery_codes",
        "webauthn_credentials",
        "mfa_totp",
    ):
        op.drop_table(table)
    with op.batch_alter_table("refresh_families") as batch:
        for column in ("last_used_at", "device", "address", "acr"):
            batch.drop_column(column)

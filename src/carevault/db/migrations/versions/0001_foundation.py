"""Foundation: accounts, refresh token families, revocations, login throttle, security events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("roles", sa.JSON, nullable=False),
        sa.Column("organization_id", sa.String(64)),
        sa.Column("practitioner_id", sa.String(64)),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("is_demo", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    op.create_table(
        "refresh_families",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("amr", sa.JSON, nullable=False),
        sa.Column("auth_time", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.Column("revoked_reason", sa.String(32)),
        sa.PrimaryKeyConstraint("id", name="pk_refresh_families"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_refresh_families_user_id_users"
        ),
    )
    op.create_index("ix_refresh_families_user_id", "refresh_families", ["user_id"])
    op.create_table(
        "refresh_tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("family_id", sa.String(36), nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("idle_expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float),
        sa.Column("successor_hash", sa.String(64)),
        sa.PrimaryKeyConstraint("token_hash", name="pk_refresh_tokens"),
        sa.ForeignKeyConstraint(
            ["family_id"],
            ["refresh_families.id"],
            name="fk_refresh_tokens_family_id_refresh_families",
        ),
    )
    op.create_index("ix_refresh_tokens_family_id", "refresh_tokens", ["family_id"])
    op.create_table(
        "revocations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("value", sa.String(64), nullable=False),
        sa.Column("not_before", sa.Float),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_revocations"),
    )
    op.create_index("ix_revocations_expires_at", "revocations", ["expires_at"])
    op.create_table(
        "login_throttle",
        sa.Column("key", sa.String(80), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("window_started_at", sa.Float, nullable=False),
        sa.Column("last_failure_at", sa.Float, nullable=False),
        sa.Column("locked_until", sa.Float),
        sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),
        sa.Column("in_flight_at", sa.Float),
        sa.PrimaryKeyConstraint("key", name="pk_login_throttle"),
    )
    op.create_table(
        "security_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("user_id", sa.String(36)),
        sa.Column("client_id", sa.String(128)),
        sa.Column("subject_hash", sa.String(64)),
        sa.Column("source_address", sa.String(64)),
        sa.Column("request_id", sa.String(64)),
        sa.Column("details", sa.JSON),
        sa.PrimaryKeyConstraint("id", name="pk_security_events"),
    )
    op.create_index("ix_security_events_occurred_at", "security_events", ["occurred_at"])


def downgrade() -> None:
    for table in (
        "security_events",
        "login_throttle",
        "revocations",
        "refresh_tokens",
        "refresh_families",
        "users",
    ):
        op.drop_table(table)

"""OAuth 2.0 / OpenID Connect / SMART: registered clients, authorization codes, remembered
consent, a replay cache for one-time values, and the launch patient and DPoP key of a grant.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("refresh_families") as batch:
        batch.add_column(sa.Column("patient", sa.String(64)))
        batch.add_column(sa.Column("dpop_jkt", sa.String(64)))

    op.create_table(
        "oauth_clients",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("auth_method", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(64)),
        sa.Column("jwks", sa.JSON),
        sa.Column("redirect_uris", sa.JSON, nullable=False),
        sa.Column("grant_types", sa.JSON, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("require_dpop", sa.Boolean, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("disabled_at", sa.Float),
        sa.PrimaryKeyConstraint("id", name="pk_oauth_clients"),
    )

    op.create_table(
        "oauth_codes",
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("code_challenge", sa.String(128), nullable=False),
        sa.Column("nonce", sa.String(512)),
        sa.Column("patient", sa.String(64)),
        sa.Column("dpop_jkt", sa.String(64)),
        sa.Column("amr", sa.JSON, nullable=False),
        sa.Column("acr", sa.String(40)),
        sa.Column("auth_time", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float),
        sa.Column("family_id", sa.String(36)),
        sa.PrimaryKeyConstraint("code_hash", name="pk_oauth_codes"),
        sa.ForeignKeyConstraint(
            ["client_id"], ["oauth_clients.id"], name="fk_oauth_codes_client_id_oauth_clients"
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_oauth_codes_user_id_users"),
    )
    op.create_index("ix_oauth_codes_expires_at", "oauth_codes", ["expires_at"])

    op.create_table(
        "oauth_consents",
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("granted_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "client_id", name="pk_oauth_consents"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_oauth_consents_user_id_users"),
        sa.ForeignKeyConstraint(
            ["client_id"], ["oauth_clients.id"], name="fk_oauth_consents_client_id_oauth_clients"
        ),
    )

    op.create_table(
        "oauth_replay",
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_oauth_replay"),
    )
    op.create_index("ix_oauth_replay_expires_at", "oauth_replay", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_oauth_replay_expires_at", table_name="oauth_replay")
    op.drop_table("oauth_replay")
    op.drop_table("oauth_consents")
    op.drop_index("ix_oauth_codes_expires_at", table_name="oauth_codes")
    op.drop_table("oauth_codes")
    op.drop_table("oauth_clients")
    with op.batch_alter_table("refresh_families") as batch:
        batch.drop_column("dpop_jkt")
        batch.drop_column("patient")

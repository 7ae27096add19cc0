"""Data keys leave the data database for the key vault (`db/vault_migrations`).

`carevault.db.migrate.upgrade` copies them into the vault before this runs; downgrading brings
back an empty table (the keys stay in the vault).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_data_keys_kek_key_id", table_name="data_keys")
    op.drop_table("data_keys")


def downgrade() -> None:
    op.create_table(
        "data_keys",
        sa.Column("scope", sa.String(100), nullable=False),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("kek_key_id", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("destroyed_at", sa.Float),
        sa.PrimaryKeyConstraint("scope", name="pk_data_keys"),
    )
    op.create_index("ix_data_keys_kek_key_id", "data_keys", ["kek_key_id"])

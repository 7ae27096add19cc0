"""Key vault: one KEK-wrapped tink keyset per encryption scope (the data keys).

Revision ID: v001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "v001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
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


def downgrade() -> None:
    op.drop_index("ix_data_keys_kek_key_id", table_name="data_keys")
    op.drop_table("data_keys")

"""Crypto-shredding erasure marker: `fhir_resources.erased_at`.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fhir_resources") as batch:
        batch.add_column(sa.Column("erased_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fhir_resources") as batch:
        batch.drop_column("erased_at")

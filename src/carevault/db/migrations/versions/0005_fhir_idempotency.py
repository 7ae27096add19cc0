"""Idempotency-Key of FHIR creates: `fhir_idempotency`.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fhir_idempotency",
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("body_hash", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=True),
        sa.Column("resource_id", sa.String(64), nullable=True),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("key_hash", name="pk_fhir_idempotency"),
    )
    op.create_index("ix_fhir_idempotency_created_at", "fhir_idempotency", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_fhir_idempotency_created_at", table_name="fhir_idempotency")
    op.drop_table("fhir_idempotency")

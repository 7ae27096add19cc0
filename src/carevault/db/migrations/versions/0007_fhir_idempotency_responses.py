"""Idempotency-Key of FHIR transaction/batch Bundles: `fhir_idempotency_responses`.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fhir_idempotency_responses",
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("key_hash", name="pk_fhir_idempotency_responses"),
    )
    op.create_index(
        "ix_fhir_idempotency_responses_created_at",
        "fhir_idempotency_responses",
        ["created_at"],
    )


def downgrade() -> None:
    op.drop_index(
        "ix_fhir_idempotency_responses_created_at", table_name="fhir_idempotency_responses"
    )
    op.drop_table("fhir_idempotency_responses")

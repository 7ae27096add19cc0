"""FHIR record store: encrypted versions, current pointers, compartments, search indexes.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fhir_resources",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.Float, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("scope", sa.String(100), nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "id", name="pk_fhir_resources"),
    )
    op.create_index("ix_fhir_resources_last_updated", "fhir_resources", ["last_updated"])
    op.create_table(
        "fhir_versions",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.Float, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("scope", sa.String(100), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "id", "version", name="pk_fhir_versions"),
    )
    op.create_index("ix_fhir_versions_last_updated", "fhir_versions", ["last_updated"])
    op.create_table(
        "fhir_compartments",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "id", "patient_id", name="pk_fhir_compartments"),
    )
    op.create_index("ix_fhir_compartments_patient_id", "fhir_compartments", ["patient_id"])
    op.create_table(
        "fhir_index_keys",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
    )
    op.create_index(
        "ix_fhir_index_keys_lookup", "fhir_index_keys", ["resource_type", "param", "key"]
    )
    op.create_index("ix_fhir_index_keys_resource", "fhir_index_keys", ["resource_type", "id"])
    op.create_table(
        "fhir_index_dates",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        sa.Column("low", sa.Float, nullable=False),
        sa.Column("high", sa.Float, nullable=False),
    )
    op.create_index(
        "ix_fhir_index_dates_lookup", "fhir_index_dates", ["resource_type", "param", "low"]
    )
    op.create_index("ix_fhir_index_dates_resource", "fhir_index_dates", ["resource_type", "id"])


def downgrade() -> None:
    for table in (
        "fhir_index_dates",
        "fhir_index_keys",
        "fhir_compartments",
        "fhir_versions",
        "fhir_resources",
    ):
        op.drop_table(table)

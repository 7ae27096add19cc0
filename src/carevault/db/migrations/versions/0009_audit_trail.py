"""The audit trail: hash-chained entries, signed checkpoints, Merkle block hashes, retention
marks, all append-only by trigger. It takes over the interim `security_events` table, which is
dropped: no release wrote to it.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

from carevault.db import append_only

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_entries",
        sa.Column("seq", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("at", sa.String(27), nullable=False),
        sa.Column("action", sa.String(48), nullable=False),
        sa.Column("outcome", sa.String(8), nullable=False),
        sa.Column("user_id", sa.String(64)),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("break_glass", sa.Boolean, nullable=False),
        sa.Column("entry", sa.Text, nullable=False),
        sa.Column("mac", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_entries"),
    )
    op.create_index("ix_audit_entries_patient_id", "audit_entries", ["patient_id", "seq"])
    op.create_index("ix_audit_entries_user_id", "audit_entries", ["user_id", "seq"])
    op.create_index("ix_audit_entries_at", "audit_entries", ["at"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("size", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("root", sa.LargeBinary, nullable=False),
        sa.Column("at", sa.String(27), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("size", name="pk_audit_checkpoints"),
    )
    op.create_table(
        "audit_blocks",
        sa.Column("block", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("block", name="pk_audit_blocks"),
    )
    op.create_table(
        "audit_retention",
        sa.Column("up_to", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("last_mac", sa.LargeBinary, nullable=False),
        sa.Column("at", sa.String(27), nullable=False),
        sa.Column("export_sha256", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("up_to", name="pk_audit_retention"),
    )
    append_only.create(op.get_bind())
    op.drop_index("ix_security_events_occurred_at", table_name="security_events")
    op.drop_table("security_events")


def downgrade() -> None:
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
    append_only.drop(op.get_bind())
    for table in ("audit_retention", "audit_blocks", "audit_checkpoints", "audit_entries"):
        op.drop_table(table)

"""Access control: break-glass grants, per-user label grants, the access-facts generation.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "break_glass_grants",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.LargeBinary, nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.Column("revoked_by", sa.String(36)),
        sa.PrimaryKeyConstraint("id", name="pk_break_glass_grants"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_break_glass_grants_user_id_users"
        ),
    )
    op.create_index(
        "ix_break_glass_grants_user_id", "break_glass_grants", ["user_id", "expires_at"]
    )
    op.create_index("ix_break_glass_grants_created_at", "break_glass_grants", ["created_at"])
    op.create_table(
        "user_label_grants",
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("granted_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "label", name="pk_user_label_grants"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_user_label_grants_user_id_users"
        ),
    )
    op.create_table(
        "access_generation",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_access_generation"),
    )
    op.execute("INSERT INTO access_generation (id, generation) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("access_generation")
    op.drop_table("user_label_grants")
    op.drop_index("ix_break_glass_grants_created_at", table_name="break_glass_grants")
    op.drop_index("ix_break_glass_grants_user_id", table_name="break_glass_grants")
    op.drop_table("break_glass_grants")

"""runs and saes: the registry of finished runs and their trained SAEs

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=500), nullable=False),
        sa.Column("adapter", sa.String(length=50), nullable=False),
        sa.Column("dataset", sa.String(length=500), nullable=False),
        sa.Column("config_yaml", sa.Text(), nullable=False),
        sa.Column("store_path", sa.String(length=1000), nullable=False),
        sa.Column("n_texts", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "saes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("hook_name", sa.String(length=200), nullable=False),
        sa.Column("path", sa.String(length=1000), nullable=False),
        sa.Column("architecture", sa.String(length=50), nullable=False),
        sa.Column("d_in", sa.Integer(), nullable=False),
        sa.Column("d_sae", sa.Integer(), nullable=False),
        sa.Column("mse", sa.Double(), nullable=False),
        sa.Column("explained_variance", sa.Double(), nullable=False),
        sa.Column("l0", sa.Double(), nullable=False),
        sa.Column("dead_fraction", sa.Double(), nullable=False),
        sa.Column("r2_heldout", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "layer"),
    )
    op.create_index("ix_saes_run_id", "saes", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_saes_run_id", table_name="saes")
    op.drop_table("saes")
    op.drop_table("runs")

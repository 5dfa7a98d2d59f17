"""labels outlive a replaced run; sessions that logging out ends

A replaced run used to be deleted and inserted again, and its labels and their history went
with it (ON DELETE CASCADE). Now the run row is updated in place and its version grows; each
SAE keeps a fingerprint of its weights, and each label and event the SAE and run version it
was made on, so a label made on an earlier SAE of the layer is shown as such.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-09
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("saes") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(64), nullable=True))
    for table in ("labels", "label_events"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("sae_fingerprint", sa.String(64), nullable=True))
            batch.add_column(sa.Column("run_version", sa.Integer(), nullable=True))
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("author", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("web_sessions")
    for table in ("label_events", "labels"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("run_version")
            batch.drop_column("sae_fingerprint")
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("fingerprint")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("version")

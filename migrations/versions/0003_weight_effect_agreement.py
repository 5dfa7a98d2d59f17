"""saes.weight_effect_agreement: how far a layer's regression weights agree with the reward effect

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.add_column(sa.Column("weight_effect_agreement", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("weight_effect_agreement")

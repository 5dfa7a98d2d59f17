"""explanations keep the evidence they were written from: the feature's top tokens

A search for a kind of feature ("positive adjectives") should find the features that fire on such
words even where the explainer's words miss them; the evidence, and its MiniLM embedding, are
searched beside the explanation's own. A person's edit carries the evidence of the version it edits.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("explanations") as batch:
        batch.add_column(sa.Column("evidence", sa.Text(), nullable=True))
        batch.add_column(sa.Column("evidence_embedding", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("explanations") as batch:
        batch.drop_column("evidence_embedding")
        batch.drop_column("evidence")

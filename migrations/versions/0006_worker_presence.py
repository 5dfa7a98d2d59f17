"""workers say they are alive, so pages know whether a queued job will run

A worker holds no row while it waits for jobs; the job page could not tell a queue that a
worker will reach from one nobody serves. Each worker now keeps a row of its own, touched
every few seconds and removed when it stops.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(200), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("workers")

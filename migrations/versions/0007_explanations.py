"""feature explanations: versioned texts with their model, classification and scores

Each row is one version of a feature's explanation (the highest is current): the text, who wrote
it (an LLM endpoint's model and prompt version, the offline explainer, or a person), the tokens it
took, its MiniLM embedding for semantic search, then the reward-related classification and the
detection / fuzzing / embedding / causal scores made on that text. Like labels, rows outlive a
replaced run and record the run version and SAE they were made on.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "explanations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("feature", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("explainer", sa.String(20), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("prompt_version", sa.String(20), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("reward_related", sa.String(10), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("classified_by", sa.String(250), nullable=True),
        sa.Column("classify_tokens", sa.Integer(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("scored_by", sa.String(250), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("author", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sae_fingerprint", sa.String(64), nullable=True),
        sa.Column("run_version", sa.Integer(), nullable=True),
        sa.UniqueConstraint("run_id", "layer", "feature", "version"),
    )
    op.create_index("ix_explanations_feature", "explanations", ["run_id", "layer", "feature"])


def downgrade() -> None:
    op.drop_index("ix_explanations_feature", table_name="explanations")
    op.drop_table("explanations")

"""layer metrics live in the feature store only; runs keep the best layer the runs list shows

A copy of each layer's metrics in `saes` could disagree with the store, and the runs list and
the run page then picked their best layer from different copies.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

METRICS = ("mse", "explained_variance", "l0", "dead_fraction", "r2_heldout")  # NOT NULL until now


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("best_layer", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("best_r2_heldout", sa.Double(), nullable=True))
    _best_layers_from_saes()
    with op.batch_alter_table("saes") as batch:
        for name in (*METRICS, "weight_effect_agreement"):
            batch.drop_column(name)


def _best_layers_from_saes() -> None:
    """Runs registered before keep their runs-list entry, chosen by the rule of the day."""
    from backend.core.layer_choice import best_layer

    conn = op.get_bind()
    by_run: dict[str, list[dict]] = {}
    for row in conn.execute(sa.text("SELECT run_id, layer, r2_heldout, weight_effect_agreement FROM saes")).mappings():
        by_run.setdefault(row["run_id"], []).append(dict(row))
    for run_id, layers in by_run.items():
        layer = best_layer(layers)
        r2 = next((l["r2_heldout"] for l in layers if l["layer"] == layer), None)
        conn.execute(sa.text("UPDATE runs SET best_layer = :layer, best_r2_heldout = :r2 WHERE id = :id"),
                     {"layer": layer, "r2": r2, "id": run_id})


def downgrade() -> None:
    # the metrics are gone from SQL: back as 0 (NOT NULL columns need a value); re-register a
    # run (rewardatlas run CONFIG --replace) for the real numbers
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("best_r2_heldout")
        batch.drop_column("best_layer")
    with op.batch_alter_table("saes") as batch:
        for name in METRICS:
            batch.add_column(sa.Column(name, sa.Double(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("weight_effect_agreement", sa.Double(), nullable=True))

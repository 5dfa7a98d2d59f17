"""Reads a run's preference pairs (workers/analyses/preference.py) from its feature store: the
summary the run page and `GET /api/runs/{run}` carry, one page of the pairs browser, and the
features that pushed each wrongly ordered pair toward its rejected side. A run whose dataset is a
text corpus has no pairs: None / nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from backend.core import store
from backend.core.store_schema import TABLES

SPLITS = ("heldout", "train")


def has_pairs(path: Path) -> bool:
    return store._has_table(path, "preference_pairs") and store._memo(
        path, "n_pairs", lambda: store._rows(path, "SELECT count(*) AS n FROM preference_pairs")[0]["n"]) > 0


def summary(path: Path) -> dict[str, Any] | None:
    """n_pairs, the RM's pairwise accuracy on held-out pairs, and per layer the accuracy with the
    SAE spliced in and the surrogate's (SAE features + Bradley–Terry) beside it."""
    if not has_pairs(path):
        return None

    def compute():
        counts = store._rows(path, """
            SELECT count(*) AS n_pairs, count(*) FILTER (WHERE split = 'heldout') AS n_heldout_pairs,
                   avg(correct::INTEGER) FILTER (WHERE split = 'heldout') AS pairwise_accuracy,
                   count(*) FILTER (WHERE split = 'heldout' AND NOT correct) AS n_heldout_wrong
            FROM preference_pairs""")[0]
        layers = [{"layer": row["layer"], "spliced_accuracy": row["spliced_accuracy"],
                   "surrogate_accuracy": row["surrogate_accuracy"],
                   "surrogate_train_accuracy": row["surrogate_train_accuracy"]} for row in store.layers(path)]
        return {**counts, "layers": layers}
    return store._memo(path, "preference summary", compute)


def pairs_page(path: Path, split: str | None, wrong: bool, limit: int, offset: int) -> tuple[list[dict], int]:
    """One page of pairs in pair order, each with both texts as the model read them, and the total."""
    where, params = [], []
    if split is not None:
        where.append("p.split = ?")
        params.append(split)
    if wrong:
        where.append("NOT p.correct")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = store._rows(path, f"SELECT count(*) AS n FROM preference_pairs p{clause}", params)[0]["n"]
    columns = ", ".join(f"p.{name}" for name in TABLES["preference_pairs"].names)
    rows = store._rows(path, f"""
        SELECT {columns}, c.text AS chosen_text, r.text AS rejected_text
        FROM preference_pairs p JOIN texts c ON c.text_id = p.chosen_text_id JOIN texts r ON r.text_id = p.rejected_text_id
        {clause} ORDER BY p.pair_id LIMIT ? OFFSET ?""", [*params, limit, offset])
    return rows, total


def wrong_features(path: Path, pair_ids: list[int]) -> dict[int, dict[int, list[dict[str, Any]]]]:
    """pair id -> layer -> the features that pushed it most toward the rejected side, strongest first."""
    if not pair_ids or not store._has_table(path, "preference_wrong_features"):
        return {}
    marks = ", ".join("?" for _ in pair_ids)
    rows = store._rows(path, f"""
        SELECT w.pair_id, w.layer, w.rank, w.feature, w.margin_attribution, w.chosen_attribution,
               w.rejected_attribution, f.top_token
        FROM preference_wrong_features w JOIN features f ON f.layer = w.layer AND f.feature = w.feature
        WHERE w.pair_id IN ({marks}) ORDER BY w.pair_id, w.layer, w.rank""", list(pair_ids))
    out: dict[int, dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        out.setdefault(row.pop("pair_id"), {}).setdefault(row.pop("layer"), []).append(row)
    return out

"""The layer page's agreement tables: the reward-related classifier against the human labels
(Cohen's kappa, sklearn), and both against the measured effect.

The measured verdict of a feature is the store's measured Δ (the feature zeroed alone on held-out
texts where it fires): "moves the reward" when its 95% CI excludes 0, "does not" when it includes
0; features never measured are left out of that table. Kappa is taken on the rows both sides
decided (unsure is a column of its own in the counts, and left out of kappa against the verdict).
"""
from __future__ import annotations

from typing import Any

from backend.core import explanations, labels, store
from backend.core.exports.source import run_and_store
from backend.core.settings import Settings

CLASSES = ("yes", "no", "unsure")
HUMAN_TO_CLASS = {"reward": "yes", "not_reward": "no", "unsure": "unsure"}
VERDICTS = ("moves", "does not move")


def measured_verdict(row: dict[str, Any]) -> str | None:
    low, high = row.get("measured_delta_low"), row.get("measured_delta_high")
    if row.get("measured_delta") is None or low is None or high is None:
        return None
    return "moves" if low > 0 or high < 0 else "does not move"


def _kappa(a: list[str], b: list[str]) -> float | None:
    from sklearn.metrics import cohen_kappa_score  # lazy: scikit-learn (1 s) loads with the first table, not with the web app

    if len(a) < 2 or len(set(a) | set(b)) < 2:
        return None
    value = float(cohen_kappa_score(a, b))
    return value if value == value else None  # NaN (one class on both sides): no kappa


def _table(pairs: list[tuple[str, str]], rows: tuple[str, ...], columns: tuple[str, ...]) -> list[list[int]]:
    return [[sum(1 for a, b in pairs if a == r and b == c) for c in columns] for r in rows]


def agreement(explained: dict[int, dict[str, Any]], labelled: dict[int, dict[str, Any]],
              features: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """`explained`: current explanations by feature; `labelled`: human labels; `features`: the
    store's rows (measured Δ and its CI) of the features either names."""
    classified = {f: e["reward_related"] for f, e in explained.items() if e.get("reward_related")}
    human = {f: HUMAN_TO_CLASS[row["label"]] for f, row in labelled.items() if row.get("label") in HUMAN_TO_CLASS}
    verdict = {f: v for f, v in ((f, measured_verdict(row)) for f, row in features.items()) if v}

    both = sorted(classified.keys() & human.keys())
    vs_human = [(classified[f], human[f]) for f in both]

    def against_effect(source: dict[int, str]) -> dict[str, Any]:
        ids = sorted(source.keys() & verdict.keys())
        pairs = [(source[f], verdict[f]) for f in ids]
        decided = [(a, b) for a, b in pairs if a != "unsure"]
        return {"n": len(pairs), "rows": CLASSES, "columns": VERDICTS, "counts": _table(pairs, CLASSES, VERDICTS),
                "kappa": _kappa(["yes" if a == "yes" else "no" for a, _ in decided],
                                ["yes" if b == "moves" else "no" for _, b in decided])}

    return {
        "classifier_vs_human": {"n": len(vs_human), "rows": CLASSES, "columns": CLASSES,
                                "counts": _table(vs_human, CLASSES, CLASSES),
                                "kappa": _kappa([a for a, _ in vs_human], [b for _, b in vs_human])},
        "classifier_vs_effect": against_effect(classified),
        "human_vs_effect": against_effect(human),
        "n_classified": len(classified), "n_labelled": len(human), "n_measured": len(verdict),
    }


def layer_agreement(settings: Settings, run_id: str, layer: int) -> dict[str, Any]:
    """The layer's agreement tables, from its explanations, labels and features' measured effects."""
    path = run_and_store(settings, run_id)[1]
    info = store.layer_info(path, layer)
    explained = explanations.for_layer(settings, run_id, layer)
    labelled = labels.labels_for_layer(settings, run_id, layer)
    ids = sorted((explained.keys() | labelled.keys()) & set(range(info["d_sae"])))
    rows = {}
    if ids:
        where = store.FeatureFilter(features=tuple(ids))
        rows = {r["feature"]: r for r in store.features(path, layer, sort="frequency", where=where, limit=len(ids)).rows}
    return agreement(explained, labelled, rows)

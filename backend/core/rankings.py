"""The rankings of a layer's features and what each one is: a prediction of the score, the
model's own gradient, or a measurement. Shared by the worker (deletion curves, "top N"
selections) and the server (labels, default sort), so it imports nothing heavy.

A ranking orders live features with a value in its column, largest first (sign -1: smallest
first; 0: by absolute value)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ranking:
    key: str
    column: str  # the features table's column
    sign: int  # 1: largest first, -1: smallest first, 0: largest |value| first
    sort: str  # the layer table's ?sort= that lists the features in this order
    label: str
    kind: str  # "predicts" (regression), "gradient" (first-order, the model's own), "measured" (ablation)


RANKINGS: dict[str, Ranking] = {r.key: r for r in (
    Ranking("weight", "weight", 1, "weight", "regression weight", "predicts"),
    Ranking("abs_weight", "weight", 0, "abs_weight", "|regression weight|", "predicts"),
    Ranking("reward_effect", "reward_effect", 1, "reward_effect", "effect per unit (gradient)", "gradient"),
    Ranking("attribution", "attribution", 1, "attribution", "attribution (activation × gradient)", "gradient"),
    Ranking("measured_delta", "measured_delta", -1, "-measured_delta", "measured Δ when zeroed", "measured"),
)}

KIND_WORDS = {"predicts": "predicts the score (regression over the corpus)",
              "gradient": "the model's own gradient (first-order estimate of zeroing)",
              "measured": "measured by zeroing each feature alone"}

# A signed ranking is measured in both of its directions: its raisers zeroed (should lower the
# score) and its lowerers zeroed (should raise it); a |value| ranking by the mean |Δ| per text
# (workers/faithfulness.py).
DIRECTION_WORDS = {"raises": "top raisers zeroed (should lower the score)",
                   "lowers": "top lowerers zeroed (should raise the score)",
                   "both": "top by magnitude zeroed (mean |Δ| per text)"}
SUMMARY_N = 10  # the curve point the pages quote and the best layer is chosen at
MEASURE_WORDS = {"signed": "its raisers zeroed lower the score, its lowerers zeroed raise it",
                 "abs": "mean |Δ| per text"}
VERDICT_WORDS = {"beyond_controls": "beyond every control draw",
                 "within_controls": "undecided: a control draw reaches it",
                 "too_few_controls": "undecided: too few control draws"}


def directions_of(ranking: str) -> tuple[str, ...]:
    return ("both",) if RANKINGS[ranking].sign == 0 else ("raises", "lowers")


def ranking_scores(points: list[dict]) -> dict[str, float]:
    """What the default ranking is chosen by (workers/faithfulness.py) and the layer page shows:
    each ranking's mean excess over its controls across its deletion points, per direction, then
    over its directions (a point without controls counts 0)."""
    by_direction: dict[tuple[str, str], list[float]] = {}
    for point in points:
        by_direction.setdefault((point["ranking"], point["direction"]), []).append(point.get("excess") or 0.0)
    by_ranking: dict[str, list[float]] = {}
    for (ranking, _), values in by_direction.items():
        by_ranking.setdefault(ranking, []).append(sum(values) / len(values))
    return {ranking: sum(values) / len(values) for ranking, values in by_ranking.items()}


FALLBACK_RANKING = "weight"  # where no deletion curve was measured (a score the model does not compute)


def ranking_for_sort(sort: str) -> Ranking | None:
    return next((r for r in RANKINGS.values() if r.sort == sort), None)

# A layer whose deletion curves never move the score by more than this share of its spread
# "barely reaches the score"; so does one where the head reads one token (nearly all of the
# score's gradient sits there: the demo's last layer, where only [CLS] reaches the head) and the
# default ranking's top 10 move it less than that. Its pages say so in words.
BARELY_REACHES = 0.02
READS_ONE_TOKEN = 0.9


def reads_one_token(layer: dict) -> bool:
    share = layer.get("read_token_gradient_share")
    return share is not None and share >= READS_ONE_TOKEN


def barely_reaches(layer: dict) -> bool:
    if layer.get("reach") is not None and layer["reach"] < BARELY_REACHES:
        return True
    relative = layer.get("faithfulness_relative")
    return reads_one_token(layer) and relative is not None and relative < BARELY_REACHES


def directions_said(feature: dict) -> dict[str, int]:
    """What each kind of number says the feature does to the score: +1 raises, -1 lowers, for
    its weight (predicts), attribution (gradient) and measured Δ (zeroing it lowers the score:
    it raises it); numbers that are missing or zero say nothing."""
    said = {"weight": feature.get("weight"), "attribution": feature.get("attribution"),
            "measured": None if feature.get("measured_delta") is None else -feature["measured_delta"]}
    return {k: (1 if v > 0 else -1) for k, v in said.items() if v}


def signs_disagree(feature: dict) -> bool:
    """Its weight, attribution and measured Δ do not agree on whether it raises the score."""
    return len(set(directions_said(feature).values())) > 1

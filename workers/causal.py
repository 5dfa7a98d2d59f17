"""The causal stage of one layer: what the reward model *uses*, measured, beside what the
regression says *predicts* the score.

1. measured single-feature effects (workers/measured_effects.py) on held-out texts where
   each candidate fires, with both predictions for the same reads and their calibration;
2. deletion curves of every ranking against frequency-matched controls
   (workers/faithfulness.py), which pick the layer's default ranking;
3. how far the layer's edits reach the score at all: the largest move of any curve relative
   to the score's spread, and the share of the score's gradient at the read token (a head
   that reads one token cannot be moved by features firing elsewhere).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from backend.core.store_schema import LAYERS
from workers.ablation import prepare_eval_set
from backend.core.run_config import EffectsConfig
from workers.controls import VERDICT_DRAWS
from workers.distributed_measure import MeasureTask, announce
from workers.faithfulness import default_ranking, deletion_curves, excess, summary_points
from workers.measured_effects import calibration, candidate_features, measure_single_features
from workers.sae_ops import decoder_directions, linear_decoder

MEASURED_COLUMNS = ("measured_delta", "measured_delta_low", "measured_delta_high", "measured_n",
                    "predicted_delta_regression", "predicted_delta_attribution")


@dataclass
class CausalResult:
    feature_columns: dict[str, list]  # MEASURED_COLUMNS over all the layer's features (None: not measured)
    curves: list[dict]  # faithfulness rows
    layer_columns: dict[str, object]
    timings: dict[str, float] = field(default_factory=dict)


def not_applicable(d_sae: int) -> CausalResult:
    """A score computed from the text (a reward function), not by the model: no edit moves it."""
    return CausalResult({name: [None] * d_sae for name in MEASURED_COLUMNS}, [], empty_layer_columns())


def empty_layer_columns() -> dict[str, object]:
    """The layers table's causal columns (the spec's, default_ranking to n_measured), none measured."""
    names = LAYERS.names[LAYERS.names.index("default_ranking"):LAYERS.names.index("n_measured") + 1]
    return {name: 0 if name == "n_measured" else None for name in names}


def run_causal_stage(adapter, sae, layer: int, heldout_texts: list[str], feature_columns: dict[str, np.ndarray],
                     weights: np.ndarray, pooling: str, config: EffectsConfig, seed: int, report=print,
                     progress: Callable[[float], None] | None = None) -> CausalResult:
    """`report` hears each part's message; `progress` the share done, per batch or chunk of every
    part (weighted by their cost on the demo), and may raise to stop."""
    def part(start: float, end: float):
        return None if progress is None else lambda share: progress(start + (end - start) * share)

    timings = {}
    d_sae = len(weights)
    directions = decoder_directions(sae)
    linear = linear_decoder(sae, directions) is not None
    started = time.time()
    candidates = candidate_features(feature_columns["attribution_abs"], weights, feature_columns["frequency"],
                                    config.candidates)
    announce(MeasureTask(layer, candidates, weights, pooling, config.pool_texts, config.batch_size,
                         config.texts_per_feature, seed))  # the other ranks measure a share (if any)
    pool = prepare_eval_set(adapter, layer, heldout_texts[: config.pool_texts], config.batch_size, with_gradients=True,
                            progress=part(0.0, 0.1))
    report(f"layer {layer}: measuring {len(candidates)} features, each zeroed alone on up to "
           f"{config.texts_per_feature} of {pool.n_texts} held-out texts where it fires")
    measured = measure_single_features(adapter, sae, layer, pool, candidates, weights, pooling, directions,
                                       config.texts_per_feature, seed, progress=part(0.1, 0.5))
    timings["measured"] = time.time() - started
    columns = {name: np.full(d_sae, np.nan) for name in MEASURED_COLUMNS}
    for name in MEASURED_COLUMNS:
        columns[name][candidates] = measured[name]
    columns["measured_n"] = np.where(np.isnan(columns["measured_n"]), 0, columns["measured_n"])

    started = time.time()
    faith_set = prepare_eval_set(adapter, layer, heldout_texts[: config.faithfulness_texts], config.batch_size,
                                 with_gradients=True, progress=part(0.5, 0.55))
    ranking_columns = {**feature_columns, "weight": weights, "measured_delta": columns["measured_delta"]}
    n_live = int((np.asarray(feature_columns["frequency"]) > 0).sum())
    ns = [n for n in config.faithfulness_n if 2 * n <= n_live]
    skipped = [n for n in config.faithfulness_n if n not in ns]
    report(f"layer {layer}: deletion curves of 5 rankings, signed ones in both directions, at n = {ns} on "
           f"{faith_set.n_texts} held-out texts, {config.controls} random controls each (n = 10: at least "
           f"{VERDICT_DRAWS})"
           + (f" (n = {skipped} left out: the layer has {n_live} live features, and a control of n more "
              "must be drawn from them)" if skipped else ""))
    curves = deletion_curves(adapter, sae, layer, faith_set, ranking_columns, ns,
                             config.controls, weights, pooling, directions, linear, seed, progress=part(0.55, 1.0))
    timings["faithfulness"] = time.time() - started
    layer_columns = _layer_columns(curves, columns, faith_set.clean, pool)
    return CausalResult(_nullable(columns), curves, layer_columns, timings)


def _layer_columns(curves: list[dict], columns: dict[str, np.ndarray], scores: np.ndarray, pool) -> dict:
    out = empty_layer_columns()
    spread = float(np.std(scores)) if len(scores) > 1 else None
    best = default_ranking(curves)
    out.update(default_ranking=best, score_spread=spread,
               n_measured=int(np.isfinite(columns["measured_delta"]).sum()),
               read_token_gradient_share=read_token_gradient_share(pool))
    out.update(verdict_columns(summary_points(curves, best), spread))
    if curves and spread:
        out["reach"] = max(excess(r) for r in curves) / spread
    for prediction in ("regression", "attribution"):
        fit = calibration(columns[f"predicted_delta_{prediction}"], columns["measured_delta"])
        out[f"calibration_{prediction}_slope"], out[f"calibration_{prediction}_r"] = fit["slope"], fit["r"]
    return out


def verdict_columns(points: list[dict], spread: float | None) -> dict:
    """The layer's summary of its default ranking at n = 10, over the ranking's directions: the
    mean effect on its measure, the controls', their excess relative to the score's spread (what
    picks the best layer), and one verdict (beyond controls only when every direction is)."""
    if not points:
        return {}
    verdicts = {p["verdict"] for p in points}
    verdict = ("too_few_controls" if "too_few_controls" in verdicts else
               "within_controls" if "within_controls" in verdicts else "beyond_controls")
    effect = float(np.mean([p["effect"] for p in points]))
    control = float(np.mean([p["control_effect"] for p in points]))
    return {"faithfulness_measure": points[0]["measure"], "faithfulness_effect": effect,
            "faithfulness_control": control,
            "faithfulness_relative": (effect - control) / spread if spread else None,
            "faithfulness_verdict": verdict,
            "faithfulness_draws": min(len(p["control_effects"]) for p in points)}


def read_token_gradient_share(evalset) -> float | None:
    """Share of the score's gradient (L2 norm per token, summed) at the tokens scores are read at."""
    at_read = total = 0.0
    for item in evalset.batches:
        if item.grad is None:
            return None
        norms = item.grad.float().norm(dim=-1) * item.batch.attention_mask
        total += float(norms.sum())
        seq, pos = item.batch.reward_index.unbind(1)
        at_read += float(norms[seq, pos].sum())
    return at_read / total if total > 0 else None


def _nullable(columns: dict[str, np.ndarray]) -> dict[str, list]:
    out = {}
    for name, values in columns.items():
        if name == "measured_n":
            out[name] = values.astype(np.int64).tolist()
        else:
            out[name] = [None if np.isnan(v) else float(v) for v in values]
    return out


"""Faithfulness (deletion) curves: how much zeroing the top n features of a ranking moves the
reward, beside frequency-matched random draws of the same n. A ranking is as good as its
curve; each layer's default ranking is the one whose curve moves the reward most.

Rankings (each largest first; only live features with a value):
- weight: the regression weight (predicts the score; zeroing its top should lower it),
- abs_weight: |weight|, the seeds' "largest weights",
- reward_effect: d(score)/d(activation) per unit, where the feature fires,
- attribution: mean contribution (activation x gradient) per text,
- measured_delta: the measured single-feature change, most negative first (zeroing lowers
  the reward most); only the measured candidates are ranked.

"Moves the reward" is |mean change - control mean change|, averaged over the curve's n.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.rankings import RANKINGS
from workers.ablation import EvalSet, run_ablation
from workers.controls import control_draws, control_summary, mean_with_ci
from workers.sae_ops import FeatureEdit


def ranked(columns: dict[str, np.ndarray], ranking: str) -> np.ndarray:
    """Live features with a nonzero value in `ranking`'s column, in its order (ties by feature
    id). A zero ranks nothing: at an encoder's last block no text token reaches the score, so
    every feature's attribution there is exactly 0."""
    column, sign = RANKINGS[ranking].column, RANKINGS[ranking].sign
    values = np.asarray(columns[column], dtype=np.float64)
    ok = np.isfinite(values) & (values != 0) & (np.asarray(columns["frequency"]) > 0)
    ids = np.flatnonzero(ok)
    key = np.abs(values[ok]) if sign == 0 else values[ok] * sign
    return ids[np.argsort(-key, kind="stable")]


def _set_seed(features: tuple[int, ...], seed: int) -> int:
    """The same chosen set always gets the same controls (rankings that agree share them)."""
    return (seed * 1_000_003 + hash(tuple(sorted(features)))) % (2**31)


def deletion_curves(adapter, sae, layer: int, evalset: EvalSet, columns: dict[str, np.ndarray], ns: list[int],
                    n_controls: int, weights: np.ndarray, pooling: str, directions, linear: bool, seed: int = 0,
                    progress: Callable[[float], None] | None = None) -> list[dict]:
    """One row per (ranking, n) that the layer's live features allow: the ranking must hold n
    features, and the layer n more live ones to draw disjoint controls from."""
    frequency = np.asarray(columns["frequency"])
    n_live = int((frequency > 0).sum())
    jobs = []
    for ranking in RANKINGS:
        order = ranked(columns, ranking)
        for n in ns:
            if n <= len(order) and 2 * n <= n_live:
                jobs.append((ranking, n, tuple(int(f) for f in order[:n])))
    measured: dict[tuple[int, ...], object] = {}

    def zero(features: tuple[int, ...]):
        key = tuple(sorted(features))
        if key not in measured:
            measured[key] = run_ablation(adapter, sae, layer, evalset, FeatureEdit(features, "zero"), weights,
                                         pooling, directions=directions, linear=linear)
        return measured[key]

    rows = []
    for done, (ranking, n, features) in enumerate(jobs):
        chosen = zero(features)
        draws = control_draws(frequency, features, n_controls, _set_seed(features, seed))
        controls = [zero(draw).delta for draw in draws]
        fired = chosen.fired
        rows.append({
            "layer": layer, "ranking": ranking, "n": n, "features": list(features),
            **{k: v for k, v in chosen.summary().items() if k != "n"},
            "n_reads": int(len(chosen.delta)), "n_fired": int(fired.sum()),
            "fired_mean_delta": mean_with_ci(chosen.delta[fired])["mean_delta"] if fired.any() else None,
            **_control_columns(control_summary(chosen.delta, controls, seed)),
        })
        if progress:
            progress((done + 1) / len(jobs))
    return rows


def _control_columns(summary: dict) -> dict:
    test = summary["test"]
    return {"control_mean_delta": summary["mean_delta"], "control_low": summary["low"],
            "control_high": summary["high"], "control_draw_means": summary["draw_means"],
            "difference": test["difference"], "difference_low": test["ci_low"], "difference_high": test["ci_high"],
            "p_value": test["p_value"]}


def excess(row: dict) -> float:
    """How far a curve point moves the reward beyond its control."""
    return abs(row["mean_delta"] - (row["control_mean_delta"] or 0.0))


def default_ranking(rows: list[dict]) -> str | None:
    """The ranking whose curve moves the reward most beyond its controls (mean over its n)."""
    by_ranking: dict[str, list[float]] = {}
    for row in rows:
        by_ranking.setdefault(row["ranking"], []).append(excess(row))
    if not by_ranking:
        return None
    return max(by_ranking, key=lambda r: (np.mean(by_ranking[r]), -list(RANKINGS).index(r)))


def point(rows: list[dict], ranking: str | None, n: int = 10) -> dict | None:
    """The curve point of `ranking` at n (or the largest n below it that was measured)."""
    options = [r for r in rows if r["ranking"] == ranking and r["n"] <= n]
    return max(options, key=lambda r: r["n"]) if options else None

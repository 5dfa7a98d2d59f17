"""Faithfulness (deletion) curves: how much zeroing the top n features of a ranking moves the
reward, beside frequency-matched random draws of the same n. A ranking is as good as its
curve; each layer's default ranking is the one whose curves move the reward most.

Rankings (backend/core/rankings.py; only live features with a nonzero value):
- weight: the regression weight (predicts the score),
- abs_weight: |weight|, the seeds' "largest weights",
- reward_effect: d(score)/d(activation) per unit, where the feature fires,
- attribution: mean contribution (activation x gradient) per text,
- measured_delta: the measured single-feature change (only the measured candidates).

Signs must not cancel. A signed ranking makes two claims, each its own curve: its top n
*raisers* (largest positive values; for measured_delta, the most negative changes), zeroed,
lower the score; its top n *lowerers* (most negative values), zeroed, raise it. A raiser
curve holds raisers only, so it stops where they run out instead of turning back as
lowerers join (the measured-Δ curve that rebounded from -0.21 at n = 50 to -0.07 at n = 100
had reached the candidates whose zeroing raises the score). A |value| ranking claims only
that its features matter either way, and is measured by the mean |Δ| per text.

Each point is judged on its own measure (workers/controls.py MEASURES, `judge`) beside the
same measure of its control draws. The default ranking is the one whose points exceed their
controls most, averaged over n and, for a signed ranking, over both directions. The point at
n = 10 of every ranking gets at least VERDICT_DRAWS control draws: a verdict the pages state
needs the draws' spread, not only their mean.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.core.rankings import RANKINGS, SUMMARY_N, directions_of, ranking_scores
from workers.ablation import EvalSet, run_ablation
from workers.controls import VERDICT_DRAWS, control_draws, control_summary, judge, mean_with_ci
from workers.sae_ops import FeatureEdit


def ranked(columns: dict[str, np.ndarray], ranking: str, direction: str | None = None) -> np.ndarray:
    """Live features with a nonzero value in `ranking`'s column, in its order (ties by feature
    id). `direction` 'raises' / 'lowers' keeps one sign of a signed ranking; 'both' (or None for
    a |value| ranking) orders by magnitude. A zero ranks nothing: at an encoder's last block no
    text token reaches the score, so every feature's attribution there is exactly 0."""
    column, sign = RANKINGS[ranking].column, RANKINGS[ranking].sign
    direction = direction or directions_of(ranking)[0]
    values = np.asarray(columns[column], dtype=np.float64)
    ok = np.isfinite(values) & (values != 0) & (np.asarray(columns["frequency"]) > 0)
    signed = values * (sign or 1)
    if direction == "raises":
        ok &= signed > 0
    elif direction == "lowers":
        ok &= signed < 0
    ids = np.flatnonzero(ok)
    key = {"raises": signed, "lowers": -signed, "both": np.abs(values)}[direction][ok]
    return ids[np.argsort(-key, kind="stable")]


def _set_seed(features: tuple[int, ...], seed: int) -> int:
    """The same chosen set always gets the same controls (rankings that agree share them)."""
    return (seed * 1_000_003 + hash(tuple(sorted(features)))) % (2**31)


def curve_jobs(columns: dict[str, np.ndarray], ns: list[int]) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """(ranking, direction, n, features) for every point the layer's live features allow: the
    direction must hold n features, and the layer n more live ones to draw controls from."""
    n_live = int((np.asarray(columns["frequency"]) > 0).sum())
    jobs = []
    for ranking in RANKINGS:
        for direction in directions_of(ranking):
            order = ranked(columns, ranking, direction)
            jobs += [(ranking, direction, n, tuple(int(f) for f in order[:n]))
                     for n in ns if n <= len(order) and 2 * n <= n_live]
    return jobs


def draws_for(n: int, ns_measured: list[int], n_controls: int) -> int:
    """Control draws for a point: the summary point (n = 10, or the largest n below it) gets at
    least VERDICT_DRAWS, every other point `n_controls`."""
    summary_n = max((m for m in ns_measured if m <= SUMMARY_N), default=None)
    return max(n_controls, VERDICT_DRAWS) if n == summary_n else n_controls


def deletion_curves(adapter, sae, layer: int, evalset: EvalSet, columns: dict[str, np.ndarray], ns: list[int],
                    n_controls: int, weights: np.ndarray, pooling: str, directions, linear: bool, seed: int = 0,
                    progress: Callable[[float], None] | None = None) -> list[dict]:
    """One row per (ranking, direction, n) of curve_jobs, each with its controls and verdict."""
    frequency = np.asarray(columns["frequency"])
    jobs = curve_jobs(columns, ns)
    measured: dict[tuple[int, ...], object] = {}

    def zero(features: tuple[int, ...]):
        key = tuple(sorted(features))
        if key not in measured:
            measured[key] = run_ablation(adapter, sae, layer, evalset, FeatureEdit(features, "zero"), weights,
                                         pooling, directions=directions, linear=linear)
        return measured[key]

    rows = []
    for done, (ranking, direction, n, features) in enumerate(jobs):
        chosen = zero(features)
        n_draws = draws_for(n, sorted({j[2] for j in jobs if j[:2] == (ranking, direction)}), n_controls)
        draws = control_draws(frequency, features, n_draws, _set_seed(features, seed))
        controls = [zero(draw).delta for draw in draws]
        rows.append(curve_row(layer, ranking, direction, n, features, chosen, controls, seed))
        if progress:
            progress((done + 1) / len(jobs))
    return rows


def curve_row(layer: int, ranking: str, direction: str, n: int, features: tuple[int, ...], chosen,
              controls: list[np.ndarray], seed: int) -> dict:
    fired = chosen.fired
    summary = control_summary(chosen.delta, controls, seed)
    test = summary["test"]
    verdict = judge(chosen.delta, controls, direction, seed)
    return {
        "layer": layer, "ranking": ranking, "direction": direction, "n": n, "features": list(features),
        **{k: v for k, v in chosen.summary().items() if k != "n"},
        "abs_mean_delta": float(np.mean(np.abs(chosen.delta))) if len(chosen.delta) else None,
        "n_reads": int(len(chosen.delta)), "n_fired": int(fired.sum()),
        "fired_mean_delta": mean_with_ci(chosen.delta[fired])["mean_delta"] if fired.any() else None,
        "control_mean_delta": summary["mean_delta"], "control_low": summary["low"], "control_high": summary["high"],
        "control_draw_means": summary["draw_means"],
        "difference": test["difference"], "difference_low": test["ci_low"], "difference_high": test["ci_high"],
        "p_value": test["p_value"],
        **{k: verdict[k] for k in ("measure", "effect", "control_effect", "control_effects", "excess",
                                   "rank_p_value", "effect_p_value", "verdict")},
    }


def excess(row: dict) -> float:
    """How far a point moves the reward beyond its controls, on its own measure (negative: the
    ranking's claim goes the wrong way, or less far than random features)."""
    return row["excess"] if row.get("excess") is not None else 0.0


def default_ranking(rows: list[dict]) -> str | None:
    """The ranking whose points exceed their controls most (ranking_scores); ties go to the
    earlier ranking in RANKINGS."""
    scores = ranking_scores(rows)
    if not scores:
        return None
    return max(scores, key=lambda r: (scores[r], -list(RANKINGS).index(r)))


def point(rows: list[dict], ranking: str | None, direction: str | None = None, n: int = SUMMARY_N) -> dict | None:
    """The curve point of `ranking` (in `direction`, by default its first) at n, or at the
    largest n below it that was measured."""
    if ranking is None:
        return None
    direction = direction or directions_of(ranking)[0]
    options = [r for r in rows if r["ranking"] == ranking and r["direction"] == direction and r["n"] <= n]
    return max(options, key=lambda r: r["n"]) if options else None


def summary_points(rows: list[dict], ranking: str | None) -> list[dict]:
    """The ranking's point at n = 10 in each of its directions that was measured."""
    if ranking is None:
        return []
    return [p for d in directions_of(ranking) if (p := point(rows, ranking, d)) is not None]

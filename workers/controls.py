"""Controls that decide: random features of matched frequency, ablated the same way, and a
test of chosen against control on the same texts.

Per text, the chosen edit's change minus the mean change of the control draws; its mean, a
95% t-interval and a two-sided sign-flip permutation p-value (the texts are paired, so
flipping the sign of each text's difference is the null of "no difference").

A verdict also needs the draws' spread, not only their mean: `judge` ranks the chosen effect
among the draws' own effects (a draw that reaches it makes the verdict undecided) and states
a verdict only with at least VERDICT_DRAWS draws.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

PERMUTATIONS = 9999
VERDICT_DRAWS = 10  # fewer draws than this: no verdict is stated
SIGNIFICANCE = 0.05

# How a ranking's claim is measured, per reward read's change Δ: features ranked as raising the
# score, zeroed, should lower it (-Δ); those ranked as lowering it should raise it (+Δ); a
# ranking by |value| claims only that the features matter, either way (|Δ|). Signs cannot cancel
# in any of them: a set that mixes directions is measured by |Δ| or split by direction.
MEASURES = {"raises": lambda delta: -delta, "lowers": lambda delta: delta, "both": np.abs}


def mean_with_ci(values: np.ndarray, level: float = 0.95) -> dict:
    """Mean and its t-interval (a single value has no interval)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(np.mean(values)) if n else None
    if n < 2:
        return {"mean_delta": mean, "ci_low": None, "ci_high": None}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return {"mean_delta": mean, "ci_low": mean - half, "ci_high": mean + half}


def control_features(frequencies: np.ndarray, chosen: tuple[int, ...], seed: int, pool: int = 20) -> tuple[int, ...]:
    """As many random features as `chosen`, each drawn among the `pool` features nearest to one
    chosen feature in frequency (never a chosen one, never twice): a control for 'any features
    that fire this often'."""
    rng = np.random.default_rng(seed)
    by_frequency = np.argsort(frequencies, kind="stable")
    rank = np.empty_like(by_frequency)
    rank[by_frequency] = np.arange(len(by_frequency))
    taken = set(chosen)
    out = []
    for feature in chosen:
        r = rank[feature]
        window = by_frequency[max(0, r - pool): r + pool + 1]
        options = [int(f) for f in window if int(f) not in taken]
        if not options:
            options = [int(f) for f in by_frequency if int(f) not in taken]
        if not options:
            raise ValueError(f"no control features left: the layer has {len(frequencies)} features and "
                             f"{len(chosen)} are chosen")
        pick = options[rng.integers(len(options))]
        taken.add(pick)
        out.append(pick)
    return tuple(out)


def control_draws(frequencies: np.ndarray, chosen: tuple[int, ...], n_draws: int, seed: int) -> list[tuple[int, ...]]:
    """`n_draws` independent frequency-matched control sets."""
    return [control_features(frequencies, chosen, seed * 1000 + i) for i in range(n_draws)]


def paired_test(chosen: np.ndarray, controls: list[np.ndarray], seed: int = 0) -> dict:
    """chosen [R] and each control [R]: changes of the same reward reads. The difference per
    read (chosen - mean of the controls) with its mean, 95% CI and permutation p-value."""
    chosen = np.asarray(chosen, dtype=np.float64)
    if not controls or len(chosen) == 0:
        return {"difference": None, "ci_low": None, "ci_high": None, "p_value": None, "n": int(len(chosen))}
    diff = chosen - np.mean(np.stack(controls), axis=0)
    ci = mean_with_ci(diff)
    p = None
    if len(diff) >= 2 and np.ptp(diff) > 0:
        result = stats.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=PERMUTATIONS,
                                        alternative="two-sided", random_state=seed)
        p = float(result.pvalue)
    elif len(diff) >= 2:
        p = 1.0 if diff[0] == 0 else 0.0
    return {"difference": ci["mean_delta"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "p_value": p,
            "n": int(len(diff))}


def control_summary(chosen: np.ndarray, controls: list[np.ndarray], seed: int = 0) -> dict:
    """What a result reports of its controls: each draw's mean change, their mean and range,
    and the paired test of chosen against them."""
    means = [float(np.mean(c)) for c in controls] if controls else []
    chosen = np.asarray(chosen, dtype=np.float64)
    # judged in the direction the chosen edit moved the score: lowered (its features raised it) or raised
    direction = "raises" if len(chosen) and np.mean(chosen) < 0 else "lowers"
    verdict = judge(chosen, controls, direction, seed)
    return {"n_draws": len(controls), "draw_means": means,
            "mean_delta": float(np.mean(means)) if means else None,
            "low": min(means) if means else None, "high": max(means) if means else None,
            "test": paired_test(chosen, controls, seed),
            "verdict": verdict["verdict"], "rank_p_value": verdict["rank_p_value"],
            "reached_by": sum(e >= verdict["effect"] for e in verdict["control_effects"])
            if verdict["effect"] is not None else 0}


def judge(chosen: np.ndarray, controls: list[np.ndarray], direction: str, seed: int = 0) -> dict:
    """The chosen edit's effect on `direction`'s measure (MEASURES) against each control draw's:
    the excess over their mean, the paired test per read, the chosen effect's rank among the
    draws (p = (1 + draws reaching it) / (1 + draws)), and the verdict:
    'beyond_controls' (no draw reaches it, the paired test p < 0.05, enough draws),
    'within_controls' (a draw reaches it, or the test does not separate them), or
    'too_few_controls'."""
    measure = MEASURES[direction]
    chosen_t = measure(np.asarray(chosen, dtype=np.float64))
    draws_t = [measure(np.asarray(c, dtype=np.float64)) for c in controls]
    effect = float(np.mean(chosen_t)) if len(chosen_t) else None
    draw_effects = [float(np.mean(d)) for d in draws_t]
    out = {"measure": "abs" if direction == "both" else "signed", "effect": effect,
           "control_effect": float(np.mean(draw_effects)) if draw_effects else None,
           "control_effects": draw_effects, "n_draws": len(draw_effects),
           "excess": None, "rank_p_value": None, "effect_p_value": None, "verdict": "too_few_controls"}
    if effect is None or not draw_effects:
        return out
    reaching = sum(d >= effect for d in draw_effects)
    test = paired_test(chosen_t, draws_t, seed)
    out.update(excess=effect - out["control_effect"], rank_p_value=(1 + reaching) / (1 + len(draw_effects)),
               effect_p_value=test["p_value"])
    if len(draw_effects) >= VERDICT_DRAWS:
        separated = reaching == 0 and test["p_value"] is not None and test["p_value"] < SIGNIFICANCE
        out["verdict"] = "beyond_controls" if separated else "within_controls"
    return out

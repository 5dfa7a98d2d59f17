"""P11: the causal stage per layer on the demo -- measured single-feature effects (100 candidates,
each zeroed alone on up to 64 held-out texts where it fires) and the deletion curves of the five
rankings with 3 frequency-matched controls -- timed, with what it found: each layer's default
ranking, the faithfulness of every ranking at n = 10 and the calibration of both predictions.

It re-runs the stage on the demo run's reward model, SAEs and stored feature columns (as the
pipeline does after the regression), so the figures are the pipeline's own.

    RA_DATA_DIR=data python benchmarks/p11_causal_stage.py [--layers 1 3 5]   # needs the demo run
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from backend.core import store
from backend.core.settings import Settings
from workers.causal import run_causal_stage
from backend.core.rankings import directions_of
from workers.faithfulness import point
from workers.run_cache import RunCache


def fmt(value) -> str:
    return "n/a (nothing to fit)" if value is None else f"{value:.3f}"


def layer_columns(path, layer: int) -> dict[str, np.ndarray]:
    rows = store._rows(path, "SELECT frequency, reward_effect, attribution, attribution_abs, weight FROM features "
                             "WHERE layer = ? ORDER BY feature", [layer])
    return {name: np.array([np.nan if r[name] is None else r[name] for r in rows], dtype=np.float64)
            for name in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--layers", type=int, nargs="*")
    args = parser.parse_args()
    run = RunCache(Settings()).get(args.run)
    heldout = [r["text"] for r in store.texts(run.store_path, "heldout")]
    layers = args.layers or [l["layer"] for l in store.layers(run.store_path)]
    for layer in layers:
        columns = layer_columns(run.store_path, layer)
        started = time.time()
        result = run_causal_stage(run.adapter, run.sae(layer), layer, heldout, columns, columns["weight"],
                                  run.config.regression.pooling, run.config.effects, run.config.seed,
                                  report=lambda m: None)
        total = time.time() - started
        c = result.layer_columns
        print(f"layer {layer}: {total:.1f} s (measured effects {result.timings['measured']:.1f} s, "
              f"deletion curves {result.timings['faithfulness']:.1f} s; target <= 60 s)")
        print(f"  default ranking {c['default_ranking']}; reach {fmt(c['reach'])} of the score's spread; "
              f"{fmt(c['read_token_gradient_share'])} of the gradient at the read token")
        for ranking in ("weight", "abs_weight", "reward_effect", "attribution", "measured_delta"):
            for direction in directions_of(ranking):  # each on its own measure: signs cannot cancel
                p = point(result.curves, ranking, direction)
                if p is not None:
                    print(f"  top {p['n']:>3} by {ranking:<15} {direction:<6} effect {p['effect']:.4f} (controls "
                          f"{p['control_effect']:+.4f}, max of {len(p['control_effects'])} draws "
                          f"{max(p['control_effects']):+.4f}; {p['verdict']}, p {p['effect_p_value']:.4f}); mean Δ "
                          f"{p['mean_delta']:+.4f}, predicted: regression {p['predicted_mean_delta']:+.4f}, "
                          f"attribution {p['attribution_mean_delta']:+.4f}")
        fits = "; ".join(f"{name} slope {fmt(c[f'calibration_{name}_slope'])} r {fmt(c[f'calibration_{name}_r'])}"
                         for name in ("regression", "attribution"))
        print(f"  calibration over {c['n_measured']} measured features: {fits}")


if __name__ == "__main__":
    main()

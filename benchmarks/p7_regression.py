"""P7: the reward regression on synthetic TopK-like pooled features, timed end to end.

Rows have `--k` nonzero features (reward-token / max pooling of a TopK SAE) or, with
`--pooling sum`, the union over `--tokens` tokens of k features each (denser rows). The score
is linear in a few hundred of the features plus noise. Prints seconds per stage-complete fit
(alpha by cross-validation, final weights, stability) and the held-out R², for ridge and,
with --lasso, for lasso; and the raw-activation probe on a dense [rows, --d-model] matrix.

    python benchmarks/p7_regression.py                     # full size: 20,000 x 3,072
    python benchmarks/p7_regression.py --rows 4000 --features 768   # smoke
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

import workers.regress as regress
from backend.core.run_config import RegressionConfig
from workers.regress import fit_probe, fit_regression

MERGE = RegressionConfig().merge_correlated  # the pipeline's default: near-duplicates fitted as one


def synthetic(rows: int, features: int, k: int, tokens: int, pooling: str, seed: int):
    rng = np.random.default_rng(seed)
    per_row = k if pooling != "sum" else k * tokens
    cols = rng.integers(0, features, size=(rows, per_row))
    # a Zipf-like firing rate: some features are common, most are rare, like a trained SAE
    popularity = 1.0 / np.arange(1, features + 1) ** 0.6
    cols = rng.choice(features, size=(rows, per_row), p=popularity / popularity.sum())
    vals = rng.exponential(1.0, size=(rows, per_row))
    X = sp.csr_matrix((vals.ravel(), (np.repeat(np.arange(rows), per_row), cols.ravel())),
                      shape=(rows, features), dtype=np.float32)  # duplicates add up, like sum pooling
    true_w = np.zeros(features)
    drivers = rng.choice(features, size=min(300, features), replace=False)
    true_w[drivers] = rng.normal(0, 1, size=len(drivers))
    y = np.asarray(X @ true_w).ravel()
    y = y + rng.normal(0, 0.5 * y.std(), size=rows)
    heldout = rng.random(rows) < 0.2
    return X, y, heldout


def timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    extra = f", out-of-fold R² {out.r2_cv:.3f}" if out.r2_cv is not None else ""
    print(f"{label:<44} {seconds:7.2f} s   held-out R² {out.r2_heldout:.3f} (train {out.r2_train:.3f}"
          f"{extra}), alpha {out.alpha:.3g}")
    return seconds


def breakdown(X, y, heldout, folds: int) -> None:
    """Where the ridge fit's time goes: the Gram matrix, the eigendecomposition, one fold refit."""
    Xt = sp.csr_matrix(X[~heldout], dtype=np.float64)
    start = time.perf_counter()
    gram = regress._gram(Xt)
    gram_s = time.perf_counter() - start
    start = time.perf_counter()
    np.linalg.eigh(gram)
    eigh_s = time.perf_counter() - start
    refit = regress._Refitter("ridge", Xt, y[~heldout], 1.0, None, regress._raw_moments(Xt) + (Xt.T @ y[~heldout],))
    rows = np.flatnonzero(regress._fold_ids(Xt.shape[0], folds, 0) == 0)
    start = time.perf_counter()
    refit.without(rows)
    fold_s = time.perf_counter() - start
    print(f"   stages: Gram {gram_s:.2f} s, eigh {eigh_s:.2f} s, one fold refit {fold_s:.2f} s (x{folds})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--features", type=int, default=3072)
    p.add_argument("--k", type=int, default=32, help="nonzero features per token (TopK k)")
    p.add_argument("--tokens", type=int, default=8, help="tokens summed per row with --pooling sum")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--d-model", type=int, default=384, help="raw residual width for the probe")
    p.add_argument("--lasso", action="store_true", help="also time the lasso option")
    p.add_argument("--bootstrap", type=int, default=0, help="also time bootstrap stability with N refits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true", help="also time the ridge fit's stages")
    args = p.parse_args()

    print(f"P7: {args.rows:,} rows x {args.features:,} features, {args.folds}-fold stability (target <= 10 s)")
    for pooling in ("reward_token", "sum"):
        X, y, heldout = synthetic(args.rows, args.features, args.k, args.tokens, pooling, args.seed)
        print(f"-- {pooling} pooling: {X.nnz / X.shape[0]:.0f} nonzeros per row")
        timed("ridge, GCV alpha + fold stability", lambda: fit_regression(
            X, y, heldout, method="ridge", cv_folds=args.folds, merge_correlated=MERGE, seed=args.seed))
        if args.breakdown:
            breakdown(X, y, heldout, args.folds)
        if args.bootstrap:
            timed(f"ridge, GCV alpha + {args.bootstrap} bootstrap refits", lambda: fit_regression(
                X, y, heldout, method="ridge", stability="bootstrap", bootstrap_samples=args.bootstrap,
                merge_correlated=MERGE))
        if args.lasso:
            timed("lasso, k-fold alpha + fold stability", lambda: fit_regression(
                X, y, heldout, method="lasso", cv_folds=args.folds, merge_correlated=MERGE, seed=args.seed))
    rng = np.random.default_rng(args.seed)
    raw = rng.normal(size=(args.rows, args.d_model))
    y = raw @ rng.normal(size=args.d_model) + rng.normal(size=args.rows)
    timed(f"raw probe, {args.d_model} dims (ridge, GCV)", lambda: fit_probe(
        raw, y, rng.random(args.rows) < 0.2, cv_folds=args.folds))


if __name__ == "__main__":
    main()

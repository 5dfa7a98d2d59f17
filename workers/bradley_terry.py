"""A scalar head fitted with the Bradley–Terry loss on cached features, body frozen.

TRL's `RewardTrainer` minimises −log σ(r(chosen) − r(rejected)). With r(x) = w·f(x) and f frozen,
that is a logistic regression without intercept on d = f(chosen) − f(rejected) with every label
1. sklearn needs two classes, so each difference enters twice, (d, 1) and (−d, 0): the second
term's loss −log(1 − σ(−w·d)) equals the first's, so the fit minimises exactly the BT loss (plus
sklearn's L2 penalty). No torch here: features arrive as numpy arrays.

Pairwise accuracy counts a pair right when its margin r(chosen) − r(rejected) is > 0; a tie is
wrong (the model expressed no preference).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_C = 1.0  # sklearn's inverse L2 strength, on standardised features


@dataclass(frozen=True)
class BradleyTerryFit:
    weights: np.ndarray  # [d_features]: r(x) = weights · f(x), on the raw (unstandardised) features
    train_accuracy: float
    heldout_accuracy: float | None  # None when no pair was held out
    train_index: np.ndarray
    heldout_index: np.ndarray

    def score(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.weights


def pairwise_accuracy(chosen_scores, rejected_scores) -> float:
    """Share of pairs whose margin chosen − rejected is strictly positive."""
    margins = np.asarray(chosen_scores, dtype=np.float64) - np.asarray(rejected_scores, dtype=np.float64)
    if margins.size == 0:
        raise ValueError("pairwise accuracy needs at least one pair")
    return float(np.mean(margins > 0))


def heldout_split(n_pairs: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation split into (train, held-out) pair indices, each sorted."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError("heldout_fraction must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(n_pairs)
    n_heldout = int(round(n_pairs * heldout_fraction))
    if n_pairs - n_heldout < 1:
        raise ValueError(f"{n_pairs} pairs leave none to train on at heldout_fraction={heldout_fraction}")
    return np.sort(order[n_heldout:]), np.sort(order[:n_heldout])


def fit_weights(differences: np.ndarray, C: float = DEFAULT_C) -> np.ndarray:
    """w minimising Σ −log σ(w·d) + ‖w‖² / (2C) over standardised d; returned on the raw scale."""
    from sklearn.linear_model import LogisticRegression

    differences = np.asarray(differences, dtype=np.float64)
    if differences.ndim != 2 or differences.shape[0] == 0:
        raise ValueError("differences must be a non-empty [n_pairs, d_features] array")
    # scale only (no centring): with no intercept, w·(d / s) = (w / s)·d keeps the model linear in d
    scale = np.sqrt(np.mean(differences**2, axis=0))
    scale[scale == 0] = 1.0
    scaled = differences / scale
    inputs = np.concatenate([scaled, -scaled])
    labels = np.concatenate([np.ones(len(scaled)), np.zeros(len(scaled))])
    model = LogisticRegression(fit_intercept=False, C=C, max_iter=2_000)
    model.fit(inputs, labels)
    return model.coef_[0] / scale


def fit_bradley_terry(chosen_features, rejected_features, *, heldout_fraction: float = 0.2, seed: int = 0,
                      C: float = DEFAULT_C, train_index: np.ndarray | None = None,
                      heldout_index: np.ndarray | None = None) -> BradleyTerryFit:
    """Fit on the training pairs, report pairwise accuracy on both splits.

    Pass `train_index` / `heldout_index` to reuse a split chosen elsewhere (the RM's and the
    surrogate's accuracies must be read on the same held-out pairs)."""
    chosen = np.asarray(chosen_features, dtype=np.float64)
    rejected = np.asarray(rejected_features, dtype=np.float64)
    if chosen.shape != rejected.shape or chosen.ndim != 2:
        raise ValueError(f"chosen {chosen.shape} and rejected {rejected.shape} must be equal [n_pairs, d] arrays")
    if (train_index is None) != (heldout_index is None):
        raise ValueError("pass both train_index and heldout_index, or neither")
    if train_index is None:
        train_index, heldout_index = heldout_split(len(chosen), heldout_fraction, seed)
    weights = fit_weights(chosen[train_index] - rejected[train_index], C=C)
    margins = (chosen - rejected) @ weights
    heldout = float(np.mean(margins[heldout_index] > 0)) if len(heldout_index) else None
    return BradleyTerryFit(
        weights=weights, train_accuracy=float(np.mean(margins[train_index] > 0)), heldout_accuracy=heldout,
        train_index=np.asarray(train_index), heldout_index=np.asarray(heldout_index),
    )

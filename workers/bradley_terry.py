"""A scalar head fitted with the Bradley–Terry loss on cached features, body frozen.

TRL's `RewardTrainer` minimises −log σ(r(chosen) − r(rejected)). With r(x) = w·f(x) and f frozen,
that is a logistic regression without intercept on d = f(chosen) − f(rejected) with every label
1. sklearn needs two classes, so a seeded half of the pairs enter as (−d, 0): that row's loss
−log(1 − σ(−w·d)) equals −log σ(w·d), so the fit minimises exactly the BT loss (plus sklearn's L2
penalty), and each pair stays one row (cross-validation folds never split a pair). Features arrive
as numpy arrays or scipy sparse matrices (SAE features); no torch here.

Pairwise accuracy counts a pair right when its margin r(chosen) − r(rejected) is > 0; a tie is
wrong (the model expressed no preference).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

DEFAULT_C = 1.0  # sklearn's inverse L2 strength, on standardised features
C_GRID = (0.01, 0.1, 1.0, 10.0)  # searched by cross-validation when no C is given
CV_FOLDS = 3


@dataclass(frozen=True)
class BradleyTerryFit:
    weights: np.ndarray  # [d_features]: r(x) = weights · f(x), on the raw (unstandardised) features
    train_accuracy: float
    heldout_accuracy: float | None  # None when no pair was held out
    train_index: np.ndarray
    heldout_index: np.ndarray

    def score(self, features) -> np.ndarray:
        return np.asarray(_as_matrix(features) @ self.weights).ravel()


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


def _as_matrix(values):
    return sp.csr_matrix(values, dtype=np.float64) if sp.issparse(values) else np.asarray(values, dtype=np.float64)


def _scaled(differences):
    """Each column divided by its root mean square (no centring: with no intercept, w·(d / s) =
    (w / s)·d keeps the model linear in d), and the scale."""
    if sp.issparse(differences):
        scale = np.sqrt(np.asarray(differences.multiply(differences).mean(axis=0)).ravel())
        scale[scale == 0] = 1.0
        return sp.csr_matrix(differences @ sp.diags(1.0 / scale)), scale
    scale = np.sqrt(np.mean(differences**2, axis=0))
    scale[scale == 0] = 1.0
    return differences / scale, scale


def _signed_rows(scaled, seed: int):
    """Half the rows (seeded) negated with label 0, the rest as they are with label 1."""
    flip = np.random.default_rng([seed, 7]).random(scaled.shape[0]) < 0.5
    if scaled.shape[0] >= 2:  # both classes present
        flip[0], flip[1] = False, True
    signs = np.where(flip, -1.0, 1.0)
    rows = sp.diags(signs) @ scaled if sp.issparse(scaled) else scaled * signs[:, None]
    return rows, (~flip).astype(np.int64)


def fit_weights(differences, C: float | None = DEFAULT_C, seed: int = 0) -> np.ndarray:
    """w minimising Σ −log σ(w·d) + ‖w‖² / (2C) over standardised d; returned on the raw scale.
    C=None: chosen from C_GRID by cross-validated BT loss on the pairs given."""
    differences = _as_matrix(differences)
    if differences.ndim != 2 or differences.shape[0] < 2:
        raise ValueError("differences must be a [n_pairs, d_features] array of at least two pairs")
    scaled, scale = _scaled(differences)
    inputs, labels = _signed_rows(scaled, seed)
    if C is None:
        C = _cross_validated_c(inputs, labels, seed)
    return _logistic(inputs, labels, C).coef_[0] / scale


def _logistic(inputs, labels, C: float):
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn's models (1.5 s) load only for a fit, not with the worker

    return LogisticRegression(fit_intercept=False, C=C, max_iter=2_000).fit(inputs, labels)


def _cross_validated_c(inputs, labels, seed: int) -> float:
    """The C of C_GRID with the lowest out-of-fold BT loss (DEFAULT_C when too few pairs to fold)."""
    from sklearn.metrics import log_loss  # lazy: scikit-learn (1 s), only for a fit
    from sklearn.model_selection import StratifiedKFold  # lazy: scikit-learn, only for a fit

    if min(np.bincount(labels, minlength=2)) < CV_FOLDS:
        return DEFAULT_C
    folds = list(StratifiedKFold(CV_FOLDS, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))
    losses = [np.mean([log_loss(labels[test], _logistic(inputs[train], labels[train], C).predict_proba(inputs[test]),
                                labels=[0, 1]) for train, test in folds]) for C in C_GRID]
    return C_GRID[int(np.argmin(losses))]


def fit_bradley_terry(chosen_features, rejected_features, *, heldout_fraction: float = 0.2, seed: int = 0,
                      C: float | None = DEFAULT_C, train_index: np.ndarray | None = None,
                      heldout_index: np.ndarray | None = None) -> BradleyTerryFit:
    """Fit on the training pairs, report pairwise accuracy on both splits.

    Pass `train_index` / `heldout_index` to reuse a split chosen elsewhere (the RM's and the
    surrogate's accuracies must be read on the same held-out pairs)."""
    chosen, rejected = _as_matrix(chosen_features), _as_matrix(rejected_features)
    if chosen.shape != rejected.shape or chosen.ndim != 2:
        raise ValueError(f"chosen {chosen.shape} and rejected {rejected.shape} must be equal [n_pairs, d] arrays")
    if (train_index is None) != (heldout_index is None):
        raise ValueError("pass both train_index and heldout_index, or neither")
    if train_index is None:
        train_index, heldout_index = heldout_split(chosen.shape[0], heldout_fraction, seed)
    weights = fit_weights(chosen[train_index] - rejected[train_index], C=C, seed=seed)
    margins = np.asarray((chosen - rejected) @ weights).ravel()
    heldout = float(np.mean(margins[heldout_index] > 0)) if len(heldout_index) else None
    return BradleyTerryFit(
        weights=weights, train_accuracy=float(np.mean(margins[train_index] > 0)), heldout_accuracy=heldout,
        train_index=np.asarray(train_index), heldout_index=np.asarray(heldout_index),
    )

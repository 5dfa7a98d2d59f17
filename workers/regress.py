"""Per layer: the RM's score ~ pooled SAE features, by ridge regression.

alpha is chosen on a validation slice of the training texts; the fit then uses all of
them and is scored on held-out texts. sklearn's RidgeCV (leave-one-out GCV) would do the
same but forms the hat matrix per alpha: ~35 s per layer at 20k x 3,072 on this CPU.
One eigendecomposition of the (small, d_sae x d_sae) Gram matrix serves every alpha."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp

VALIDATION_FRACTION = 0.2


@dataclass
class RegressionResult:
    weights: np.ndarray  # one per feature: change in score per unit of activation
    intercept: float
    alpha: float
    r2_train: float
    r2_heldout: float
    n_train: int
    n_heldout: int


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else 0.0


def _centered_gram(X: sp.csr_matrix, y: np.ndarray):
    n = X.shape[0]
    mu = np.asarray(X.mean(axis=0)).ravel()
    gram = (X.T @ X).toarray().astype(np.float64) - n * np.outer(mu, mu)
    xty = np.asarray(X.T @ y).ravel() - n * mu * y.mean()
    return gram, xty, mu


def _predict(X: sp.csr_matrix, weights, mu, y_mean):
    return np.asarray(X @ weights).ravel() - mu @ weights + y_mean


def choose_alpha(X: sp.csr_matrix, y: np.ndarray, alphas: list[float], seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    val = rng.random(X.shape[0]) < VALIDATION_FRACTION
    gram, xty, mu = _centered_gram(X[~val], y[~val])
    eigvals, eigvecs = np.linalg.eigh(gram)
    projected = eigvecs.T @ xty
    scores = [r2(y[val], _predict(X[val], eigvecs @ (projected / (eigvals + a)), mu, y[~val].mean())) for a in alphas]
    return float(alphas[int(np.argmax(scores))])


def fit_reward_regression(
    features: sp.csr_matrix, scores: np.ndarray, heldout: np.ndarray, alphas: list[float], seed: int = 0
) -> RegressionResult:
    features = sp.csr_matrix(features, dtype=np.float64)
    train = ~heldout
    X, y = features[train], scores[train]
    alpha = choose_alpha(X, y, alphas, seed) if len(alphas) > 1 else float(alphas[0])
    gram, xty, mu = _centered_gram(X, y)
    gram[np.diag_indices_from(gram)] += alpha
    weights = scipy.linalg.solve(gram, xty, assume_a="pos")
    intercept = float(y.mean() - mu @ weights)
    return RegressionResult(
        weights=weights,
        intercept=intercept,
        alpha=alpha,
        r2_train=r2(y, _predict(X, weights, mu, y.mean())),
        r2_heldout=r2(scores[heldout], _predict(features[heldout], weights, mu, y.mean())),
        n_train=int(train.sum()),
        n_heldout=int(heldout.sum()),
    )

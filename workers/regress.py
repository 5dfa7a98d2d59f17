"""Per layer: the RM's score ~ pooled SAE features (ridge or lasso), and a raw-activation probe.

Ridge: one eigendecomposition of the centred d x d Gram matrix of the training rows gives
the weights for every alpha at once, and generalised cross-validation (GCV, the
rotation-invariant form of leave-one-out) scores every alpha from the eigenvalues alone, so
the grid can be dense for free. sklearn's RidgeCV does exact leave-one-out but, for sparse
input, through the n x n kernel: ~35 s per layer at 20k x 3,072 where this takes seconds.
Lasso: scikit-learn's LassoCV on the sparse matrix, k-fold.

Near-duplicate features (an SAE often learns several features that fire on the same tokens)
make single weights meaningless: the fit splits their share arbitrarily, often as large
weights of opposite sign that cancel. With `merge_correlated`, features whose pooled
activations correlate above the threshold on the training rows and, given their decoder
directions, whose directions have cosine above `merge_min_cosine` (they fire together and
write alike; features that merely fire together, like the always-on ones at a reading token,
can carry different parts of the score) are fitted as one column, their sum, and every member
gets that column's weight. Groups are linked in chains: connected components of the graph of
such pairs. The correlations come from the Gram matrix the ridge fit needs anyway.

Stability: each weight's standard error, from refits on the k cross-validation folds
(delete-a-group jackknife) or on bootstrap resamples of the training rows. The Gram matrix
of a refit's rows is the full one minus (or reweighted by) a few sparse rows, so a ridge
refit costs one Cholesky solve.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

# Default ridge grid, relative to the mean eigenvalue of the centred Gram matrix so it fits
# any feature scale (sum pooling over long texts, raw residual streams). GCV prices every
# point at almost nothing.
RELATIVE_RIDGE_GRID = np.logspace(-6, 2, 33)
DENSE_GRAM_DENSITY = 0.1  # share of nonzeros above which a dense BLAS Gram beats the sparse one
LASSO_PATH_LENGTH = 30  # alphas on sklearn's automatic lasso path when none are configured


@dataclass
class RegressionResult:
    method: str  # "ridge" or "lasso"
    weights: np.ndarray  # one per feature: change in score per unit of activation
    std_weights: np.ndarray  # weight x the feature's std on training rows: score per 1 SD
    weight_spread: np.ndarray | None  # standard error of each weight (None: not estimated)
    weight_groups: np.ndarray  # per feature: the smallest feature fitted in one column with it (itself if alone)
    intercept: float
    alpha: float  # the penalty cross-validation chose
    r2_train: float
    r2_heldout: float
    r2_cv: float | None  # out-of-fold R² on training rows at the chosen alpha (fold stability)
    n_train: int
    n_heldout: int
    cv_folds: int


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else 0.0


def _as_matrix(X) -> sp.csr_matrix | np.ndarray:
    return sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)


def _gram(X) -> np.ndarray:
    """X^T X, dense float64. Sparse rows go through scipy's sparse product; rows denser than
    DENSE_GRAM_DENSITY (sum pooling over long texts) are densified in chunks for BLAS syrk,
    which is then faster despite the zeros."""
    n, d = X.shape
    if not sp.issparse(X):
        return np.asarray(X.T @ X)
    if X.nnz <= DENSE_GRAM_DENSITY * n * d:
        return X.T.dot(X).toarray()
    gram = np.zeros((d, d), order="F")
    for start in range(0, n, 2048):
        block = X[start:start + 2048].toarray().T  # d x rows, Fortran-ordered: BLAS takes it as is
        gram = scipy.linalg.blas.dsyrk(1.0, block, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
    gram += gram.T  # syrk filled the upper triangle only; the lower one is still zero
    gram[np.diag_indices_from(gram)] /= 2
    return gram


def _raw_moments(X):
    """X^T X and the column sums: what every (re)fit is built from."""
    return _gram(X), np.asarray(X.sum(axis=0), dtype=np.float64).ravel()


def _centre_in_place(gram, col_sum, xty, y_sum, n):
    """Centre raw moments on the rows' means (fits an unpenalised intercept); `gram` is
    overwritten, by a BLAS rank-1 update instead of a d x d temporary."""
    mu = col_sum / n
    gram = scipy.linalg.blas.dger(-float(n), mu, mu, a=gram.T, overwrite_a=1).T  # symmetric: .T is free
    return gram, xty - mu * y_sum, mu


def _solve_ridge(gram, xty, alpha):
    """(gram + alpha I) w = xty by Cholesky; `gram` is modified. numpy's LAPACK factorises
    (like its eigh) several times faster than scipy's on the CPUs measured; the two triangular
    solves are O(d^2) either way."""
    gram[np.diag_indices_from(gram)] += alpha
    try:
        lower = np.linalg.cholesky(gram)
        half = scipy.linalg.solve_triangular(lower, xty, lower=True, check_finite=False)
        return scipy.linalg.solve_triangular(lower, half, lower=True, trans="T", check_finite=False)
    except np.linalg.LinAlgError:  # alpha far below the Gram's scale: least squares instead
        return scipy.linalg.lstsq(gram, xty, check_finite=False)[0]


def _predict(X, weights, mu, y_mean):
    return np.asarray(X @ weights).ravel() - float(mu @ weights) + y_mean


def correlated_groups(gram: np.ndarray, col_sum: np.ndarray, n: int, threshold: float,
                      directions: np.ndarray | None = None, min_cosine: float = 0.0,
                      block: int = 1024) -> np.ndarray:
    """Group label per column: columns linked by a chain of pairs correlated above `threshold`
    (and, with `directions` [d, d_in], whose directions have cosine above `min_cosine`) share one
    (connected components). Built a block of rows at a time from the raw moments, so no second
    d x d matrix is held; cosines are taken only for the correlated pairs."""
    d = len(col_sum)
    mu = col_sum / n
    sd = np.sqrt(np.clip(np.diag(gram) / n - mu**2, 0.0, None))
    scale = np.where(sd > 0, sd, np.inf)  # a constant column correlates with nothing
    rows, cols = [], []
    for start in range(0, d, block):
        stop = min(start + block, d)
        corr = (gram[start:stop] / n - np.outer(mu[start:stop], mu)) / np.outer(scale[start:stop], scale)
        r, c = np.nonzero(corr > threshold)
        rows.append(r + start)
        cols.append(c)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    if directions is not None:
        unit = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
        alike = np.einsum("ij,ij->i", unit[rows], unit[cols]) > min_cosine
        rows, cols = rows[alike], cols[alike]
    graph = sp.csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(d, d))
    return connected_components(graph, directed=False)[1]


def _merge_moments(moments, members: sp.csr_matrix):
    """The raw moments of X @ members (each column the sum of a group's columns)."""
    gram, col_sum, xty = moments
    left = members.T.tocsr()
    merged = left @ np.asarray(left @ gram).T  # symmetric: M^T G M without a dense M
    return np.ascontiguousarray(merged), left @ col_sum, left @ xty


def _leave_one_out(X, y, mu, eigvecs, shrink, fitted) -> np.ndarray:
    """Exact leave-one-out mean squared error per alpha: residual / (1 - H_ii), with H_ii = 1/n +
    sum_j z_ij^2 / (lambda_j + alpha) for z = the centred rows in the eigenbasis. GCV puts the mean
    of H_ii in place of each: with about as many columns as rows a near-zero alpha interpolates,
    n - tr H and the residuals vanish together, and their ratio looked best (held-out R^2 -0.67 on
    1,195 texts x 1,700 live features, where leave-one-out's alpha gives 0.70)."""
    z = np.asarray(X @ eigvecs) - mu @ eigvecs
    leverage = 1.0 / len(y) + (z**2) @ shrink  # n x A
    return (((y[:, None] - fitted) / np.maximum(1.0 - leverage, 1e-12)) ** 2).mean(axis=0)


def ridge_gcv(X, y, alphas: np.ndarray | None, moments=None):
    """Ridge weights at the GCV-best alpha, from one eigendecomposition.

    GCV(alpha) = n * RSS / (n - tr H)^2 with tr H = 1 + sum(lambda / (lambda + alpha)),
    the leading 1 being the intercept; with at least as many columns as rows less one, exact
    leave-one-out instead (_leave_one_out). `moments` (X^T X, column sums, X^T y), when the caller
    has them. Returns (weights, intercept, alpha, moments).
    """
    n = X.shape[0]
    if moments is None:
        moments = (*_raw_moments(X), np.asarray(X.T @ y, dtype=np.float64).ravel())
    gram, col_sum, xty = moments
    cgram, cxty, mu = _centre_in_place(gram.copy(), col_sum, xty, y.sum(), n)
    eigvals, eigvecs = np.linalg.eigh(cgram)
    del cgram
    eigvals = np.clip(eigvals, 0.0, None)
    configured = alphas is not None
    if not configured:  # spans near-OLS to near-constant: an edge there is an answer, not a limit
        alphas = RELATIVE_RIDGE_GRID * max(eigvals.mean(), np.finfo(float).tiny)
    alphas = np.asarray(alphas, dtype=np.float64)
    shrink = 1.0 / (eigvals[:, None] + alphas[None, :])  # d x A
    all_weights = eigvecs @ ((eigvecs.T @ cxty)[:, None] * shrink)  # d x A: one column per alpha
    fitted = np.asarray(X @ all_weights) - mu @ all_weights + y.mean()
    rss = ((y[:, None] - fitted) ** 2).sum(axis=0)
    dof = 1.0 + (eigvals[:, None] * shrink).sum(axis=0)
    if len(eigvals) + 1 >= n:  # as many columns as rows: GCV's n - tr H vanishes with the residuals
        score = _leave_one_out(X, y, mu, eigvecs, shrink, fitted)
    else:
        score = n * rss / np.maximum(n - dof, 1e-12) ** 2
    best = int(np.argmin(score))
    if configured and len(alphas) > 1 and alphas[best] in (alphas.min(), alphas.max()):
        warnings.warn(f"regression.alphas: GCV chose {alphas[best]:g}, the edge of the grid "
                      f"[{alphas.min():g}, {alphas.max():g}]; widen it", stacklevel=3)
    weights = all_weights[:, best]
    return weights, float(y.mean() - mu @ weights), float(alphas[best]), (gram, col_sum, xty)


def _lasso(X, y, alphas, folds: int, seed: int):
    from sklearn.linear_model import LassoCV  # lazy: scikit-learn's models (1.5 s) load only for a lasso, not with the worker
    from sklearn.model_selection import KFold  # lazy: scikit-learn, only for a lasso

    model = LassoCV(alphas=LASSO_PATH_LENGTH if alphas is None else np.asarray(alphas), cv=KFold(
        folds, shuffle=True, random_state=seed), max_iter=5000, tol=1e-4, random_state=seed)
    model.fit(X, y)
    return model.coef_.astype(np.float64), float(model.intercept_), float(model.alpha_)


def _lasso_refit(X, y, alpha, init):
    from sklearn.linear_model import Lasso  # lazy: scikit-learn, only for a lasso

    model = Lasso(alpha=alpha, max_iter=5000, tol=1e-4, warm_start=True)
    model.coef_ = init.copy()  # starts from the full fit: a few sweeps instead of a path
    model.fit(X, y)
    return model.coef_.astype(np.float64), float(model.intercept_)


def _fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) % folds


class _Refitter:
    """Refits at a fixed alpha on a subset (or reweighting) of the training rows."""

    def __init__(self, method, X, y, alpha, weights, moments):
        self.method, self.X, self.y, self.alpha, self.weights = method, X, y, alpha, weights
        self.moments = moments

    def without(self, rows: np.ndarray):
        """Refit on every training row except `rows` -> (weights, predict function)."""
        keep = np.ones(self.X.shape[0], dtype=bool)
        keep[rows] = False
        if self.method == "lasso":
            w, b = _lasso_refit(self.X[keep], self.y[keep], self.alpha, self.weights)
            return w, lambda Z: np.asarray(Z @ w).ravel() + b
        gram, col_sum, xty = self.moments
        out_gram, out_sum = _raw_moments(self.X[rows])
        out_xty = np.asarray(self.X[rows].T @ self.y[rows], dtype=np.float64).ravel()
        np.subtract(gram, out_gram, out=out_gram)
        return self._ridge(out_gram, col_sum - out_sum, xty - out_xty,
                           self.y.sum() - self.y[rows].sum(), int(keep.sum()), self.y[keep].mean())

    def weighted(self, counts: np.ndarray) -> np.ndarray:
        """Refit with row i counted counts[i] times (a bootstrap resample)."""
        if self.method == "lasso":
            rows = np.repeat(np.arange(len(counts)), counts)
            return _lasso_refit(self.X[rows], self.y[rows], self.alpha, self.weights)[0]
        root = np.sqrt(counts.astype(np.float64))
        scaled = sp.diags(root) @ self.X if sp.issparse(self.X) else root[:, None] * self.X
        gram = _gram(scaled)  # sum_i counts_i x_i x_i^T
        col_sum = np.asarray(scaled.T @ root).ravel()
        xty = np.asarray(scaled.T @ (root * self.y)).ravel()
        n = int(counts.sum())
        return self._ridge(gram, col_sum, xty, float(counts @ self.y), n, float(counts @ self.y) / n)[0]

    def _ridge(self, gram, col_sum, xty, y_sum, n, y_mean):
        cgram, cxty, mu = _centre_in_place(gram, col_sum, xty, y_sum, n)
        w = _solve_ridge(cgram, cxty, self.alpha)
        return w, lambda Z: _predict(Z, w, mu, y_mean)


def _fold_stability(refit: _Refitter, n: int, folds: int, seed: int):
    """Jackknife standard errors over k-fold refits, and the out-of-fold R²."""
    ids = _fold_ids(n, folds, seed)
    fold_weights, oof = [], np.empty(n)
    for f in range(folds):
        rows = np.flatnonzero(ids == f)
        w, predict = refit.without(rows)
        fold_weights.append(w)
        oof[rows] = predict(refit.X[rows])
    W = np.stack(fold_weights)
    spread = np.sqrt((folds - 1) / folds * ((W - W.mean(axis=0)) ** 2).sum(axis=0))
    return spread, r2(refit.y, oof)


def _bootstrap_stability(refit: _Refitter, n: int, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = np.stack([refit.weighted(rng.multinomial(n, np.full(n, 1.0 / n))) for _ in range(samples)])
    return W.std(axis=0, ddof=1)


def _feature_std(X) -> np.ndarray:
    mean = np.asarray(X.mean(axis=0)).ravel()
    mean_sq = np.asarray(X.multiply(X).mean(axis=0) if sp.issparse(X) else (X**2).mean(axis=0)).ravel()
    std = np.sqrt(np.clip(mean_sq - mean**2, 0.0, None))
    std[std <= 1e-7 * np.sqrt(mean_sq)] = 0.0  # rounding left over from a constant column
    return std


def fit_regression(
    features, scores: np.ndarray, heldout: np.ndarray, *, method: str = "ridge",
    alphas: list[float] | None = None, cv_folds: int = 5, stability: str = "folds",
    bootstrap_samples: int = 20, merge_correlated: float | None = None,
    merge_directions: np.ndarray | None = None, merge_min_cosine: float = 0.0, seed: int = 0,
) -> RegressionResult:
    """Fit score ~ features on the rows not held out; score the held-out rows.

    features: [n_rows, d], scipy sparse (SAE features) or dense (raw activations).
    alphas: the penalty grid (None: a default grid for the method). stability: "folds",
    "bootstrap" or "none". merge_correlated: fit features correlated above this as one
    column (None: every feature alone); merge_directions [d, d_in] (the SAE's decoder rows) and
    merge_min_cosine: only features whose directions are also this alike.
    """
    if method not in ("ridge", "lasso"):
        raise ValueError(f"regression.method must be 'ridge' or 'lasso', not {method!r}")
    if stability not in ("folds", "bootstrap", "none"):
        raise ValueError(f"regression.stability must be 'folds', 'bootstrap' or 'none', not {stability!r}")
    features = _as_matrix(features)
    scores = np.asarray(scores, dtype=np.float64)
    heldout = np.asarray(heldout, dtype=bool)
    train = ~heldout
    X, y = features[train], scores[train]
    if X.shape[0] < max(cv_folds, 2):
        raise ValueError(f"regression: {X.shape[0]} training rows, fewer than regression.cv_folds ({cv_folds})")
    std = _feature_std(X)
    # Features constant on the training rows (dead, or never pooled) cannot move the score: they
    # keep weight 0 and spread 0, and leave the d x d algebra, whose cost is cubic in d.
    live = std > 0
    live_ids = np.flatnonzero(live)
    X_fit = X if live.all() else X[:, live]
    moments = None
    if method == "ridge" or merge_correlated is not None:
        moments = (*_raw_moments(X_fit), np.asarray(X_fit.T @ y, dtype=np.float64).ravel())
    members = None  # live feature -> fitted column, when groups were merged
    groups = np.arange(X.shape[1])
    if merge_correlated is not None:
        directions = None if merge_directions is None else np.asarray(merge_directions, dtype=np.float64)[live]
        labels = correlated_groups(moments[0], moments[1], X_fit.shape[0], merge_correlated, directions,
                                   merge_min_cosine)
        if labels.max() + 1 < len(labels):
            members = sp.csr_matrix((np.ones(len(labels)), (np.arange(len(labels)), labels)))
            X_fit = sp.csr_matrix(X_fit @ members) if sp.issparse(X_fit) else X_fit @ members
            moments = _merge_moments(moments, members)
            smallest = np.full(labels.max() + 1, X.shape[1])
            np.minimum.at(smallest, labels, live_ids)
            groups[live_ids] = smallest[labels]
    if method == "ridge":
        fit_weights, intercept, alpha, moments = ridge_gcv(X_fit, y, alphas, moments)
    else:
        fit_weights, intercept, alpha = _lasso(X_fit, y, alphas, cv_folds, seed)
        moments = None
    refit = _Refitter(method, X_fit, y, alpha, fit_weights, moments)
    fit_spread, r2_cv = None, None
    if stability == "folds":
        fit_spread, r2_cv = _fold_stability(refit, X.shape[0], cv_folds, seed)
    elif stability == "bootstrap":
        fit_spread = _bootstrap_stability(refit, X.shape[0], bootstrap_samples, seed)

    def per_feature(fitted: np.ndarray) -> np.ndarray:  # fitted columns -> every feature
        out = np.zeros(X.shape[1])
        out[live] = fitted if members is None else members @ fitted
        return out

    weights = per_feature(fit_weights)
    spread = None if fit_spread is None else per_feature(fit_spread)

    def predict(Z):
        return np.asarray(Z @ weights).ravel() + intercept

    return RegressionResult(
        method=method, weights=weights, std_weights=weights * std, weight_spread=spread, weight_groups=groups,
        intercept=intercept, alpha=alpha, r2_train=r2(y, predict(X)),
        r2_heldout=r2(scores[heldout], predict(features[heldout])) if heldout.any() else float("nan"),
        r2_cv=r2_cv, n_train=int(train.sum()), n_heldout=int(heldout.sum()), cv_folds=cv_folds,
    )


def weight_effect_agreement(weights, effects, frequency, min_features: int = 3) -> float | None:
    """Pearson r of the regression weights with the reward effect (score per unit of a feature
    through the rest of the model), over the features that fired and have an effect: near 1
    where the weights rank features as the model uses them, near 0 (or below) where they
    explain the score from features it does not read. None without effects."""
    effects = np.array([np.nan if e is None else e for e in effects], dtype=np.float64)
    weights, frequency = np.asarray(weights, dtype=np.float64), np.asarray(frequency, dtype=np.float64)
    use = (frequency > 0) & np.isfinite(effects)
    if use.sum() < min_features or np.ptp(weights[use]) == 0 or np.ptp(effects[use]) == 0:
        return None
    return float(np.corrcoef(weights[use], effects[use])[0, 1])


def fit_reward_regression(features, scores, heldout, config, seed: int = 0,
                          decoder: np.ndarray | None = None) -> RegressionResult:
    """The layer's reward regression, as the run config's `regression` section asks; `decoder`:
    the SAE's decoder rows [d_sae, d_in], which near-duplicates must share."""
    return fit_regression(
        features, scores, heldout, method=config.method, alphas=config.alphas, cv_folds=config.cv_folds,
        stability=config.stability, bootstrap_samples=config.bootstrap_samples,
        merge_correlated=config.merge_correlated, merge_directions=decoder,
        merge_min_cosine=config.merge_min_cosine, seed=seed,
    )


def fit_probe(raw, scores, heldout, cv_folds: int = 5, seed: int = 0) -> RegressionResult:
    """The baseline: ridge on the same layer's pooled raw residual stream, alpha by GCV (by exact
    leave-one-out when dimensions are about as many as texts) on the default relative grid (the
    raw stream's scale differs from the features')."""
    return fit_regression(raw, scores, heldout, method="ridge", alphas=None, cv_folds=cv_folds,
                          stability="none", seed=seed)
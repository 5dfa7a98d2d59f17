"""The reward regression: ridge (GCV alpha) and lasso (k-fold alpha) against scikit-learn,
weight stability, standardised weights and the raw-activation probe, on small synthetic data."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import Lasso, Ridge

import workers.regress as regress
from backend.core.run_config import ConfigError, RegressionConfig, parse_config
from workers.regress import fit_probe, fit_regression, fit_reward_regression


def sparse_problem(n=400, d=30, density=0.25, noise=0.3, seed=0):
    """Nonnegative sparse features (like pooled TopK activations) and a linear score."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, d, density=density, random_state=seed, format="csr", data_rvs=lambda size: rng.exponential(1.0, size))
    true_w = rng.normal(size=d)
    y = np.asarray(X @ true_w).ravel() + 0.5 + noise * rng.normal(size=n)
    heldout = np.arange(n) >= int(0.8 * n)
    return X, y, heldout, true_w


def test_ridge_matches_sklearn_at_the_same_alpha():
    X, y, heldout, _ = sparse_problem()
    fit = fit_regression(X, y, heldout, alphas=[0.7], stability="none")
    reference = Ridge(alpha=0.7, solver="cholesky").fit(X[~heldout].toarray(), y[~heldout])
    np.testing.assert_allclose(fit.weights, reference.coef_, rtol=1e-8, atol=1e-10)
    assert fit.intercept == pytest.approx(reference.intercept_, rel=1e-8)
    assert fit.r2_train == pytest.approx(reference.score(X[~heldout].toarray(), y[~heldout]))
    assert fit.r2_heldout == pytest.approx(reference.score(X[heldout].toarray(), y[heldout]))
    assert (fit.alpha, fit.n_train, fit.n_heldout, fit.method) == (0.7, 320, 80, "ridge")


def test_lasso_matches_sklearn_and_selects_the_drivers():
    rng = np.random.default_rng(1)
    X = sp.random(500, 40, density=0.3, random_state=1, format="csr", data_rvs=lambda size: rng.exponential(1.0, size))
    true_w = np.zeros(40)
    true_w[:4] = [2.0, -1.5, 1.0, 3.0]
    y = np.asarray(X @ true_w).ravel() + 0.1 * rng.normal(size=500)
    heldout = np.arange(500) >= 400
    fit = fit_regression(X, y, heldout, method="lasso", alphas=[0.01], stability="none")
    reference = Lasso(alpha=0.01, max_iter=5000, tol=1e-4).fit(X[:400], y[:400])
    np.testing.assert_allclose(fit.weights, reference.coef_, atol=1e-6)
    assert fit.intercept == pytest.approx(reference.intercept_, abs=1e-6)
    # k-fold CV over sklearn's own path: the drivers survive, most of the rest are exactly zero
    cv = fit_regression(X, y, heldout, method="lasso", cv_folds=4, stability="none")
    assert set(np.flatnonzero(np.abs(cv.weights) > 0.2)) == {0, 1, 2, 3}
    assert np.abs(cv.weights[4:]).max() < 0.05 and cv.r2_heldout > 0.99
    ridge = fit_regression(X, y, heldout, stability="none")
    assert np.sum(cv.weights[4:] == 0) >= 15 and np.sum(ridge.weights == 0) == 0  # exact zeros: lasso's


def gcv_brute_force(X, y, alpha):
    """GCV from the explicit hat matrix (intercept included): n RSS / (n - tr H)^2."""
    n = len(y)
    Xc = X - X.mean(axis=0)
    H = Xc @ np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T) + 1.0 / n
    residual = y - H @ y
    return n * residual @ residual / (n - np.trace(H)) ** 2


def test_gcv_picks_the_alpha_the_explicit_hat_matrix_picks():
    X, y, heldout, _ = sparse_problem(n=150, d=40, noise=2.0, seed=3)
    grid = list(np.logspace(-3, 3, 13))
    fit = fit_regression(X, y, heldout, alphas=grid, stability="none")
    dense = X[~heldout].toarray()
    expected = grid[int(np.argmin([gcv_brute_force(dense, y[~heldout], a) for a in grid]))]
    assert fit.alpha == pytest.approx(expected)
    assert grid[0] < fit.alpha < grid[-1]  # noisy, few rows: neither extreme wins


def test_cv_alpha_recovers_known_weights_and_predicts_heldout_well():
    X, y, heldout, true_w = sparse_problem(n=2000, d=30, noise=0.5, seed=4)
    fit = fit_regression(X, y, heldout, stability="none")  # the default relative grid
    assert np.corrcoef(fit.weights, true_w)[0, 1] > 0.99
    # the chosen alpha is as good on held-out rows as the best alpha of a wide grid, in hindsight
    grid = np.logspace(-4, 4, 17) * fit.alpha
    best_heldout = max(fit_regression(X, y, heldout, alphas=[a], stability="none").r2_heldout for a in grid)
    assert fit.r2_heldout > best_heldout - 0.005
    # a huge alpha shrinks everything: far worse, so the choice mattered
    assert fit_regression(X, y, heldout, alphas=[1e6], stability="none").r2_heldout < fit.r2_heldout - 0.5


def duplicate_pair_problem(seed=5):
    """Feature 1 is feature 0 with 2% jitter (a near-duplicate); feature 2 carries its own signal."""
    rng = np.random.default_rng(seed)
    X = sp.random(600, 12, density=0.3, random_state=seed, format="lil", data_rvs=lambda size: rng.exponential(1.0, size))
    X[:, 1] = X[:, 0].multiply(1 + 0.02 * rng.normal(size=(600, 1)))
    X = X.tocsr()
    w = np.zeros(12)
    w[0], w[2] = 2.0, 2.0  # the pair carries 2.0 between them
    y = np.asarray(X @ w).ravel() + 0.2 * rng.normal(size=600)
    return X, y, np.arange(600) >= 500


@pytest.mark.parametrize("stability", ["folds", "bootstrap"])
def test_stability_is_small_for_a_determined_weight_and_large_for_a_duplicate_pair(stability):
    X, y, heldout = duplicate_pair_problem()
    fit = fit_regression(X, y, heldout, alphas=[1e-4], stability=stability, bootstrap_samples=30, cv_folds=5)
    # the pair's total is well determined; how it is split between the two is not
    assert fit.weights[0] + fit.weights[1] == pytest.approx(2.0, abs=0.1)
    assert fit.weight_spread[2] < 0.05
    assert fit.weight_spread[0] > 10 * fit.weight_spread[2] and fit.weight_spread[1] > 10 * fit.weight_spread[2]
    assert (fit.r2_cv is not None) == (stability == "folds")


def test_fold_stability_is_a_jackknife_over_explicit_refits():
    X, y, heldout, _ = sparse_problem(n=200, d=10, seed=6)
    fit = fit_regression(X, y, heldout, alphas=[0.5], cv_folds=4, seed=7)
    Xt, yt = X[~heldout].toarray(), y[~heldout]
    folds = regress._fold_ids(len(yt), 4, 7)
    refits = np.stack([Ridge(alpha=0.5, solver="cholesky").fit(Xt[folds != f], yt[folds != f]).coef_
                       for f in range(4)])
    expected = np.sqrt(3 / 4 * ((refits - refits.mean(axis=0)) ** 2).sum(axis=0))
    np.testing.assert_allclose(fit.weight_spread, expected, rtol=1e-6)
    oof = np.empty(len(yt))
    for f in range(4):
        oof[folds == f] = Ridge(alpha=0.5, solver="cholesky").fit(Xt[folds != f], yt[folds != f]).predict(
            Xt[folds == f])
    assert fit.r2_cv == pytest.approx(regress.r2(yt, oof))


def test_standardised_weight_is_weight_times_feature_std():
    X, y, heldout, _ = sparse_problem(seed=8)
    X = X @ sp.diags(np.linspace(0.1, 10, X.shape[1]))  # very different feature scales
    fit = fit_regression(X, y, heldout, alphas=[0.1], stability="none")
    std = X[~heldout].toarray().std(axis=0)
    np.testing.assert_allclose(fit.std_weights, fit.weights * std, rtol=1e-9)
    assert fit.weight_spread is None and fit.r2_cv is None


def test_dense_gram_path_equals_the_sparse_one(monkeypatch):
    X, y, heldout, _ = sparse_problem(seed=9)
    sparse_fit = fit_regression(X, y, heldout, alphas=[0.3], cv_folds=3)
    monkeypatch.setattr(regress, "DENSE_GRAM_DENSITY", 0.0)  # every matrix takes the BLAS route
    dense_fit = fit_regression(X, y, heldout, alphas=[0.3], cv_folds=3)
    np.testing.assert_allclose(dense_fit.weights, sparse_fit.weights, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dense_fit.weight_spread, sparse_fit.weight_spread, rtol=1e-7, atol=1e-12)
    dense_input = fit_regression(X.toarray(), y, heldout, alphas=[0.3], cv_folds=3)
    np.testing.assert_allclose(dense_input.weights, sparse_fit.weights, rtol=1e-9, atol=1e-12)


def test_probe_fits_raw_activations_and_finds_no_signal_where_there_is_none():
    rng = np.random.default_rng(10)
    raw = 30.0 * rng.normal(size=(800, 24)) + 5.0  # raw residual streams: large, offset, dense
    y = raw @ rng.normal(size=24) / 30.0 + 0.3 * rng.normal(size=800)
    heldout = rng.random(800) < 0.25
    probe = fit_probe(raw, y, heldout)
    assert probe.r2_heldout > 0.97 and probe.r2_train >= probe.r2_heldout - 0.02
    noise = fit_probe(raw, rng.normal(size=800), heldout)
    assert noise.r2_heldout < 0.05 and noise.r2_train < 0.1


def test_config_drives_the_fit_and_rejects_too_few_rows():
    X, y, heldout, _ = sparse_problem(n=300, seed=11)
    config = RegressionConfig(method="ridge", alphas=[2.0], cv_folds=3, stability="bootstrap", bootstrap_samples=4)
    fit = fit_reward_regression(X, y, heldout, config, seed=0)
    assert (fit.alpha, fit.cv_folds, fit.r2_cv) == (2.0, 3, None) and fit.weight_spread.shape == (X.shape[1],)
    with pytest.raises(ValueError, match="regression.cv_folds"):
        fit_regression(X[:4], y[:4], np.zeros(4, dtype=bool), cv_folds=5)
    with pytest.raises(ValueError, match="regression.method"):
        fit_regression(X, y, heldout, method="elasticnet")


def test_constant_features_get_zero_weight_and_leave_the_others_unchanged():
    X, y, heldout, _ = sparse_problem(seed=12)
    widened = sp.hstack([sp.csr_matrix((X.shape[0], 3)), X, sp.csr_matrix(np.ones((X.shape[0], 1)))]).tocsr()
    fit = fit_regression(X, y, heldout, alphas=[0.4], cv_folds=3)
    wide = fit_regression(widened, y, heldout, alphas=[0.4], cv_folds=3)
    np.testing.assert_allclose(wide.weights[3:-1], fit.weights, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(wide.weight_spread[3:-1], fit.weight_spread, rtol=1e-7, atol=1e-12)
    assert np.all(wide.weights[[0, 1, 2, -1]] == 0) and np.all(wide.weight_spread[[0, 1, 2, -1]] == 0)
    assert wide.r2_heldout == pytest.approx(fit.r2_heldout) and wide.intercept == pytest.approx(fit.intercept)


@pytest.mark.parametrize("regression, key", [
    ({"method": "elasticnet"}, "regression.method"),
    ({"cv_folds": 1}, "regression.cv_folds"),
    ({"stability": "permutation"}, "regression.stability"),
    ({"alphas": []}, "regression.alphas"),
    ({"bootstrap_samples": 1}, "regression.bootstrap_samples"),
    ({"merge_correlated": 1.5}, "regression.merge_correlated"),
])
def test_bad_regression_settings_name_their_key(regression, key):
    base = {"name": "r", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1]}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({**base, "regression": regression})
    assert parse_config({**base, "regression": {"method": "lasso", "stability": "bootstrap"}}).regression.cv_folds == 5


def test_an_alpha_at_the_grid_edge_is_reported():
    X, y, heldout, _ = sparse_problem(noise=0.01, seed=13)  # nearly noiseless: the smallest alpha wins
    with pytest.warns(UserWarning, match="regression.alphas"):
        fit = fit_regression(X, y, heldout, alphas=[10.0, 1.0, 100.0], stability="none")
    assert fit.alpha == 1.0


@pytest.mark.parametrize("stability", ["folds", "bootstrap"])
def test_merged_near_duplicates_share_one_well_determined_weight(stability):
    X, y, heldout = duplicate_pair_problem()
    alone = fit_regression(X, y, heldout, alphas=[1e-4], stability=stability, bootstrap_samples=30)
    merged = fit_regression(X, y, heldout, alphas=[1e-4], stability=stability, bootstrap_samples=30,
                            merge_correlated=0.9)
    assert merged.weight_groups[:3].tolist() == [0, 0, 2] and set(merged.weight_groups[3:]) == set(range(3, 12))
    # each member carries half of the pair's 2.0 (the column is their sum), with a small error bar
    assert merged.weights[0] == merged.weights[1] == pytest.approx(1.0, abs=0.02)
    assert merged.weight_spread[0] == merged.weight_spread[1] < alone.weight_spread[0] / 10
    assert merged.r2_heldout == pytest.approx(alone.r2_heldout, abs=0.01)


def test_merged_fit_is_the_fit_on_summed_columns():
    X, y, heldout = duplicate_pair_problem(seed=8)
    merged = fit_regression(X, y, heldout, alphas=[0.3], cv_folds=3, merge_correlated=0.9)
    summed = sp.hstack([X[:, [0]] + X[:, [1]], X[:, 2:]]).tocsr()
    explicit = fit_regression(summed, y, heldout, alphas=[0.3], cv_folds=3)
    np.testing.assert_allclose(merged.weights[1:], explicit.weights, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(merged.weight_spread[1:], explicit.weight_spread, rtol=1e-6, atol=1e-12)
    assert merged.intercept == pytest.approx(explicit.intercept) and merged.r2_cv == pytest.approx(explicit.r2_cv)


def test_groups_follow_chains_of_correlation_and_nothing_below_the_threshold():
    rng = np.random.default_rng(3)
    base = rng.exponential(1.0, size=(800, 1)) * (rng.random((800, 1)) < 0.5)
    a, b = base + 0.25 * rng.random((800, 1)), base + 0.5 * rng.random((800, 1))
    c = b + 0.5 * rng.random((800, 1))  # like b, less like a
    independent = rng.exponential(1.0, size=(800, 3))
    X = np.hstack([a, b, c, independent])
    corr = np.corrcoef(X, rowvar=False)
    threshold = (corr[0, 1] + corr[0, 2]) / 2
    assert corr[1, 2] > threshold > corr[0, 2]
    y = X @ np.array([1.0, 0.5, 0.2, 1.0, -1.0, 0.5]) + 0.1 * rng.normal(size=800)
    fit = fit_regression(X, y, np.zeros(800, dtype=bool), stability="none", merge_correlated=threshold)
    assert fit.weight_groups.tolist() == [0, 0, 0, 3, 4, 5]  # a-b and b-c link a to c
    strict = fit_regression(X, y, np.zeros(800, dtype=bool), stability="none", merge_correlated=0.999)
    assert strict.weight_groups.tolist() == list(range(6))
    np.testing.assert_allclose(strict.weights, fit_regression(X, y, np.zeros(800, dtype=bool),
                                                              stability="none").weights)


def test_features_that_fire_together_but_write_different_directions_stay_apart():
    X, y, heldout = duplicate_pair_problem()
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(12, 16))
    alike = directions.copy()
    alike[1] = directions[0] + 0.3 * rng.normal(size=16)  # cosine ~0.95 with feature 0
    apart = directions.copy()
    apart[1] -= (apart[1] @ apart[0]) / (apart[0] @ apart[0]) * apart[0]  # orthogonal to feature 0
    kw = dict(alphas=[1e-4], stability="none", merge_correlated=0.9, merge_min_cosine=0.5)
    assert fit_regression(X, y, heldout, merge_directions=alike, **kw).weight_groups[:2].tolist() == [0, 0]
    assert fit_regression(X, y, heldout, merge_directions=apart, **kw).weight_groups[:2].tolist() == [0, 1]
    # the cosine is read for live features only: a dead column in front shifts nothing
    widened = sp.hstack([sp.csr_matrix((X.shape[0], 1)), X]).tocsr()
    shifted = fit_regression(widened, y, heldout, merge_directions=np.vstack([rng.normal(size=(1, 16)), alike]), **kw)
    assert shifted.weight_groups[:3].tolist() == [0, 1, 1]


def test_the_probe_keeps_a_penalty_when_texts_are_fewer_than_dimensions():
    """More dimensions than training rows, a large shared mean (as a residual stream has): the
    probe's penalty is leave-one-out's (sklearn's RidgeCV), and it predicts held-out rows."""
    from sklearn.linear_model import RidgeCV

    from workers.regress import RELATIVE_RIDGE_GRID, fit_probe

    rng = np.random.default_rng(0)
    n, d = 140, 120
    X = 40.0 + rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    y = X @ rng.normal(size=d) * 0.05 + rng.normal(scale=0.5, size=n)
    heldout = np.arange(n) >= 60  # 60 training rows, 120 dimensions
    fit = fit_probe(X, y, heldout)
    Xt = X[~heldout]
    grid = RELATIVE_RIDGE_GRID * ((Xt - Xt.mean(0)) ** 2).sum() / d
    assert fit.alpha == pytest.approx(RidgeCV(alphas=grid).fit(Xt, y[~heldout]).alpha_)
    assert fit.r2_heldout > 0.5, fit.r2_heldout


def test_feature_regression_with_more_features_than_texts_takes_leave_one_outs_alpha():
    """GCV calls a near-interpolating fit best once columns are as many as rows; the fit then
    chooses alpha by exact leave-one-out, as sklearn's RidgeCV does."""
    from sklearn.linear_model import RidgeCV

    from workers.regress import RELATIVE_RIDGE_GRID

    rng = np.random.default_rng(3)
    n, d = 160, 240
    X = sp.random(n, d, density=0.08, random_state=4, data_rvs=lambda k: rng.exponential(size=k)).tocsr()
    y = X @ (rng.normal(size=d) * (rng.random(d) < 0.2)) + rng.normal(scale=0.7, size=n)
    heldout = np.arange(n) >= 120
    fit = fit_regression(X, y, heldout, method="ridge", stability="none")
    Xt = X[~heldout].toarray()
    live = Xt.std(0) > 0
    grid = RELATIVE_RIDGE_GRID * ((Xt[:, live] - Xt[:, live].mean(0)) ** 2).sum() / live.sum()
    assert fit.alpha == pytest.approx(RidgeCV(alphas=grid).fit(Xt[:, live], y[~heldout]).alpha_)

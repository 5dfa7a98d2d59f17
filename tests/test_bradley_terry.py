"""The Bradley–Terry head: a no-intercept logistic regression on feature differences."""
from __future__ import annotations

import numpy as np
import pytest

from workers.bradley_terry import fit_bradley_terry, fit_weights, heldout_split, pairwise_accuracy


def _planted_pairs(n_pairs=600, d=8, seed=0):
    """Features whose true reward is w·f; the pair's order follows a BT draw on the margin."""
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=d)
    first, second = rng.normal(size=(n_pairs, d)) * 3.0, rng.normal(size=(n_pairs, d)) * 3.0
    prefer_first = rng.random(n_pairs) < 1 / (1 + np.exp(-(first - second) @ true_w))
    chosen = np.where(prefer_first[:, None], first, second)
    rejected = np.where(prefer_first[:, None], second, first)
    return chosen, rejected, true_w


def test_fit_recovers_the_planted_direction_and_predicts_held_out_pairs():
    chosen, rejected, true_w = _planted_pairs()
    fit = fit_bradley_terry(chosen, rejected, heldout_fraction=0.25, seed=0)
    cosine = fit.weights @ true_w / np.linalg.norm(fit.weights) / np.linalg.norm(true_w)
    assert cosine > 0.95
    assert len(fit.heldout_index) == 150 and len(fit.train_index) == 450
    assert not set(fit.heldout_index) & set(fit.train_index)
    assert fit.heldout_accuracy > 0.8
    # the reported accuracy is the direct computation with the fitted head
    direct = pairwise_accuracy(fit.score(chosen[fit.heldout_index]), fit.score(rejected[fit.heldout_index]))
    assert fit.heldout_accuracy == direct


def test_fit_minimises_the_bradley_terry_loss():
    chosen, rejected, _ = _planted_pairs(n_pairs=300, d=4, seed=1)
    differences = chosen - rejected
    weights = fit_weights(differences, C=1e6)  # ~no penalty: the BT optimum itself

    def bt_loss(w):
        return float(np.mean(np.logaddexp(0.0, -(differences @ w))))

    # the gradient of the mean BT loss vanishes at the fitted weights
    sigma = 1 / (1 + np.exp(differences @ weights))
    gradient = -(differences * sigma[:, None]).mean(axis=0)
    assert np.abs(gradient).max() < 1e-3
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert bt_loss(weights) <= bt_loss(weights + 0.05 * rng.normal(size=weights.shape))


def test_scaling_a_feature_scales_its_weight_inversely():
    chosen, rejected, _ = _planted_pairs(n_pairs=300, d=4, seed=2)
    base = fit_weights(chosen - rejected)
    scaled = fit_weights((chosen - rejected) * np.array([1000.0, 1, 1, 1]))
    np.testing.assert_allclose(scaled * np.array([1000.0, 1, 1, 1]), base, rtol=1e-3)


def test_given_split_is_used_and_pairwise_accuracy_counts_ties_as_wrong():
    chosen, rejected, _ = _planted_pairs(n_pairs=100, d=3, seed=3)
    train, heldout = np.arange(80), np.arange(80, 100)
    fit = fit_bradley_terry(chosen, rejected, train_index=train, heldout_index=heldout)
    assert list(fit.heldout_index) == list(range(80, 100))
    assert pairwise_accuracy([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(1 / 3)


def test_heldout_split_is_seeded_and_disjoint():
    train, heldout = heldout_split(50, 0.2, seed=7)
    assert len(heldout) == 10 and sorted(np.concatenate([train, heldout])) == list(range(50))
    assert list(heldout) == list(heldout_split(50, 0.2, seed=7)[1])
    assert list(heldout) != list(heldout_split(50, 0.2, seed=8)[1])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="chosen"):
        fit_bradley_terry(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="heldout_fraction"):
        heldout_split(10, 1.0, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        pairwise_accuracy([], [])


def test_sparse_features_and_a_cross_validated_penalty_give_the_dense_fit():
    import scipy.sparse as sp

    chosen, rejected, true_w = _planted_pairs(n_pairs=400, d=6, seed=5)
    chosen[:, 3] = rejected[:, 3] = 0.0  # a dead feature: its weight stays 0
    dense = fit_bradley_terry(chosen, rejected, C=None)
    sparse = fit_bradley_terry(sp.csr_matrix(chosen), sp.csr_matrix(rejected), C=None)
    np.testing.assert_allclose(sparse.weights, dense.weights, rtol=1e-4, atol=1e-6)
    assert dense.weights[3] == 0.0
    assert sparse.heldout_accuracy == dense.heldout_accuracy > 0.8

"""Attribution, measured single-feature effects, deletion curves and controls, on a tiny random
BERT reward model with a random TopK SAE: each figure equals what a hand-made forward or
backward gives."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny_models import save_tiny_bert
from workers.ablation import prepare_eval_set, run_ablation
from workers.analyze import forward_with_gradients
from workers.attribution import AttributionAccumulator, text_contributions
from backend.core.run_config import EffectsConfig, ModelConfig, SaeConfig
from workers.controls import control_draws, judge, paired_test
from workers.faithfulness import RANKINGS, default_ranking, deletion_curves, ranked
from workers.measured_effects import calibration, candidate_features, measure_single_features
from workers.sae_ops import FeatureEdit, decoder_directions

LAYER = 1
TEXTS = ["a truly wonderful and moving film", "the plot was dull and the acting awful", "it was fine",
         "not good , not bad , just long", "brilliant ! i loved every minute of it", "the worst film of the year",
         "an ok story", "great music but a weak ending"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from workers.adapters import adapter_from_config
    from workers.train import build_training_sae

    path = save_tiny_bert(tmp_path_factory.mktemp("causal") / "bert")
    adapter = adapter_from_config(ModelConfig(path=str(path), max_length=32), str(path), torch.device("cpu"))
    torch.manual_seed(0)
    sae = build_training_sae(SaeConfig(width=64, k=4), adapter.d_model, "cpu").eval()
    return adapter, sae


def clean_pass(adapter, text):
    batch = adapter.tokenize([text])
    scores, hidden, grads = forward_with_gradients(adapter, batch, [LAYER])
    return batch, scores, hidden[LAYER], grads[LAYER]


def text_tokens(adapter, batch):
    """The text's own tokens of a one-text batch: [CLS] and [SEP] left out."""
    return ~torch.isin(batch.input_ids[0], torch.tensor(adapter.tokenizer.all_special_ids))


def zeroed_score(adapter, sae, batch, hidden, feature):
    """The score with `feature` zeroed on the text's own tokens at LAYER, reconstruction error
    kept, by hand."""
    acts = sae.encode(hidden.float())
    edited = acts.clone()
    edited[0, text_tokens(adapter, batch), feature] = 0
    new = hidden + (sae.decode(edited) - sae.decode(acts))
    with torch.no_grad():
        score, _ = adapter.run(batch, edits={LAYER: lambda h: new})
    return float(score[0])


def test_contribution_is_activation_times_gradient_summed_over_the_texts_tokens(world):
    adapter, sae = world
    batch, scores, hidden, grad = clean_pass(adapter, TEXTS[0])
    acts = sae.encode(hidden[0].float()).detach()
    directions = decoder_directions(sae)
    got = text_contributions(acts, grad[0], directions, torch.zeros(len(acts), dtype=torch.long), 1)[0]
    by_hand = torch.stack([(acts[:, f] * (grad[0] @ directions[f])).sum() for f in range(sae.cfg.d_sae)])
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert (got != 0).sum() >= 4  # live features contribute


def test_attribution_summary_means_and_variance_shares(world):
    adapter, sae = world
    acc = AttributionAccumulator(sae.cfg.d_sae)
    directions = decoder_directions(sae)
    per_text, scores = [], []
    for text in TEXTS:
        batch, score, hidden, grad = clean_pass(adapter, text)
        acts = sae.encode(hidden[0].float()).detach()
        per_text.append(acc.add(acts, grad[0], directions, torch.zeros(len(acts), dtype=torch.long), score)[0])
        scores.append(float(score[0]))
    c, y = torch.stack(per_text).double().numpy(), np.array(scores)
    out = acc.results()
    assert np.allclose(out["attribution"], c.mean(0))
    assert np.allclose(out["attribution_abs"], np.abs(c).mean(0))
    expected_share = ((c - c.mean(0)) * (y - y.mean())[:, None]).mean(0) / y.var()
    assert np.allclose(out["attribution_share"], expected_share)


def test_selecting_rows_of_a_batch_scores_them_as_alone(world):
    adapter, _ = world
    batch = adapter.tokenize(TEXTS[:4])
    with torch.no_grad():
        full, _ = adapter.run(batch)
        rows = torch.tensor([2, 0, 2])
        picked, _ = adapter.run(batch.select(rows))
    assert torch.allclose(picked, full[rows], atol=1e-5)


def test_measured_single_feature_effects_equal_hand_made_ablations(world):
    adapter, sae = world
    evalset = prepare_eval_set(adapter, LAYER, TEXTS, batch_size=4, with_gradients=True)
    directions = decoder_directions(sae)
    freq = np.ones(sae.cfg.d_sae)
    candidates = np.array([f for f in range(sae.cfg.d_sae)][:10])
    weights = np.linspace(-1, 1, sae.cfg.d_sae)
    out = measure_single_features(adapter, sae, LAYER, evalset, candidates, weights, "sum", directions,
                                  texts_per_feature=len(TEXTS))
    measured = 0
    for c, feature in enumerate(candidates):
        deltas, attributed = [], []
        for text in TEXTS:
            batch, score, hidden, grad = clean_pass(adapter, text)
            on_text = text_tokens(adapter, batch)
            acts = sae.encode(hidden[0].float()).detach()[on_text]
            if not (acts[:, feature] > 0).any():
                continue
            deltas.append(zeroed_score(adapter, sae, batch, hidden, feature) - float(score[0]))
            attributed.append(-float((acts[:, feature] * (grad[0][on_text] @ directions[feature])).sum()))
        if not deltas:
            assert out["measured_n"][c] == 0 and np.isnan(out["measured_delta"][c])
            continue
        measured += 1
        assert out["measured_n"][c] == len(deltas)
        assert out["measured_delta"][c] == pytest.approx(np.mean(deltas), rel=1e-3, abs=1e-7)
        assert out["predicted_delta_attribution"][c] == pytest.approx(np.mean(attributed), rel=1e-3, abs=1e-7)
        if len(deltas) > 1:
            assert out["measured_delta_low"][c] <= out["measured_delta"][c] <= out["measured_delta_high"][c]
    assert measured >= 3
    del freq


def test_ablation_reports_the_first_order_prediction_and_where_features_fire(world):
    adapter, sae = world
    evalset = prepare_eval_set(adapter, LAYER, TEXTS, batch_size=4, with_gradients=True)
    feature = 3
    result = run_ablation(adapter, sae, LAYER, evalset, FeatureEdit((feature,), "zero"), np.zeros(64), "sum",
                          directions=decoder_directions(sae), linear=True)
    directions = decoder_directions(sae)
    for row, i in enumerate(result.text_index):
        batch, score, hidden, grad = clean_pass(adapter, TEXTS[i])
        on_text = text_tokens(adapter, batch)
        acts = sae.encode(hidden[0].float()).detach()[on_text]
        assert result.fired[row] == bool((acts[:, feature] > 0).any())
        expected = -float((acts[:, feature] * (grad[0][on_text] @ directions[feature])).sum())
        assert result.attributed[row] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    summary = result.summary()
    assert summary["attribution_mean_delta"] == pytest.approx(float(result.attributed.mean()))
    fired_only = result.summary(result.fired)
    assert fired_only["n"] == int(result.fired.sum())


def test_candidates_take_turns_between_attribution_and_weight():
    attribution = np.array([0.0, 5.0, 4.0, np.nan, 1.0, 0.5])
    weight = np.array([9.0, -8.0, 0.1, 7.0, 0.2, 0.0])
    frequency = np.array([0.1, 0.1, 0.1, 0.1, 0.0, 0.1])  # feature 4 is dead
    # by |attribution|: 1, 2, 5, 0; by |weight|: 0, 1, 3, 2, 5 -- in turns, each feature once
    assert candidate_features(attribution, weight, frequency, 4).tolist() == [1, 0, 2, 5]
    assert candidate_features(attribution, weight, frequency, 6).tolist() == [1, 0, 2, 5, 3]  # 4 is dead


def test_rankings_order_live_features_by_their_column_one_direction_at_a_time():
    columns = {"frequency": np.array([0.1, 0.2, 0.0, 0.3]), "weight": np.array([1.0, -3.0, 9.0, 2.0]),
               "reward_effect": np.array([0.5, np.nan, 1.0, 0.1]), "attribution": np.array([0.2, 0.1, 0.0, -0.4]),
               "measured_delta": np.array([np.nan, -0.5, np.nan, 0.2])}
    assert ranked(columns, "weight", "raises").tolist() == [3, 0]  # the dead feature 2 is never ranked
    assert ranked(columns, "weight", "lowers").tolist() == [1]
    assert ranked(columns, "abs_weight").tolist() == [1, 3, 0]  # |value|: both directions, one order
    assert ranked(columns, "reward_effect", "raises").tolist() == [0, 3]
    assert ranked(columns, "attribution", "lowers").tolist() == [3]
    # measured Δ: a raiser is a feature whose zeroing lowers the score (most negative change first)
    assert ranked(columns, "measured_delta", "raises").tolist() == [1]
    assert ranked(columns, "measured_delta", "lowers").tolist() == [3]
    assert set(RANKINGS) == {"weight", "abs_weight", "reward_effect", "attribution", "measured_delta"}


def test_deletion_curves_measure_each_direction_against_controls_and_pick_the_ranking_that_holds_up(world):
    adapter, sae = world
    evalset = prepare_eval_set(adapter, LAYER, TEXTS, batch_size=4, with_gradients=True)
    directions = decoder_directions(sae)
    columns = {"frequency": np.full(64, 0.1), "weight": np.linspace(1, -1, 64),
               "reward_effect": np.linspace(-1, 1, 64), "attribution": np.linspace(0, 1, 64),
               "measured_delta": np.full(64, np.nan)}
    rows = deletion_curves(adapter, sae, LAYER, evalset, columns, [1, 5, 10, 100], 3, np.zeros(64), "sum",
                           directions, True, seed=1)
    signed = ("weight", "reward_effect")  # both signs present; attribution has no lowerer (all >= 0)
    assert {(r["ranking"], r["direction"], r["n"]) for r in rows} == (
        {(k, d, n) for k in signed for d in ("raises", "lowers") for n in (1, 5, 10)}
        | {("abs_weight", "both", n) for n in (1, 5, 10)} | {("attribution", "raises", n) for n in (1, 5, 10)})
    for r in rows:  # 100 > the 64 live features
        draws = len(r["control_effects"])
        assert draws == (10 if r["n"] == 10 else 3) and len(r["control_draw_means"]) == draws
        assert r["n_reads"] == len(TEXTS) and 0 <= r["n_fired"] <= len(TEXTS)
        assert r["difference"] == pytest.approx(r["mean_delta"] - r["control_mean_delta"], abs=1e-9)
        expected_effect = {"raises": -r["mean_delta"], "lowers": r["mean_delta"], "both": r["abs_mean_delta"]}
        assert r["effect"] == pytest.approx(expected_effect[r["direction"]], abs=1e-9)
        assert r["excess"] == pytest.approx(r["effect"] - np.mean(r["control_effects"]), abs=1e-9)
        assert r["abs_mean_delta"] >= abs(r["mean_delta"]) - 1e-12  # |Δ| per text: signs cannot cancel
        if r["direction"] != "both":  # a direction holds features of one sign only
            values = np.asarray(columns[RANKINGS[r["ranking"]].column])[r["features"]]
            assert np.all(values > 0) if r["direction"] == "raises" else np.all(values < 0)
        if draws < 10:
            assert r["verdict"] == "too_few_controls"
    scores = {}
    for r in rows:
        scores.setdefault(r["ranking"], {}).setdefault(r["direction"], []).append(r["excess"])
    by_hand = {k: np.mean([np.mean(v) for v in d.values()]) for k, d in scores.items()}
    assert default_ranking(rows) == max(by_hand, key=lambda k: by_hand[k])


def test_a_verdict_needs_ten_draws_none_reaching_the_effect_and_a_paired_test():
    rng = np.random.default_rng(0)
    chosen = rng.normal(-0.5, 0.05, 64)  # zeroing "raisers" lowers the score by 0.5
    quiet = [rng.normal(0, 0.05, 64) for _ in range(10)]
    clear = judge(chosen, quiet, "raises")
    assert clear["verdict"] == "beyond_controls" and clear["effect"] == pytest.approx(0.5, abs=0.02)
    assert clear["rank_p_value"] == pytest.approx(1 / 11) and clear["effect_p_value"] < 0.001
    # one draw of ten reaches the chosen effect: the mean of the draws is far below, yet undecided
    reaching = quiet[:9] + [rng.normal(-0.55, 0.05, 64)]
    close = judge(chosen, reaching, "raises")
    assert close["excess"] > 0.4 and close["verdict"] == "within_controls"
    assert close["rank_p_value"] == pytest.approx(2 / 11)
    assert judge(chosen, quiet[:3], "raises")["verdict"] == "too_few_controls"
    # the wrong direction: zeroing "lowerers" that in fact lower the score is no effect at all
    assert judge(chosen, quiet, "lowers")["excess"] < 0
    # |Δ|: a set pushing both ways cancels in its mean but not per text
    mixed = np.concatenate([np.full(32, 0.3), np.full(32, -0.3)])
    both = judge(mixed, quiet, "both")
    assert abs(mixed.mean()) < 1e-12 and both["effect"] == pytest.approx(0.3) and both["verdict"] == "beyond_controls"


def test_controls_are_frequency_matched_and_the_test_decides():
    frequency = np.linspace(0.001, 0.5, 200)
    chosen = (10, 100, 150)
    draws = control_draws(frequency, chosen, 3, seed=0)
    assert len(draws) == 3 and len(set(draws)) == 3
    for draw in draws:
        assert not set(draw) & set(chosen)
        assert all(abs(int(d) - int(c)) <= 21 for d, c in zip(draw, chosen))  # among the 20 nearest in frequency
    rng = np.random.default_rng(0)
    shifted = paired_test(rng.normal(-0.5, 0.2, 50), [rng.normal(0, 0.2, 50) for _ in range(3)])
    assert shifted["p_value"] < 0.001 and shifted["ci_high"] < 0
    same = paired_test(rng.normal(0, 0.2, 50), [rng.normal(0, 0.2, 50) for _ in range(3)])
    assert same["p_value"] > 0.01 and same["ci_low"] < 0 < same["ci_high"]


def test_calibration_slope_and_r():
    predicted = np.array([0.1, 0.2, 0.3, 0.4, np.nan])
    fit = calibration(predicted, predicted * 0.5)
    assert fit["slope"] == pytest.approx(0.5) and fit["r"] == pytest.approx(1.0) and fit["n"] == 4
    assert calibration(np.array([1.0, 2.0]), np.array([1.0, 2.0]))["slope"] is None  # too few points


def test_effects_config_sorts_n_and_rejects_nonsense():
    assert EffectsConfig(faithfulness_n=[10, 1, 5, 5]).faithfulness_n == [1, 5, 10]
    with pytest.raises(ValueError, match="positive"):
        EffectsConfig(faithfulness_n=[0, 5])


def test_a_layer_barely_reaches_the_score_when_no_curve_moves_it_or_its_head_reads_one_token():
    from backend.core.rankings import barely_reaches

    assert barely_reaches({"reach": 0.01, "read_token_gradient_share": 0.2, "faithfulness_relative": 0.01})
    # the demo's last layer: some curve moves it (features that also fire at [CLS]), its default top 10 do not
    assert barely_reaches({"reach": 0.07, "read_token_gradient_share": 1.0, "faithfulness_relative": 0.007})
    assert not barely_reaches({"reach": 0.07, "read_token_gradient_share": 0.5, "faithfulness_relative": 0.007})
    assert not barely_reaches({"reach": 0.7, "read_token_gradient_share": 1.0, "faithfulness_relative": 0.3})
    assert not barely_reaches({"reach": None, "read_token_gradient_share": None, "faithfulness_relative": None})

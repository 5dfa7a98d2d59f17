"""Ablation on a tiny random reward model: only the chosen features change, the reward moves
by exactly what a hand-made forward says, and the worker runs it as a job."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.core import db, jobs, store
from backend.core.settings import Settings
from tests.test_pipeline import tiny_config, tiny_world  # noqa: F401  (module fixture)
from workers.ablation import (FeatureEdit, control_features, edit_hidden, linear_decoder, mean_with_ci,
                              prepare_eval_set, run_ablation)
from workers.analyze import forward_with_gradients
from workers.pipeline import run_pipeline
from workers.sae_ops import decoder_directions
from workers.run_cache import RunCache
from workers.worker import Worker

LAYER = 2


@pytest.fixture(scope="module")
def tiny_run(tiny_world, tmp_path_factory):  # noqa: F811
    settings = Settings(data_dir=tmp_path_factory.mktemp("ablation-data"))
    config = tiny_config(*tiny_world)
    run_pipeline(config, settings)
    loaded = RunCache(settings).get(config.run_id)
    yield settings, loaded
    db.dispose_engines()


def live_features(loaded, n):
    freq = np.asarray(store.layer_vectors(loaded.store_path, LAYER)["frequency"])
    return tuple(int(f) for f in np.argsort(-freq)[:n])


@pytest.mark.parametrize("mode, value", [("zero", 0.0), ("clamp", 3.0)])
def test_edit_changes_only_the_chosen_features_and_keeps_the_reconstruction_error(tiny_run, mode, value):
    _, loaded = tiny_run
    sae = loaded.sae(LAYER)
    chosen = live_features(loaded, 2)
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, sae.cfg.d_in)
    new, before, after = edit_hidden(sae, hidden, FeatureEdit(chosen, mode, value))
    others = [f for f in range(sae.cfg.d_sae) if f not in chosen]
    assert torch.equal(after[..., others], before[..., others])
    assert torch.all(after[..., list(chosen)] == value)
    # the error term is kept: new - h is exactly the change of the chosen features' decoder output
    expected = (after - before)[..., list(chosen)] @ sae.W_dec[list(chosen)]
    assert torch.allclose(new - hidden, expected, atol=1e-5)
    assert not torch.allclose(new, hidden)  # live features on random states: something did change


def test_reward_change_matches_a_forward_with_the_hidden_state_edited_by_hand(tiny_run):
    _, loaded = tiny_run
    adapter, sae = loaded.adapter, loaded.sae(LAYER)
    chosen = live_features(loaded, 3)
    texts = ["a truly wonderful and moving film", "the plot was dull and the acting awful"]
    weights = np.asarray(store.layer_vectors(loaded.store_path, LAYER)["weight"])
    result = run_ablation(adapter, sae, LAYER, texts, FeatureEdit(chosen, "zero"), weights, "mean", scope="all")
    for i, text in enumerate(texts):
        batch = adapter.tokenize([text])
        clean, captured = adapter.run(batch, capture=[LAYER])
        h = captured[LAYER]
        acts = sae.encode(h.float())
        zeroed = acts.clone()
        zeroed[..., list(chosen)] = 0
        by_hand = h + (sae.decode(zeroed) - sae.decode(acts))
        edited, _ = adapter.run(batch, edits={LAYER: lambda hidden: by_hand})
        row = list(result.text_index).index(i)
        assert result.before[row] == pytest.approx(float(clean[0]), abs=1e-5)
        assert result.after[row] == pytest.approx(float(edited[0]), abs=1e-5)
        # predicted: the regression weights times the change of the mean-pooled features (content tokens)
        content = ~torch.isin(batch.input_ids[0], torch.tensor(adapter.tokenizer.all_special_ids))
        change = (zeroed - acts)[0][content].mean(0)
        assert result.predicted[row] == pytest.approx(float(change @ torch.tensor(weights, dtype=torch.float32)), abs=1e-4)


@pytest.mark.parametrize("mode, value", [("zero", 0.0), ("clamp", 2.0)])
def test_the_linear_decoder_shortcut_makes_the_same_edit(tiny_run, mode, value):
    _, loaded = tiny_run
    sae = loaded.sae(LAYER)
    rows = linear_decoder(sae)
    assert rows is not None and rows.shape == (sae.cfg.d_sae, sae.cfg.d_in)
    hidden = torch.randn(2, 6, sae.cfg.d_in, generator=torch.Generator().manual_seed(1))
    firing = sae.encode(hidden).detach().flatten(0, 1).sum(0)  # the features these states do fire
    edit = FeatureEdit(tuple(int(f) for f in torch.argsort(firing, descending=True)[:3]), mode, value)
    slow, fast = edit_hidden(sae, hidden, edit), edit_hidden(sae, hidden, edit, rows, linear=True)
    assert torch.allclose(fast[0], slow[0], atol=1e-5) and not torch.allclose(fast[0], hidden)


def test_a_decoder_that_is_not_linear_is_told_apart(tiny_run):
    _, loaded = tiny_run
    sae = loaded.sae(LAYER)

    class Squashed:  # an output normalisation after the decoder: decode is no longer affine
        cfg, W_dec = sae.cfg, sae.W_dec

        def decode(self, codes):
            return torch.tanh(sae.decode(codes))

    assert linear_decoder(Squashed()) is None


def test_a_prepared_evaluation_set_gives_what_a_fresh_run_gives(tiny_run):
    """Reusing the clean pass (edits then run only the blocks above the layer) changes nothing,
    whether the layer's output was kept or not."""
    _, loaded = tiny_run
    adapter, sae = loaded.adapter, loaded.sae(LAYER)
    texts = [f"review {i}: the acting was {'superb' if i % 2 else 'dreadful'} and the plot {'moving' * (i % 3)}"
             for i in range(9)]
    weights = np.asarray(store.layer_vectors(loaded.store_path, LAYER)["weight"])
    edit = FeatureEdit(live_features(loaded, 3), "zero")
    fresh = run_ablation(adapter, sae, LAYER, texts, edit, weights, "sum", batch_size=4, scope="all")
    kept = prepare_eval_set(adapter, LAYER, texts, 4)
    not_kept = prepare_eval_set(adapter, LAYER, texts, 4, keep_bytes=0)
    assert all(b.hidden is not None for b in kept.batches) and all(b.hidden is None for b in not_kept.batches)
    rows, linear = loaded.decoder(LAYER)
    for evalset in (kept, not_kept, kept):
        again = run_ablation(adapter, sae, LAYER, evalset, edit, weights, "sum", directions=rows, linear=linear,
                             scope="all")
        assert np.array_equal(again.text_index, fresh.text_index)
        np.testing.assert_allclose(again.before, fresh.before, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(again.delta, fresh.delta, rtol=1e-3, atol=1e-9)  # the tiny RM's scores are ~1e-2
        np.testing.assert_allclose(again.predicted, fresh.predicted, rtol=1e-4, atol=1e-7)
    assert np.abs(fresh.delta).min() > 1e-5 and np.abs(fresh.predicted).max() > 1e-4
    with pytest.raises(ValueError, match="prepared at layer"):
        run_ablation(adapter, sae, LAYER - 1, kept, edit, weights, "sum")


def test_an_edit_of_the_texts_own_tokens_leaves_special_tokens_as_they_are(tiny_run):
    """At the tiny BERT's last block the head reads [CLS] only: zeroing features on the text's
    own tokens cannot move the score there, zeroing them on every token can."""
    _, loaded = tiny_run
    adapter, sae = loaded.adapter, loaded.sae(LAYER)
    texts = ["a truly wonderful and moving film", "the plot was dull and the acting awful"]
    weights = np.asarray(store.layer_vectors(loaded.store_path, LAYER)["weight"])
    edit = FeatureEdit(live_features(loaded, 3), "zero")
    text_only = run_ablation(adapter, sae, LAYER, texts, edit, weights, "mean")
    everywhere = run_ablation(adapter, sae, LAYER, texts, edit, weights, "mean", scope="all")
    assert np.abs(text_only.delta).max() < 1e-6 < np.abs(everywhere.delta).max()
    with pytest.raises(ValueError, match="tokens must be one of"):
        run_ablation(adapter, sae, LAYER, texts, edit, weights, "mean", scope="special")


def test_steering_along_a_decoder_direction_moves_the_hidden_state_by_it(tiny_run):
    _, loaded = tiny_run
    sae = loaded.sae(LAYER)
    feature = live_features(loaded, 1)
    hidden = torch.randn(2, 4, sae.cfg.d_in)
    new, _, _ = edit_hidden(sae, hidden, FeatureEdit(feature, "steer", 2.5))
    assert torch.allclose(new - hidden, (2.5 * sae.W_dec[feature[0]]).expand_as(hidden), atol=1e-5)


def test_control_features_are_distinct_and_of_similar_frequency():
    freq = np.linspace(0, 1, 200)
    chosen = (10, 100, 190)
    control = control_features(freq, chosen, seed=1, pool=5)
    assert len(set(control)) == 3 and not set(control) & set(chosen)
    assert all(abs(freq[c] - freq[f]) <= 5 / 199 + 1e-9 for c, f in zip(control, chosen))


def test_confidence_interval_covers_the_mean():
    ci = mean_with_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    assert ci["mean_delta"] == 2.5 and ci["ci_low"] < 2.5 < ci["ci_high"]
    assert mean_with_ci(np.array([1.0]))["ci_low"] is None


def test_worker_runs_an_ablation_job_end_to_end(tiny_run, monkeypatch):
    settings, loaded = tiny_run
    partials = []
    publish = jobs.publish_partial
    monkeypatch.setattr(jobs, "publish_partial", lambda *a: partials.append(a[3]) or publish(*a))
    chosen = list(live_features(loaded, 4))
    job = jobs.submit(settings, "ablation", {"run_id": loaded.run_id, "layer": LAYER, "features": chosen,
                                             "mode": "zero", "n_texts": 40, "tokens": "all"},
                       author="tester", run_id=loaded.run_id)
    worker = Worker(settings, lease_s=10)
    worker.cache = RunCache(settings)
    assert worker.run_one() is True
    done = jobs.get(settings, job["id"])
    assert done["status"] == "done", done["error"]
    result = done["result"]
    assert result["summary"]["n"] == 40 and len(result["examples"]) == 40
    deltas = [e["after"] - e["before"] for e in result["examples"]]
    assert result["summary"]["mean_delta"] == pytest.approx(np.mean(deltas))
    assert len(result["controls"]) == 10  # ten frequency-matched draws by default, each as large as the choice
    for control in result["controls"]:
        assert len(control["features"]) == 4 and not set(control["features"]) & set(chosen)
    draw_means = [c["summary"]["mean_delta"] for c in result["controls"]]
    assert result["control"]["draw_means"] == pytest.approx(draw_means)
    test = result["control"]["test"]
    per_read = np.array(deltas) - np.mean([c["deltas"] for c in result["controls"]], axis=0)
    assert test["difference"] == pytest.approx(per_read.mean()) and 0 <= test["p_value"] <= 1
    # the verdict: beyond controls only when no draw reaches the chosen effect (in its direction)
    chosen_effect = abs(np.mean(deltas))
    sign = -1 if np.mean(deltas) < 0 else 1
    reached = sum(sign * m >= chosen_effect for m in draw_means)
    assert result["control"]["reached_by"] == reached
    if reached:
        assert result["control"]["verdict"] == "within_controls"
    # the chosen features' result was on the page before the controls ran: no controls, 10 pending
    (first,) = partials
    assert first["controls_pending"] == 10 and first["controls"] == [] and first["control"]["n_draws"] == 0
    assert first["summary"] == result["summary"] and first["control"]["verdict"] == "too_few_controls"
    # the first-order prediction beside the regression's, and the summary where the features fire
    assert result["summary"]["attribution_mean_delta"] == pytest.approx(np.mean([e["attributed"] for e in result["examples"]]))
    fired = [e for e in result["examples"] if e["fired"]]
    assert result["where_fired"]["summary"]["n"] == len(fired) > 0
    assert result["where_fired"]["summary"]["mean_delta"] == pytest.approx(np.mean([e["after"] - e["before"] for e in fired]))
    assert worker.run_one() is False  # nothing left


def test_worker_runs_a_custom_text_job(tiny_run):
    settings, loaded = tiny_run
    features = list(live_features(loaded, 3))
    job = jobs.submit(settings, "inference", {"run_id": loaded.run_id, "layer": LAYER, "text": "what a great movie",
                                              "features": features,
                                              "edit": {"features": features[:1], "mode": "zero", "tokens": "all"}},
                      author="tester", run_id=loaded.run_id)
    text_only = jobs.submit(settings, "inference", {"run_id": loaded.run_id, "layer": LAYER, "text": "what a great movie",
                                                    "features": features, "edit": {"features": features[:1], "mode": "zero"}},
                            author="tester", run_id=loaded.run_id)
    worker = Worker(settings)
    worker.run_one(), worker.run_one()
    result = jobs.get(settings, job["id"])["result"]
    assert result["tokens"][0] == "[CLS]" and len(result["acts"][str(features[0])]) == len(result["tokens"])
    assert result["edit"]["reward_before"] == pytest.approx(result["reward"], abs=1e-5)
    assert all(a == 0 for a in result["edit"]["acts_after"][str(features[0])])
    # by default zeroed on the text's own tokens: [CLS] and [SEP] keep their activation
    by_default = jobs.get(settings, text_only["id"])["result"]
    special = [i for i, t in enumerate(by_default["tokens"]) if t in ("[CLS]", "[SEP]")]
    after, before = by_default["edit"]["acts_after"][str(features[0])], by_default["acts"][str(features[0])]
    assert special == [0, len(after) - 1] and all(a == 0 for i, a in enumerate(after) if i not in special)
    assert all(after[i] == pytest.approx(before[i]) for i in special)
    # the first-order prediction: gradient at the layer . the edit's change of the layer output
    adapter, sae = loaded.adapter, loaded.sae(LAYER)
    batch = adapter.tokenize(["what a great movie"])
    _, hidden, grads = forward_with_gradients(adapter, batch, [LAYER])
    acts = sae.encode(hidden[LAYER][0].float()).detach()
    f = features[0]
    expected = -float((acts[:, f] * (grads[LAYER][0] @ decoder_directions(sae)[f])).sum())
    assert result["edit"]["attribution_delta"] == pytest.approx(expected, abs=1e-5)

"""One text's score decomposed over a layer's SAE features (workers/text_attribution.py), on
the tiny random reward model: integrated gradients are complete up to a residual that
shrinks with the steps, the first-order mode is activation x gradient, and tokens left as
they are contribute nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_ablation import tiny_run  # noqa: F401  (module fixture: a tiny pipeline run, layers 0 and 2)
from tests.test_pipeline import tiny_world  # noqa: F401  (module fixture)
from workers.analyze import forward_with_gradients
from workers.sae_ops import decoder_directions, linear_decoder
from workers.text_attribution import (_feature_gradient, attribute_text, attribution_result, diff_attributions,
                                      what_was_read)

# The first block: at the last one (2) only [CLS] reaches this classifier's head, and the
# text's own tokens contribute nothing there.
LAYER = 0
TEXTS = ["a truly wonderful and moving film", "the plot was dull and the acting awful, not good at all"]


@pytest.mark.parametrize("text", TEXTS)
def test_contributions_add_up_to_the_score_minus_the_zeroed_score(tiny_run, text):  # noqa: F811
    _, loaded = tiny_run
    unrefined = float("inf")  # no residual is large enough to be integrated again
    coarse = attribute_text(loaded.adapter, loaded.sae(LAYER), LAYER, text, steps=2, tolerance=unrefined)
    fine = attribute_text(loaded.adapter, loaded.sae(LAYER), LAYER, text, steps=32, tolerance=unrefined)
    gap = fine.score - fine.baseline
    assert abs(gap) > 1e-8, "zeroing the layer's features must move the score for the test to mean anything"
    assert abs(fine.residual) <= 0.05 * abs(gap), (fine.residual, gap)
    assert abs(fine.residual) <= abs(coarse.residual) + 1e-6  # more steps, closer to complete
    assert (fine.score, fine.baseline) == pytest.approx((coarse.score, coarse.baseline))
    assert fine.per_token().sum() == pytest.approx(fine.contributions.sum(), rel=1e-5)
    top = fine.top_features(5)
    assert top and abs(top[0]["contribution"]) >= abs(top[-1]["contribution"])


def test_special_tokens_are_left_as_they_are(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    result = attribute_text(loaded.adapter, loaded.sae(LAYER), LAYER, TEXTS[0], steps=4)
    special = {i for i, t in enumerate(result.tokens) if t in loaded.adapter.tokenizer.all_special_tokens}
    assert special and all(not result.contributions[i].any() for i in special)
    assert any(result.contributions[i].any() for i in range(len(result.tokens)) if i not in special)
    everywhere = attribute_text(loaded.adapter, loaded.sae(LAYER), LAYER, TEXTS[0], steps=4, scope="all")
    assert any(everywhere.contributions[i].any() for i in special)


def test_first_order_mode_is_activation_times_gradient(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    adapter, sae = loaded.adapter, loaded.sae(LAYER)
    result = attribute_text(adapter, sae, LAYER, TEXTS[1], steps=0)
    batch = adapter.tokenize([TEXTS[1]])
    _, hidden, grads = forward_with_gradients(adapter, batch, [LAYER])
    acts = sae.encode(hidden[LAYER][0].float()).detach()
    by_hand = acts * (grads[LAYER][0].float() @ decoder_directions(sae).T)
    content = ~torch.isin(batch.input_ids[0], torch.tensor(sorted(adapter.tokenizer.all_special_ids)))
    expected = (by_hand * content.unsqueeze(1)).numpy()
    assert np.allclose(result.contributions, expected, atol=1e-5)


def test_the_decoder_shortcut_gives_autograd_s_gradient(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    adapter, sae = loaded.adapter, loaded.sae(LAYER)
    batch = adapter.tokenize([TEXTS[0]])
    _, captured = adapter.run(batch, capture=[LAYER], need_score=False)
    h = captured[LAYER][0].float()
    f = sae.encode(h).detach()
    full = (sae.decode(f) - sae.decode(torch.zeros_like(f))).detach()
    rows = linear_decoder(sae)
    assert rows is not None  # TopK decodes linearly: the fast path is the one the pipeline's SAEs take
    through_rows = _feature_gradient(adapter, sae, batch, LAYER, h, f, full, [0.3, 0.8], [1.0, 1.0], rows)
    through_decode = _feature_gradient(adapter, sae, batch, LAYER, h, f, full, [0.3, 0.8], [1.0, 1.0], None)
    assert torch.allclose(through_rows, through_decode, atol=1e-5)
    one_by_one = sum(_feature_gradient(adapter, sae, batch, LAYER, h, f, full, [a], [1.0], rows) for a in (0.3, 0.8))
    assert torch.allclose(through_rows, one_by_one, atol=1e-5)  # the batched path is the sum of its points
    weighted = _feature_gradient(adapter, sae, batch, LAYER, h, f, full, [0.3, 0.8], [0.25, 0.75], rows)
    by_point = [_feature_gradient(adapter, sae, batch, LAYER, h, f, full, [a], [1.0], rows) for a in (0.3, 0.8)]
    assert torch.allclose(weighted, 0.25 * by_point[0] + 0.75 * by_point[1], atol=1e-5)


def test_a_residual_above_the_tolerance_is_integrated_again(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    sae = loaded.sae(LAYER)
    plain = attribute_text(loaded.adapter, sae, LAYER, TEXTS[1], steps=1, tolerance=float("inf"))
    assert plain.steps_used == 1
    gap = plain.score - plain.baseline
    assert abs(plain.residual) > 1e-4 * abs(gap), "one point must leave a residual for this test to mean anything"
    refined = attribute_text(loaded.adapter, sae, LAYER, TEXTS[1], steps=1, tolerance=1e-4, max_steps=64)
    assert refined.steps_used > 1 and (abs(refined.residual) <= 1e-4 * abs(gap) or refined.steps_used == 64)
    assert abs(refined.residual) < abs(plain.residual)
    capped = attribute_text(loaded.adapter, sae, LAYER, TEXTS[1], steps=1, tolerance=0.0, max_steps=4)
    assert capped.steps_used == 4  # doubled up to the cap, not beyond


def test_the_page_s_summary_adds_up_and_lists_each_token_s_features(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    a = attribute_text(loaded.adapter, loaded.sae(LAYER), LAYER, TEXTS[0])
    page = attribution_result(a, top=5, per_token=3)
    assert page["tokens"] == a.tokens and len(page["per_token"]) == len(a.tokens) == len(page["token_features"])
    assert sum(page["per_token"]) == pytest.approx(page["total"], rel=1e-4)
    assert page["score"] - page["baseline"] - page["total"] == pytest.approx(page["residual"], abs=1e-6)
    assert page["residual_share"] == pytest.approx(abs(a.residual) / abs(a.score - a.baseline))
    totals = a.contributions.sum(0)
    assert [f["feature"] for f in page["features"]] == [int(f) for f in np.argsort(-np.abs(totals))[:5]]
    for f in page["features"]:
        assert f["peak"] == pytest.approx(float(a.activations[:, f["feature"]].max()), rel=1e-5)
    for t, listed in enumerate(page["token_features"]):
        assert len(listed) <= 3 and all(a.activations[t, x["feature"]] > 0 for x in listed)
        assert [abs(x["contribution"]) for x in listed] == sorted((abs(x["contribution"]) for x in listed), reverse=True)
        assert x_contributions_match(a, t, listed)


def x_contributions_match(a, t: int, listed: list[dict]) -> bool:
    return all(x["contribution"] == pytest.approx(float(a.contributions[t, x["feature"]]), rel=1e-5, abs=1e-9)
               for x in listed)


def test_a_long_text_says_where_it_was_cut(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    adapter = loaded.adapter
    short = what_was_read(adapter, TEXTS[0])
    assert not short["cut"] and short["cut_at_char"] is None and short["n_tokens"] == short["n_tokens_full"]
    long_text = " ".join(["wonderful film"] * adapter.max_length)
    read = what_was_read(adapter, long_text)
    assert read["cut"] and read["n_tokens"] == adapter.max_length < read["n_tokens_full"]
    kept = long_text[:read["cut_at_char"]]
    # what was read is exactly the model's truncated input, less its special tokens
    truncated = adapter.tokenize([long_text]).input_ids[0].tolist()
    assert adapter.tokenizer(kept)["input_ids"] == truncated
    assert 0 < read["cut_at_char"] < len(long_text)


def test_a_diff_names_the_features_that_changed_and_aligns_the_tokens(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    sae = loaded.sae(LAYER)
    a = attribute_text(loaded.adapter, sae, LAYER, "the film was good")
    b = attribute_text(loaded.adapter, sae, LAYER, "the film was awful")
    diff = diff_attributions(a, b, top=4)
    assert diff["score_change"] == pytest.approx(b.score - a.score)
    change = b.contributions.sum(0) - a.contributions.sum(0)
    assert [c["feature"] for c in diff["changed"]] == [int(f) for f in np.argsort(-np.abs(change))[:4]]
    assert diff["contribution_change"] == pytest.approx(float(change.sum()), rel=1e-5)
    ops = diff["alignment"]
    assert [o["op"] for o in ops] == ["equal", "replace", "equal"]  # [CLS] the film was | good/awful | [SEP]
    assert ops[1]["a"] == ops[1]["b"] == [4, 5] and a.tokens[4] != b.tokens[4]

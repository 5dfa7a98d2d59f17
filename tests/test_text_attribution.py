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
from workers.text_attribution import _feature_gradient, attribute_text

# The first block: at the last one (2) only [CLS] reaches this classifier's head, and the
# text's own tokens contribute nothing there.
LAYER = 0
TEXTS = ["a truly wonderful and moving film", "the plot was dull and the acting awful, not good at all"]


@pytest.mark.parametrize("text", TEXTS)
def test_contributions_add_up_to_the_score_minus_the_zeroed_score(tiny_run, text):  # noqa: F811
    _, loaded = tiny_run
    coarse = attribute_text(loaded.adapter, loaded.sae(LAYER), LAYER, text, steps=2)
    fine = attribute_text(loaded.adapter, loaded.sae(LAYER), LAYER, text, steps=32)
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
    through_rows = _feature_gradient(adapter, sae, batch, LAYER, h, f, full, [0.3, 0.8], rows)
    through_decode = _feature_gradient(adapter, sae, batch, LAYER, h, f, full, [0.3, 0.8], None)
    assert torch.allclose(through_rows, through_decode, atol=1e-5)
    one_by_one = sum(_feature_gradient(adapter, sae, batch, LAYER, h, f, full, [a], rows) for a in (0.3, 0.8))
    assert torch.allclose(through_rows, one_by_one, atol=1e-5)  # the batched path is the sum of its points

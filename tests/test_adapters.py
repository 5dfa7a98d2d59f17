"""The seq-cls adapter: hooks capture HF hidden states, edits change the score, early stop."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import save_tiny_bert
from workers.adapters import load_adapter


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    path = save_tiny_bert(tmp_path_factory.mktemp("m") / "bert", n_layers=3)
    return load_adapter("seq_cls", str(path), torch.device("cpu"), max_length=32)


TEXTS = ["The film was wonderful.", "I hated the ending, but the score was lovely and moving."]


def test_hooks_capture_hf_hidden_states_in_one_pass(tiny_adapter):
    batch = tiny_adapter.tokenize(TEXTS)
    scores, captured = tiny_adapter.run(batch, capture=[0, 2])
    out = tiny_adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    assert torch.allclose(scores, out.logits[:, 0], atol=1e-5)
    for layer in (0, 2):
        assert torch.allclose(captured[layer], out.hidden_states[layer + 1], atol=1e-5)
    assert batch.reward_index.tolist() == [[0, 0], [1, 0]]  # BERT reads [CLS]
    assert (batch.token_segment[batch.attention_mask.bool()] >= 0).all()
    assert (batch.token_segment[~batch.attention_mask.bool()] == -1).all()


def test_stop_after_deepest_layer_skips_the_score(tiny_adapter):
    batch = tiny_adapter.tokenize(TEXTS)
    calls = []
    handle = tiny_adapter.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        scores, captured = tiny_adapter.run(batch, capture=[1], need_score=False)
    finally:
        handle.remove()
    assert scores is None and set(captured) == {1} and calls == []


def test_layer_edit_changes_the_score(tiny_adapter):
    batch = tiny_adapter.tokenize(TEXTS)
    before, _ = tiny_adapter.run(batch)
    after, captured = tiny_adapter.run(batch, capture=[1], edits={1: lambda h: h * 0})
    assert torch.count_nonzero(captured[1]) == 0
    assert not torch.allclose(before, after)
    again, _ = tiny_adapter.run(batch)  # hooks are removed afterwards
    assert torch.allclose(before, again)


@pytest.mark.integration
def test_real_minilm_hidden_states_match_hooks():
    """The embedded MiniLM: layer L's hook equals HF hidden_states[L + 1]."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from workers.adapters.seq_cls import SequenceClassifierAdapter
    from workers.demo_model import base_model_path

    path = base_model_path()
    model = BertForSequenceClassification.from_pretrained(path, num_labels=1)
    adapter = SequenceClassifierAdapter(model, AutoTokenizer.from_pretrained(path), torch.device("cpu"), 64)
    assert adapter.n_layers == 6 and adapter.d_model == 384
    batch = adapter.tokenize(TEXTS)
    _, captured = adapter.run(batch, capture=[0, 3, 5])
    out = adapter.model.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    for layer in (0, 3, 5):
        assert torch.allclose(captured[layer], out.hidden_states[layer + 1], atol=1e-4)

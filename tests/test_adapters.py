"""Adapters for every reward-model family, on tiny random models: where each reward is read,
that the score is the model's own, and that hooks capture / edit / stop in one pass."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import save_tiny_bert, save_tiny_bert_token_classifier, save_tiny_decoder
from workers.adapters import load_adapter
from workers.demo_corpus import vader_reward

CPU = torch.device("cpu")
TEXTS = ["The film was wonderful.", "I hated the ending, but the score was lovely and moving."]
STEP_TEXTS = ["first we add ; then we divide ; so the answer is 4 ;", "guess ; tail without a separator"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    return {
        "bert": save_tiny_bert(root / "bert", n_layers=3),
        "gpt2": save_tiny_decoder(root / "gpt2", "gpt2", "seq_cls"),
        "llama": save_tiny_decoder(root / "llama", "llama", "seq_cls", padding_side="left"),
        "llama_lm": save_tiny_decoder(root / "llama-lm", "llama", "causal_lm", padding_side="left"),
        "gpt2_lm": save_tiny_decoder(root / "gpt2-lm", "gpt2", "causal_lm"),
        "token_cls": save_tiny_bert_token_classifier(root / "tok1", num_labels=1),
        "token_cls2": save_tiny_bert_token_classifier(root / "tok2", num_labels=2),
    }


@pytest.fixture(scope="module")
def tiny_adapter(models):
    return load_adapter("seq_cls", str(models["bert"]), CPU, max_length=32)


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


# -- sequence classifiers with a decoder body: the head reads the last non-pad token ----------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_classifier_reads_where_its_head_reads(models, family):
    adapter = load_adapter("seq_cls", str(models[family]), CPU, max_length=32)
    assert adapter.reads_last_token
    batch = adapter.tokenize(TEXTS)
    mask = batch.attention_mask
    assert mask[0].sum() < mask[1].sum()  # the short text is padded
    scores, captured = adapter.run(batch, capture=[0, 1, 2])
    body = adapter.model.base_model(input_ids=batch.input_ids, attention_mask=mask, output_hidden_states=True)
    rows, positions = batch.reward_index.unbind(1)
    assert (mask[rows, positions] == 1).all()
    # the score is the head applied at exactly the read position, and no other
    head_at_read = adapter.model.score(body.last_hidden_state[rows, positions])[:, 0]
    assert torch.allclose(scores, head_at_read, atol=1e-5)
    assert torch.allclose(scores, adapter.model(input_ids=batch.input_ids, attention_mask=mask).logits[:, 0], atol=1e-5)
    for layer in (0, 1):  # the last entry of hidden_states has the final norm applied
        assert torch.allclose(captured[layer], body.hidden_states[layer + 1], atol=1e-5)
    if family == "llama":  # left padding: the read is the last column for every text
        assert positions.tolist() == [batch.input_ids.shape[1] - 1] * 2
    else:
        assert positions.tolist() == (mask.sum(1) - 1).tolist()


def test_decoder_classifier_edit_and_early_stop(models):
    adapter = load_adapter("seq_cls", str(models["llama"]), CPU, max_length=32)
    batch = adapter.tokenize(TEXTS)
    before, _ = adapter.run(batch)
    after, _ = adapter.run(batch, edits={1: lambda h: h * 0})
    assert not torch.allclose(before, after)
    scores, captured = adapter.run(batch, capture=[0], need_score=False)
    assert scores is None and set(captured) == {0}


# -- process reward models: one read per step, at its separator --------------------------------

def _step_token(adapter, row: int, position: int) -> str:
    return adapter.tokenizer.convert_ids_to_tokens(int(adapter.tokenize(STEP_TEXTS).input_ids[row, position]))


@pytest.mark.parametrize("family", ["llama_lm", "gpt2_lm"])
def test_process_lm_scores_each_step_at_its_separator(models, family):
    adapter = load_adapter("process", str(models[family]), CPU, max_length=64, step_separator=" ;")
    assert adapter.head == "lm"
    batch = adapter.tokenize(STEP_TEXTS)
    reads = batch.reward_index.tolist()
    assert [row for row, _ in reads] == [0, 0, 0, 1]  # three steps, then one (the tail is no step)
    assert all(_step_token(adapter, row, pos) == ";" for row, pos in reads)
    scores, captured = adapter.run(batch, capture=[1])
    logits = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows, positions = batch.reward_index.unbind(1)
    good, bad = adapter.tokenizer.convert_tokens_to_ids(["+", "-"])
    expected = logits[rows, positions][:, [good, bad]].softmax(-1)[:, 0]
    assert torch.allclose(scores, expected, atol=1e-5)
    assert ((scores > 0) & (scores < 1)).all()
    # segments: each step owns its tokens up to and including its separator
    segment = batch.token_segment
    for read, (row, pos) in enumerate(reads):
        assert segment[row, pos] == read
        assert segment[row, pos + 1] != read
    tail = segment[1][batch.attention_mask[1].bool()]
    assert (tail[-3:] == -1).all()  # "tail without a separator": no read covers it
    assert set(captured) == {1}


def test_process_token_classifier_reads_label_at_separator(models):
    for name, labels in (("token_cls", 1), ("token_cls2", 2)):
        adapter = load_adapter("process", str(models[name]), CPU, max_length=64, step_separator=" ;")
        assert adapter.head == "token_classification"
        batch = adapter.tokenize(STEP_TEXTS)
        scores, _ = adapter.run(batch)
        logits = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rows, positions = batch.reward_index.unbind(1)
        at = logits[rows, positions]
        expected = at[:, 0] if labels == 1 else at.softmax(-1)[:, 1]
        assert torch.allclose(scores, expected, atol=1e-5)


def test_process_separators_beyond_truncation_are_not_read(models):
    text = "one ; two ; " + "filler " * 40 + "; three ;"
    adapter = load_adapter("process", str(models["token_cls"]), CPU, max_length=16, step_separator=" ;")
    with pytest.warns(UserWarning, match="no step separator"):
        batch = adapter.tokenize([text, "no separator at all here"])
    assert batch.reward_index.tolist()[:2] == [[0, 2], [0, 4]]
    assert [row for row, _ in batch.reward_index.tolist()] == [0, 0, 1]
    # a text with no separator in view is read once, at its last token, covering all of it
    last = int(batch.attention_mask[1].sum()) - 1
    assert batch.reward_index.tolist()[2] == [1, last]


def test_process_whitespace_separator_reads_step_end(models):
    """A separator the tokenizer drops ("\\n") puts the read on the step's last token."""
    adapter = load_adapter("process", str(models["token_cls"]), CPU, max_length=64, step_separator="\n")
    batch = adapter.tokenize(["add two\n\ndivide\nanswer four\n"])
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch.input_ids[0])
    assert [tokens[p] for _, p in batch.reward_index.tolist()] == ["two", "divide", "four"]


def test_process_slow_tokenizer_finds_separator_by_id(models):
    from transformers import BertTokenizer

    fast = load_adapter("process", str(models["token_cls"]), CPU, max_length=64, step_separator=";")
    slow = type(fast)(fast.model, BertTokenizer.from_pretrained(str(models["token_cls"])), CPU, 64, step_separator=";")
    assert not slow.needs_offsets
    assert slow.tokenize(STEP_TEXTS).reward_index.tolist() == fast.tokenize(STEP_TEXTS).reward_index.tolist()
    with pytest.raises(ValueError, match="model.step_separator"):
        type(fast)(fast.model, slow.tokenizer, CPU, 64, step_separator="two tokens")


def test_process_good_token_must_be_one_token(models):
    with pytest.raises(ValueError, match="model.good_token"):
        load_adapter("process", str(models["llama_lm"]), CPU, 64, good_token="very good")


# -- causal LM + reward function -------------------------------------------------------------

def test_causal_lm_vader_reward_read_at_last_token(models):
    adapter = load_adapter("causal_lm", str(models["llama_lm"]), CPU, max_length=32)
    batch = adapter.tokenize(TEXTS)
    positions = batch.reward_index[:, 1]
    assert positions.tolist() == [batch.input_ids.shape[1] - 1] * 2  # left padded
    scores, captured = adapter.run(batch, capture=[0, 2])
    assert scores.tolist() == pytest.approx([vader_reward(t) for t in TEXTS])
    assert scores[0] > 0 and scores[1] != scores[0]
    hidden = adapter.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      output_hidden_states=True).hidden_states
    assert torch.allclose(captured[0], hidden[1], atol=1e-5)
    # edits change the activations downstream but not a reward computed from the text
    edited, after = adapter.run(batch, capture=[2], edits={1: lambda h: h * 0})
    assert torch.allclose(edited, scores) and not torch.allclose(after[2], captured[2])
    assert adapter.score_from_model is False


def test_causal_lm_vader_sees_only_the_visible_text(models):
    adapter = load_adapter("causal_lm", str(models["gpt2_lm"]), CPU, max_length=8)
    text = "plain words here and there wonderful wonderful wonderful"
    scores, _ = adapter.run(adapter.tokenize([text]))
    visible = "plain words here and there wonderful"  # 8 tokens with [CLS] and [SEP]
    assert float(scores[0]) == pytest.approx(vader_reward(visible))
    assert 0 < vader_reward(visible) < vader_reward(text)  # the other lexicon words were cut off


def test_causal_lm_dataset_reward(models):
    adapter = load_adapter("causal_lm", str(models["gpt2_lm"]), CPU, max_length=32, reward_function="dataset")
    scores, _ = adapter.run(adapter.tokenize(TEXTS, rewards=[2.5, -1.0]))
    assert scores.tolist() == [2.5, -1.0]
    with pytest.raises(ValueError, match="dataset.reward_column"):
        adapter.run(adapter.tokenize(TEXTS))
    adapter.use_dataset_rewards(TEXTS, [0.5, 7.0])  # any stage scoring corpus texts finds them
    scores, _ = adapter.run(adapter.tokenize(TEXTS[::-1]))
    assert scores.tolist() == [7.0, 0.5]


@pytest.mark.parametrize("kind, name", [("seq_cls", "bert"), ("seq_cls", "gpt2"), ("seq_cls", "llama"),
                                        ("process", "llama_lm"), ("process", "gpt2_lm"), ("process", "token_cls2")])
def test_running_from_a_layer_equals_the_full_forward(models, kind, name):
    """run_from(batch, L, h) runs only the blocks above L: with h captured it gives the clean
    score, with h edited the score `run` gives under the same edit."""
    options = {"step_separator": " ;"} if kind == "process" else {}
    adapter = load_adapter(kind, str(models[name]), CPU, max_length=64, **options)
    batch = adapter.tokenize(STEP_TEXTS if kind == "process" else TEXTS)
    blocks = list(adapter.blocks)
    shift = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    for layer in range(adapter.n_layers):
        clean, captured = adapter.run(batch, capture=[layer])
        assert torch.allclose(adapter.run_from(batch, layer, captured[layer]), clean, atol=1e-5)

        def edit(hidden):
            return hidden * 3.0 + 5.0 * shift

        edited, _ = adapter.run(batch, edits={layer: edit})
        assert (edited - clean).abs().max() > 1e-4  # the edit matters, so the comparison below means something
        assert torch.allclose(adapter.run_from(batch, layer, edit(captured[layer])), edited, atol=1e-5)
    assert all(a is b for a, b in zip(adapter.blocks, blocks))  # every block is back in its place


@pytest.mark.parametrize("kind, name", [("seq_cls", "bert"), ("seq_cls", "llama"), ("process", "gpt2_lm"),
                                        ("process", "token_cls2")])
def test_selected_rows_of_a_batch_score_as_the_originals(models, kind, name):
    """batch.select(rows) (repeats allowed) keeps each row's reward reads, in reads_of order:
    many edits of the same texts can run as one forward."""
    options = {"step_separator": " ;"} if kind == "process" else {}
    adapter = load_adapter(kind, str(models[name]), CPU, max_length=64, **options)
    batch = adapter.tokenize(STEP_TEXTS if kind == "process" else TEXTS)
    rows = torch.tensor([1, 0, 1])
    full, _ = adapter.run(batch)
    picked, _ = adapter.run(batch.select(rows))
    read_ids = torch.cat(batch.reads_of(rows))
    assert len(picked) == len(read_ids) > len(rows) - 1
    assert torch.allclose(picked, full[read_ids], atol=1e-5)
    segment = batch.select(rows).token_segment
    assert set(segment[segment >= 0].tolist()) == set(range(len(read_ids)))  # every read keeps its tokens


def test_unknown_adapter_kind_names_the_key(models):
    with pytest.raises(ValueError, match="model.adapter"):
        load_adapter("mystery", str(models["bert"]), CPU, 32)


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


def test_family_keys_are_checked_in_the_config():
    from backend.core.run_config import ConfigError, parse_config

    base = {"name": "x", "dataset": {"source": "demo"}, "layers": [0]}
    with pytest.raises(ConfigError, match="model.reward_function is only read by adapter 'causal_lm'"):
        parse_config({**base, "model": {"path": "m", "reward_function": "dataset"}})
    with pytest.raises(ConfigError, match="model.good_token"):
        parse_config({**base, "model": {"path": "m", "adapter": "causal_lm", "good_token": "+"}})
    with pytest.raises(ConfigError, match="must differ"):
        parse_config({**base, "model": {"path": "m", "adapter": "process", "good_token": "-"}})
    config = parse_config({**base, "model": {"path": "m", "adapter": "process", "step_separator": " ки"},
                           "dataset": {"source": "hf:org/data", "split": "test"}}, base_dir=None)
    assert config.model.step_separator == " ки" and config.dataset.source == "hf:org/data"
    relative = parse_config({**base, "model": {"path": "m"}, "dataset": {"source": "hf:org/data"}}, base_dir=Path("/x"))
    assert relative.dataset.source == "hf:org/data"  # a hub id is not a path next to the config

"""Attention sinks (workers/sinks.py): measured per layer, left out of SAE training and every
feature read, reported per layer; on a tiny LLaMA whose first token ([CLS]) is made a sink by
an embedding row far larger than every other."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch

from backend.core import db
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import make_client
from tests.tiny_models import save_tiny_decoder
from workers.collect import activation_stream, shuffled_batches
from backend.core.run_config import parse_config
from workers.sinks import NO_RULE, SinkReport, SinkRule, with_sink_rule

SINK_SCALE = 2000.0
N_TEXTS = 120


def planted_sink_model(path):
    """A tiny LLaMA RM whose [CLS] embedding (always position 0 with the MiniLM tokenizer) is
    SINK_SCALE times larger: its residual norm stands out at every layer, as a real sink does."""
    from transformers import AutoModelForSequenceClassification

    save_tiny_decoder(path, "llama", "seq_cls")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[101] *= SINK_SCALE  # [CLS]
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from workers.demo_corpus import generate_corpus, vader_reward

    root = tmp_path_factory.mktemp("sinks")
    model = planted_sink_model(root / "tiny-llama")
    dataset = root / "reviews.jsonl"
    dataset.write_text("".join(json.dumps({"text": t, "reward": vader_reward(t)}) + "\n"
                               for t in generate_corpus(N_TEXTS, seed=3)))
    return model, dataset


def config_for(world, **overrides):
    model, dataset = world
    return parse_config({
        "name": "sinks", "model": {"path": str(model), "max_length": 32},
        "dataset": {"source": str(dataset), "batch_size": 32}, "layers": [0, 2],
        "sae": {"width": 32, "k": 4, "training_tokens": 2048, "batch_size": 256, "buffer_tokens": 512},
        "analysis": {"n_contexts": 5, "ranked_texts": 10, "reward_effect_texts": 64},
        "effects": {"candidates": 4, "texts_per_feature": 4, "pool_texts": 16, "faithfulness_texts": 8},
        "regression": {"pooling": "mean"}, **overrides})


def test_rule_keeps_tokens_up_to_its_threshold_and_no_rule_keeps_all():
    hidden = torch.tensor([[3.0, 4.0], [30.0, 40.0], [0.0, 0.0]])  # norms 5, 50, 0
    assert SinkRule(10.0).kept(hidden).tolist() == [True, False, True]
    assert NO_RULE.kept(hidden).all()


def test_rule_survives_a_save_and_an_sae_saved_without_one_reads_every_token(tmp_path):
    SinkRule(12.5, 1.25).save(tmp_path)
    assert SinkRule.load(tmp_path) == SinkRule(12.5, 1.25)
    assert SinkRule.load(tmp_path / "missing") == NO_RULE


def test_an_sae_under_the_rule_gives_no_features_at_sinks_only():
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=4, d_sae=16, k=4))
    x = torch.randn(6, 4)
    x[2] *= 1000
    plain = sae.encode(x)
    with_sink_rule(sae, SinkRule(float(x[[0, 1, 3, 4, 5]].norm(dim=-1).max()) * 2))
    masked = sae.encode(x)
    assert plain[2].abs().sum() > 0 and masked[2].abs().sum() == 0
    assert torch.equal(masked[[0, 1, 3, 4, 5]], plain[[0, 1, 3, 4, 5]])


def test_shuffle_buffer_serves_whole_batches_when_layers_hold_different_tokens():
    def stream():
        for i in range(30):
            rows = torch.arange(i * 40, (i + 1) * 40, dtype=torch.float32)[:, None]
            yield {"a": rows, "b": rows[rows[:, 0] % 10 != 0]}  # 'b' lost every tenth token

    batches = list(shuffled_batches(stream(), buffer_tokens=256, batch_size=64))
    assert batches and all(b["a"].shape == (64, 1) and b["b"].shape == (64, 1) for b in batches)
    served_b = torch.cat([b["b"][:, 0] for b in batches])
    assert len(served_b.unique()) == len(served_b) and not bool((served_b % 10 == 0).any())


def test_the_rule_is_measured_per_layer_and_the_training_stream_leaves_the_sink_out(world):
    from workers.adapters import adapter_from_config
    from workers.sinks import measure_sink_rules

    config = config_for(world)
    adapter = adapter_from_config(config.model, str(world[0]), torch.device("cpu"))
    texts = [json.loads(line)["text"] for line in world[1].read_text().splitlines()]
    rules = measure_sink_rules(adapter, texts, [0, 2], config.sinks, 32)
    assert all(rule.max_norm == pytest.approx(10 * rule.median_norm) for rule in rules.values())
    batch = adapter.tokenize(texts[:8])
    _, captured = adapter.run(batch, capture=[0, 2], need_score=False)
    for layer in (0, 2):
        sinks = ~rules[layer].kept(captured[layer]) & batch.attention_mask.bool()
        assert sinks[:, 0].all() and not sinks[:, 1:].any()  # exactly position 0 ([CLS]) of every text
    chunk = next(activation_stream(adapter, texts[:8], [0, 2], 8, 0, rules))
    n_real = int(adapter.tokenize(texts[:8]).attention_mask.sum())
    assert all(len(rows) == n_real - 8 for rows in chunk.values())  # one sink per text, left out
    unruled = next(activation_stream(adapter, texts[:8], [0, 2], 8, 0, {layer: NO_RULE for layer in (0, 2)}))
    assert all(len(rows) == n_real for rows in unruled.values())


def test_report_counts_positions_tokens_and_norms():
    report = SinkReport(SinkRule(100.0))
    norms = torch.tensor([500.0, 5.0, 7.0, 450.0, 6.0])
    report.add(norms, norms > 100, torch.tensor([0, 1, 2, 0, 1]), torch.tensor([101, 7, 8, 101, 9]))
    vocab = np.array([f"t{i}" for i in range(102)], dtype=object)
    columns = report.columns(vocab)
    assert columns["sink_count"] == 2 and columns["sink_fraction"] == pytest.approx(0.4)
    assert columns["sink_positions"] == [{"position": 0, "count": 2}]
    assert columns["sink_tokens"] == [{"token": "t101", "count": 2}]
    assert columns["sink_mean_norm"] == pytest.approx(475) and columns["other_mean_norm"] == pytest.approx(6)
    assert columns["other_max_norm"] == pytest.approx(7)


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    from workers.pipeline import run_pipeline

    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    run_pipeline(config_for(world, run_id="ruled"), settings)
    run_pipeline(config_for(world, run_id="unruled", sinks={"rule": "none"}), settings)
    yield settings
    db.dispose_engines()


def layer_rows(settings, run_id):
    con = duckdb.connect(str(settings.run_dir(run_id) / STORE_FILENAME), read_only=True)
    try:
        cur = con.execute("select * from layers order by layer")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()], con.execute(
            "select min(position) from contexts").fetchone()[0]
    finally:
        con.close()


def test_a_run_reports_per_layer_what_the_rule_left_out_and_reads_no_feature_there(runs):
    rows, first_context = layer_rows(runs, "ruled")
    for row in rows:
        assert row["sink_count"] == N_TEXTS  # one [CLS] per text
        assert row["sink_positions"] == [{"position": 0, "count": N_TEXTS}]
        assert row["sink_tokens"] == [{"token": "[CLS]", "count": N_TEXTS}]
        assert row["sink_mean_norm"] > 10 * row["other_max_norm"]
        assert row["other_mean_norm"] < row["sink_max_norm"] < row["sink_mean_norm"]
    assert first_context >= 1  # no context peaks at a sink
    unruled, first_unruled = layer_rows(runs, "unruled")
    assert all(row["sink_count"] == 0 and row["sink_max_norm"] is None for row in unruled)


def test_run_page_and_its_json_twin_say_what_was_left_out(runs):
    client = make_client(runs)
    data = client.get("/api/runs/ruled").json()
    layer = data["layers"][0]
    assert layer["sink_count"] == N_TEXTS and layer["sink_tokens"][0]["token"] == "[CLS]"
    page = client.get("/runs/ruled").text
    assert 'id="sinks"' in page and "[CLS]" in page and f"{N_TEXTS:,}" in page
    assert "no rule" in client.get("/runs/unruled").text


def test_later_passes_come_from_the_cache_and_equal_a_stream_without_it(world):
    """With a cache large enough, the stream runs the model once per text, and serves exactly
    what a stream without one serves; a cache too small for one pass runs every pass again."""
    from itertools import islice

    from workers.adapters import adapter_from_config
    from workers.sinks import measure_sink_rules

    config = config_for(world)
    adapter = adapter_from_config(config.model, str(world[0]), torch.device("cpu"))
    texts = [json.loads(line)["text"] for line in world[1].read_text().splitlines()][:24]
    rules = measure_sink_rules(adapter, texts, [0, 2], config.sinks, 32)
    forwards = []
    plain_run = adapter.run
    adapter.run = lambda *a, **k: (forwards.append(1), plain_run(*a, **k))[1]
    n_batches = 3 * 3  # three passes over 24 texts in batches of 8
    cached = list(islice(activation_stream(adapter, texts, [0, 2], 8, 0, rules, cache_bytes=2**30), n_batches))
    assert len(forwards) == 3  # the first pass only
    forwards.clear()
    plain = list(islice(activation_stream(adapter, texts, [0, 2], 8, 0, rules), n_batches))
    assert len(forwards) == n_batches
    for a, b in zip(cached, plain):
        assert a.keys() == b.keys() and all(torch.equal(a[h], b[h]) for h in a)
    forwards.clear()
    list(islice(activation_stream(adapter, texts, [0, 2], 8, 0, rules, cache_bytes=1024), n_batches))
    assert len(forwards) == n_batches

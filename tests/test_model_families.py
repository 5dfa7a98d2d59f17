"""End to end, one tiny run per reward-model family: process RM (one row per step), causal LM
scored by VADER or by the dataset's reward column, and decoder (GPT-2, LLaMA) classifiers."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest

from backend.core import db
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import make_client
from tests.tiny_models import save_tiny_decoder
from backend.core.run_config import ConfigError, parse_config
from workers.demo_corpus import generate_corpus, vader_reward
from workers.pipeline import run_pipeline

SEPARATOR = " ки\n"  # Math-Shepherd style step tag, then a newline
N_TEXTS = 100


def length_reward(text: str) -> float:
    """A dataset reward that no model computes: only the dataset can supply it."""
    return len(text.split()) / 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    texts = generate_corpus(N_TEXTS, seed=5)
    reviews = root / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": t, "reward": length_reward(t)}) + "\n" for t in texts))
    plain = root / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    steps = root / "steps.jsonl"
    step_lists = [[f"step {j}: {part.strip()}" for j, part in enumerate(t.split(",")[:3])] for t in texts]
    steps.write_text("".join(json.dumps({"steps": s}) + "\n" for s in step_lists))
    models = {
        name: save_tiny_decoder(root / name, family, head, n_layers=2, padding_side=side)
        for name, family, head, side in (("gpt2-lm", "gpt2", "causal_lm", "right"),
                                         ("llama-lm", "llama", "causal_lm", "left"),
                                         ("gpt2-cls", "gpt2", "seq_cls", "right"),
                                         ("llama-cls", "llama", "seq_cls", "left"))
    }
    return {"reviews": reviews, "plain": plain, "steps": steps, "step_lists": step_lists, **models}


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    yield Settings(data_dir=tmp_path_factory.mktemp("data"))
    db.dispose_engines()


def run(settings, name, model: dict, dataset, pooling="mean", max_length=48):
    config = parse_config({
        "name": name,
        "model": {"max_length": max_length, **model},
        "dataset": {"source": str(dataset), "batch_size": 32},
        "layers": [0, 1],
        "sae": {"width": 32, "k": 4, "training_tokens": 2048, "batch_size": 256, "buffer_tokens": 512},
        "analysis": {"n_contexts": 3},
        "regression": {"pooling": pooling},
    })
    run_dir = run_pipeline(config, settings)
    return duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)


def test_process_rm_scores_and_regresses_per_step(settings, world):
    con = run(settings, "process", {"path": str(world["llama-lm"]), "adapter": "process",
                                     "step_separator": SEPARATOR, "good_token": "+", "bad_token": "-"}, world["steps"],
              max_length=128)
    assert con.execute("select max(n_tokens) from texts").fetchone()[0] < 128  # no step cut off
    reads = con.execute("select text_id, count(*) from reward_reads group by text_id order by text_id").fetchall()
    assert [n for _, n in reads] == [len(s) for s in world["step_lists"]]  # one read per step
    scores = np.array([s for (s,) in con.execute("select score from reward_reads").fetchall()])
    assert ((scores > 0) & (scores < 1)).all() and scores.std() > 0  # P(good) at each step's tag
    # a text's score is its last step's; the read sits on the tag's last token
    last = con.execute("""select t.score, r.score, t.reward_position, r.position from texts t join reward_reads r
                          using (text_id) where r.position = (select max(position) from reward_reads x
                          where x.text_id = t.text_id)""").fetchall()
    assert len(last) == N_TEXTS and all(a == pytest.approx(b) and p == q for a, b, p, q in last)
    n_train, n_heldout = con.execute("select n_train, n_heldout from layers where layer = 1").fetchone()
    assert n_train + n_heldout == sum(len(s) for s in world["step_lists"])  # regression rows are steps
    assert con.execute("select count(*) from features where weight is null").fetchone()[0] == 0


def test_causal_lm_with_vader_reward(settings, world):
    con = run(settings, "vader", {"path": str(world["gpt2-lm"]), "adapter": "causal_lm"}, world["plain"])
    rows = con.execute("select text, score, reward_position, n_tokens from texts").fetchall()
    assert len(rows) == N_TEXTS
    assert all(score == pytest.approx(vader_reward(text), abs=1e-5) for text, score, _, _ in rows)
    assert all(position == n - 1 for _, _, position, n in rows)  # read at the last token


def test_supplied_reward_runs_end_to_end_and_ranks_features(settings, world):
    con = run(settings, "supplied", {"path": str(world["llama-lm"]), "adapter": "causal_lm",
                                      "reward_function": "dataset"}, world["reviews"], pooling="sum")
    rows = con.execute("select text, reward, score, reward_position, n_tokens from texts").fetchall()
    assert all(score == pytest.approx(length_reward(text)) == reward for text, reward, score, _, _ in rows)
    assert all(position == n - 1 for *_, position, n in rows)  # left padded, still the last token
    # the features are fitted to (and so ranked by) the supplied reward: summed, they carry a length
    r2 = dict(con.execute("select layer, r2_heldout from layers").fetchall())
    assert min(r2.values()) > 0.5
    stored = [f for (f,) in con.execute("select feature from features where layer = 0 order by weight desc, feature").fetchall()]
    with make_client(settings) as client:  # the layer page lists features by their weight on that reward
        listed = [row["feature"] for row in client.get("/api/runs/supplied/layers/0").json()["features"]]
    assert listed[:10] == stored[:10]


def test_dataset_reward_without_a_reward_column_is_rejected(settings, world):
    with pytest.raises(ConfigError, match="model.reward_function"):
        run(settings, "no-rewards", {"path": str(world["gpt2-lm"]), "adapter": "causal_lm",
                                     "reward_function": "dataset"}, world["plain"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_classifier_runs_end_to_end(settings, world, family):
    import torch

    from workers.adapters import load_adapter

    con = run(settings, f"{family}-cls", {"path": str(world[f"{family}-cls"])}, world["plain"])
    rows = con.execute("select text, score, reward_position, n_tokens from texts order by text_id limit 8").fetchall()
    assert all(position == n - 1 for _, _, position, n in rows)  # the head reads the last non-pad token
    adapter = load_adapter("seq_cls", str(world[f"{family}-cls"]), torch.device("cpu"), max_length=48)
    scores, _ = adapter.run(adapter.tokenize([text for text, *_ in rows]))
    assert np.allclose(scores.numpy(), [score for _, score, *_ in rows], atol=1e-4)
    assert dict(con.execute("select layer, count(*) from features group by layer").fetchall()) == {0: 32, 1: 32}

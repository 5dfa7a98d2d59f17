"""Corpus loading: local files, steps, dataset directories, shuffle, token budget, truncation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tiny_models import minilm_tokenizer
from backend.core.run_config import ConfigError, DatasetConfig
from workers.datasets import load_corpus

ROWS = [{"text": f"review {i} " + "good " * (i % 7), "reward": float(i) / 10} for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files_give_texts_and_rewards(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    path = tmp_path / f"data{suffix}"
    table = pa.Table.from_pylist(ROWS)
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".csv":
        pyarrow.csv.write_csv(table, path)
    else:
        pyarrow.parquet.write_table(table, path)
    corpus = load_corpus(DatasetConfig(source=str(path), heldout_fraction=0.25), seed=0)
    assert corpus.texts == [r["text"] for r in ROWS]
    assert np.allclose(corpus.rewards, [r["reward"] for r in ROWS])
    assert 0 < corpus.heldout.sum() < len(ROWS)


def test_text_without_reward_and_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"body": r["text"]} for r in ROWS])
    with pytest.raises(ConfigError, match="dataset.text_column.*body"):
        load_corpus(DatasetConfig(source=str(path)), seed=0)
    corpus = load_corpus(DatasetConfig(source=str(path), text_column="body"), seed=0)
    assert corpus.rewards is None and len(corpus.texts) == len(ROWS)


def test_non_numeric_reward_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": r["text"], "reward": "high"} for r in ROWS])
    with pytest.raises(ConfigError, match="dataset.reward_column"):
        load_corpus(DatasetConfig(source=str(path)), seed=0)


def test_steps_are_joined_with_the_separator_after_each_step(tmp_path):
    rows = [{"steps": [f"step a{i}", f"step b{i}", "so 4"], "reward": i} for i in range(12)]
    path = write_jsonl(tmp_path / "steps.jsonl", rows)
    corpus = load_corpus(DatasetConfig(source=str(path)), seed=0, step_separator=" ки\n")
    assert corpus.texts[3] == "step a3 ки\nstep b3 ки\nso 4 ки\n"
    bad = write_jsonl(tmp_path / "bad_steps.jsonl", [{"steps": "not a list"}] * 12)
    with pytest.raises(ConfigError, match="dataset.steps_column"):
        load_corpus(DatasetConfig(source=str(bad)), seed=0)


def test_shuffle_is_seeded_and_n_texts_takes_after_it(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    plain = load_corpus(DatasetConfig(source=str(path), n_texts=15), seed=0)
    assert plain.texts == [r["text"] for r in ROWS[:15]]
    a = load_corpus(DatasetConfig(source=str(path), n_texts=15, shuffle=True), seed=0)
    b = load_corpus(DatasetConfig(source=str(path), n_texts=15, shuffle=True), seed=0)
    c = load_corpus(DatasetConfig(source=str(path), n_texts=15, shuffle=True), seed=1)
    assert a.texts == b.texts and a.texts != plain.texts and a.texts != c.texts
    by_text = {r["text"]: r["reward"] for r in ROWS}
    assert np.allclose(a.rewards, [by_text[t] for t in a.texts])  # rewards travel with their texts


def test_token_budget_stops_once_reached(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    config = DatasetConfig(source=str(path), token_budget=150)
    corpus = load_corpus(config, seed=0, tokenizer=tokenizer, max_length=16)
    lengths = [len(ids) for ids in tokenizer(corpus.texts, truncation=True, max_length=16)["input_ids"]]
    assert sum(lengths) >= 150 and sum(lengths[:-1]) < 150
    assert corpus.texts == [r["text"] for r in ROWS[: len(corpus.texts)]]
    with pytest.raises(ValueError, match="tokenizer"):
        load_corpus(config, seed=0)


def test_truncation_off_skips_texts_longer_than_max_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    kept = load_corpus(DatasetConfig(source=str(path), truncation=False), seed=0, tokenizer=tokenizer, max_length=8)
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in ROWS])["input_ids"]]
    assert kept.texts == [r["text"] for r, n in zip(ROWS, lengths) if n <= 8]
    assert 10 <= len(kept.texts) < len(ROWS)
    with pytest.raises(ConfigError, match="usable texts"):
        load_corpus(DatasetConfig(source=str(path), truncation=False), seed=0, tokenizer=tokenizer, max_length=4)


def test_dataset_directory_saved_by_datasets(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(ROWS[:30]), "test": datasets.Dataset.from_list(ROWS[30:]),
    }).save_to_disk(tmp_path / "dd")
    test = load_corpus(DatasetConfig(source=str(tmp_path / "dd"), split="test"), seed=0)
    assert test.texts == [r["text"] for r in ROWS[30:]]
    assert np.allclose(test.rewards, [r["reward"] for r in ROWS[30:]])
    with pytest.raises(ConfigError, match="dataset.split"):
        load_corpus(DatasetConfig(source=str(tmp_path / "dd"), split="validation"), seed=0)
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "one")
    assert len(load_corpus(DatasetConfig(source=str(tmp_path / "one")), seed=0).texts) == len(ROWS)


def test_hf_loader_on_a_local_data_directory(tmp_path, monkeypatch):
    """'hf:<id>' goes through datasets.load_dataset, which also reads a local data directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    write_jsonl((tmp_path / "files").mkdir() or tmp_path / "files" / "train.jsonl", ROWS)
    corpus = load_corpus(DatasetConfig(source=f"hf:{tmp_path / 'files'}"), seed=0)
    assert corpus.texts == [r["text"] for r in ROWS]
    with pytest.raises(ConfigError, match="dataset.split"):
        load_corpus(DatasetConfig(source=f"hf:{tmp_path / 'files'}", split="test"), seed=0)


def test_hf_hub_id_offline_gives_a_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(ConfigError, match="dataset.source.*network access"):
        load_corpus(DatasetConfig(source="hf:nobody/no-such-dataset"), seed=0)


def test_demo_corpus_with_budget(tokenizer):
    corpus = load_corpus(DatasetConfig(source="demo", n_texts=200, token_budget=500), seed=3,
                         tokenizer=tokenizer, max_length=32)
    assert 10 <= len(corpus.texts) < 200 and corpus.rewards is not None
    assert len(corpus.rewards) == len(corpus.texts) == len(corpus.heldout)

"""`rewardatlas run CONFIG --nproc N` on CPU (gloo): two ranks give the store one process gives
(exact for counts, ids, ranks and every selection; floats to rounding, as sums are added in
another order) for an encoder reading a text column and for a decoder judging chat-formatted
preference pairs, a rank that fails fails the run with nothing published, and more ranks than
cores are refused."""
from __future__ import annotations

import json
import math
import zlib

import duckdb
import pytest
import torch
import yaml

from backend.core import db
from backend.cli import main
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.test_pipeline import tiny_config
from tests.tiny_models import save_tiny_bert
from workers.distributed import FAIL_RANK_FOR_TESTS
from workers.launch import usable_cores
from workers.pipeline import run_pipeline

# small enough to run in seconds, large enough that every shared stage has work for both ranks:
# 8 analysis batches, several measure chunks per layer, three layers over two ranks (uneven),
# training over about three passes of the texts (the later ones from the text cache)
CONFIG = {
    "name": "Sharded Run",
    "layers": [0, 1, 2],
    "sae": {"width": 64, "k": 4, "training_tokens": 6144, "batch_size": 128, "buffer_tokens": 512},
    "effects": {"candidates": 12, "texts_per_feature": 16, "pool_texts": 48, "faithfulness_texts": 16,
                "faithfulness_n": [1, 2, 5], "controls": 3},
}
FLOAT_TOLERANCE = dict(rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    model_path = save_tiny_bert(root / "tiny-bert")
    from workers.demo_corpus import generate_corpus, vader_reward

    dataset = root / "reviews.jsonl"
    with dataset.open("w") as f:
        for text in generate_corpus(240, seed=11):
            f.write(json.dumps({"text": text, "reward": vader_reward(text)}) + "\n")
    config = tiny_config(model_path, dataset, **CONFIG)
    path = root / "sharded.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    return config, path


def run_with_ranks(path, data_dir, monkeypatch, nproc: int) -> int:
    monkeypatch.setenv("RA_DATA_DIR", str(data_dir))
    monkeypatch.setenv("RA_DATABASE_URL", "")
    return main(["run", str(path), "--nproc", str(nproc)])


@pytest.fixture(scope="module")
def one_rank_store(world, tmp_path_factory):
    config, _ = world
    settings = Settings(data_dir=tmp_path_factory.mktemp("one"), database_url="")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of two ranks on two cores runs
    try:
        run_dir = run_pipeline(config, settings)
    finally:
        torch.set_num_threads(threads)
        db.dispose_engines()
    return run_dir / STORE_FILENAME


def test_two_ranks_give_the_store_one_process_gives(world, one_rank_store, tmp_path, monkeypatch):
    _, path = world
    assert run_with_ranks(path, tmp_path, monkeypatch, 2) == 0
    two = tmp_path / "runs" / "sharded-run" / STORE_FILENAME
    one_tables = assert_same_stores(one_rank_store, two)
    # the comparison had something to compare in every shared stage
    counts = {table: len(rows) for table, rows in one_tables.items()}
    assert counts["features"] == 3 * 64 and counts["contexts"] > 3 * 64 and counts["feature_texts"] > 0
    measured = [r for r in one_tables["features"] if r[_column(one_rank_store, "features", "measured_n")]]
    assert len(measured) >= 3 * 6


@pytest.fixture(scope="module")
def pairs_world(tmp_path_factory):
    """A tiny Llama with a chat template judging conversational preference pairs (TRL's form)."""
    from tests.test_chat import TEMPLATE
    from tests.tiny_models import save_tiny_decoder
    from workers.demo_pairs import generate_pairs, write_pairs_jsonl

    root = tmp_path_factory.mktemp("sharded-pairs")
    model = save_tiny_decoder(root / "tiny-llama", "llama", "seq_cls")
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": TEMPLATE}))
    dataset = write_pairs_jsonl(root / "pairs.jsonl", generate_pairs(100, seed=3))
    config = tiny_config(model, dataset, **{**CONFIG, "name": "Sharded Pairs", "layers": [1, 2],
                                            "model": {"path": str(model), "max_length": 96}})
    path = root / "pairs.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    return config, path


def test_two_ranks_give_the_store_one_process_gives_for_chat_preference_pairs_on_a_decoder(
        pairs_world, tmp_path, monkeypatch):
    config, path = pairs_world
    settings = Settings(data_dir=tmp_path / "one", database_url="")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_pipeline(config, settings) / STORE_FILENAME
    finally:
        torch.set_num_threads(threads)
        db.dispose_engines()
    assert run_with_ranks(path, tmp_path / "two", monkeypatch, 2) == 0
    two = tmp_path / "two" / "runs" / "sharded-pairs" / STORE_FILENAME
    one_tables = assert_same_stores(one, two)
    info = dict(one_tables["run_info"])
    assert int(info["n_pairs"]) > 50 and info["pairwise_accuracy"] and one_tables["contexts"]
    texts = [row[_column(one, "texts", "text")] for row in one_tables["texts"]]
    assert all(text.startswith("<|user|>") and "<|assistant|>" in text for text in texts)  # chat-formatted


def test_a_rank_that_fails_fails_the_run_naming_it_and_publishes_nothing(world, tmp_path, monkeypatch, capsys):
    _, path = world
    monkeypatch.setenv(FAIL_RANK_FOR_TESTS, "1")
    assert run_with_ranks(path, tmp_path, monkeypatch, 2) == 2
    err = capsys.readouterr().err
    assert "rank 1 of 2 failed" in err and "failing on purpose in the analysis pass" in err
    assert "nothing was published" in err
    runs = tmp_path / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []  # no run, no build directory left behind
    assert not db.run_exists(Settings(data_dir=tmp_path, database_url=""), "sharded-run")
    db.dispose_engines()


def test_more_ranks_than_cores_is_refused_before_any_work(world, tmp_path, monkeypatch, capsys):
    _, path = world
    cores = usable_cores()
    assert run_with_ranks(path, tmp_path, monkeypatch, cores + 1) == 2
    err = capsys.readouterr().err
    assert f"--nproc {cores + 1}: this machine has {cores} CPU core" in err
    assert not (tmp_path / "runs").exists()
    assert run_with_ranks(path, tmp_path, monkeypatch, 0) == 2
    assert "--nproc 0" in capsys.readouterr().err


# -- comparing two stores ------------------------------------------------------------------------
def store_tables(path) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        names = [name for (name,) in con.execute("SELECT table_name FROM information_schema.tables "
                                                 "ORDER BY table_name").fetchall()]
        return {name: con.execute(f"SELECT * FROM {name}").fetchall() for name in names}
    finally:
        con.close()


def assert_same_stores(one, two) -> dict[str, list[tuple]]:
    """Every table of the two stores alike (rows in order, floats to rounding); the first's tables."""
    one_tables, two_tables = store_tables(one), store_tables(two)
    assert one_tables.keys() == two_tables.keys()
    for table, rows in one_tables.items():
        assert len(two_tables[table]) == len(rows), table
        for row, other in zip(rows, two_tables[table]):
            if table == "run_info" and row[0] == "created_at":
                continue
            assert_same(row, other, table)
    return one_tables


def _column(path, table: str, column: str) -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        names = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                                           "ORDER BY ordinal_position", [table]).fetchall()]
    finally:
        con.close()
    return names.index(column)


def assert_same(a, b, where: str) -> None:
    """Equal, floats to rounding; a feature card (compressed JSON) compared as its content."""
    if isinstance(a, bytes) and isinstance(b, bytes):
        a, b = json.loads(zlib.decompress(a)), json.loads(zlib.decompress(b))
    if isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, **FLOAT_TOLERANCE), where
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for x, y in zip(a, b):
            assert_same(x, y, where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, where

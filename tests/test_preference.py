"""Preference pairs as a dataset kind: TRL's chosen / rejected (strings or conversational
messages, optional prompt) read without extra keys, checked row by row before compute, and a
pairs run end to end on a tiny LLaMA and a tiny BERT: the run's pairwise accuracy is the RM's
own on the same pairs, computed directly."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch

from backend.core import db
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.tiny_models import save_tiny_bert, save_tiny_decoder
from backend.core.run_config import ConfigError, DatasetConfig, parse_config
from workers.datasets import read_texts, select_corpus
from workers.demo_pairs import generate_pairs, response_text, write_pairs_jsonl
from workers.pipeline import run_pipeline
from workers.preference_data import PreferencePairs

# a minimal chat template (the tiny models share MiniLM's tokenizer, which has none)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}")
N_PAIRS = 60


def string_pairs(n=N_PAIRS, seed=3):
    """TRL's explicit-prompt form with plain strings."""
    return [{"prompt": p["prompt"][0]["content"] + " ", "chosen": response_text(p["chosen"]),
             "rejected": response_text(p["rejected"])} for p in generate_pairs(n, seed=seed)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def source(path, **extra):
    return DatasetConfig(source=str(path), **extra)


# --- reading: every format, recognised by its columns -------------------------------------

def test_jsonl_csv_parquet_and_datasets_directory_are_read_as_pairs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    rows = string_pairs(12)
    table = pa.Table.from_pylist(rows)
    files = {"jsonl": write_jsonl(tmp_path / "p.jsonl", rows), "csv": tmp_path / "p.csv",
             "parquet": tmp_path / "p.parquet", "dir": tmp_path / "dir"}
    pyarrow.csv.write_csv(table, files["csv"])
    pyarrow.parquet.write_table(table, files["parquet"])
    datasets.Dataset.from_list(rows).save_to_disk(str(files["dir"]))
    for kind, path in files.items():
        pairs, rewards = read_texts(source(path), seed=0)
        assert isinstance(pairs, PreferencePairs), kind
        assert rewards is None and len(pairs) == 12 and not pairs.conversational
        assert pairs.chosen == [r["chosen"] for r in rows] and pairs.prompts == [r["prompt"] for r in rows], kind


def test_conversational_pairs_render_with_the_chat_template_and_split_per_pair(tmp_path):
    path = write_pairs_jsonl(tmp_path / "chat.jsonl", generate_pairs(40, seed=1))
    pairs, _ = read_texts(source(path), seed=0)
    assert pairs.conversational and pairs.prompts[0][0]["role"] == "user"
    tokenizer = _chat_tokenizer()
    corpus = select_corpus(pairs, None, source(path, heldout_fraction=0.3), 0, tokenizer, 128)
    assert len(corpus.texts) == 80 and corpus.pairs.tolist() == [[2 * k, 2 * k + 1] for k in range(40)]
    first = generate_pairs(40, seed=1)[0]
    assert corpus.texts[0] == f"<user> {first['prompt'][0]['content']}\n<assistant> {response_text(first['chosen'])}\n"
    assert (corpus.heldout[0::2] == corpus.heldout[1::2]).all()  # both sides in the same split
    assert 0 < corpus.heldout.sum() < 80


def test_implicit_prompt_strings_and_n_texts_count_both_sides(tmp_path):
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in string_pairs(30)]
    path = write_jsonl(tmp_path / "implicit.jsonl", rows)
    pairs, _ = read_texts(source(path), seed=0)
    assert pairs.prompts is None
    corpus = select_corpus(pairs, None, source(path, n_texts=20), 0, _chat_tokenizer(), 128)
    assert len(corpus.texts) == 20 and corpus.texts[:2] == [rows[0]["chosen"], rows[0]["rejected"]]


def test_a_text_column_still_makes_a_text_corpus(tmp_path):
    path = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"text {i}", "chosen": "a", "rejected": "b"}
                                                  for i in range(12)])
    texts, _ = read_texts(source(path), seed=0)
    assert texts[:2] == ["text 0", "text 1"]


# --- bad input: refused naming the column and the row ---------------------------------------

CHAT = generate_pairs(4, seed=2)


@pytest.mark.parametrize("rows, expected", [
    ([*string_pairs(3), {"prompt": "x ", "chosen": "good", "rejected": None}], "row 3 of .*'rejected' is missing"),
    ([*string_pairs(3), {"prompt": "x ", "chosen": "  ", "rejected": "bad"}], "row 3 of .*'chosen' is empty"),
    ([{"prompt": "x ", "chosen": "same text", "rejected": "same text"}, *string_pairs(2)], "row 0 of .*identical"),
    ([*CHAT[:2], {**CHAT[2], "chosen": [{"role": "bot", "content": "hi"}]}], "row 2 of .*'chosen' message 0 has "
                                                                            "unknown role 'bot'"),
    ([*CHAT[:1], {**CHAT[1], "rejected": []}], "row 1 of .*'rejected' is empty"),
    ([*CHAT[:1], {**CHAT[1], "rejected": [{"role": "assistant", "content": ""}]}], "row 1 of .*'rejected' is empty"),
    ([*CHAT[:1], {**CHAT[1], "prompt": [{"role": "narrator", "content": "x"}]}], "row 1 of .*'prompt' message 0 "
                                                                               "has unknown role 'narrator'"),
    # mixed forms in a column: the JSON reader itself names the column and the row
    ([*CHAT[:1], {**CHAT[1], "chosen": "a plain string"}], "Column\\(/chosen\\) changed from array to string in row 1"),
])
def test_bad_pairs_are_refused_naming_the_column_and_the_row(tmp_path, rows, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=expected) as refused:
        read_texts(source(path), seed=0)
    assert str(refused.value).startswith("dataset.source: ")


def test_conversational_pairs_need_a_chat_template(tmp_path):
    from tests.tiny_models import minilm_tokenizer

    path = write_pairs_jsonl(tmp_path / "chat.jsonl", generate_pairs(10, seed=1))
    pairs, _ = read_texts(source(path), seed=0)
    with pytest.raises(ConfigError, match="dataset.source: .*no chat template"):
        select_corpus(pairs, None, source(path), 0, minilm_tokenizer(), 128)


def test_sides_identical_within_max_length_are_refused(tmp_path):
    shared = "word " * 60
    rows = [*string_pairs(8), {"prompt": shared, "chosen": "good", "rejected": "bad"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    pairs, _ = read_texts(source(path), seed=0)
    with pytest.raises(ConfigError, match="row 8 of .*same within model.max_length \\(32\\)"):
        select_corpus(pairs, None, source(path), 0, _chat_tokenizer(), 32)


def _chat_tokenizer():
    from tests.tiny_models import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --- end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    llama = save_tiny_decoder(root / "llama", "llama", "seq_cls", n_layers=2, padding_side="left")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(llama)
    return {"llama": llama, "bert": save_tiny_bert(root / "bert", n_layers=2),
            "chat": write_pairs_jsonl(root / "chat.jsonl", generate_pairs(N_PAIRS, seed=7)),
            "strings": write_jsonl(root / "strings.jsonl", string_pairs())}


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    yield Settings(data_dir=tmp_path_factory.mktemp("data"))
    db.dispose_engines()


def run(settings, name, model_path, dataset, pairs=500, **extra):
    config = parse_config({
        "name": name, "model": {"path": str(model_path), "max_length": 64},
        "dataset": {"source": str(dataset), "batch_size": 16, "heldout_fraction": 0.3},
        "layers": [0, 1],
        "sae": {"width": 32, "k": 4, "training_tokens": 2048, "batch_size": 256, "buffer_tokens": 512},
        "analysis": {"n_contexts": 3},
        "effects": {"enabled": False},
        "preference": {"pairs": pairs, "measured_features": 3, "wrong_pair_features": 2}, **extra,
    })
    return duckdb.connect(str(run_pipeline(config, settings) / STORE_FILENAME), read_only=True)


def rows(con, sql):
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


@torch.no_grad()
def direct_scores(model_path, texts: list[str], spliced: tuple | None = None) -> np.ndarray:
    """The RM on each text alone, straight from transformers (no batching, no padding);
    spliced=(layer, SAE directory): a LLaMA block's output replaced by the SAE's reconstruction."""
    from sae_lens import SAE
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    if spliced is not None:
        sae = SAE.load_from_disk(str(spliced[1]))

        def reconstruct(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = sae.decode(sae.encode(hidden.float()))
            return (new, *output[1:]) if isinstance(output, tuple) else new

        model.model.layers[spliced[0]].register_forward_hook(reconstruct)
    return np.array([float(model(**tokenizer(t, return_tensors="pt", truncation=True, max_length=64)).logits[0, 0])
                     for t in texts])


def check_pairs_run(con, model_path, expected_texts):
    info = dict(con.execute("select key, value from run_info").fetchall())
    pairs = rows(con, "select * from preference_pairs order by pair_id")
    texts = {r["text_id"]: r for r in rows(con, "select text_id, text, split from texts")}
    assert int(info["n_pairs"]) == len(pairs) == N_PAIRS
    # both sides as the model read them: the template (or prompt + side) rendered, in the pair's split
    by_row = {p["row"]: p for p in pairs}
    for row, (chosen, rejected) in enumerate(expected_texts):
        assert texts[by_row[row]["chosen_text_id"]]["text"] == chosen
        assert texts[by_row[row]["rejected_text_id"]]["text"] == rejected
    held = [p for p in pairs if p["split"] == "heldout"]
    assert int(info["n_heldout_pairs"]) == len(held) > 0
    assert all(texts[p["chosen_text_id"]]["split"] == texts[p["rejected_text_id"]]["split"] == p["split"]
               for p in pairs)
    # the run's pairwise accuracy is the RM's own, computed directly on the same held-out pairs
    chosen = direct_scores(model_path, [texts[p["chosen_text_id"]]["text"] for p in held])
    rejected = direct_scores(model_path, [texts[p["rejected_text_id"]]["text"] for p in held])
    np.testing.assert_allclose([p["chosen_score"] for p in held], chosen, atol=1e-4)
    assert float(info["pairwise_accuracy"]) == float(np.mean(chosen - rejected > 0))
    assert [p["correct"] for p in held] == list(chosen - rejected > 0)
    # per layer: the SAE spliced in, the surrogate BT model
    for layer in rows(con, "select * from layers"):
        assert 0 <= layer["spliced_accuracy"] <= 1 and 0 <= layer["surrogate_accuracy"] <= 1
        assert 0 <= layer["surrogate_train_accuracy"] <= 1
    # per feature: the margin's attribution is the chosen side's minus the rejected side's
    feats = rows(con, "select * from features where margin_attribution is not null")
    assert feats
    for f in feats:
        assert f["margin_attribution"] == pytest.approx(f["margin_attribution_chosen"] - f["margin_attribution_rejected"],
                                                         abs=1e-6)
    measured = rows(con, "select * from features where margin_delta_n > 0")
    assert 0 < len(measured) <= 6  # 3 per layer
    for f in measured:
        if f["margin_delta_low"] is not None:
            assert f["margin_delta_low"] <= f["margin_delta"] <= f["margin_delta_high"]
    # the wrongly ordered held-out pairs, each with features pushing toward the rejected side
    wrong = rows(con, "select * from preference_wrong_features")
    wrong_ids = {p["pair_id"] for p in held if not p["correct"]}
    assert wrong_ids and {w["pair_id"] for w in wrong} <= wrong_ids
    assert all(w["margin_attribution"] < 0 and w["rank"] < 2 for w in wrong)
    return info


def test_conversational_pairs_run_end_to_end_on_a_tiny_llama(settings, world):
    # attribution and edits on 8 of the held-out pairs; the accuracies on all of them
    con = run(settings, "pairs-llama", world["llama"], world["chat"], pairs=8)
    expected = [(f"<user> {p['prompt'][0]['content']}\n<assistant> {response_text(p['chosen'])}\n",
                 f"<user> {p['prompt'][0]['content']}\n<assistant> {response_text(p['rejected'])}\n")
                for p in generate_pairs(N_PAIRS, seed=7)]
    info = check_pairs_run(con, world["llama"], expected)
    assert int(info["preference_analysed_pairs"]) == 8 < int(info["n_heldout_pairs"])
    # the spliced accuracy is the RM's with the SAE's reconstruction in place of the block's output
    held = rows(con, "select * from preference_pairs where split = 'heldout' order by pair_id")
    texts = dict(con.execute("select text_id, text from texts").fetchall())
    for layer in rows(con, "select layer, sae_path, spliced_accuracy from layers"):
        sae_dir = settings.run_dir("pairs-llama") / layer["sae_path"]
        chosen = direct_scores(world["llama"], [texts[p["chosen_text_id"]] for p in held], (layer["layer"], sae_dir))
        rejected = direct_scores(world["llama"], [texts[p["rejected_text_id"]] for p in held], (layer["layer"], sae_dir))
        assert layer["spliced_accuracy"] == float(np.mean(chosen - rejected > 0))


@pytest.fixture(scope="module")
def bert_run(settings, world):
    return run(settings, "pairs-bert", world["bert"], world["strings"])


def test_string_pairs_with_a_prompt_run_end_to_end_on_a_tiny_bert(bert_run, world):
    con = bert_run
    expected = [(p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]) for p in string_pairs()]
    check_pairs_run(con, world["bert"], expected)


def test_bad_pairs_stop_the_run_before_compute_and_register_nothing(settings, world, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*string_pairs(5), {"prompt": "p ", "chosen": "x", "rejected": "x"}])
    with pytest.raises(ConfigError, match="row 5 of .*identical"):
        run(settings, "bad-pairs", world["bert"], bad)
    assert not settings.run_dir("bad-pairs").exists()
    assert not db.run_exists(settings, "bad-pairs")


# --- the web: run and layer pages, the pairs browser -----------------------------------------

def test_run_api_and_page_carry_the_preference_summary(settings, bert_run):
    from tests.helpers import make_client

    info = dict(bert_run.execute("select key, value from run_info").fetchall())
    with make_client(settings) as client:
        data = client.get("/api/runs/pairs-bert").json()["preference"]
        assert data["n_pairs"] == N_PAIRS and data["n_heldout_pairs"] == int(info["n_heldout_pairs"])
        assert data["pairwise_accuracy"] == pytest.approx(float(info["pairwise_accuracy"]))
        layers = {row["layer"]: row for row in rows(bert_run, "select * from layers")}
        assert [l["layer"] for l in data["layers"]] == [0, 1]
        for l in data["layers"]:
            assert l["spliced_accuracy"] == layers[l["layer"]]["spliced_accuracy"]
            assert l["surrogate_accuracy"] == layers[l["layer"]]["surrogate_accuracy"]
        page = client.get("/runs/pairs-bert")
        assert page.status_code == 200 and 'id="preference"' in page.text and "/runs/pairs-bert/pairs" in page.text
        # the margin attribution tab where the layer has margin attributions (layer 1, BERT's last block, has none)
        layer_page = client.get("/runs/pairs-bert/layers/0")
        assert 'id="preference-layer"' in layer_page.text and 'data-sort="margin_attribution"' in layer_page.text
        last = client.get("/runs/pairs-bert/layers/1").text
        assert 'id="preference-layer"' in last and 'data-sort="margin_attribution"' not in last


def test_layer_table_ranks_by_margin_attribution(settings, bert_run):
    from tests.helpers import make_client

    with make_client(settings) as client:
        # layer 0: at BERT's last block no gradient reaches the text's own tokens, so no margin attribution
        features = client.get("/api/runs/pairs-bert/layers/0?sort=margin_attribution").json()["features"]
        values = [f["margin_attribution"] for f in features if f["margin_attribution"] is not None]
        assert values and values == sorted(values, reverse=True)
        assert values == [f["margin_attribution"] for f in features[:len(values)]]  # NULLs last
        top = bert_run.execute("select feature from features where layer = 0 "
                               "order by margin_attribution desc nulls last, feature limit 1").fetchone()[0]
        assert features[0]["feature"] == top


def test_pairs_browser_pages_filters_and_lists_the_wrong_side_features(settings, bert_run):
    from tests.helpers import make_client

    held = rows(bert_run, "select * from preference_pairs where split = 'heldout' order by pair_id")
    wrong = [p for p in held if not p["correct"]]
    with make_client(settings) as client:
        every = client.get("/api/runs/pairs-bert/pairs").json()
        size = every["page_size"]
        assert every["total"] == N_PAIRS and every["n_pages"] == 2 and len(every["pairs"]) == size
        second = client.get("/api/runs/pairs-bert/pairs?page=2").json()["pairs"]
        assert [p["pair_id"] for p in every["pairs"] + second] == list(range(N_PAIRS))
        data = client.get("/api/runs/pairs-bert/pairs?split=heldout&wrong=true").json()
        assert data["total"] == len(wrong) and [p["pair_id"] for p in data["pairs"]] == [p["pair_id"] for p in wrong]
        texts = dict(bert_run.execute("select text_id, text from texts").fetchall())
        for pair, stored in zip(data["pairs"], wrong):
            assert pair["chosen"]["text"] == texts[stored["chosen_text_id"]]
            assert pair["margin"] == pytest.approx(pair["chosen"]["score"] - pair["rejected"]["score"])
            assert not pair["correct"] and pair["split"] == "heldout"
            # BERT's head reads [CLS] after the last block: its text tokens there carry no gradient, no push
            assert 0 in {l["layer"] for l in pair["wrong_side_features"]}
            assert all(f["margin_attribution"] < 0 for l in pair["wrong_side_features"] for f in l["features"])
        train = client.get("/api/runs/pairs-bert/pairs?split=train").json()
        assert train["total"] == N_PAIRS - len(held) and all(p["split"] == "train" for p in train["pairs"])
        html = client.get("/runs/pairs-bert/pairs?split=heldout&wrong=true").text
        first = data["pairs"][0]
        assert f'/runs/pairs-bert/texts/{first["chosen"]["text_id"]}' in html
        assert f'/runs/pairs-bert/texts/{first["rejected"]["text_id"]}' in html
        feature = first["wrong_side_features"][0]
        assert f'/runs/pairs-bert/layers/{feature["layer"]}/features/{feature["features"][0]["feature"]}' in html
        assert client.get("/api/runs/pairs-bert/pairs?split=sideways").status_code == 422
        assert client.get("/api/runs/pairs-bert/pairs?page=99").status_code == 404


def test_a_text_corpus_run_has_no_pairs(settings):
    from tests.helpers import make_client, publish_synthetic_run

    publish_synthetic_run(settings, "corpus-only")
    with make_client(settings) as client:
        assert client.get("/api/runs/corpus-only").json()["preference"] is None
        missing = client.get("/api/runs/corpus-only/pairs")
        assert missing.status_code == 404 and "no preference pairs" in missing.json()["detail"]
        assert 'id="preference"' not in client.get("/runs/corpus-only").text

"""The implicit-reward lexicon (workers/analyses/lexicon.py) on a tiny real run: a word's measured
value is the score difference computed by hand, its predicted value the layer's weights · the
pooled-feature difference by hand, tau is scipy's on the stored columns, bad CSV rows are listed
and skipped, multi-token words counted; bad input is refused before compute; the run page and
its JSON carry the section."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from backend.core import db, store
from backend.core.settings import Settings
from tests.helpers import make_client
from tests.test_pipeline import tiny_config, tiny_world  # noqa: F401  (fixture)
from backend.core.run_config import ConfigError, check_word_lists, parse_config
from workers.pipeline import run_pipeline
from backend.core.reference_words import ReferenceError, read_lexicon_csv
from workers.run_cache import RunCache
from backend.web.routes.formats import fmt_num

CARRIERS = ["The word on the card was {}.", "She wrote {} on the board.", "He read {} aloud."]
NEUTRAL = "chair"
GOOD_ROWS = [("good", 1.9), ("bad", -2.5), ("great", 3.1), ("awful", -2.0), ("happy", 2.7), ("sad", -2.1),
             ("love", 3.2), ("hate", -2.7), ("boring", -1.3), ("fine", 0.8), ("table", 0.0), ("xylophonic", 1.0)]
BAD_LINES = ["nice,", "lovely,abc", "good,1.5", ",2", "wow,inf"]


def lexicon_csv(path) -> str:
    lines = ["word,value"] + [f"{w},{v}" for w, v in GOOD_ROWS] + BAD_LINES
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def lexicon_run(tiny_world, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("lexicon")
    settings = Settings(data_dir=root / "data")
    vocabulary = root / "vocabulary.txt"
    vocabulary.write_text("not, never\nvery really 🦜\n")
    config = tiny_config(*tiny_world, run_id="lexicon-run",
                         lexicon={"reference": lexicon_csv(root / "lexicon.csv"), "carriers": CARRIERS,
                                  "neutral_word": NEUTRAL, "batch_size": 4, "divergent": 3},
                         reason_score={"vocabulary": str(vocabulary), "texts": 100})
    run_pipeline(config, settings)
    loaded = RunCache(settings).get(config.run_id)
    yield settings, loaded
    db.dispose_engines()


def stored(loaded, table: str) -> dict[str, list]:
    con = duckdb.connect(str(loaded.store_path), read_only=True)
    try:
        cur = con.execute(f"SELECT * FROM {table}")
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
    finally:
        con.close()
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


def score(adapter, text: str) -> float:
    scores, _ = adapter.run(adapter.tokenize([text]))
    return float(scores[-1])


def test_bad_csv_rows_are_listed_and_skipped_and_a_file_without_usable_rows_is_refused(tmp_path):
    lexicon = read_lexicon_csv(lexicon_csv(tmp_path / "l.csv"))
    assert lexicon.words == [w for w, _ in GOOD_ROWS] and lexicon.values == [v for _, v in GOOD_ROWS]
    assert lexicon.n_bad_rows == 5
    assert lexicon.bad_rows == ["line 14: no value", "line 15: value 'abc' is not a number",
                                "line 16: 'good' already given on line 2", "line 17: no word",
                                "line 18: value 'inf' is not a finite number"]
    empty = tmp_path / "bad.csv"
    empty.write_text("word,value\nnice,\nlovely,abc\n")
    with pytest.raises(ReferenceError, match="no usable word,value row .2 bad, on lines 2, 3") as refused:
        read_lexicon_csv(empty)
    assert "abc" not in str(refused.value) and "lovely" not in str(refused.value)  # what the file holds stays in it
    config = parse_config({"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1],
                           "lexicon": {"reference": str(empty)}})
    with pytest.raises(ConfigError, match="has no usable word,value row"):
        check_word_lists(config)  # before any compute: preflight runs it
    with pytest.raises(ConfigError, match="file not found"):
        check_word_lists(parse_config({"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"},
                                       "layers": [1], "lexicon": {"reference": str(tmp_path / "nope.csv")}}))


@pytest.mark.parametrize("carrier, count", [("no slot here.", 0), ("two {} slots {}.", 2)])
def test_a_carrier_without_exactly_one_slot_is_refused(carrier, count):
    with pytest.raises(ConfigError, match=f"exactly one {{}} where the word goes; .* has {count}"):
        parse_config({"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1],
                      "lexicon": {"carriers": ["A fine {} here.", carrier]}})


def test_the_section_is_optional_and_off_when_absent():
    config = parse_config({"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1]})
    assert config.lexicon is None and config.reason_score is None
    on = parse_config({"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1],
                       "lexicon": {}})
    assert on.lexicon.enabled and on.lexicon.reference == "vader" and len(on.lexicon.carriers) == 8


def test_single_token_words_are_kept_the_rest_counted_and_bad_rows_skipped(lexicon_run):
    _, loaded = lexicon_run
    words = stored(loaded, "lexicon_words")
    assert sorted(words["word"]) == sorted(w for w, _ in GOOD_ROWS if w != "xylophonic")
    summary = stored(loaded, "lexicon_summary")
    assert sorted(summary["which"]) == ["layer 0", "layer 2", "measured"]
    assert set(summary["n_multi_token_skipped"]) == {1} and set(summary["n_bad_rows"]) == {5}
    assert set(summary["n_words"]) == {len(GOOD_ROWS) - 1}
    info = store.run_info(loaded.store_path)
    assert json.loads(info["lexicon_bad_rows"])[1] == "line 15: value 'abc' is not a number"
    reference = dict(GOOD_ROWS)
    assert all(reference[w] == v for w, v in zip(words["word"], words["reference"]))


def test_a_word_s_measured_value_is_the_score_difference_computed_by_hand(lexicon_run):
    _, loaded = lexicon_run
    words = stored(loaded, "lexicon_words")
    adapter = loaded.adapter
    for word in ("good", "hate"):
        by_hand = np.mean([score(adapter, c.replace("{}", word)) - score(adapter, c.replace("{}", NEUTRAL))
                           for c in CARRIERS])
        assert words["measured"][words["word"].index(word)] == pytest.approx(by_hand, abs=1e-5)
    assert len(set(np.round(words["measured"], 6))) > 3  # the words are not all worth the same


def mean_pooled_features(adapter, sae, layer: int, text: str) -> np.ndarray:
    """The regression's pooling (tiny_config: mean) by hand: mean over the text's non-special tokens."""
    batch = adapter.tokenize([text])
    _, captured = adapter.run(batch, capture=[layer])
    ids = batch.input_ids[0].tolist()
    own = [i for i, t in enumerate(ids) if t not in set(adapter.tokenizer.all_special_ids)]
    with torch.no_grad():
        acts = sae.encode(captured[layer][0, own].float())
    return acts.mean(0).double().numpy()


def test_a_word_s_predicted_value_is_the_weights_dot_the_pooled_feature_difference(lexicon_run):
    _, loaded = lexicon_run
    predictions = stored(loaded, "lexicon_predictions")
    adapter = loaded.adapter
    for layer in (0, 2):
        weights = np.asarray(store.layer_vectors(loaded.store_path, layer)["weight"], dtype=np.float64)
        sae = loaded.sae(layer)
        for word in ("great", "sad"):
            by_hand = np.mean([weights @ (mean_pooled_features(adapter, sae, layer, c.replace("{}", word))
                                          - mean_pooled_features(adapter, sae, layer, c.replace("{}", NEUTRAL)))
                               for c in CARRIERS])
            row = next(i for i, (l, w) in enumerate(zip(predictions["layer"], predictions["word"]))
                       if l == layer and w == word)
            assert predictions["predicted"][row] == pytest.approx(by_hand, rel=1e-4, abs=1e-6)


def test_tau_is_scipy_s_on_the_stored_columns(lexicon_run):
    _, loaded = lexicon_run
    words, predictions, summary = (stored(loaded, t) for t in ("lexicon_words", "lexicon_predictions",
                                                               "lexicon_summary"))
    reference = np.asarray(words["reference"])
    expected = kendalltau(reference, words["measured"])
    row = summary["which"].index("measured")
    assert summary["tau"][row] == pytest.approx(expected.statistic) and summary["p_value"][row] == pytest.approx(
        expected.pvalue)
    for layer in (0, 2):
        by_word = {w: p for l, w, p in zip(predictions["layer"], predictions["word"], predictions["predicted"])
                   if l == layer}
        predicted = [by_word[w] for w in words["word"]]
        row = summary["which"].index(f"layer {layer}")
        assert summary["tau"][row] == pytest.approx(kendalltau(reference, predicted).statistic)
        assert summary["tau_vs_measured"][row] == pytest.approx(kendalltau(words["measured"], predicted).statistic)


def test_the_run_page_and_its_json_carry_the_lexicon(lexicon_run):
    settings, loaded = lexicon_run
    with make_client(settings) as client:
        data = client.get("/api/runs/lexicon-run").json()["lexicon"]
        page = client.get("/runs/lexicon-run").text
    assert [row["which"] for row in data["summary"]] == ["measured", "layer 0", "layer 2"]
    assert data["paper_baseline"] == {"tau": -0.037, "p_value": 0.55,
                                      "source": "apartresearch/Probing-Learned-Feedback-Patterns"}
    assert len(data["words"]) == len(GOOD_ROWS) - 1 and set(data["words"][0]["predicted"]) == {"0", "2"}
    above = [w["word"] for w in data["divergent"]["above"]]
    ranked = sorted(data["words"], key=lambda w: -w["rank_difference"])
    assert above == [w["word"] for w in ranked[:3]]  # lexicon.divergent: 3
    assert 'id="lexicon"' in page and 'id="lexicon-scatter"' in page and "τ = -0.037" in page
    assert page.count("<circle") >= len(GOOD_ROWS) - 1
    assert fmt_num(data['summary'][0]['tau']) in page
    assert "line 15: value &#39;abc&#39; is not a number" in page or "line 15: value 'abc' is not a number" in page


def test_a_run_without_a_lexicon_has_no_section(client):
    assert client.get("/api/runs/synthetic").json()["lexicon"] is None
    assert 'id="lexicon"' not in client.get("/runs/synthetic").text

"""ReasonScore (workers/analyses/reason_score.py): the formula on a constructed activation matrix
against a hand computation, the streamed accumulator (word windows, special tokens left out)
against the same by hand, a vocabulary with no known token refused before compute, the pipeline's
column and the typed-vocabulary job on a tiny real run; from the web, the layer page's form and
the JSON endpoint queue a job and bad input is a 4xx creating no job."""
from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest
import torch

from backend.core import jobs, store
from tests.test_jobs_web import csrf, job_count
from tests.test_lexicon import lexicon_run, score  # noqa: F401  (fixture)
from tests.test_pipeline import tiny_world  # noqa: F401  (fixture)
from tests.tiny_models import minilm_tokenizer
from workers.analyses.reason_score import (ReasonScoreAccumulator, Vocabulary, check, compute_reason_scores,
                                           reason_score_task, reason_scores, vocabulary_tokens, word_masks)
from backend.core.run_config import ConfigError, parse_config

RUN = "/runs/synthetic"


def hand_score(acts: np.ndarray, word_positions: list[list[int]], others: list[int], alpha: float) -> np.ndarray:
    """The paper's formula written out feature by feature."""
    d = acts.shape[1]
    union = sorted({t for ps in word_positions for t in ps})
    mu_pos = np.array([np.mean(acts[union, f]) for f in range(d)])
    mu_neg = np.array([np.mean(acts[others, f]) for f in range(d)])
    out = []
    for f in range(d):
        means = [np.mean(acts[ps, f]) for ps in word_positions]
        total = sum(means)
        h = 0.0
        for m in means:
            p = m / (total + 1e-12)
            if p > 0:
                h -= p * math.log(p)
        h /= math.log(len(word_positions))
        out.append(mu_pos[f] / (mu_pos.sum() + 1e-12) * h ** alpha - mu_neg[f] / (mu_neg.sum() + 1e-12))
    return np.array(out)


def test_the_formula_on_a_constructed_matrix_equals_a_hand_computation():
    rng = np.random.default_rng(0)
    acts = rng.random((12, 5)) * (rng.random((12, 5)) < 0.6)
    acts[:, 4] = 0.0
    acts[[0, 1], 4] = 3.0  # feature 4: only on word 0's tokens
    word_positions, others = [[0, 1], [2, 3, 4], [5]], [6, 7, 8, 9, 10, 11]
    union = [0, 1, 2, 3, 4, 5]
    word_means = np.stack([acts[ps].mean(0) for ps in word_positions], axis=1)
    scores, entropy = reason_scores(word_means, acts[union].mean(0), acts[others].mean(0), alpha=0.7)
    assert scores == pytest.approx(hand_score(acts, word_positions, others, 0.7))
    assert entropy[4] < 1e-9 and scores[4] < 1e-6  # all its mass on one word: ~no entropy, ~no score
    # one word only: no entropy to take (H = 1), the score is the share on it minus the share elsewhere
    single, h = reason_scores(word_means[:, :1], acts[[0, 1]].mean(0), acts[others].mean(0), alpha=0.7)
    assert h == pytest.approx(np.ones(5))
    mu = acts[[0, 1]].mean(0)
    assert single == pytest.approx(mu / mu.sum() - acts[others].mean(0) / acts[others].mean(0).sum())


def test_the_accumulator_widens_each_match_and_leaves_special_tokens_out():
    # two sequences of token ids; word A = token 7, word B = the pair (8, 9); 0 = a special token
    ids = torch.tensor([[0, 5, 7, 5, 5, 5, 8, 9, 0], [0, 5, 5, 5, 7, 5, 5, 0, 0]])
    valid = torch.tensor([[False] + [True] * 7 + [False], [False] + [True] * 6 + [False, False]])
    vocab = Vocabulary(["a", "b"], [[(7,)], [(8, 9)]])
    masks = word_masks(ids, valid, vocab, (1, 2))
    # A at (0, 2) widened to 1..4, at (1, 4) to 3..6; B at (0, 6-7) to 5..9, cut at the special token 8
    assert masks[0].nonzero().tolist() == [[0, 1], [0, 2], [0, 3], [0, 4], [1, 3], [1, 4], [1, 5], [1, 6]]
    assert masks[1].nonzero().tolist() == [[0, 5], [0, 6], [0, 7]]
    rng = np.random.default_rng(1)
    acts = torch.tensor(rng.random((2, 9, 4)), dtype=torch.float32)
    acc = ReasonScoreAccumulator(4, 2, "cpu")
    acc.add(acts[valid], masks[:, valid], valid)
    word, pos, neg = acc.means()
    flat = acts[valid].double().numpy()
    index = {(b, t): i for i, (b, t) in enumerate(valid.nonzero().tolist())}
    a = [index[p] for p in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 3), (1, 4), (1, 5), (1, 6)]]
    b = [index[p] for p in [(0, 5), (0, 6), (0, 7)]]
    rest = [i for i in range(len(flat)) if i not in set(a) | set(b)]
    assert word[:, 0] == pytest.approx(flat[a].mean(0)) and word[:, 1] == pytest.approx(flat[b].mean(0))
    assert pos == pytest.approx(flat[sorted(set(a) | set(b))].mean(0)) and neg == pytest.approx(flat[rest].mean(0))
    scores, _ = reason_scores(word, pos, neg, 0.7)
    assert scores == pytest.approx(hand_score(flat, [a, b], rest, 0.7))


def test_a_vocabulary_with_no_known_token_is_refused_before_compute(tmp_path):
    tokenizer = minilm_tokenizer()
    with pytest.raises(ValueError, match="no word of the vocabulary .* has a token"):
        vocabulary_tokens(tokenizer, ["🦜", "🪐"])
    vocab = vocabulary_tokens(tokenizer, ["not", "🦜", "Very"])
    assert vocab.words == ["not", "Very"] and vocab.unknown == ["🦜"]
    unknown = tmp_path / "emoji.txt"
    unknown.write_text("🦜 🪐\n")
    config = parse_config({"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1],
                           "reason_score": {"vocabulary": str(unknown)}})
    with pytest.raises(ConfigError, match="reason_score.vocabulary: no word of the vocabulary"):
        check(config, tokenizer)  # the pipeline calls it once the model is loaded, before training
    blank = tmp_path / "blank.txt"
    blank.write_text("# only a comment\n")
    from backend.core.run_config import check_word_lists

    with pytest.raises(ConfigError, match="no words"):
        check_word_lists(parse_config({"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"},
                                       "layers": [1], "reason_score": {"vocabulary": str(blank)}}))


def test_the_pipeline_stores_each_layer_s_reason_scores(lexicon_run):  # noqa: F811
    _, loaded = lexicon_run
    texts = [r["text"] for r in store.texts(loaded.store_path)][:100]
    vocab = vocabulary_tokens(loaded.adapter.tokenizer, ["not", "never", "very", "really"])
    again = compute_reason_scores(loaded.adapter, {0: loaded.sae(0), 2: loaded.sae(2)}, texts, vocab)
    info = store.run_info(loaded.store_path)
    assert info["reason_score_unknown"] == '["🦜"]' or info["reason_score_unknown"] == '["\\ud83e\\udd9c"]'
    for layer in (0, 2):
        con = duckdb.connect(str(loaded.store_path), read_only=True)
        column = np.asarray([v for (v,) in con.execute(
            "SELECT reason_score FROM features WHERE layer = ? ORDER BY feature", [layer]).fetchall()], dtype=np.float64)
        con.close()
        assert np.isfinite(column).all() and column.std() > 0
        assert column == pytest.approx(again[layer].scores, rel=1e-6, abs=1e-9)
    top = store.features(loaded.store_path, 2, sort="reason_score", limit=3).rows
    assert [r["reason_score"] for r in top] == pytest.approx(sorted(again[2].scores, reverse=True)[:3], rel=1e-6)


class Ctx:
    def __init__(self, cache):
        self.cache, self.reports = cache, []

    def report(self, progress=None, message=None):
        self.reports.append((progress, message))


def test_the_typed_vocabulary_job_lists_the_top_features_and_the_words_found(lexicon_run):  # noqa: F811
    settings, loaded = lexicon_run

    class Cache:
        def get(self, run_id):
            assert run_id == "lexicon-run"
            return loaded

    result = reason_score_task({"run_id": "lexicon-run", "layer": 2, "words": ["not", "very", "🦜"], "n_texts": 50,
                                "alpha": 0.7, "window": [1, 2]}, Ctx(Cache()))
    assert result["words"] == ["not", "very"] and result["unknown"] == ["🦜"] and result["n_texts"] == 50
    scores = [f["score"] for f in result["features"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 50
    expected = compute_reason_scores(loaded.adapter, {2: loaded.sae(2)},
                                     [r["text"] for r in store.texts(loaded.store_path)][:50],
                                     vocabulary_tokens(loaded.adapter.tokenizer, ["not", "very"]))[2]
    assert result["features"][0]["feature"] == int(np.argmax(expected.scores))
    assert result["word_counts"]["not"] > 0  # the demo-style corpus has negations


@pytest.mark.sql_databases("sqlite")
def test_the_layer_page_form_queues_a_job_and_its_page_lists_the_features(client, migrated):
    page = client.get(f"{RUN}/layers/3").text
    assert 'id="reason-form"' in page and f'action="{RUN}/layers/3/reason-score"' in page
    before = job_count(migrated)
    r = client.post(f"{RUN}/layers/3/reason-score", data={"csrf_token": csrf(client, f"{RUN}/layers/3"),
                                                           "vocabulary": "not, never\nvery  Very", "n_texts": "300"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    job = jobs.get(migrated, int(r.headers["location"].rsplit("/", 1)[1]))
    assert job_count(migrated) == before + 1 and job["kind"] == "reason_score"
    assert job["params"]["words"] == ["not", "never", "very"] and job["params"]["n_texts"] == 300
    assert job["params"]["layer"] == 3 and job["params"]["window"] == [1, 2]
    claimed = jobs.claim(migrated, "w")
    assert claimed["id"] == job["id"]
    jobs.finish(migrated, job["id"], "w", result={
        "layer": 3, "words": ["not", "never"], "unknown": ["very"], "word_counts": {"not": 12, "never": 3},
        "n_texts": 300, "n_tokens": 4000, "n_vocabulary_tokens": 60,
        "features": [{"feature": 9, "score": 0.0123, "entropy": 0.8, "vocabulary_mean": 1.5, "elsewhere_mean": 0.1},
                     {"feature": 4, "score": 0.001, "entropy": 0.2, "vocabulary_mean": 0.5, "elsewhere_mean": 0.2}]})
    shown = client.get(f"/jobs/{job['id']}").text
    assert shown.index(f'href="{RUN}/layers/3/features/9"') < shown.index(f'href="{RUN}/layers/3/features/4"')
    assert 'id="reason-unknown"' in shown and "0.0123" in shown and "×12" in shown


@pytest.mark.sql_databases("sqlite")
@pytest.mark.parametrize("data, message", [
    ({"vocabulary": " , \n "}, "no words"),
    ({"vocabulary": "not", "n_texts": "0"}, "greater than or equal to 1"),
    ({"vocabulary": "x" * 70}, "a word of 70 characters; at most 64"),
])
def test_bad_forms_are_a_4xx_and_create_no_job(client, migrated, data, message):
    before = job_count(migrated)
    r = client.post(f"{RUN}/layers/3/reason-score", data={"csrf_token": csrf(client, f"{RUN}/layers/3"), **data})
    assert r.status_code == 422 and message in r.text
    assert job_count(migrated) == before


@pytest.mark.sql_databases("sqlite")
def test_the_json_endpoint_answers_201_with_its_location_and_refuses_bad_bodies(client, migrated):
    r = client.post(f"/api{RUN}/layers/3/reason-scores", json={"words": ["hardly", "barely"], "n_texts": 10})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/api/jobs/{r.json()['id']}" and r.json()["kind"] == "reason_score"
    before = job_count(migrated)
    for body, status in [({"words": []}, 422), ({"words": ["two words"]}, 422), ({"words": ["ok"], "alpha": -1}, 422),
                         ({"words": ["ok"], "window": [1]}, 422)]:
        assert client.post(f"/api{RUN}/layers/3/reason-scores", json=body).status_code == status, body
    assert client.post(f"/api{RUN}/layers/99/reason-scores", json={"words": ["ok"]}).status_code == 404
    assert client.post(f"/api{RUN}/layers/3/reason-scores", data={"words": "ok"}).status_code in (415, 422)
    assert job_count(migrated) == before


@pytest.mark.sql_databases("sqlite")
def test_the_layer_table_sorts_by_reason_score_with_its_tab(client):
    page = client.get(f"{RUN}/layers/3").text
    assert 'data-sort="reason_score"' in page and "ReasonScore (vocabulary)" in page
    rows = client.get(f"/api{RUN}/layers/3?sort=reason_score").json()["features"]
    scores = [r["reason_score"] for r in rows]
    assert len(scores) > 1 and scores == sorted(scores, reverse=True)
    smallest = [r["reason_score"] for r in client.get(f"/api{RUN}/layers/3?sort=-reason_score").json()["features"]]
    assert smallest == sorted(smallest) and smallest[0] < scores[0]


@pytest.mark.sql_databases("sqlite")
def test_the_feature_page_shows_its_reason_score(client):
    card = client.get(f"/api{RUN}/layers/3/features/7").json()["feature"]
    page = client.get(f"{RUN}/layers/3/features/7").text
    assert card["reason_score"] is not None
    assert f'<dd id="reason-score"><a href="{RUN}/layers/3?sort=reason_score"' in page
    from backend.web.routes.formats import fmt_num

    assert f"{fmt_num(card['reason_score'])}</a></dd>" in page

"""Reward-hacking probes (workers/probes.py) on the tiny random reward model: the vocabulary
probe's numbers are what encoding its tokens in a carrier gives, an insertion's Δ is the score
of the edited text minus the score of the text, and a sweep's steer by 0 changes nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from backend.core import db, jobs, store
from backend.core.models import Run
from tests.helpers import make_client
from tests.test_ablation import tiny_run  # noqa: F401  (module fixture: a tiny pipeline run, layers 0 and 2)
from tests.test_pipeline import tiny_world  # noqa: F401  (module fixture)
from workers.ablation import FeatureEdit, run_ablation
from workers.probes import (CONTROL_PHRASE, DEFAULT_CARRIERS, insert_phrase, measure_insertion, probe_vocabulary,
                            slot_positions, vocab_probe_result, whole_word_tokens)
from workers.run_cache import JobStopped, RunCache
from workers.worker import JobContext, Worker

# The first block: at the last one (2) only [CLS] reaches this classifier's head, so neither an
# inserted word's features nor an edit of the text's tokens there could move the score.
LAYER = 0
TEXTS = ["the film runs about two hours.", "a quiet story told slowly, with care", "it was on at eight"]


@torch.no_grad()
def activation_in_carrier(adapter, sae, word: str, carrier: str, feature: int) -> float:
    """The feature's activation at the word, in the carrier alone (one sequence, no padding)."""
    batch = adapter.tokenize([carrier.replace("{}", word)])
    _, captured = adapter.run(batch, capture=[LAYER], need_score=False)
    ids = batch.input_ids[0].tolist()
    word_id = adapter.tokenizer.convert_tokens_to_ids(word)
    position = ids.index(word_id, len(adapter.tokenizer(carrier.split("{}")[0].rstrip())["input_ids"]) - 1)
    return float(sae.encode(captured[LAYER][0, position].float())[feature])


def run_job(settings, kind: str, params: dict) -> dict:
    job = jobs.submit(settings, kind, params, author="tester", run_id=params["run_id"])
    worker = Worker(settings, lease_s=30)
    assert worker.run_one() is True
    done = jobs.get(settings, job["id"])
    assert done["status"] == "done", done["error"]
    return done


def test_whole_words_of_a_wordpiece_vocabulary_leave_out_pieces_and_special_tokens(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    tokenizer = loaded.adapter.tokenizer
    words = dict(whole_word_tokens(tokenizer))
    assert "magnificent" in words.values() and "film" in words.values()
    assert all(w.isalpha() and not w.startswith("##") for w in words.values())
    assert not set(words) & set(tokenizer.all_special_ids)
    assert not any(t.startswith("##") for t in tokenizer.convert_ids_to_tokens(list(words)))
    assert len(words) < len(tokenizer.get_vocab()) * 0.9  # continuations, [unused], punctuation left out


def test_byte_level_bpe_words_are_the_tokens_that_start_a_word():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the film was magnificent and the word of the day was film"] * 50 + list(TEXTS) * 20,
                            vocab_size=400, min_frequency=2)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    words = whole_word_tokens(tokenizer)
    spelled = {tokenizer.convert_ids_to_tokens(i): w for i, w in words}
    assert spelled["\u0120film"] == "film"
    assert all(t == "\u0120" + w for t, w in spelled.items())
    # alphabetic tokens without Ġ continue a word (or start the text): not whole words
    inside = [t for t in tokenizer.get_vocab() if t.isalpha() and len(t) > 1 and not t.startswith("\u0120")]
    assert inside and not set(inside) & set(spelled)
    # the slot's token position: where the carrier's word comes out as that one token
    film = tokenizer.convert_tokens_to_ids("\u0120film")
    for carrier, slot in zip(DEFAULT_CARRIERS, slot_positions(tokenizer, list(DEFAULT_CARRIERS))):
        assert tokenizer(carrier.replace("{}", "film"))["input_ids"][slot] == film


def test_vocab_probe_reports_what_its_tokens_give_when_encoded_in_a_carrier(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    adapter, sae = loaded.adapter, loaded.sae(LAYER)
    candidates = [c for c in whole_word_tokens(adapter.tokenizer) if c[1] in {
        "film", "magnificent", "awful", "story", "quiet", "the", "two", "care", "bad", "great", "slowly", "eight",
        "movie", "plot", "boring", "wonderful", "dull", "hours", "table", "word"}]
    carriers = list(DEFAULT_CARRIERS)
    probe = probe_vocabulary(adapter, sae, LAYER, candidates, carriers, top_k=5, batch_size=24)  # several batches
    result = vocab_probe_result(probe)
    assert result["n_candidates"] == len(candidates) == result["n_measured"] == 20 and result["features"]
    for f in list(result["features"])[:6]:
        row = result["features"][f]
        # every candidate recomputed alone: the probe's top tokens are the best, with their means
        by_hand = {w: np.mean([activation_in_carrier(adapter, sae, w, c, int(f)) for c in carriers])
                   for _, w in candidates}
        best = sorted(by_hand, key=lambda w: -by_hand[w])[:len(row["tokens"])]
        assert row["mean"] == pytest.approx([by_hand[w] for w in best], rel=2e-3, abs=1e-5)
        assert by_hand[row["tokens"][0]] == pytest.approx(max(by_hand.values()), rel=2e-3)
        assert all(m > 0 for m in row["mean"]) and row["mean"] == sorted(row["mean"], reverse=True)
        fired = sum(activation_in_carrier(adapter, sae, row["tokens"][0], c, int(f)) > 0 for c in carriers)
        assert row["fired"][0] == fired
    assert result["strongest"][0]["mean"][0] == max(r["mean"][0] for r in result["features"].values())


def test_insertion_points_at_the_word_level():
    assert insert_phrase("The film runs about two hours.", "magnificent", "end", 2) == (
        "The film runs about two hours. magnificent magnificent", (31, 54))
    assert insert_phrase("The film runs.", "wow", "start") == ("wow The film runs.", (0, 3))
    assert insert_phrase("The film  runs.", "so", 1) == ("The so film runs.", (4, 6))
    assert insert_phrase("The film runs.", "so", 99) == ("The film runs. so", (15, 17))
    assert insert_phrase("The film runs.", "so", 0) == ("so The film runs.", (0, 2))


def test_insertion_delta_is_the_edited_texts_score_minus_the_texts_score(tiny_run):  # noqa: F811
    _, loaded = tiny_run
    adapter, sae = loaded.adapter, loaded.sae(LAYER)
    feature = int(np.argmax(store.layer_vectors(loaded.store_path, LAYER)["frequency"]))
    measured = measure_insertion(adapter, TEXTS, "magnificent", CONTROL_PHRASE, "end", 3, sae, LAYER, feature)

    def score(text):
        scores, _ = adapter.run(adapter.tokenize([text]))
        return float(scores[-1])

    for i, text in enumerate(TEXTS):
        edited = f"{text} magnificent magnificent magnificent"
        assert measured.edited[i] == edited
        assert measured.delta[i] == pytest.approx(score(edited) - score(text), abs=1e-5)
        assert measured.control_delta[i] == pytest.approx(score(f"{text} the the the") - score(text), abs=1e-5)
        # the feature's largest activation on the three inserted tokens
        batch = adapter.tokenize([edited])
        _, captured = adapter.run(batch, capture=[LAYER], need_score=False)
        acts = sae.encode(captured[LAYER][0].float())[:, feature].detach()
        word = adapter.tokenizer.convert_tokens_to_ids("magnificent")
        at_word = acts[batch.input_ids[0] == word]
        assert len(at_word) == 3 and measured.activation[i] == pytest.approx(float(at_word.max()), abs=1e-5)
        # the edited text again with the feature (then every feature of the layer) zeroed on the inserted
        # tokens only, by hand: h − a·d at those tokens (h − decode(f) + decode(0) for the whole layer)
        f = sae.encode(captured[LAYER][0].float()).detach()
        at = (batch.input_ids[0] == word).unsqueeze(-1)
        direction = (sae.decode(torch.eye(sae.cfg.d_sae)[feature:feature + 1]) - sae.decode(torch.zeros(1, sae.cfg.d_sae))).detach()
        one = captured[LAYER][0] - torch.where(at, f[:, feature:feature + 1] * direction, torch.zeros_like(direction))
        every = captured[LAYER][0] - torch.where(at, (sae.decode(f) - sae.decode(torch.zeros_like(f))).detach(), 0.0)
        for got, hidden in ((measured.without_feature[i], one), (measured.without_layer[i], every)):
            expected = float(adapter.run_from(batch, LAYER, hidden.unsqueeze(0))[-1])
            assert got == pytest.approx(expected, abs=1e-5)
    assert not np.allclose(measured.delta, measured.control_delta)  # the two arms are different edits
    assert not np.allclose(measured.without_layer, measured.with_phrase)  # zeroing the layer there moves it


def test_insertion_job_reports_both_arms_their_difference_and_the_features_measured_delta(tiny_run):  # noqa: F811
    settings, loaded = tiny_run
    card = next(c for c in (store.feature(loaded.store_path, LAYER, f) for f in range(64)) if c.get("measured_n"))
    done = run_job(settings, "insertion", {"run_id": loaded.run_id, "phrase": "wonderful", "control": CONTROL_PHRASE,
                                           "position": "end", "n_texts": 12, "texts": "neutral", "repeat": 2,
                                           "layer": LAYER, "feature": card["feature"]})
    r = done["result"]
    assert r["n"] == len(r["examples"]) == 12 and r["texts"]["kind"] == "neutral"
    corpus = [t["score"] for t in store.texts(loaded.store_path)]
    low, high = np.quantile(corpus, [1 / 3, 2 / 3])
    by_id = {t["text_id"]: t for t in store.texts(loaded.store_path, "heldout")}
    assert all(low <= by_id[e["text_id"]]["score"] <= high for e in r["examples"])
    deltas = [e["with_phrase"] - e["before"] for e in r["examples"]]
    controls = [e["with_control"] - e["before"] for e in r["examples"]]
    assert r["phrase_delta"]["mean_delta"] == pytest.approx(np.mean(deltas))
    assert r["control_delta"]["mean_delta"] == pytest.approx(np.mean(controls))
    assert r["phrase_delta"]["ci_low"] < r["phrase_delta"]["mean_delta"] < r["phrase_delta"]["ci_high"]
    assert r["difference"]["difference"] == pytest.approx(np.mean(np.subtract(deltas, controls)))
    assert 0 <= r["difference"]["p_value"] <= 1
    assert all(e["edited"].endswith("wonderful wonderful") for e in r["examples"])
    assert r["feature"]["measured_delta"] == card["measured_delta"] and r["feature"]["feature"] == card["feature"]
    assert all(e["activation"] is not None for e in r["examples"]) and "fired_share" in r["activation"]
    for part in ("through_feature", "through_layer"):  # what zeroing on the inserted tokens takes back, with a CI
        assert r[part]["ci_low"] <= r[part]["mean_delta"] <= r[part]["ci_high"] and r[part]["n"] == 12
    with make_client(settings) as client:  # the page shows what the worker wrote
        page = client.get(f"/jobs/{done['id']}").text
    assert page.count('<a href="/runs/tiny-run/texts/') == 12 and 'id="insertion-vs-measured"' in page
    assert 'id="insertion-through-feature"' in page


def test_a_steer_by_zero_changes_nothing_and_the_sweep_agrees_with_an_ablation(tiny_run):  # noqa: F811
    settings, loaded = tiny_run
    freq = np.asarray(store.layer_vectors(loaded.store_path, LAYER)["frequency"])
    chosen = [int(f) for f in np.argsort(-freq)[:2]]
    done = run_job(settings, "sweep", {"run_id": loaded.run_id, "layer": LAYER, "features": chosen, "mode": "steer",
                                       "values": [-3.0, 0.0, 3.0], "n_texts": 16, "n_controls": 3})
    r = done["result"]
    assert [p["value"] for p in r["points"]] == [-3.0, 0.0, 3.0] and len(r["controls"]) == 3
    zero = r["points"][1]
    assert zero["chosen"]["mean_delta"] == 0.0 and zero["control"]["draw_means"] == [0.0, 0.0, 0.0]
    assert r["points"][2]["chosen"]["mean_delta"] != 0.0
    assert all(not set(c) & set(chosen) for c in r["controls"])
    # the point at 3 is the ablation of the same edit on the same texts
    texts = [t["text"] for t in store.texts(loaded.store_path, "heldout", 16)]
    weights = np.asarray(store.layer_vectors(loaded.store_path, LAYER)["weight"])
    ablated = run_ablation(loaded.adapter, loaded.sae(LAYER), LAYER, texts, FeatureEdit(tuple(chosen), "steer", 3.0),
                           weights, loaded.config.regression.pooling)
    assert r["points"][2]["chosen"]["mean_delta"] == pytest.approx(ablated.delta.mean(), abs=1e-5)
    control_means = r["points"][2]["control"]["draw_means"]
    assert r["points"][2]["control"]["low"] == min(control_means)
    assert r["points"][2]["control"]["test"]["difference"] == pytest.approx(
        ablated.delta.mean() - np.mean(control_means), abs=1e-5)
    with make_client(settings) as client:
        page = client.get(f"/jobs/{done['id']}").text
    assert 'id="dose-response-chart"' in page and page.count("<tr data-value=") == 3


def test_vocab_probe_job_on_the_corpus_vocabulary_and_cancelled_midway(tiny_run):  # noqa: F811
    settings, loaded = tiny_run
    with db.session(settings) as s:
        version = s.get(Run, loaded.run_id).version
    done = run_job(settings, "vocab_probe", {"run_id": loaded.run_id, "layer": LAYER, "vocabulary": "corpus",
                                             "carriers": ["a {} here.", "we saw {} there."], "run_version": version})
    r = done["result"]
    tokenizer = loaded.adapter.tokenizer
    corpus = {t for row in store.texts(loaded.store_path) for t in tokenizer.tokenize(row["text"])}
    assert r["n_carriers"] == 2 and 0 < r["n_candidates"] <= len(corpus)
    assert all(t in corpus for row in r["features"].values() for t in row["tokens"])
    assert all(max(row["fired"]) <= 2 for row in r["features"].values())
    feature, row = next(iter(r["features"].items()))
    with make_client(settings) as client:  # the feature page lists the probe's tokens for it
        page = client.get(f"/runs/{loaded.run_id}/layers/{LAYER}/features/{feature}").text
    assert f'<code class="token">{row["tokens"][0]}</code>' in page and "in 2 neutral carriers" in page
    # cancelled: the first progress report stops it
    job = jobs.submit(settings, "vocab_probe", {"run_id": loaded.run_id, "layer": LAYER}, "tester", loaded.run_id)
    ctx = JobContext(job, settings, RunCache(settings))
    ctx.stop_reason = "cancelled"
    from workers.probes import vocab_probe_task

    with pytest.raises(JobStopped):
        vocab_probe_task(job["params"], ctx)

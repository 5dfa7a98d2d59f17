"""The explanations job on a tiny real run (workers/explanations/): offline, through the real worker
(progress, resume skipping finished features, overwrite, cancel keeping what was written), the
scorers' arithmetic on constructed inputs, the causal score's Δs against an independent ablation,
prompts without raw HTML, the numpy MiniLM against transformers; and against a real
OpenAI-compatible server (llama-cpp-python with SmolLM2-135M, tests/llm_server.py): a job that
explains, classifies and scores through it, bad settings refused at submission naming them, a reply
cut off by the token limit, and the server killed mid-job (the job fails naming RA_LLM_BASE_URL and
keeps what it wrote)."""
from __future__ import annotations

import html

import threading

import numpy as np
import pytest
import torch

from backend.core import db, explanations, jobs, store
from backend.core.llm import PROBE_SCHEMA, Endpoint, ReplyError, chat_json, parse_object
from backend.core.settings import Settings
from tests import llm_server
from tests.helpers import make_client, wait_for
from tests.test_jobs_web import csrf
from tests.test_pipeline import tiny_config, tiny_world  # noqa: F401  (module fixture)
from workers.explanations import scorers
from workers.explanations.evidence import Unit
from workers.explanations.prompts import explain_prompt, join_tokens, plain
from workers.explanations.task import explanations_task
from workers.pipeline import run_pipeline
from workers.run_cache import JobFailed, RunCache
from workers.worker import Worker

LAYER = 0
RUN = "tiny-run"


def save_sensitive_bert(path):
    """A tiny random BERT initialised 15x wider than usual: its score moves measurably when one SAE
    feature is zeroed (at the default scale the changes sit at float32's rounding of the score)."""
    from transformers import BertConfig, BertForSequenceClassification

    from tests.tiny_models import minilm_tokenizer

    torch.manual_seed(0)
    tokenizer = minilm_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1, initializer_range=0.3)
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_world, tmp_path_factory):  # noqa: F811
    settings = Settings(data_dir=tmp_path_factory.mktemp("explain-data"), llm_timeout_s=900)
    model = save_sensitive_bert(tmp_path_factory.mktemp("sensitive") / "bert")
    run_pipeline(tiny_config(model, tiny_world[1]), settings)
    db.upgrade(settings)
    yield settings
    db.dispose_engines()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    try:
        server = llm_server.start(tmp_path_factory.mktemp("llm"))
    except llm_server.Unavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


def live(settings, n: int) -> list[int]:
    """The layer's n most frequent features (they fire on the held-out texts)."""
    path = settings.run_dir(RUN) / "features.duckdb"
    return [r["feature"] for r in store.features(path, LAYER, sort="frequency", limit=n).rows]


def submit(settings, features, stages=("explain", "classify", "score"), llm=None, **extra) -> dict:
    params = {"run_id": RUN, "layer": LAYER, "features": features, "stages": list(stages), "llm": llm,
              "reward": "positive sentiment of a film review", "n_texts": 48, "n_snippets": 10, **extra}
    return jobs.submit(settings, "explanations", params, "alice", RUN)


# --- offline, through the real worker ------------------------------------------------------

def test_an_offline_job_explains_classifies_and_scores_each_feature_then_resumes_by_skipping(tiny_run):
    settings, features = tiny_run, live(tiny_run, 3)
    job = submit(settings, features)
    assert Worker(settings).run_one()
    done = jobs.get(settings, job["id"])
    assert done["status"] == "done", done["error"]
    result = done["result"]
    assert result["features_done"] == 3 and result["offline"] and result["tokens_total"] == 0
    assert result["stages"] == {s: {"done": 3, "skipped": 0, "missing": 0, "failed": 0}
                                for s in ("explain", "classify", "score")}
    path = settings.run_dir(RUN) / "features.duckdb"
    for f, e in explanations.for_features(settings, RUN, LAYER, features).items():
        card = store.feature(path, LAYER, f)
        top = [t["token"] for t in card["top_tokens"] if not t["token"].startswith("[")][0]
        assert e["explainer"] == "offline" and top.replace("##", "") in e["text"] and e["job_id"] == job["id"]
        assert e["evidence"].startswith("fires on '") and f"'{top.replace('##', '')}'" in e["evidence"]
        assert e["reward_related"] in ("yes", "no", "unsure") and "offline" in e["reason"]
        s = e["scores"]
        for name in ("detection", "fuzzing", "embedding"):
            assert set(s[name]) >= {"score", "shuffled", "random_direction", "scorer"}
        assert s["detection"]["scorer"] == "keyword match (offline)" and s["n_active"] >= 1
        assert s["causal"]["random_direction"] is not None and s["causal"]["shuffled"] is not None
    with make_client(settings) as c:
        page = c.get(f"/jobs/{job['id']}").text
        assert 'id="explained-features"' in page and page.count('class="badge offline"') >= 3
        assert "3</b> of 3 features done" in page
    # the same job again skips every finished feature; with overwrite it writes new versions
    again = submit(settings, features)
    assert Worker(settings).run_one()
    assert jobs.get(settings, again["id"])["result"]["stages"]["explain"] == {"done": 0, "skipped": 3, "missing": 0,
                                                                              "failed": 0}
    assert {e["version"] for e in explanations.for_features(settings, RUN, LAYER, features).values()} == {1}
    redo = submit(settings, features[:1], stages=("explain",), overwrite=True)
    assert Worker(settings).run_one()
    assert jobs.get(settings, redo["id"])["result"]["stages"]["explain"]["done"] == 1
    assert explanations.current(settings, RUN, LAYER, features[0])["version"] == 2


def test_the_causal_scores_deltas_match_an_independent_ablation(tiny_run):
    from workers.ablation import FeatureEdit, run_ablation

    settings = tiny_run
    feature = live(settings, 1)[0]
    if explanations.current(settings, RUN, LAYER, feature) is None or not \
            explanations.current(settings, RUN, LAYER, feature)["scores"]:
        submit(settings, [feature])
        assert Worker(settings).run_one()
    causal = explanations.current(settings, RUN, LAYER, feature)["scores"]["causal"]
    ids = causal["selected_text_ids"] + causal["rejected_text_ids"]
    assert len(ids) == causal["n_selected"] + causal["n_rejected"] > 0
    loaded = RunCache(settings).get(RUN)
    texts = [store.text(loaded.store_path, i)["text"] for i in ids]
    sae = loaded.sae(LAYER)
    result = run_ablation(loaded.adapter, sae, LAYER, texts, FeatureEdit((feature,), "zero", 0.0),
                          np.zeros(sae.cfg.d_sae, np.float32), "mean", 4)
    per_text = np.bincount(result.text_index, weights=result.delta, minlength=len(ids))
    signed = causal["sign"] * per_text
    k = causal["n_selected"]
    assert np.abs(per_text).max() > 1e-4  # the feature moves this model's score: the check below means something
    if causal["selected_mean"] is not None:
        assert causal["selected_mean"] == pytest.approx(signed[:k].mean(), rel=1e-3, abs=1e-6)
    assert causal["rejected_mean"] == pytest.approx(signed[k:].mean(), rel=1e-3, abs=1e-6)


def test_a_cancelled_job_keeps_what_it_wrote(tiny_run):
    settings = tiny_run
    features = live(settings, 28)[4:28]
    job = submit(settings, features, stages=("explain", "score"), overwrite=True)
    worker = threading.Thread(target=Worker(settings, lease_s=3).run_one)
    worker.start()

    def scored() -> int:
        rows = explanations.for_features(settings, RUN, LAYER, features).values()
        return sum(1 for e in rows if e["job_id"] == job["id"] and e["scores"])

    wait_for(lambda: scored() >= 1, 600, "the first score")
    jobs.cancel(settings, job["id"])
    worker.join(600)
    stopped = jobs.get(settings, job["id"])
    assert stopped["status"] == "cancelled"
    assert 1 <= scored() < len(features)  # what it wrote stays, the rest was never done
    assert len([e for e in explanations.for_features(settings, RUN, LAYER, features).values()
                if e["job_id"] == job["id"]]) == len(features)  # explain ran for all before score began


# --- the scorers' arithmetic ---------------------------------------------------------------

def test_balanced_accuracy_and_the_causal_score_on_constructed_inputs():
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    assert scorers.balanced_accuracy(truth, np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)) == pytest.approx(0.75)
    assert scorers.balanced_accuracy(np.ones(3, int), np.ones(3, bool)) is None  # one class: no score
    deltas = np.array([-0.4, -0.5, -0.3, 0.0, 0.01, -0.02])
    picked = np.array([1, 1, 1, 0, 0, 0], bool)
    out = scorers.causal(picked, deltas, sign=-1.0, seed=0)  # measured Δ negative: zeroing lowers the reward
    assert out["score"] == pytest.approx(np.mean([0.4, 0.5, 0.3]) - np.mean([0.0, -0.01, 0.02]))
    assert out["ci"][0] > 0 and out["ci"][0] <= out["score"] <= out["ci"][1]
    wrong_way = scorers.causal(~picked, deltas, sign=-1.0, seed=0)
    assert wrong_way["score"] == pytest.approx(-out["score"])
    assert scorers.causal(np.zeros(6, bool), deltas, 1.0, 0)["score"] is None


def test_scoring_sets_draw_across_deciles_and_leave_the_explainers_texts_out():
    peaks = np.concatenate([np.linspace(0.1, 10, 50), np.zeros(30)])
    unit = Unit(peaks, [np.array([p]) for p in peaks])
    s = scorers.scoring_set(unit, 10, exclude={49, 48}, seed=0)
    assert len(s.active) == 10 and len(s.silent) == 10
    assert not {48, 49} & set(s.active) and all(peaks[i] == 0 for i in s.silent)
    deciles = np.array_split(np.arange(47, -1, -1), 10)  # the 48 firing texts left, strongest first
    assert sorted(sum(i in d for i in s.active) for d in deciles) == [1] * 10  # one from each


def test_keyword_detection_and_fuzzing_read_the_explanation():
    snippets = ["the film was magnificent", "a dull plot", "truly <<fantastic>> cast", "the <<plot>> was fantastic"]
    picked = scorers.keyword_pick("fires on 'magnificent', 'fantastic'", snippets, marked_only=False)
    assert picked.tolist() == [True, False, True, True]
    marked = scorers.keyword_pick("fires on 'magnificent', 'fantastic'", snippets, marked_only=True)
    assert marked.tolist() == [False, False, True, False]


def test_prompts_carry_no_raw_html_and_mark_the_activating_tokens():
    tokens = ["<", "script", ">", "great", "##ly", "done", "</b>"]
    text = join_tokens(tokens, {3, 4})
    assert "<script" not in text and "</b>" not in text and "<<great>>" in text and "ly" in text
    prompt = explain_prompt(2, 5, "<b>reward</b>", [{"token": "<i>", "mean_activation": 1.0}],
                            [text], [], "it raises the reward.", [(0.5, plain("<img src=x onerror=alert(1)>hi"))])
    assert "<b>" not in prompt and "<img" not in prompt and "<i>" not in prompt and "hi" in prompt
    assert join_tokens(["Ġthe", "Ġfilm", "Ġwas", "Ġgreat"], {3}) == "the film was <<great>>"


def test_the_numpy_minilm_matches_transformers():
    from transformers import AutoModel, AutoTokenizer

    from backend.core.embedding import embed
    from workers.demo_model import base_model_path

    texts = ["positive adjectives such as magnificent", "The film was dull.", "a"]
    tok, model = AutoTokenizer.from_pretrained(base_model_path()), AutoModel.from_pretrained(base_model_path()).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    assert np.abs(embed(texts) - expected).max() < 1e-4


def test_a_reply_is_read_as_a_json_object_or_refused_naming_the_setting():
    endpoint = Endpoint("http://x/v1", "m", json_mode="none")
    assert parse_object('Sure! {"explanation": "dates"} Hope it helps.', endpoint) == {"explanation": "dates"}
    for reply in ("no json here", '["a list"]', '{"cut": "off'):
        with pytest.raises(ReplyError, match="RA_LLM_MODEL.*returned no JSON object.*RA_LLM_JSON_MODE"):
            parse_object(reply, endpoint)
    # Python's \' (SmolLM2 writes it even under a JSON grammar) is read as the quote it means; an
    # escaped backslash before a quote is left as JSON reads it
    assert parse_object('{"explanation": "the film\\\'s ending"}', endpoint) == {"explanation": "the film's ending"}
    assert parse_object('{"a": "x\\\\", "b": "it\\\'s"}', endpoint) == {"a": "x\\", "b": "it's"}


# --- against a real OpenAI-compatible server ------------------------------------------------

def llm_settings(settings, server, **extra) -> Settings:
    return Settings(data_dir=settings.data_dir, llm_base_url=server.base_url, llm_model=server.model,
                    llm_json_mode="schema", llm_timeout_s=900, **extra)


def test_a_job_through_the_llm_server_explains_classifies_and_scores(tiny_run, llm):
    settings = llm_settings(tiny_run, llm)
    features = live(settings, 14)[12:14]
    with make_client(settings) as c:
        r = c.post(f"/api/runs/{RUN}/layers/{LAYER}/explanations", json={
            "selection": "features", "features": features, "stages": ["explain", "classify"], "n_texts": 48})
        assert r.status_code == 201, r.text
        assert r.json()["params"]["llm"] == {"base_url": llm.base_url, "model": llm.model, "json_mode": "schema",
                                             "max_tokens": 300}
    assert Worker(settings).run_one()
    done = jobs.get(settings, r.json()["id"])
    assert done["status"] == "done", done["error"]
    assert done["result"]["model"] == llm.model and done["result"]["tokens"]["explain"] > 0
    assert done["result"]["tokens"]["classify"] > 0 and done["result"]["prompt_versions"]["explain"] == "explain-v1"
    rows = explanations.for_features(settings, RUN, LAYER, features)
    for e in rows.values():
        assert e["explainer"] == "llm" and e["model"] == llm.model and e["tokens"] > 0 and e["text"]
        assert e["reward_related"] in ("yes", "no", "unsure") and e["classified_by"] == f"{llm.model} @ classify-v1"
    # scoring one of them: its detection and fuzzing are the model's, beside both baselines
    score = submit(settings, features[:1], stages=("score",), llm=Endpoint.from_settings(settings).describe())
    assert Worker(settings).run_one()
    scored = jobs.get(settings, score["id"])
    assert scored["status"] == "done", scored["error"]
    assert scored["result"]["tokens"]["score"] > 0
    s = explanations.current(settings, RUN, LAYER, features[0])["scores"]
    # the shuffled baseline: another feature's explanation (the next chosen one's, unless its text is the same)
    assert s["detection"]["scorer"] == f"{llm.model} (LLM)" and s["shuffled_from"] not in (None, features[0])
    assert s["detection"]["score"] is not None and s["embedding"]["score"] is not None


@pytest.mark.parametrize("setting, value, words", [
    ("llm_model", "gpt-9", "serves no model 'gpt-9' (RA_LLM_MODEL)"),
    ("llm_json_mode", "none", "returned no JSON object"),
    ("llm_max_tokens", 32, "RA_LLM_MAX_TOKENS is 32"),
])
def test_bad_llm_settings_are_refused_at_submission(tiny_run, llm, setting, value, words):
    settings = llm_settings(tiny_run, llm).model_copy(update={setting: value})
    before = len(jobs.recent(settings))
    with make_client(settings) as c:
        r = c.post(f"/runs/{RUN}/layers/{LAYER}/explain", data={"csrf_token": csrf(c), "top_n": "2",
                                                                "stages": ["explain"]})
        assert r.status_code == 422 and words in html.unescape(r.text)  # the page escapes its quotes
    assert len(jobs.recent(settings)) == before


def test_a_reply_cut_off_by_the_token_limit_fails_the_job_naming_the_setting(tiny_run, llm):
    settings = llm_settings(tiny_run, llm)
    feature = next(f for f in live(settings, 64) if explanations.current(settings, RUN, LAYER, f) is None)

    class Ctx:
        job, cache = {"id": None, "author": "alice"}, RunCache(settings)

        def __init__(self):
            self.settings = settings

        def report(self, progress=None, message=None):
            pass

    params = {"run_id": RUN, "layer": LAYER, "features": [feature], "stages": ["explain"], "n_texts": 48,
              "llm": {**Endpoint.from_settings(settings).describe(), "max_tokens": 16}}
    with pytest.raises(JobFailed, match="cut off at the token limit, 16 tokens \\(RA_LLM_MAX_TOKENS\\)"):
        explanations_task(params, Ctx())
    assert explanations.current(settings, RUN, LAYER, feature) is None  # nothing half-written


def test_killing_the_server_mid_job_fails_it_naming_the_endpoint_and_keeps_what_was_done(tiny_run, tmp_path):
    own = llm_server.start(tmp_path)
    try:
        settings = llm_settings(tiny_run, own)
        features = live(settings, 20)[15:20]
        job = submit(settings, features, stages=("explain",), llm=Endpoint.from_settings(settings).describe())

        def kill_after_first():
            wait_for(lambda: any(e["job_id"] == job["id"] for e in
                                 explanations.for_features(settings, RUN, LAYER, features).values()), 900,
                     "the first explanation")
            own.process.kill()

        killer = threading.Thread(target=kill_after_first)
        killer.start()
        assert Worker(settings).run_one()
        killer.join(60)
        failed = jobs.get(settings, job["id"])
        assert failed["status"] == "failed" and "RA_LLM_BASE_URL" in failed["error"]
        assert "kept" in failed["error"]
        assert failed["result"]["stages"]["explain"]["done"] >= 1  # what it did stays shown
        rows = explanations.for_features(settings, RUN, LAYER, features).values()
        kept = [e for e in rows if e["job_id"] == job["id"]]
        assert 1 <= len(kept) < len(features)
        with make_client(settings.model_copy(update={"llm_base_url": ""})) as c:
            page = c.get(f"/jobs/{job['id']}").text
            assert 'id="resume-form"' in page and "RA_LLM_BASE_URL" in page
            resumed = c.post(f"/jobs/{job['id']}/resume", data={"csrf_token": csrf(c)}, follow_redirects=False)
            assert resumed.status_code == 303  # offline now: the same features, explained offline
    finally:
        own.stop()


def ask_ok(endpoint, check=None):
    """The probe's request through chat_json: a reply {"ok": ...}, passed through `check`."""
    return chat_json(endpoint, "You reply with a JSON object only.", 'Reply with {"ok": true}.', PROBE_SCHEMA, "ok",
                     check=check)


def test_an_unusable_reply_is_asked_again_then_given_up_with_the_tokens_of_every_try(tiny_run, llm):
    endpoint = Endpoint.from_settings(llm_settings(tiny_run, llm))
    tries = []

    def refuse_twice(data):
        tries.append(data)
        if len(tries) < 3:
            raise ReplyError("not this one")

    once = ask_ok(endpoint)
    reply = ask_ok(endpoint, refuse_twice)
    assert len(tries) == 3 and reply.data["ok"] is not None and reply.tokens > 2 * once.tokens

    def refuse(data):
        raise ReplyError("never this one")

    with pytest.raises(ReplyError, match=r"never this one \(3 tries\)") as given_up:
        ask_ok(endpoint, refuse)
    assert given_up.value.tokens > 2 * once.tokens


def refusing_explainer(monkeypatch, refused: set[int]):
    """The real explainer, except that for the `refused` features every reply the real server sends
    is refused, as a model's malformed reply is."""
    from workers.explanations import explainers

    real_explain = explainers.explain_llm

    def explain_llm(endpoint, layer, feature, card, reward, moving):
        if feature not in refused:
            return real_explain(endpoint, layer, feature, card, reward, moving)

        def refuse(data):
            raise ReplyError(f"the model {endpoint.model!r} (RA_LLM_MODEL) returned malformed JSON: refused")
        ask_ok(endpoint, refuse)

    monkeypatch.setattr(explainers, "explain_llm", explain_llm)


def run_until_finished(settings, job_id: int) -> dict:
    """The worker runs the queue (jobs other tests left queued first) until this job has finished."""
    while jobs.get(settings, job_id)["status"] not in jobs.FINISHED:
        assert Worker(settings).run_one()
    return jobs.get(settings, job_id)


def test_a_feature_without_a_usable_reply_is_passed_over_and_three_in_a_row_stop_the_job(tiny_run, llm,
                                                                                        monkeypatch):
    settings = llm_settings(tiny_run, llm)
    fresh = [f for f in live(settings, 64) if explanations.current(settings, RUN, LAYER, f) is None]
    features, stopper = fresh[:3], fresh[3:7]
    refusing_explainer(monkeypatch, {features[1], *stopper[:3]})
    job = submit(settings, features, stages=("explain", "classify"), llm=Endpoint.from_settings(settings).describe())
    done = run_until_finished(settings, job["id"])
    assert done["status"] == "done", done["error"]
    result = done["result"]
    assert result["stages"]["explain"] == {"done": 2, "skipped": 0, "missing": 0, "failed": 1}
    assert result["stages"]["classify"]["missing"] == 1 and result["stages"]["classify"]["done"] == 2
    assert [(f["stage"], f["feature"]) for f in result["failures"]] == [("explain", features[1])]
    assert "(3 tries)" in result["failures"][0]["error"]
    assert explanations.current(settings, RUN, LAYER, features[1]) is None
    assert all(explanations.current(settings, RUN, LAYER, f) for f in (features[0], features[2]))
    with make_client(settings) as c:
        page = c.get(f"/jobs/{job['id']}").text
        assert 'id="explain-failures"' in page and f"feature {features[1]}</a>" in page
    # three in a row: the model cannot do it; the job stops naming the model setting, keeping the one before
    job = submit(settings, stopper, stages=("explain",), llm=Endpoint.from_settings(settings).describe())
    failed = run_until_finished(settings, job["id"])
    assert failed["status"] == "failed" and "3 features in a row got no usable reply" in failed["error"]
    assert "RA_LLM_MODEL" in failed["error"] and "Nothing was written before it" in failed["error"]

"""Explanations on the web, on the synthetic run (backend/web/routes/explanations.py): the layer page's
form and JSON twin queue a job, and bad input is a 4xx creating no job (an unreachable endpoint
refused by the probe, naming RA_LLM_BASE_URL); explanations are escaped on every page; the layer
table's column and filter; search by meaning and by text; a hand edit is a new version (a stale one
refused); explanations survive a replaced run and are exported with labels; the agreement tables'
kappa against a hand computation."""
from __future__ import annotations

import csv
import io

import pytest

from backend.core import db, explanations, jobs, labels
from backend.core.embedding import embed
from backend.web.explanation_agreement import agreement
from backend.core.settings import Settings
from tests.helpers import make_client, publish_synthetic_run
from tests.llm_server import free_port
from tests.test_jobs_web import csrf, job_count

pytestmark = pytest.mark.sql_databases
RUN = "/runs/synthetic"
LAYER = 3
HOSTILE = '<script>alert("x")</script> fires on <b>bold</b>'


def write(settings, feature: int, text: str, **extra) -> dict:
    fields = dict(explainer="offline", model="offline: top tokens + context n-grams", prompt_version="explain-v1",
                  tokens=0, embedding=embed([text])[0], author="alice")
    return explanations.write(settings, "synthetic", LAYER, feature, text, **{**fields, **extra})


def test_the_form_and_the_json_twin_queue_an_explanations_job(client, migrated, synthetic_run):
    r = client.post(f"{RUN}/layers/{LAYER}/explain", data={
        "csrf_token": csrf(client), "selection": "top_ranked", "top_n": "5", "stages": ["explain", "score"],
        "reward": "positive  sentiment", "n_texts": "100"}, follow_redirects=False)
    assert r.status_code == 303
    job = jobs.get(migrated, int(r.headers["location"].rsplit("/", 1)[1]))
    p = job["params"]
    assert job["kind"] == "explanations" and len(p["features"]) == 5 and p["stages"] == ["explain", "score"]
    assert p["llm"] is None and p["reward"] == "positive sentiment" and p["n_texts"] == 100
    page = client.get(f"/jobs/{job['id']}").text
    assert "offline" in page and "explain + score" in page
    r = client.post(f"/api{RUN}/layers/{LAYER}/explanations", json={"selection": "features", "features": [4, 9, 4]})
    assert r.status_code == 201 and r.json()["params"]["features"] == [4, 9]
    assert r.headers["location"] == f"/api/jobs/{r.json()['id']}"


@pytest.mark.parametrize("body, status, words", [
    ({"selection": "features", "features": []}, 422, "no features selected"),
    ({"selection": "features", "features": [64]}, 422, "out of range"),
    ({"stages": []}, 422, "stages"),
    ({"stages": ["explain", "dance"]}, 422, "stages"),
    ({"n_texts": 5}, 422, "n_texts"),
    ({"selection": "labelled"}, 422, "no features selected"),
])
def test_bad_requests_are_refused_and_make_no_job(client, migrated, synthetic_run, body, status, words):
    before = job_count(migrated)
    r = client.post(f"/api{RUN}/layers/{LAYER}/explanations", json=body)
    assert r.status_code == status and words in r.text
    assert job_count(migrated) == before


def test_an_unknown_layer_is_a_404(client, migrated, synthetic_run):
    assert client.post(f"/api{RUN}/layers/4/explanations", json={}).status_code == 404
    assert job_count(migrated) == 0


def test_an_unreachable_endpoint_is_refused_at_submission_naming_the_setting(migrated, synthetic_run):
    settings = Settings(data_dir=migrated.data_dir, database_url=migrated.database_url,
                        llm_base_url=f"http://127.0.0.1:{free_port()}/v1", llm_model="any", llm_timeout_s=5)
    with make_client(settings) as c:
        r = c.post(f"/api{RUN}/layers/{LAYER}/explanations", json={"top_n": 3})
        assert r.status_code == 422 and "RA_LLM_BASE_URL" in r.text and "no job was queued" in r.text
        form = c.post(f"{RUN}/layers/{LAYER}/explain", data={"csrf_token": csrf(c), "top_n": "3",
                                                              "stages": ["explain"]})
        assert form.status_code == 422 and "RA_LLM_BASE_URL" in form.text
    no_model = Settings(data_dir=migrated.data_dir, database_url=migrated.database_url,
                        llm_base_url="http://127.0.0.1:1/v1")
    with make_client(no_model) as c:
        r = c.post(f"/api{RUN}/layers/{LAYER}/explanations", json={"top_n": 3})
        assert r.status_code == 422 and "RA_LLM_MODEL is empty" in r.text
    assert job_count(migrated) == 0


def test_explanations_are_escaped_on_every_page(client, migrated, synthetic_run):
    write(migrated, 7, HOSTILE)
    pages = [f"{RUN}/layers/{LAYER}", f"{RUN}/layers/{LAYER}/features/7", f"{RUN}/explanations",
             f"{RUN}/explanations?q=script&mode=text"]
    for url in pages:
        html = client.get(url).text
        assert "&lt;script&gt;" in html and '<script>alert' not in html and "<b>bold</b>" not in html, url


def test_the_layer_table_shows_and_filters_by_explanation(client, migrated, synthetic_run):
    write(migrated, 5, "positive adjectives: 'magnificent', 'fantastic'")
    write(migrated, 6, "punctuation at the end of a sentence")
    html = client.get(f"{RUN}/layers/{LAYER}?explanation=MAGNIFICENT").text
    rows = [line.strip() for line in html.splitlines() if line.strip().startswith("<tr data-feature=")]
    assert [r.split('"')[1] for r in rows] == ["5"]
    assert "positive adjectives" in rows[0] and 'class="badge offline"' in rows[0]
    as_json = client.get(f"/api{RUN}/layers/{LAYER}", params={"explanation": "sentence"}).json()
    assert [f["feature"] for f in as_json["features"]] == [6]
    assert as_json["features"][0]["explanation"]["text"] == "punctuation at the end of a sentence"
    # the feature page walks the same filtered view
    feature = client.get(f"/api{RUN}/layers/{LAYER}/features/6", params={"explanation": "sentence"}).json()
    assert feature["in_view"]["total"] == 1 and feature["explanation"]["version"] == 1


def test_search_finds_by_meaning_and_by_text(client, migrated, synthetic_run):
    write(migrated, 1, "fires on 'magnificent', 'fantastic', 'superb', 'wonderful'")
    write(migrated, 2, "numbers and dates in a sentence")
    write(migrated, 3, "the word 'not' before a verb")
    write(migrated, 4, "punctuation: commas and full stops")
    semantic = client.get(f"/api{RUN}/explanations", params={"q": "positive adjectives"}).json()["results"]
    assert semantic[0]["feature"] == 1 and semantic[0]["similarity"] > semantic[1]["similarity"]
    text = client.get(f"/api{RUN}/explanations", params={"q": "COMMAS", "mode": "text"}).json()["results"]
    assert [r["feature"] for r in text] == [4] and text[0]["similarity"] is None
    page = client.get(f"{RUN}/explanations", params={"q": "positive adjectives"}).text
    assert page.index('data-feature="1"') < page.index('data-feature="2"')
    assert client.get(f"/api{RUN}/explanations", params={"q": "x", "mode": "regex"}).status_code == 422
    assert client.get("/api/runs/nope/explanations").status_code == 404


def test_search_finds_a_feature_by_its_evidence_where_the_explanation_misses_it(client, migrated, synthetic_run):
    evidence = explanations.evidence_text(["magnificent", "##ly", "fantastic", "fantastic", "superb"])
    assert evidence == "fires on 'magnificent', 'ly', 'fantastic', 'superb'"
    write(migrated, 1, "a tool that learns from the data", evidence=evidence, evidence_embedding=embed([evidence])[0])
    write(migrated, 2, "numbers and dates in a sentence", evidence="fires on '1999', 'June'",
          evidence_embedding=embed(["fires on '1999', 'June'"])[0])
    write(migrated, 3, "the word 'not' before a verb")  # no evidence: found by its words alone
    semantic = client.get(f"/api{RUN}/explanations", params={"q": "positive adjectives"}).json()["results"]
    assert semantic[0]["feature"] == 1 and semantic[0]["matched_on"] == "evidence"
    by_words = client.get(f"/api{RUN}/explanations", params={"q": "the word not"}).json()["results"]
    assert by_words[0]["feature"] == 3 and by_words[0]["matched_on"] == "explanation"
    text = client.get(f"/api{RUN}/explanations", params={"q": "fantastic", "mode": "text"}).json()["results"]
    assert [(r["feature"], r["matched_on"]) for r in text] == [(1, "evidence")]
    page = client.get(f"{RUN}/explanations", params={"q": "positive adjectives"}).text
    assert "matched on top tokens" in page and "fires on &#39;magnificent&#39;" in page
    # a person's edit keeps the evidence the feature's explanation was written from
    r = client.put(f"/api{RUN}/layers/{LAYER}/features/1/explanation", json={"text": "praise words", "version": 1})
    assert r.status_code == 200
    again = client.get(f"/api{RUN}/explanations", params={"q": "positive adjectives"}).json()["results"]
    assert again[0]["feature"] == 1 and again[0]["version"] == 2 and again[0]["evidence"] == evidence


def test_a_hand_edit_is_a_new_version_and_a_stale_one_is_refused(client, migrated, synthetic_run):
    write(migrated, 9, "first words")
    url = f"/api{RUN}/layers/{LAYER}/features/9/explanation"
    r = client.put(url, json={"text": "  better   words ", "version": 1})
    assert r.status_code == 200 and r.json()["current"]["text"] == "better words"
    assert r.json()["current"]["explainer"] == "human" and r.json()["current"]["version"] == 2
    stale = client.put(url, json={"text": "late", "version": 1})
    assert stale.status_code == 409 and "version 2" in stale.text
    history = client.get(url).json()["history"]
    assert [h["version"] for h in history] == [2, 1] and history[1]["text"] == "first words"
    assert client.put(f"/api{RUN}/layers/{LAYER}/features/999/explanation", json={"text": "x", "version": 0}
                      ).status_code == 404


def test_explanations_survive_a_replaced_run_and_are_exported_with_labels(client, migrated, synthetic_run):
    made = write(migrated, 11, "fires on 'great'")
    explanations.classify(migrated, made["id"], "yes", "a positive word", "offline @ classify-v1", 0)
    version = labels.current(migrated, "synthetic", LAYER, 11)["version"]
    labels.set_label(migrated, "synthetic", LAYER, 11, "reward", "", "alice", version)
    publish_synthetic_run(migrated, replace=True)
    kept = explanations.current(migrated, "synthetic", LAYER, 11)
    assert kept["text"] == "fires on 'great'" and kept["reward_related"] == "yes" and kept["run_version"] == 1
    rows = list(csv.DictReader(io.StringIO(client.get(f"/api{RUN}/labels.csv").text)))
    assert rows[0]["feature"] == "11" and rows[0]["explanation"] == "fires on 'great'"
    assert rows[0]["reward_related"] == "yes"
    own = client.get(f"/api{RUN}/explanations.json").json()
    assert [(r["feature"], r["text"], r["reward_related"]) for r in own] == [(11, "fires on 'great'", "yes")]
    exported = client.get(f"/api{RUN}/explanations.csv")
    assert exported.status_code == 200 and "fires on 'great'" in exported.text
    path = db.delete_run_with_export(migrated, "synthetic")
    import json

    assert [e["text"] for e in json.loads(path.read_text())["explanations"]] == ["fires on 'great'"]


def test_kappa_and_the_tables_match_a_hand_computation():
    explained = {1: {"reward_related": "yes"}, 2: {"reward_related": "no"}, 3: {"reward_related": "yes"},
                 4: {"reward_related": "no"}, 5: {"reward_related": "unsure"}}
    labelled = {1: {"label": "reward"}, 2: {"label": "not_reward"}, 3: {"label": "not_reward"},
                4: {"label": "not_reward"}}
    measured = {1: {"measured_delta": -0.3, "measured_delta_low": -0.4, "measured_delta_high": -0.2},
                2: {"measured_delta": 0.01, "measured_delta_low": -0.02, "measured_delta_high": 0.04},
                3: {"measured_delta": None, "measured_delta_low": None, "measured_delta_high": None},
                5: {"measured_delta": 0.2, "measured_delta_low": 0.1, "measured_delta_high": 0.3}}
    out = agreement(explained, labelled, measured)
    vs_human = out["classifier_vs_human"]
    # pairs (yes, yes) (no, no) (yes, no) (no, no): p_o = 3/4, p_e = 2/4 * 1/4 + 2/4 * 3/4 = 1/2 -> kappa 1/2
    assert vs_human["n"] == 4 and vs_human["kappa"] == pytest.approx(0.5)
    assert vs_human["counts"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    effect = out["classifier_vs_effect"]  # 1 yes/moves, 2 no/does not, 5 unsure/moves; 3 unmeasured
    assert effect["n"] == 3 and effect["counts"] == [[1, 0], [0, 1], [1, 0]] and effect["kappa"] == pytest.approx(1.0)
    assert out["human_vs_effect"]["n"] == 2 and out["n_measured"] == 3

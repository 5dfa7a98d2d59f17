"""A corpus text's page and its JSON twin: its score's place in the corpus, its reward, and
whether it filled model.max_length; text ids on feature pages link to it."""
from __future__ import annotations

import html
import re

import pytest

from backend.core import jobs, store
from backend.web.routes.common import get_run, store_path
from tests.helpers import CONTEXT_FEATURE


def test_a_text_s_json_gives_its_score_and_percentile(client, migrated):
    path = store_path(migrated, get_run(migrated, "synthetic"))
    corpus = store.texts(path)
    for row in corpus[:5]:
        data = client.get(f"/api/runs/synthetic/texts/{row['text_id']}").json()
        t = data["text"]
        assert (t["text"], t["score"], t["reward"]) == (row["text"], row["score"], row["reward"])
        below = sum(other["score"] < row["score"] for other in corpus)
        assert t["score_percentile"] == 100 * below / len(corpus) and t["corpus"] == len(corpus)
        assert t["reached_max_length"] is (t["n_tokens"] >= data["max_length"])


def test_a_text_page_names_its_place_and_a_cut(client):
    page = client.get("/runs/synthetic/texts/3")
    assert page.status_code == 200
    assert "synthetic review number 3" in page.text and "% of the corpus" in page.text
    assert 'href="/api/runs/synthetic/texts/3"' in page.text  # its JSON twin
    # the synthetic texts have 8 tokens each: below the default max_length of 128, not cut
    assert "the whole text" in page.text and "cut to" not in page.text


def test_unknown_and_malformed_text_ids_are_refused(client):
    assert client.get("/api/runs/synthetic/texts/999").status_code == 404
    assert "text 999 not found" in client.get("/api/runs/synthetic/texts/999").json()["detail"]
    assert client.get("/runs/synthetic/texts/999").status_code == 404
    for bad in ("-1", "1.0", "²", str(2**40)):
        assert client.get(f"/api/runs/synthetic/texts/{bad}").status_code == 422
    assert client.get("/api/runs/nope/texts/1").status_code == 404


def test_feature_contexts_link_each_text_to_its_page(client):
    page = client.get(f"/runs/synthetic/layers/3/features/{CONTEXT_FEATURE}").text
    assert 'href="/runs/synthetic/texts/' in page
    first = page.split('href="/runs/synthetic/texts/', 1)[1].split('"', 1)[0]
    assert client.get(f"/runs/synthetic/texts/{first}").status_code == 200


def csrf(client, path="/jobs"):
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)


def finished(settings, kind: str, params: dict, result: dict) -> int:
    """A job as a worker leaves it, with `result` (its shape: workers/text_attribution.py)."""
    job = jobs.submit(settings, kind, params, "tester", "synthetic")
    claimed = jobs.claim(settings, "w")
    assert claimed["id"] == job["id"] and jobs.finish(settings, job["id"], "w", result)
    return job["id"]


def attribution(layer: int, tokens: list[str]) -> dict:
    per_token = [0.0] + [0.1 * (i + 1) for i in range(len(tokens) - 2)] + [0.0]
    token_features = [[] if v == 0 else [{"feature": 7, "activation": 1.5, "contribution": v}] for v in per_token]
    return {"layer": layer, "steps": 16, "steps_used": 16, "method": "integrated gradients", "tokens": tokens,
            "score": 1.0, "baseline": 1.0 - sum(per_token) - 0.001, "total": sum(per_token), "residual": 0.001,
            "residual_share": 0.001 / (sum(per_token) + 0.001), "per_token": per_token,
            "features": [{"feature": 7, "contribution": sum(per_token), "peak": 1.5}], "token_features": token_features}


def test_the_attribute_form_queues_the_corpus_text(client, migrated):
    text = client.get("/api/runs/synthetic/texts/3").json()["text"]["text"]
    r = client.post("/runs/synthetic/texts/3/attribute", data={"csrf_token": csrf(client), "layer": "3", "steps": "0"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/runs/synthetic/texts/3#attribution"
    job = jobs.recent(migrated, 1)[0]
    p = job["params"]
    assert job["kind"] == "inference" and (p["text_id"], p["text"], p["layer"], p["steps"]) == (3, text, 3, 0)
    assert p["attribution_layers"] == [3]
    client.post("/runs/synthetic/texts/3/attribute", data={"csrf_token": csrf(client), "layer": "all"})
    every = [x["layer"] for x in client.get("/api/runs/synthetic").json()["layers"]]
    assert jobs.recent(migrated, 1)[0]["params"]["attribution_layers"] == every and len(every) > 1
    page = client.get("/runs/synthetic/texts/3").text
    assert page.count('class="jobstate"') == 2 and "/static/jobs.js" in page  # it updates itself once they finish
    for bad in ("99", "x", "-1", "³"):
        refused = client.post("/runs/synthetic/texts/3/attribute", data={"csrf_token": csrf(client), "layer": bad})
        assert refused.status_code == 422 and "has no SAE in this run" in refused.text
    assert client.post("/runs/synthetic/texts/999/attribute", data={"csrf_token": csrf(client)}).status_code == 404
    assert len(jobs.recent(migrated, 100)) == 2  # nothing refused was queued


def test_a_text_s_page_and_json_show_its_newest_attribution_per_layer(client, migrated):
    tokens = ["[CLS]", "synthetic", "review", "[SEP]"]
    params = {"run_id": "synthetic", "layer": 3, "text": "t", "text_id": 3, "features": []}
    old = finished(migrated, "inference", params, {"attribution": {"3": {**attribution(3, tokens), "score": 9.0}}})
    new = finished(migrated, "inference", params, {"attribution": {"3": attribution(3, tokens)},
                                                   "read": {"n_tokens": 4, "n_tokens_full": 4, "cut": False,
                                                            "max_length": 128, "cut_at_char": None}})
    edit = {"features": [7], "mode": "zero", "value": None, "reward_before": 1.0, "reward_after": 0.4}
    edited = finished(migrated, "inference", {**params, "edit": edit}, {"attribution": {}, "edit": edit})
    finished(migrated, "inference", {**params, "text_id": 4}, {"attribution": {"5": attribution(5, tokens)}})
    data = client.get("/api/runs/synthetic/texts/3").json()
    assert list(data["attribution"]) == ["3"] and data["attribution"]["3"]["job_id"] == new != old
    assert data["attribution"]["3"]["score"] == 1.0 and data["attribution"]["3"]["tokens"] == tokens
    assert data["edits"] == [{"job_id": edited, "layer": 3, "mode": "zero", "value": None, "features": [7],
                              "before": 1.0, "after": 0.4}]
    page = client.get("/runs/synthetic/texts/3").text
    assert 'id="attribution-3"' in page and 'href="#tok-3-1"' in page and 'id="tok-3-1"' in page
    assert 'href="/runs/synthetic/layers/3/features/7"' in page and f'href="/jobs/{new}"' in page
    assert 'id="edits"' in page and f'href="/jobs/{edited}"' in page
    assert 'name="text_id" value="3"' in page  # the row's edit form names the corpus text, not a copy of it
    # each listed feature says what it is: its top token from the store, beside its id
    top = client.get("/api/runs/synthetic/layers/3/features/7").json()["feature"]["top_token"]
    row = re.search(r'<tr data-feature="7"><td class="num"><a href="/runs/synthetic/layers/3/features/7"><b>7</b>'
                    r'</a> <code class="token"[^>]*>([^<]*)</code>', page)
    assert top and row and row.group(1) == html.escape(top)


@pytest.mark.parametrize("body, status, message", [
    ({"text": "a", "text_id": 3}, 422, "not both"),
    ({}, 422, "type a text, or name a corpus text"),
    ({"text_id": 999}, 404, "text 999 not found"),
    ({"text": "a", "steps": 65}, 422, "less than or equal to 64"),
    ({"text": "a", "steps": -1}, 422, "greater than or equal to 0"),
    ({"text": "a", "attribution_layers": [99]}, 422, "layer 99 has no SAE in this run"),
    ({"text": "  "}, 422, "type a text"),
])
def test_a_bad_text_request_is_refused_and_queues_nothing(client, migrated, body, status, message):
    r = client.post("/api/runs/synthetic/layers/3/texts", json=body)
    assert r.status_code == status and message in r.text
    assert jobs.recent(migrated, 10) == []


def test_a_diff_is_queued_with_both_texts(client, migrated):
    corpus_text = client.get("/api/runs/synthetic/texts/3").json()["text"]["text"]
    r = client.post("/api/runs/synthetic/layers/3/diffs", json={"text_id_a": 3, "text_b": "an edited review"})
    assert r.status_code == 201 and r.headers["location"] == f"/api/jobs/{r.json()['id']}"
    p = r.json()["params"]
    assert r.json()["kind"] == "text_diff" and (p["text_a"], p["text_b"], p["steps"]) == (corpus_text, "an edited review", 16)
    form = client.post("/runs/synthetic/layers/3/diff", data={"csrf_token": csrf(client), "text_a": "one",
                                                              "text_b": "two"}, follow_redirects=False)
    assert form.status_code == 303 and jobs.recent(migrated, 1)[0]["params"]["text_a"] == "one"
    for body, status, message in [({"text_a": "a"}, 422, "text_b"), ({"text_b": "b"}, 422, "give the first text"),
                                  ({"text_a": "a", "text_id_a": 3, "text_b": "b"}, 422, "not both"),
                                  ({"text_id_a": 999, "text_b": "b"}, 404, "text 999 not found")]:
        refused = client.post("/api/runs/synthetic/layers/3/diffs", json=body)
        assert refused.status_code == status and message in refused.text
    assert client.post("/api/runs/synthetic/layers/99/diffs", json={"text_a": "a", "text_b": "b"}).status_code == 404
    assert len(jobs.recent(migrated, 10)) == 2

"""A corpus text's page and its JSON twin: its score's place in the corpus, its reward, and
whether it filled model.max_length; text ids on feature pages link to it."""
from __future__ import annotations

from backend import store
from backend.routes.common import get_run, store_path
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

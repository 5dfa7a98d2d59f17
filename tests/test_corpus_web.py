"""The corpus browser's page and JSON twin on the synthetic run: search, filters, sorts,
paging with the filters kept, the feature sort's link and note, links to every text's page,
and every bad input refused with a 4xx and a message."""
from __future__ import annotations

import html
import re

import pytest

from backend.core import store
from backend.web.routes.common import get_run, store_path
from backend.web.routes.corpus import highlighted
from tests.helpers import CONTEXT_FEATURE, RANKED_TEXTS
from backend.web.routes.formats import fmt_num

API, PAGE = "/api/runs/synthetic/texts", "/runs/synthetic/texts"


def corpus_rows(settings) -> list[dict]:
    return store.texts(store_path(settings, get_run(settings, "synthetic")))


def test_json_lists_every_text_by_score_and_echoes_the_filters(client, migrated):
    data = client.get(API).json()
    rows = corpus_rows(migrated)
    assert data["total"] == len(rows) == 20 and (data["offset"], data["limit"], data["page"]) == (0, 50, 1)
    assert [t["text_id"] for t in data["texts"]] == [r["text_id"] for r in sorted(rows, key=lambda r: -r["score"])]
    assert data["filters"] == {"q": None, "split": None, "score_min": None, "score_max": None, "sort": "score",
                               "layer": None, "feature": None}
    assert data["feature"] is None and set(data["texts"][0]) == {"text_id", "split", "text", "score", "reward",
                                                                 "n_tokens"}


def test_json_search_split_and_score_range(client, migrated):
    rows = corpus_rows(migrated)
    by_id = {r["text_id"]: r for r in rows}
    found = client.get(API, params={"q": "NUMBER 1", "sort": "text_id"}).json()
    assert [t["text_id"] for t in found["texts"]] == [1] + list(range(10, 20)) and found["filters"]["q"] == "NUMBER 1"
    low, high = sorted(r["score"] for r in rows)[5], sorted(r["score"] for r in rows)[14]
    ranged = client.get(API, params={"split": "train", "score_min": low, "score_max": high, "sort": "-score"}).json()
    expected = sorted((i for i, r in by_id.items() if i < 15 and low <= r["score"] <= high), key=lambda i: by_id[i]["score"])
    assert [t["text_id"] for t in ranged["texts"]] == expected and ranged["total"] == len(expected) > 0
    assert {t["split"] for t in ranged["texts"]} == {"train"}
    # a blank field is no filter, as an empty form field submits it
    blank = client.get(API, params={"q": "", "split": "", "score_min": "", "score_max": "", "sort": "", "layer": "",
                                    "feature": ""}).json()
    assert blank["total"] == 20 and blank["filters"]["sort"] == "score"


def test_json_feature_sort_and_its_ranked_texts(client):
    data = client.get(API, params={"layer": 3, "feature": CONTEXT_FEATURE}).json()  # a feature named: its sort
    assert data["filters"]["sort"] == "feature" and data["total"] == RANKED_TEXTS
    activations = [t["activation"] for t in data["texts"]]
    assert activations == sorted(activations, reverse=True) and activations[0] == pytest.approx(4.0)
    assert data["texts"][0]["text_id"] == CONTEXT_FEATURE  # the text of its strongest context
    assert data["feature"] == {"layer": 3, "feature": CONTEXT_FEATURE, "d_sae": 64, "n_ranked": RANKED_TEXTS,
                               "ranked_texts": RANKED_TEXTS}
    by_score = client.get(API, params={"layer": 3, "feature": CONTEXT_FEATURE, "sort": "score"}).json()
    assert by_score["total"] == 20
    assert sum(t["activation"] is not None for t in by_score["texts"]) == RANKED_TEXTS


def test_page_shows_each_text_linked_with_its_score_and_the_match_marked(client, migrated):
    page = client.get(PAGE, params={"q": "3"})
    assert page.status_code == 200
    assert 'href="/runs/synthetic/texts/3"' in page.text and 'href="/runs/synthetic/texts/13"' in page.text
    assert "synthetic review number <mark>3</mark>" in page.text and "number 1<mark>3</mark>" in page.text
    assert 'href="/api/runs/synthetic/texts?q=3"' in page.text  # its JSON twin, the view kept
    score = next(r["score"] for r in corpus_rows(migrated) if r["text_id"] == 3)
    row = page.text.split('data-text="3"', 1)[1].split("</tr>", 1)[0]
    assert fmt_num(score) in row
    linked = set(re.findall(r'href="/runs/synthetic/texts/(\d+)"', page.text))
    assert linked == {"3", "13"}
    assert client.get("/runs/synthetic/texts/13").status_code == 200  # the link opens the text's page


def test_page_sorted_by_a_feature_links_it_and_says_what_is_listed(client):
    page = client.get(PAGE, params={"sort": "feature", "layer": 3, "feature": CONTEXT_FEATURE}).text
    assert f'href="/runs/synthetic/layers/3/features/{CONTEXT_FEATURE}"' in page
    note = html.unescape(re.sub(r"\s+", " ", page.split('id="feature-note"', 1)[1].split("</p>", 1)[0]))
    assert f"ranked among the {RANKED_TEXTS} texts it fires on most; texts outside are not listed" in note
    assert "Activation</th>" in page and page.count('class="num activation"') == RANKED_TEXTS
    assert page.index('data-text="7"') < page.index('data-text="8"') < page.index('data-text="14"')


def test_pages_keep_the_filters_and_a_page_past_the_end_is_empty(client, migrated):
    migrated.page_size = 4  # the page size is the server's; 4 makes 20 texts five pages
    first = client.get(PAGE, params={"split": "train", "sort": "-score"}).text
    assert 'rel="next" href="/runs/synthetic/texts?split=train&amp;sort=-score&amp;page=2"' in first
    assert "page 1 of 4" in first and "texts 1–4 of 15 matching" in first
    second = client.get(PAGE, params={"split": "train", "sort": "-score", "page": 2}).text
    assert 'rel="prev" href="/runs/synthetic/texts?split=train&amp;sort=-score"' in second
    data = client.get(API, params={"split": "train", "page": 4}).json()
    assert len(data["texts"]) == 3 and data["offset"] == 12 and data["n_pages"] == 4
    beyond = client.get(API, params={"page": 99})
    assert beyond.status_code == 200 and beyond.json()["texts"] == [] and beyond.json()["total"] == 20
    past = client.get(PAGE, params={"page": 99})
    assert past.status_code == 200 and "Page 99 is past the end: 20 texts match, 5 pages of 4" in past.text
    nothing = client.get(PAGE, params={"q": "no such words"}).text
    assert "No text matches — none holds “no such words”" in nothing


@pytest.mark.parametrize("params, status, message", [
    ({"split": "test"}, 422, "Input should be 'train' or 'heldout'"),
    ({"sort": "length"}, 422, "Input should be 'score', '-score'"),
    ({"score_min": 1, "score_max": 0}, 422, "score_min (1.0) is above score_max (0.0)"),
    ({"score_min": "nan"}, 422, "Input should be a finite number"),
    ({"score_max": "inf"}, 422, "Input should be a finite number"),
    ({"score_min": "1e309"}, 422, "Input should be a finite number"),
    ({"score_min": "high"}, 422, "Input should be a valid number"),
    ({"sort": "feature"}, 422, "sort=feature needs a layer and a feature"),
    ({"sort": "feature", "layer": 3}, 422, "layer and feature go together"),
    ({"feature": 7}, 422, "layer and feature go together"),
    ({"layer": 4, "feature": 0}, 404, "layer 4 not found"),
    ({"layer": 3, "feature": 64}, 422, "feature 64 is out of range: layer 3's SAE has 64 features (0..63)"),
    ({"layer": 3, "feature": -1}, 422, "greater than or equal to 0"),
    ({"layer": 3, "feature": 2**40}, 422, "less than or equal to 2147483647"),
    ({"page": 0}, 422, "greater than or equal to 1"),
    ({"q": "x" * 201}, 422, "at most 200 characters"),
])
def test_bad_input_is_a_4xx_with_a_message(client, params, status, message):
    api = client.get(API, params=params)
    assert api.status_code == status, api.text
    assert message in api.text
    page = client.get(PAGE, params=params)
    assert page.status_code == status and message in html.unescape(page.text)


def test_an_unknown_run_is_a_404(client):
    assert client.get("/api/runs/nope/texts").status_code == 404
    page = client.get("/runs/nope/texts")
    assert page.status_code == 404 and "run 'nope' not found" in html.unescape(page.text)


def test_a_search_for_sql_and_wildcards_is_literal(client):
    for q in ("%", "_", "'", "' OR 1=1 --", "\\"):
        data = client.get(API, params={"q": q})
        assert data.status_code == 200 and data.json()["total"] == 0, q  # no synthetic text holds them
    assert client.get(API, params={"q": "review number 1_"}).json()["total"] == 0
    assert client.get(API, params={"q": "review number 1%"}).json()["total"] == 0


def test_the_run_page_and_runs_list_link_the_corpus(client):
    run = client.get("/runs/synthetic").text
    assert '<a href="/runs/synthetic/texts" id="browse-corpus">Browse the corpus (20 texts)</a>' in run
    assert 'href="/runs/synthetic/texts"' in client.get("/").text


def test_highlighting_marks_every_match_and_cuts_long_texts_around_the_first():
    assert highlighted("Great, GREAT, great!", "great") == [
        ("Great", True), (", ", False), ("GREAT", True), (", ", False), ("great", True), ("!", False)]
    assert highlighted("100% sure", "%") == [("100", False), ("%", True), (" sure", False)]
    assert highlighted("plain", None) == [("plain", False)]
    long = "a" * 1000 + "needle" + "b" * 1000
    pieces = highlighted(long, "needle", width=100)
    assert pieces[0] == ("…", False) and pieces[-1] == ("…", False) and ("needle", True) in pieces
    assert sum(len(p) for p, _ in pieces[1:-1]) == 100

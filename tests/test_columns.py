"""The layer table draws its columns from the store's spec (backend/core/store_schema.py, each
feature column's Display): the headers, the header groups, the cells, the sort tabs and the JSON
twin all follow it, and a column added to the spec alone reaches all of them. No template reads
the store: a page's route (or render) hands it what it shows."""
from __future__ import annotations

import contextvars
import html
import json
import re
import subprocess
import sys

import jinja2
import pytest

from backend.core import store
from backend.core.rankings import RANKINGS
from backend.core.store_schema import FEATURES, GROUPS, Column, Display, Tab, Table, check_display
from backend.web import feature_table
from backend.web.routes.formats import FORMATS
from tests.helpers import REPO_ROOT
from tests.test_texts_web import attribution, finished

RUN = "/runs/synthetic"


def headers(page: str) -> list[str]:
    """The words of the feature table's headers (its last header row), as a reader sees them."""
    row = re.search(r'<table class="data features">.*?</tr><tr>(.*?)</tr></thead>', page, re.S).group(1)
    return [re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", th))).strip().rstrip(" ▲▼")
            for th in re.findall(r"<th[^>]*>(.*?)</th>", row, re.S)]


def groups(page: str) -> list[tuple[int, str]]:
    row = re.search(r'<tr class="kinds">(.*?)</tr>', page, re.S).group(1)
    return [(int(span), html.unescape(words))
            for span, words in re.findall(r'<th colspan="(\d+)"[^>]*>([^<]*)</th>', row)]


def body_rows(page: str) -> list[list[str]]:
    body = re.search(r"<tbody>(.*?)</tbody>", page.split('<table class="data features">', 1)[1], re.S).group(1)
    return [re.findall(r"<td[^>]*>.*?</td>", row, re.S) for row in re.findall(r"<tr data-feature=.*?</tr>", body, re.S)]


def tabs(page: str) -> list[tuple[str, str]]:
    nav = re.search(r'<nav class="tabs" aria-label="sort">(.*?)</nav>', page, re.S).group(1)
    return [(key, html.unescape(words).strip())
            for key, words in re.findall(r'data-sort="([^"]+)"[^>]*>([^<]*)', nav)]


def expected_headers(columns) -> list[str]:
    return ["✓", "#", "Feature", *[c["heading"] for c in columns], "Label", "Explanation search"]


def test_the_spec_refuses_a_sortable_column_that_is_not_drawn_and_tabs_that_are_not_its_sorts():
    def table(*columns):
        return Table("features", (Column("feature", "INTEGER", table=True), *columns))

    with pytest.raises(ValueError, match="sorts by it .* must be drawn"):
        check_display(table(Column("novelty", "DOUBLE", table=True, sort_key="novelty", label="novelty")))
    with pytest.raises(ValueError, match="table=True"):
        check_display(table(Column("novelty", "DOUBLE", shown=Display("Novelty"))))
    with pytest.raises(ValueError, match="tab 'weight' is not one of its sorts"):
        check_display(table(Column("novelty", "DOUBLE", table=True, sort_key="novelty", label="novelty",
                                   shown=Display("Novelty", tabs=(Tab("weight"),)))))
    with pytest.raises(ValueError, match="group 'vibes'.*when 'sometimes'"):
        check_display(table(Column("novelty", "DOUBLE", table=True, shown=Display("Novelty", "vibes",
                                                                                   when="sometimes"))))
    with pytest.raises(ValueError, match="cell 'sparkline' is not one of .*format 'roman' is not one of"):
        feature_table.check_cells([Column("novelty", "DOUBLE", table=True,
                                          shown=Display("Novelty", format="roman", cell="sparkline"))])
    with pytest.raises(ValueError, match="reads \\['elsewhere'\\], not table columns"):
        check_display(table(Column("novelty", "DOUBLE", table=True, shown=Display("Novelty", reads=("elsewhere",)))))
    check_display(FEATURES)  # the spec as it stands holds
    feature_table.check_cells(feature_table.COLUMNS)


def test_every_sortable_column_has_a_header_and_a_cell_in_the_view_sorted_by_it(client):
    sortable = {c.name: c for c in FEATURES.columns if c.sort_key}
    assert sortable and all(c.shown is not None and c.table for c in sortable.values())
    for sort in store.SORTS:
        column = next(c for c in sortable.values() if sort.lstrip("-") in feature_table.column_sorts(c))
        page = client.get(f"{RUN}/layers/3", params={"sort": sort}).text
        shown = headers(page)
        assert column.shown.heading in shown, (sort, shown)
        i = shown.index(column.shown.heading)
        if sort.lstrip("-") == column.sort_key:  # its header sorts by it, and says so
            assert re.search(rf'<th class="num sorted"[^>]*aria-sort="[a-z]+">\s*<a href="[^"]*">'
                             rf'{re.escape(html.escape(column.shown.heading))} [▲▼]</a></th>', page), sort
        rows = body_rows(page)
        assert rows and all(len(cells) == len(shown) for cells in rows), sort
        api = client.get(f"/api{RUN}/layers/3", params={"sort": sort}).json()
        values = [f[column.name] for f in api["features"]]
        fmt = FORMATS[column.shown.format]
        for value, cells in zip(values, rows):  # the cell shows the row's value of the column
            if column.shown.cell != "measured":
                assert html.escape(fmt(value), quote=False) in cells[i], (sort, value, cells[i])


@pytest.mark.parametrize("sort", [None, "weight", "reason_score", "-margin_delta", "abs_attribution"])
def test_header_groups_cells_tabs_and_json_agree_with_the_spec(client, sort):
    params = {"sort": sort} if sort else {}
    page = client.get(f"{RUN}/layers/3", params=params).text
    api = client.get(f"/api{RUN}/layers/3", params=params).json()
    filled = store.filled_columns(_store_path(client), 3)
    drawn = feature_table.shown_columns(filled, api["sort"])
    assert [c["name"] for c in api["columns"]] == [c.name for c in drawn]
    # the JSON twin's columns say what the spec says
    for listed, c in zip(api["columns"], drawn):
        assert (listed["heading"], listed["group"], listed["format"], listed["cell"], listed["sort"]) == (
            c.shown.heading, c.shown.group, c.shown.format, c.shown.cell, c.sort_key)
    # in table order: group by group as GROUPS lists them, the spec's order within one
    order = [list(GROUPS).index(c.shown.group) if c.shown.group else len(GROUPS) for c in drawn]
    assert order == sorted(order)
    shown = headers(page)
    assert shown == expected_headers(api["columns"])
    # each group's name spans exactly its columns' headers; the other spans are blank
    spans, at = groups(page), 0
    assert sum(n for n, _ in spans) == len(shown)
    under = {}
    for n, words in spans:
        for position in range(at, at + n):
            under[position] = words
        at += n
    for position, c in enumerate(drawn, feature_table.LEAD):
        assert under[position] == (GROUPS[c.shown.group].heading if c.shown.group else ""), c.name
    assert all(under[p] == "" for p in range(len(shown)) if not feature_table.LEAD <= p < feature_table.LEAD
               + len(drawn))
    assert all(len(cells) == len(shown) for cells in body_rows(page))
    # the tabs: the page's, the JSON's and the spec's are the same, with the same words
    assert tabs(page) == [(t["sort"], t["label"]) for t in api["tabs"]] == list(feature_table.tabs(filled).items())
    assert {r.sort for r in RANKINGS.values()} <= {t["sort"] for t in api["tabs"]}  # every ranking has its tab


def _store_path(client):
    from backend.web.routes.common import get_run, store_path
    settings = client.app.state.settings
    return store_path(settings, get_run(settings, "synthetic"))


def test_every_spec_table_column_is_in_the_json_twin(client):
    table_columns = [c.name for c in FEATURES.columns if c.table]
    for sort in ("weight", "reason_score", "margin_delta"):
        api = client.get(f"/api{RUN}/layers/3", params={"sort": sort}).json()
        assert api["features"] and all(set(table_columns) <= set(row) for row in api["features"])
        assert sort in [key for c in api["columns"] for key in c["sorts"]]  # the column it sorts by is listed
    drawn = {c.name for c in FEATURES.columns if c.shown and c.shown.when == "always"}
    assert drawn <= {c["name"] for c in client.get(f"/api{RUN}/layers/3").json()["columns"]}


def test_a_column_shown_where_filled_is_drawn_only_where_the_layer_has_values(client):
    pair = FEATURES.columns[[c.name for c in FEATURES.columns].index("pair_max_cosine")]
    assert pair.shown.when == "filled"
    assert feature_table.BY_NAME["pair_max_cosine"] not in feature_table.shown_columns(set(), "weight")
    page = client.get(f"{RUN}/layers/3").text  # the synthetic run has a paired dictionary
    assert "Pair cos." in headers(page) and "-wide paired dictionary" in page
    cell = body_rows(page)[0][headers(page).index("Pair cos.")]
    assert 'class="num pair-cosine"' in cell and "its nearest feature in the paired dictionary: " in cell
    assert "dictionary: —" not in cell  # the row carries the feature its cell names (reads)


class _Rendering:
    flag = contextvars.ContextVar("rendering", default=False)


def test_no_template_reads_the_store(client, migrated, monkeypatch):
    """Every store read happens before a template renders: a read while Jinja renders fails."""
    render = jinja2.Template.render

    def rendering(self, *args, **kwargs):
        token = _Rendering.flag.set(True)
        try:
            return render(self, *args, **kwargs)
        finally:
            _Rendering.flag.reset(token)

    opened = store._open

    def guarded(path):
        assert not _Rendering.flag.get(), "a template read the store"
        return opened(path)

    monkeypatch.setattr(jinja2.Template, "render", rendering)
    monkeypatch.setattr(store, "_open", guarded)
    tokens = ["[CLS]", "synthetic", "review", "[SEP]"]
    params = {"run_id": "synthetic", "layer": 3, "text": "t", "text_id": 3, "features": []}
    job = finished(migrated, "inference", params, {"attribution": {"3": attribution(3, tokens)}, "tokens": tokens,
                                                   "reward": 1.0, "features": [7], "acts": {"7": [0, 1.5, 0.5, 0]}})
    top = client.get(f"/api{RUN}/layers/3/features/7").json()["feature"]["top_token"]
    for url in ("/", RUN, f"{RUN}/layers/3", f"{RUN}/layers/3?sort=reason_score", f"{RUN}/layers/3/features/7",
                f"{RUN}/texts/3", f"/jobs/{job}", "/jobs", f"{RUN}/labels", f"{RUN}/texts",
                f"{RUN}/explanations"):
        page = client.get(url)
        assert page.status_code == 200, (url, page.text[-500:])
        if url in (f"{RUN}/texts/3", f"/jobs/{job}"):  # the features an attribution lists are named, still
            assert re.search(r'<a href="/runs/synthetic/layers/3/features/7"><b>7</b></a> <code class="token"[^>]*>'
                             + re.escape(html.escape(top)) + "</code>", page.text), url
    templates = (REPO_ROOT / "frontend" / "templates").glob("*.html")
    for template in templates:  # and none calls a function that could
        text = template.read_text()
        assert not re.search(r"\b(feature_top_tokens|explained_output|saedashboard_url|store\.\w*)\(", text), template.name


# A fresh interpreter: the spec is patched before anything reads it, as an edit of
# store_schema.py would be; nothing else is touched.
NEW_COLUMN_SCRIPT = """
import dataclasses, json, re, sys
from pathlib import Path

from backend.core import store_schema as schema

novelty = schema.Column("novelty", "DOUBLE", "a column added to the spec alone", table=True,
                        sort_key="novelty", label="novelty",
                        shown=schema.Display("Novelty", "gradient", "weight", "signed", "how new it is",
                                             tabs=(schema.Tab("novelty"),)))
schema.FEATURES = dataclasses.replace(schema.FEATURES, columns=(*schema.FEATURES.columns, novelty))
schema.TABLES["features"] = schema.FEATURES
schema.check_display(schema.FEATURES)

from backend.core import db
from backend.core.settings import Settings
from tests.helpers import make_client, publish_synthetic_run

settings = Settings(data_dir=Path(sys.argv[1]), database_url="")
db.upgrade(settings)
publish_synthetic_run(settings)
with make_client(settings) as client:
    page = client.get("/runs/synthetic/layers/5?sort=novelty").text
    api = client.get("/api/runs/synthetic/layers/5?sort=novelty").json()
print(json.dumps({"page": page, "api": api}))
"""


def test_a_column_added_to_the_spec_alone_is_drawn_sorted_tabbed_and_listed(tmp_path):
    out = subprocess.run([sys.executable, "-c", NEW_COLUMN_SCRIPT, str(tmp_path)], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out.splitlines()[-1])
    page, api = got["page"], got["api"]
    shown = headers(page)
    # in its group (after the gradient columns there were), its header sorts by it, largest first
    assert shown.index("Novelty") == shown.index("Attribution") + 1
    assert re.search(r'<th class="num sorted" title="how new it is" aria-sort="descending">\s*<a href="[^"]*'
                     r'sort=-novelty[^"]*">Novelty ▼</a></th>', page)
    assert ("novelty", "novelty (gradient)") in tabs(page)
    assert [n for n, words in groups(page) if words == "model's gradient"] == [3]  # its group spans it too
    # the synthetic DOUBLE: row i / 8; layer 5's features are rows 64..127, largest first
    first = api["features"][0]
    assert first["novelty"] == 127 / 8 and "novelty" in [c["name"] for c in api["columns"]]
    assert body_rows(page)[0][shown.index("Novelty")] == '<td class="num pos">+15.9</td>'

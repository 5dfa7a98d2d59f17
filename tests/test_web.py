"""The web app against a synthetic run: pages, their JSON twins, ordering, paging, errors."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from backend.core import layer_choice
from markupsafe import escape
from backend.core.rankings import RANKINGS
from backend.web.routes.formats import fmt_num, fmt_pct, fmt_weight
from backend.core.store import SORTS
from tests.helpers import (CONTEXT_FEATURE, DEAD_FEATURE, DEFAULT_RANKING, LAYERS, N_FEATURES, QUANTILE_BINS,
                           QUANTILE_TOKEN, WEIGHT_GROUP, REPO_ROOT, make_client, publish_synthetic_run)

RUN = "/runs/synthetic"


def layer_features(tables, layer):
    f = tables["features"]
    return [{k: f[k][i] for k in f} for i in range(len(f["layer"])) if f["layer"][i] == layer]


def absolute(column):
    return lambda r: None if r[column] is None else abs(r[column])


SORT_VALUE = {
    "weight": lambda r: r["weight"],
    "abs_weight": lambda r: abs(r["weight"]),
    "std_weight": lambda r: r["std_weight"],
    "abs_std_weight": lambda r: abs(r["std_weight"]),
    "frequency": lambda r: r["frequency"],
    "max_activation": lambda r: r["max_activation"],
    "correlation": lambda r: r["reward_correlation"],
    "reward_effect": lambda r: r["reward_effect"],
    "attribution": lambda r: r["attribution"],
    "abs_attribution": absolute("attribution"),
    "attribution_abs": lambda r: r["attribution_abs"],
    "attribution_share": lambda r: r["attribution_share"],
    "measured_delta": lambda r: r["measured_delta"],
    "abs_measured_delta": absolute("measured_delta"),
    "pair_cosine": lambda r: r["pair_max_cosine"],
    "reason_score": lambda r: r["reason_score"],
    "base_correlation": lambda r: r["base_correlation"],
    "margin_attribution": lambda r: r["margin_attribution"],
    "abs_margin_attribution": absolute("margin_attribution"),
    "margin_delta": lambda r: r["margin_delta"],
    "abs_margin_delta": absolute("margin_delta"),
}


def expected_order(tables, layer, sort, keep=lambda r: True):
    """Feature ids as the table should list them: by the sort's value (largest first, or
    smallest for '-key'), missing values last, ties by id."""
    value, ascending = SORT_VALUE[sort.lstrip("-")], sort.startswith("-")
    rows = [r for r in layer_features(tables, layer) if keep(r)]
    known = sorted((r for r in rows if value(r) is not None),
                   key=lambda r: (value(r) if ascending else -value(r), r["feature"]))
    return [r["feature"] for r in known] + sorted(r["feature"] for r in rows if value(r) is None)


def html_rows(html, attr):
    """The ids in <tr data-ATTR="..."> order, i.e. the order a reader sees the rows."""
    return [int(x) for x in re.findall(rf'<tr data-{attr}="(-?\d+)"', html)]


def row_html(html, attr, value):
    return re.search(rf'<tr data-{attr}="{value}".*?</tr>', html, re.S).group(0)


def test_runs_list_links_to_the_run(client):
    html = client.get("/").text
    row = row_html(html, "run", "synthetic")
    assert f'href="{RUN}"' in row and "Synthetic synthetic" in row
    api = client.get("/api/runs").json()["runs"]
    assert [r["id"] for r in api] == ["synthetic"]
    assert api[0]["n_layers"] == len(LAYERS) and api[0]["best_layer"] == 3
    assert fmt_num(api[0]["best_r2_heldout"]) in row and api[0]["best_r2_heldout"] == pytest.approx(0.81)


def test_run_page_lists_layers_with_r2(client, synthetic_run):
    html = client.get(RUN).text
    assert html_rows(html, "layer") == list(LAYERS)
    api = client.get(f"/api{RUN}").json()
    stored = synthetic_run["layers"]
    assert [l["r2_heldout"] for l in api["layers"]] == pytest.approx(stored["r2_heldout"])
    for layer in api["layers"]:
        row = row_html(html, "layer", layer["layer"])
        assert fmt_num(layer["r2_heldout"]) in row and f'href="{RUN}/layers/{layer["layer"]}"' in row
        sae_row = row_html(html, "sae", layer["layer"])
        assert fmt_num(layer["explained_variance"]) in sae_row and fmt_num(layer["reward_recovered"]) in sae_row
    assert api["best_layer"] == 3
    assert html.count('<rect class="bar') == len(LAYERS)  # the R² chart has a bar per layer


def test_run_page_pairs_sae_r2_with_the_raw_probe(client, synthetic_run):
    html, api = client.get(RUN).text, client.get(f"/api{RUN}").json()
    stored = synthetic_run["layers"]
    assert [l["probe_r2_heldout"] for l in api["layers"]] == pytest.approx(stored["probe_r2_heldout"])
    assert [l["probe_r2_train"] for l in api["layers"]] == pytest.approx(stored["probe_r2_train"])
    assert [l["regression_method"] for l in api["layers"]] == stored["regression_method"]
    assert [l["cv_folds"] for l in api["layers"]] == stored["cv_folds"]
    for layer in api["layers"]:
        row = row_html(html, "layer", layer["layer"])
        assert f'<td class="num probe-r2" title="train {fmt_num(layer["probe_r2_train"])}' in row
        assert f'>{fmt_num(layer["probe_r2_heldout"])}</td>' in row
    # the chart: one probe bar beside each layer's SAE bar, taller where the probe R² is higher
    bars = re.findall(r'<rect class="(bar|bar best|probe)" x="([\d.]+)" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', html)
    kinds = [k.split()[0] for k, _, _ in bars]
    assert kinds == ["bar", "probe"] * len(LAYERS)
    for (_, sae_x, sae_h), (_, probe_x, probe_h), layer in zip(bars[::2], bars[1::2], api["layers"]):
        assert float(probe_x) > float(sae_x)
        assert (float(probe_h) > float(sae_h)) == (layer["probe_r2_heldout"] > layer["r2_heldout"])
    assert f'raw-activation probe: held-out R² {fmt_num(stored["probe_r2_heldout"][1])}' in html


def test_feature_page_shows_standardised_weight_and_its_error(client, synthetic_run):
    url = f"{RUN}/layers/3/features/{CONTEXT_FEATURE}"
    html, api = client.get(url).text, client.get(f"/api{url}").json()
    stored = next(r for r in layer_features(synthetic_run, 3) if r["feature"] == CONTEXT_FEATURE)
    f = api["feature"]
    assert f["std_weight"] == pytest.approx(stored["std_weight"]) and f["weight_se"] == pytest.approx(stored["weight_se"])
    assert re.search(rf'id="std-weight" class="(pos|neg)">{re.escape(fmt_weight(stored["std_weight"]))}<', html)
    t = abs(stored["weight"] / stored["weight_se"])
    assert f'id="weight-se">{fmt_num(stored["weight_se"])} <span class="muted">|t| {t:.1f}</span>' in html
    dead = client.get(f"/api{RUN}/layers/3/features/{DEAD_FEATURE}").json()["feature"]
    assert dead["weight_se"] is None  # no refit estimated it: shown as a dash, not a number


def test_feature_page_names_the_near_duplicates_that_share_its_weight(client, synthetic_run):
    url = f"{RUN}/layers/3/features/{WEIGHT_GROUP[1]}"
    html, api = client.get(url).text, client.get(f"/api{url}").json()
    f = api["feature"]
    assert (f["weight_group"], f["weight_group_size"], f["merge_correlated"]) == (WEIGHT_GROUP[0], len(WEIGHT_GROUP), 0.9)
    others = [m for m in WEIGHT_GROUP if m != WEIGHT_GROUP[1]]
    assert [m["feature"] for m in f["weight_group_members"]] == others
    group = re.search(r'<p class="weight-group" id="weight-group">(.*?)</p>', html, re.S).group(1)
    assert "Shared with 2 near-duplicates" in group and "correlate above 0.90" in group and "cosine above 0.50" in group
    assert re.findall(r'data-member="(\d+)"', group) == [str(m) for m in others]
    alone = client.get(f"{RUN}/layers/3/features/{WEIGHT_GROUP[-1] + 1}")
    assert alone.status_code == 200 and 'id="weight-group"' not in alone.text


def test_layer_table_is_ordered_by_weight_descending(client, synthetic_run):
    html = client.get(f"{RUN}/layers/3?sort=weight").text  # layer 3's default is its attribution
    expected = expected_order(synthetic_run, 3, "weight")[:50]
    assert html_rows(html, "feature") == expected
    weights = {r["feature"]: r["weight"] for r in layer_features(synthetic_run, 3)}
    top = row_html(html, "feature", expected[0])
    assert fmt_weight(weights[expected[0]]) in top and 'class="num weight pos"' in top
    bottom = client.get(f"{RUN}/layers/3?sort=-weight").text
    assert 'class="num weight neg"' in row_html(bottom, "feature", expected_order(synthetic_run, 3, "-weight")[0])


@pytest.mark.parametrize("sort", SORTS)
def test_sort_variants_html_and_api_agree_with_store(client, synthetic_run, sort):
    api = client.get(f"/api{RUN}/layers/5", params={"sort": sort}).json()
    html = client.get(f"{RUN}/layers/5", params={"sort": sort}).text
    expected = expected_order(synthetic_run, 5, sort)[:50]
    assert [f["feature"] for f in api["features"]] == expected
    assert html_rows(html, "feature") == expected
    assert api["view"]["sort"] == sort and api["total"] == N_FEATURES


def test_pagination_covers_every_feature_once(client, synthetic_run):
    pages = [client.get(f"/api{RUN}/layers/3", params={"sort": "abs_weight", "page": p}).json() for p in (1, 2)]
    assert [p["n_pages"] for p in pages] == [2, 2]
    ids = [f["feature"] for p in pages for f in p["features"]]
    assert ids == expected_order(synthetic_run, 3, "abs_weight") and len(ids) == N_FEATURES
    html1 = client.get(f"{RUN}/layers/3?sort=abs_weight&page=1").text
    html2 = client.get(f"{RUN}/layers/3?sort=abs_weight&page=2").text
    assert 'rel="next" href="/runs/synthetic/layers/3?sort=abs_weight&amp;page=2"' in html1
    assert 'rel="prev" href="/runs/synthetic/layers/3?sort=abs_weight"' in html2  # page 1 is the default
    assert 'rel="next"' not in html2
    assert html_rows(html2, "feature") == ids[50:]
    r = client.get(f"/api{RUN}/layers/3?page=3")
    assert r.status_code == 404 and "page 3" in r.json()["detail"]


def test_feature_page_shows_context_tokens_and_values(client, synthetic_run):
    url = f"{RUN}/layers/3/features/{CONTEXT_FEATURE}"
    html = client.get(url).text
    api = client.get(f"/api{url}").json()
    # the peak token is emphasised and shows its value on hover; "##ing" joins "amaz"
    assert re.search(r'<span class="tok peak" style="--a:100%" title="amaz: 4.00">amaz</span>'
                     r'<span class="tok" style="--a:50%" title="##ing: 2.00">ing</span>', html)
    assert "##ing" not in re.sub(r'title="[^"]*"', "", html)
    assert '<span class="tok special"' in html  # [CLS] is dimmed
    top = api["contexts"][0]
    assert top["tokens"][4:6] == ["amaz", "##ing"] and top["activation"] == pytest.approx(4.0)
    # the same numbers in the page, the API and the store
    stored = next(r for r in layer_features(synthetic_run, 3) if r["feature"] == CONTEXT_FEATURE)
    f = api["feature"]
    assert f["weight"] == pytest.approx(stored["weight"]) and f["frequency"] == pytest.approx(stored["frequency"])
    assert f'id="weight">{fmt_weight(f["weight"])}<' in html
    assert fmt_pct(f["frequency"]) in html and "<svg" in html
    assert f["hist_counts"] == stored["hist_counts"] and len(f["hist_edges"]) == 11
    assert html.count('<rect class="hbar"') == 10
    assert [c["rank"] for c in api["contexts"]] == [0, 1, 2]
    ranks = sorted(abs(r["weight"]) for r in layer_features(synthetic_run, 3))[::-1]
    assert f["abs_weight_rank"] == ranks.index(abs(stored["weight"])) + 1
    assert f'href="{RUN}/layers/3"' in html and f'href="{RUN}"' in html  # breadcrumbs


def test_feature_page_shows_reward_links_top_tokens_and_bin_samples(client, synthetic_run):
    url = f"{RUN}/layers/5/features/{CONTEXT_FEATURE}"
    html, api = client.get(url).text, client.get(f"/api{url}").json()
    stored = next(r for r in layer_features(synthetic_run, 5) if r["feature"] == CONTEXT_FEATURE)
    f = api["feature"]
    assert f["reward_correlation"] == pytest.approx(stored["reward_correlation"])
    assert f["reward_effect"] == pytest.approx(stored["reward_effect"])
    assert f'id="reward-correlation">{fmt_num(stored["reward_correlation"])}<' in html
    assert re.search(rf'id="reward-effect" class="(pos|neg)">{re.escape(fmt_weight(stored["reward_effect"]))}<', html)
    assert f["top_tokens"] == stored["top_tokens"]
    token_rows = re.findall(r'<tr data-token="\d+"><td><code class="token">([^<]+)</code>', html)
    assert token_rows == [t["token"] for t in stored["top_tokens"]]
    # top contexts and per-bin samples come apart: ranks 0..2 above, one sample per bin below
    assert [c["rank"] for c in api["contexts"]] == [0, 1, 2] and all(c["bin"] is None for c in api["contexts"])
    samples = api["quantile_contexts"]
    assert [c["bin"] for c in samples] == list(range(QUANTILE_BINS))
    assert all(c["bin_low"] <= c["activation"] < c["bin_high"] for c in samples)
    assert html_rows(html, "bin") == list(range(QUANTILE_BINS))
    quantile_table = html[html.index('class="data contexts quantiles"'):]
    assert quantile_table.count(f'title="{QUANTILE_TOKEN}: ') == QUANTILE_BINS
    assert f'{fmt_num(samples[-1]["bin_low"])}–{fmt_num(samples[-1]["bin_high"])}' in quantile_table


def test_dead_feature_page_renders_without_contexts(client):
    r = client.get(f"{RUN}/layers/3/features/{DEAD_FEATURE}")
    assert r.status_code == 200 and "never fired" in r.text
    api = client.get(f"/api{RUN}/layers/3/features/{DEAD_FEATURE}").json()
    assert api["contexts"] == [] and api["quantile_contexts"] == [] and api["feature"]["top_tokens"] == []
    assert api["feature"]["reward_effect"] is None and "No samples" in r.text


@pytest.mark.parametrize("path, message", [
    ("/runs/nope", "run 'nope' not found"),
    (f"{RUN}/layers/4", "layer 4 not found"),
    (f"{RUN}/layers/4/features/1", "layer 4 not found"),
    (f"{RUN}/layers/3/features/999", "feature 999 not found in layer 3"),
])
def test_unknown_things_are_404_with_a_message(client, path, message):
    api = client.get(f"/api{path}")
    assert api.status_code == 404 and message in api.json()["detail"]
    page = client.get(path)
    assert page.status_code == 404 and message.replace("'", "&#39;") in page.text
    assert "text/html" in page.headers["content-type"]


@pytest.mark.parametrize("query", ["page=0", "sort=bogus", "page=x"])
def test_bad_query_values_are_422(client, query):
    assert client.get(f"/api{RUN}/layers/3?{query}").status_code == 422
    page = client.get(f"{RUN}/layers/3?{query}")
    assert page.status_code == 422 and "Invalid request" in page.text


def test_replaced_store_is_reread(migrated, synthetic_run):
    """A run replaced by rename (same path, new file) shows the new numbers, not cached ones."""
    with make_client(migrated) as c:
        before = c.get(f"/api{RUN}/layers/3?sort=weight").json()["features"][0]
        # rewrite the store at the same path with weights negated
        import workers.publish
        from backend.core.store_schema import STORE_FILENAME
        from tests.helpers import synthetic_tables
        tables = synthetic_tables()
        tables["features"]["weight"] = [-w for w in tables["features"]["weight"]]
        workers.publish.write_store(migrated.run_dir("synthetic") / STORE_FILENAME, {"run_id": "synthetic"}, tables)
        after = c.get(f"/api{RUN}/layers/3?sort=weight").json()["features"][0]
    assert after["feature"] == expected_order(synthetic_run, 3, "-weight")[0]
    assert after["weight"] == pytest.approx(-min(r["weight"] for r in layer_features(synthetic_run, 3)))
    assert after["feature"] != before["feature"]


def test_empty_registry_and_static_files(migrated):
    with make_client(migrated) as c:
        assert c.get("/api/runs").json() == {"runs": [], "best_layer_rule": layer_choice.RULE}
        assert "No runs yet" in c.get("/").text
        css = c.get("/static/style.css")
        assert css.status_code == 200 and "tabular-nums" in css.text


def test_second_run_registers_and_lists(migrated, synthetic_run):
    publish_synthetic_run(migrated, run_id="other")
    with make_client(migrated) as c:
        assert sorted(r["id"] for r in c.get("/api/runs").json()["runs"]) == ["other", "synthetic"]
        assert c.get("/runs/other/layers/5").status_code == 200


def test_app_never_imports_torch():
    code = "import backend.web.app, sys; assert 'torch' not in sys.modules and 'sae_lens' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_token_spans_spacing_and_shading():
    from backend.web.routes.formats import token_spans, token_texts

    def text(tokens):
        return "".join((" " if space else "") + shown for shown, space in token_texts(tokens))

    assert text(["[CLS]", "un", "##believ", "##able", "plot"]) == "[CLS] unbelievable plot"  # WordPiece
    assert text(["Ġgreat", "ly", "Ġdone"]) == "greatly done"  # GPT-2 byte-level BPE
    assert text(["▁very", "▁good", "ness"]) == "very goodness"  # SentencePiece
    spans = re.findall(r'<span class="([^"]*)"(?: style="--a:([^"]*)")? title="([^"]*)">([^<]*)</span>',
                       token_spans(["[CLS]", "b", "<c>", "d"], [0.0, 3.0, 6.0, 0.0004], 4.0, peak=1))
    assert spans == [("tok special", "", "[CLS]: 0.00", "[CLS]"), ("tok peak", "75%", "b: 3.00", "b"),
                     ("tok special", "100%", "&lt;c&gt;: 6.00", "&lt;c&gt;"),  # act / max, clipped at 1; escaped
                     ("tok", "0%", "d: 0.000400", "d")]  # off: no shading; tiny: as fmt_num writes it
    assert "peak" not in token_spans(["a", "b"], [1.0, 2.0], 2.0, peak=None)
    assert 'class="tok peak" style="--a:100%" title="b: 2.00"' in token_spans(["a", "b"], [1.0, 2.0], 2.0)


def test_registered_run_without_its_store_is_404(client, migrated):
    (migrated.data_dir / "runs" / "synthetic" / "features.duckdb").unlink()
    r = client.get(f"/api{RUN}")
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]


def test_store_of_another_schema_version_is_answered_with_409(migrated, tmp_path):
    """A run whose store predates the current schema says how to fix it instead of crashing."""
    import duckdb

    from backend.core import store
    from tests.helpers import make_client, publish_synthetic_run

    publish_synthetic_run(migrated, run_id="old")
    path = migrated.data_dir / "runs" / "old" / "features.duckdb"
    con = duckdb.connect(str(path))
    con.execute("UPDATE run_info SET value = '1' WHERE key = 'store_version'")
    con.close()
    with make_client(migrated) as client:
        api = client.get("/api/runs/old/layers/3")
        assert api.status_code == 409
        assert "schema version 1" in api.json()["detail"] and "--replace" in api.json()["detail"]
        page = client.get("/runs/old/layers/3")
        assert page.status_code == 409 and "re-run its pipeline" in page.text
    assert store.STORE_VERSION == 11


# --- filters, token search, j/k order, nearest features, OpenAPI ---

def normalised(token):
    for mark in ("##", "\u0120", "\u2581"):
        if token.startswith(mark):
            token = token[len(mark):]
            break
    return token.lower()


def features_with_token(tables, layer, prefix):
    """Features whose top tokens or top-context tokens start with `prefix` (normalised)."""
    found = set()
    f, c = tables["features"], tables["contexts"]
    for i in range(len(f["layer"])):
        if f["layer"][i] == layer and any(normalised(t["token"]).startswith(prefix) for t in f["top_tokens"][i]):
            found.add(f["feature"][i])
    for i in range(len(c["layer"])):
        if c["layer"][i] == layer and c["kind"][i] == "top" and any(normalised(t).startswith(prefix) for t in c["tokens"][i]):
            found.add(c["feature"][i])
    return found


@pytest.mark.parametrize("query, keep", [  # layer 3's default ranking is attribution: "raises" is by its sign
    ({"sign": "pos"}, lambda r: (r["attribution"] or 0) > 0),
    ({"sign": "neg", "sort": "-weight"}, lambda r: (r["attribution"] or 0) < 0),
    ({"min_freq": "10", "max_freq": "20", "sort": "frequency"}, lambda r: 0.1 <= r["frequency"] <= 0.2),
    ({"min_freq": "5", "sign": "pos", "sort": "correlation"},
     lambda r: r["frequency"] >= 0.05 and (r["attribution"] or 0) > 0),
    ({"min_freq": "", "max_freq": "", "sign": ""}, lambda r: True),  # an empty form field is no filter
])
def test_filters_keep_exactly_the_matching_features(client, synthetic_run, query, keep):
    api = client.get(f"/api{RUN}/layers/3", params=query).json()
    expected = expected_order(synthetic_run, 3, query.get("sort", DEFAULT_RANKING[3]), keep)
    assert api["total"] == len(expected) and [f["feature"] for f in api["features"]] == expected[:50]
    html = client.get(f"{RUN}/layers/3", params=query).text
    assert html_rows(html, "feature") == expected[:50]


def test_the_sign_filter_reads_the_default_rankings_sign():
    from backend.core.store import FeatureFilter

    assert FeatureFilter(sign="pos", sign_column="attribution").where()[0] == " AND attribution > 0"
    # measured Δ is the change when zeroed: a feature whose zeroing lowers the score raises it
    assert FeatureFilter(sign="pos", sign_column="measured_delta", sign_flip=True).where()[0] == " AND measured_delta < 0"
    assert FeatureFilter(sign="neg", sign_column="measured_delta", sign_flip=True).where()[0] == " AND measured_delta > 0"
    with pytest.raises(ValueError):
        FeatureFilter(sign="pos", sign_column="weight; DROP TABLE features").where()


@pytest.mark.parametrize("typed", ["amaz", "AMAZ", " ing ", "bor", "lov"])
def test_token_search_finds_features_whose_contexts_or_top_tokens_hold_the_token(client, synthetic_run, typed):
    expected = features_with_token(synthetic_run, 5, typed.strip().lower())
    assert expected  # the synthetic store has every one of these
    api = client.get(f"/api{RUN}/layers/5", params={"token": typed, "sort": "abs_weight"}).json()
    assert api["total"] == len(expected)
    # those that fire on the token (it starts one of their top tokens) first, by their mean activation on
    # it (the exact token first), then the rest in the table's order
    prefix = typed.strip().lower()
    firing = {}
    f = synthetic_run["features"]
    for i in range(len(f["layer"])):
        if f["layer"][i] == 5:
            hits = [(normalised(t["token"]) == prefix, t["mean_activation"]) for t in f["top_tokens"][i]
                    if normalised(t["token"]).startswith(prefix)]
            if hits:
                firing[f["feature"][i]] = (any(e for e, _ in hits), max(a for _, a in hits))
    rest = expected_order(synthetic_run, 5, "abs_weight", lambda r: r["feature"] in expected - set(firing))
    first = sorted(firing, key=lambda fid: (not firing[fid][0], -firing[fid][1],
                                            expected_order(synthetic_run, 5, "abs_weight").index(fid)))
    assert [r["feature"] for r in api["features"]] == (first + rest)[:50]
    assert api["token_search"] == {"token": typed.strip(), "n_on_token": len(firing), "n_in_contexts": len(rest)}
    assert all(r["on_token"] == (r["feature"] in firing) for r in api["features"])
    html = client.get(f"{RUN}/layers/5", params={"token": typed, "sort": "abs_weight"}).text
    heads = re.findall(r'<tr class="group-head" data-group="([\w-]+)">', html)
    assert heads == (["on-token"] if firing else []) + (["in-contexts"] if rest else [])
    if typed in ("amaz", " ing "):  # "amaz ##ing" is only in CONTEXT_FEATURE's strongest context
        assert CONTEXT_FEATURE in expected


def test_token_search_with_no_match_says_so(client):
    html = client.get(f"{RUN}/layers/3", params={"token": "zzzz"}).text
    assert 'id="no-match"' in html and "zzzz" in html
    assert client.get(f"/api{RUN}/layers/3", params={"token": "zzzz"}).json()["total"] == 0


def test_feature_links_carry_the_view_and_j_k_follow_it(client, synthetic_run):
    view = {"sort": "correlation", "sign": "pos"}
    order = expected_order(synthetic_run, 5, "correlation", lambda r: r["weight"] > 0)
    table = client.get(f"{RUN}/layers/5", params=view).text
    assert f'href="{RUN}/layers/5/features/{order[0]}?sort=correlation&amp;sign=pos"' in table
    for i in (0, 1, len(order) - 1):
        data = client.get(f"/api{RUN}/layers/5/features/{order[i]}", params=view).json()["in_view"]
        assert data["index"] == i and data["total"] == len(order)
        assert data["previous"] == (order[i - 1] if i > 0 else None)
        assert data["next"] == (order[i + 1] if i + 1 < len(order) else None)
    page = client.get(f"{RUN}/layers/5/features/{order[1]}", params=view).text
    assert f'id="next-feature" href="{RUN}/layers/5/features/{order[2]}?sort=correlation&amp;sign=pos"' in page
    assert f'id="prev-feature" href="{RUN}/layers/5/features/{order[0]}?sort=correlation&amp;sign=pos"' in page
    negative = next(r["feature"] for r in layer_features(synthetic_run, 5) if r["weight"] < 0)
    outside = client.get(f"/api{RUN}/layers/5/features/{negative}", params=view).json()["in_view"]
    assert outside["index"] is None and outside["next"] is None  # not in this view: nothing to walk


def test_go_to_feature_id_redirects_keeping_the_view(client):
    r = client.get(f"{RUN}/layers/3", params={"go": 12, "sort": "frequency"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"{RUN}/layers/3/features/12?sort=frequency"
    missing = client.get(f"{RUN}/layers/3", params={"go": 999})
    assert missing.status_code == 404 and "feature 999 not found in layer 3" in missing.text


def test_feature_page_lists_nearest_features_by_decoder_cosine(client, synthetic_run):
    data = client.get(f"/api{RUN}/layers/3/features/5").json()["feature"]
    assert [n["feature"] for n in data["neighbours"]] == [6, 7, 8]
    assert [round(n["cosine"], 3) for n in data["neighbours"]] == [0.9, 0.5, 0.1]
    weights = {r["feature"]: r["weight"] for r in layer_features(synthetic_run, 3)}
    assert [n["weight"] for n in data["neighbours"]] == [weights[6], weights[7], weights[8]]
    html = client.get(f"{RUN}/layers/3/features/5").text
    assert html_rows(html, "neighbour") == [6, 7, 8] and fmt_weight(weights[6]) in row_html(html, "neighbour", 6)


@pytest.mark.parametrize("query, message", [
    ("sign=up", "sign"),
    ("min_freq=50&max_freq=10", "min_freq (50.0) is above max_freq (10.0)"),
    ("min_freq=200", "min_freq"),
    ("token=" + "x" * 101, "token"),
    ("go=-1", "go"),
])
def test_bad_filter_values_are_422_with_the_field_named(client, query, message):
    if not query.startswith("go="):  # `go` is the HTML page's "open feature #" box only
        api = client.get(f"/api{RUN}/layers/3?{query}")
        assert api.status_code == 422 and message in str(api.json()["detail"])
    page = client.get(f"{RUN}/layers/3?{query}")
    assert page.status_code == 422 and message in page.text


def test_openapi_describes_every_json_twin_and_no_html_page(client):
    spec = client.get("/api/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/layers/{layer}",
            "/api/runs/{run_id}/layers/{layer}/features/{feature}"} <= paths
    assert all(p.startswith("/api/") for p in paths)
    params = {p["name"]: p for p in spec["paths"]["/api/runs/{run_id}/layers/{layer}"]["get"]["parameters"]}
    assert {"sort", "sign", "min_freq", "max_freq", "token", "page"} <= set(params)
    sort = params["sort"]["schema"]  # optional (none: the layer's default ranking): the enum or null
    assert set(next(s["enum"] for s in sort.get("anyOf", [sort]) if "enum" in s)) == set(SORTS)


def test_feature_cards_agree_with_the_tables_they_are_built_from(migrated, synthetic_run):
    """Each card (one read per feature page) holds what queries on the tables would give."""
    import duckdb

    from backend.core import store

    path = migrated.data_dir / "runs" / "synthetic" / "features.duckdb"
    con = duckdb.connect(str(path), read_only=True)
    for layer, feature in con.execute("SELECT layer, feature FROM features ORDER BY layer, feature").fetchall():
        card = store.feature(path, layer, feature)
        assert card["feature"] == feature
        default_sort = RANKINGS[DEFAULT_RANKING[layer]].sort  # the layer table's default order
        assert card["default_view"] == store.neighbours_in_order(path, layer, feature, default_sort)
        rank = con.execute("SELECT 1 + count(*) FILTER (WHERE abs(weight) > (SELECT abs(weight) FROM features "
                           "WHERE layer = $1 AND feature = $2)) FROM features WHERE layer = $1", [layer, feature]).fetchone()[0]
        assert card["abs_weight_rank"] == rank
        by_kind = dict(con.execute("SELECT kind, list(activation ORDER BY rank) FROM contexts WHERE layer = ? AND "
                                   "feature = ? GROUP BY kind", [layer, feature]).fetchall())
        assert [c["activation"] for c in card["contexts"]] == by_kind.get("top", [])
        assert [c["activation"] for c in card["quantile_contexts"]] == by_kind.get("quantile", [])
        ids, cosines = con.execute("SELECT neighbours, neighbour_cosines FROM features WHERE layer = ? AND feature = ?",
                                   [layer, feature]).fetchone()
        assert [n["feature"] for n in card["neighbours"]] == list(ids or [])
        assert [n["cosine"] for n in card["neighbours"]] == list(cosines or [])
    con.close()


def test_best_layer_is_explained_by_weights_that_agree_with_the_reward_effect():
    from backend.core.layer_choice import best_layer

    layers = [{"layer": 1, "r2_heldout": 0.977, "weight_effect_agreement": 0.59},
              {"layer": 3, "r2_heldout": 0.986, "weight_effect_agreement": 0.28},
              {"layer": 5, "r2_heldout": 0.984, "weight_effect_agreement": -0.13}]
    assert best_layer(layers) == 1  # the demo's layers: R² alone would pick 3, whose top weights move nothing
    assert best_layer([{**l, "weight_effect_agreement": None} for l in layers]) == 3  # no gradients: R² alone
    assert best_layer([{"layer": 2, "r2_heldout": None, "weight_effect_agreement": None}]) is None
    assert best_layer([{"layer": 4, "r2_heldout": 0.5, "weight_effect_agreement": -0.2},
                       {"layer": 6, "r2_heldout": 0.7, "weight_effect_agreement": -0.1}]) == 6  # all 0: R² breaks the tie


def test_run_page_shows_weight_effect_agreement_and_the_best_layer_it_picks(client, migrated, synthetic_run):
    stored = synthetic_run["layers"]
    html, api = client.get(RUN).text, client.get(f"/api{RUN}").json()
    assert [l["weight_effect_agreement"] for l in api["layers"]] == pytest.approx(stored["weight_effect_agreement"])
    for layer, agreement in zip(stored["layer"], stored["weight_effect_agreement"]):
        assert f'<td class="num agreement">{fmt_num(agreement)}</td>' in row_html(html, "layer", layer)
    rule = re.search(r'<p class="muted small" id="best-rule"[^>]*>([^<]*)</p>', html).group(1)
    assert api["best_layer"] == 3 and rule == str(escape(layer_choice.RULE_WORDS["faithfulness"]))
    assert api["best_layer_rule"] == layer_choice.RULE_WORDS["faithfulness"]  # one definition, page and JSON
    assert client.get("/api/runs").json()["runs"][0]["best_layer"] == 3
    # nothing measured (a score the model does not compute): the agreement picks it, as it says
    publish_synthetic_run(migrated, run_id="plain", causal=False)
    plain = client.get("/runs/plain").text
    rule = re.search(r'<p class="muted small" id="best-rule"[^>]*>([^<]*)</p>', plain).group(1)
    assert rule == str(escape(layer_choice.RULE_WORDS["r2_x_agreement"])) and 'id="best-layer-why"' not in plain
    layer_page = client.get(f"{RUN}/layers/5").text
    assert f'weight–effect agreement {fmt_num(stored["weight_effect_agreement"][1])}</span>' in layer_page


def test_view_orders_are_kept_per_view_and_bounded(migrated, synthetic_run, monkeypatch):
    """A table view's order is read once and reused for its pages and j/k; the cache forgets
    the least recently used views beyond VIEW_CACHE_SIZE, and a label filter is its own view."""
    from backend.core import store

    monkeypatch.setattr(store, "VIEW_CACHE_SIZE", 2)
    monkeypatch.setattr(store, "LAYER_ROWS_CACHED", N_FEATURES)  # one layer's rows at a time
    path = migrated.data_dir / "runs" / "synthetic" / "features.duckdb"
    positive = store.FeatureFilter(sign="pos")
    first = store.view_order(path, 5, "correlation", positive)
    assert first.tolist() == expected_order(synthetic_run, 5, "correlation", lambda r: r["weight"] > 0)
    assert store.view_order(path, 5, "correlation", positive) is first  # reused, not re-read
    page = store.features(path, 5, "correlation", positive, limit=7, offset=3)
    assert [r["feature"] for r in page.rows] == first[3:10].tolist() and page.total == len(first)
    chosen = store.FeatureFilter(features=(3, 1, 8))
    assert store.view_order(path, 5, "frequency", chosen).tolist() == expected_order(
        synthetic_run, 5, "frequency", lambda r: r["feature"] in (3, 1, 8))
    store.view_order(path, 3, "weight")
    opened = store._open(path)
    assert len(opened.views) == 2 and (5, "correlation", positive) not in opened.views  # least recent went
    past_the_end = store.features(path, 5, "correlation", positive, limit=5, offset=len(first))
    assert past_the_end.rows == [] and past_the_end.total == len(first)
    by_id = {r["feature"]: r for r in layer_features(synthetic_run, 3)}
    for row in store.features(path, 3, "weight", limit=4).rows:  # rows read from memory hold the table's values
        assert row["weight"] == pytest.approx(by_id[row["feature"]]["weight"])
        assert row["top_token"] == by_id[row["feature"]]["top_token"]
    assert list(opened.layer_rows) == [3]  # layer 5's rows made room


def test_feature_rows_show_each_cell_and_escape_what_they_quote():
    from backend.web.feature_table import feature_rows, shown_columns
    row = {"feature": 7, "weight": -0.25, "std_weight": 0.5, "weight_se": 0.01, "weight_group_size": 3,
           "reward_correlation": 0.123, "reward_effect": None, "frequency": 0.02, "max_activation": 4.0,
           "attribution": 0.0125, "measured_delta": -0.0311, "measured_delta_low": -0.04, "measured_delta_high": -0.02,
           "measured_n": 17, "top_token": "<b>", "label": "reward", "label_note": 'says "great"'}
    unmeasured = {"measured_delta": None, "measured_delta_low": None, "measured_delta_high": None, "measured_n": 0}
    columns = [c.name for c in shown_columns(set(), "weight")]
    html = feature_rows([row, {**row, "feature": 8, "weight_group_size": 1, "top_token": None, "label": None,
                               **unmeasured}], columns,
                        first_rank=51, href="/runs/a b/layers/3/features/", query="?sort=weight&page=2",
                        scales={"weight": 0.5}, label_names={"reward": "reward-related"})
    first, second = re.findall(r"<tr .*?</tr>", html)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", first)
    assert cells[1] == "51" and re.findall(r"<td[^>]*>(.*?)</td>", second)[1] == "52"  # rank continues the page
    assert '<a href="/runs/a b/layers/3/features/7?sort=weight&amp;page=2"><b>7</b></a>' in cells[2]
    assert "×3" in cells[2] and "2 near-duplicate features" in cells[2]
    assert 'class="num weight neg"' in first and 'style="width:25.0%"' in cells[3] and cells[3].endswith("-0.250")
    assert cells[4:8] == ["+0.500", "0.0100", "0.123", "—"] and cells[8] == "+0.0125"
    assert cells[9] == '-0.0311 <span class="ci">[-0.0400, -0.0200]</span>' and "on 17 reward reads" in first
    assert cells[10:12] == ["2.00%", "4.00"]
    assert cells[12] == '<code class="token">&lt;b&gt;</code>'
    assert cells[13] == '<span class="badge label-reward" title="says &quot;great&quot;">reward-related</span>'
    assert "never fires" in second and "group-mark" not in second and "badge" not in second
    assert re.findall(r"<td[^>]*>(.*?)</td>", second)[9] == "—" and "not measured" in second


def test_percentages_keep_fixed_point_on_both_sides_of_zero():
    # a negative share (an attribution against the score) reads like a positive one, not as 1e+00
    assert fmt_pct(0.125) == "12.5%" and fmt_pct(-0.015) == "-1.50%" and fmt_pct(0) == "0.00%"
    assert fmt_pct(-2e-6) == "-0.000200%" and fmt_pct(None) == "—"


def test_one_number_format_with_fixed_significant_digits_and_no_exponent_in_the_normal_range():
    from backend.web.routes.formats import SIGNIFICANT, fmt_delta, significant

    column = [0.25, -0.00078, 12.345, 0.0009996, 1234.5, 4.0, 3e-7]
    assert [fmt_num(x) for x in column] == ["0.250", "-0.000780", "12.3", "0.00100", "1,234", "4.00", "0.000000300"]
    assert not any("e" in fmt_num(x) or "e" in fmt_weight(x) for x in column)  # one column, one notation
    for x in column:  # SIGNIFICANT significant digits, whatever the size (integer digits kept above it)
        digits = fmt_num(x).lstrip("-").replace(",", "").replace(".", "").lstrip("0")
        assert len(digits) == max(SIGNIFICANT, len(str(int(abs(x)))))
    assert fmt_weight(0.25) == "+0.250" and fmt_weight(-0.25) == "-0.250" and fmt_weight(0) == "0.00"
    assert fmt_delta(-0.0311) == "−0.0311" and fmt_pct(0.02) == "2.00%"
    assert fmt_num(None) == fmt_num(float("nan")) == "—" and significant(2e-12) == "2.00e-12"  # only the extremes


def test_api_docs_and_favicon_are_served_without_a_cdn(client):
    page = client.get("/api/docs").text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert client.get("/static/swagger-ui/swagger-ui-bundle.js").status_code == 200
    assert client.get("/static/swagger-ui/swagger-ui.css").status_code == 200
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg")
    assert '<link rel="icon" href="/static/favicon.svg"' in client.get("/").text


def test_the_text_box_counts_against_the_deployments_limit(client):
    page = client.get(f"{RUN}/layers/3").text
    assert 'maxlength="4000" data-limit="4000" data-counter="text-count"' in page
    assert 'id="text-count">limit 4,000 characters' in page and '<script src="/static/forms.js" defer>' in page
    assert "required for ${select.value}" in client.get("/static/forms.js").text  # clamp/steer need a value


def test_byte_level_line_breaks_show_as_arrows():
    from backend.web.routes.formats import token_spans

    html = str(token_spans(["<|im_start|>", "assistant", "\u010a", "I", "\u0120loved"], [0, 0, 0, 1.0, 2.0], 2.0))
    assert ">\u21b5</span>" in html and "\u010a<" not in html and "> loved<" not in html and ">loved<" in html


def test_near_equal_r2_bars_are_drawn_on_an_axis_that_shows_their_differences():
    from backend.web.charts import r2_bars

    layers = [{"layer": i, "r2_heldout": v, "r2_train": 0.99, "probe_r2_heldout": 0.985}
              for i, v in enumerate((0.980, 0.988, 0.987))]
    chart = r2_bars(layers, best_layer=1)
    heights = [b["h"] for b in chart["bars"]]
    assert 0.9 < chart["floor"] < 0.98 and heights[1] - heights[0] > 10  # 0.008 apart: over 10 px
    assert chart["ticks"][0]["v"] == chart["floor"] and chart["ticks"][-1]["v"] == 1.0
    low = r2_bars([{"layer": 0, "r2_heldout": 0.3, "r2_train": 0.5}], best_layer=0)
    assert low["floor"] == 0.0  # any value below a half: the axis starts at zero

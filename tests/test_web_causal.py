"""What the server shows of what the model uses, beside what the regression predicts: the
default ranking's order, deletion curves, calibration, measured Δs and the best layer's reason."""
from __future__ import annotations

import re
from markupsafe import escape as markup_escape

import pytest

from backend.core.rankings import RANKINGS, VERDICT_WORDS, directions_of
from backend.web.routes.formats import fmt_delta, fmt_num, fmt_pct
from tests.helpers import DEFAULT_RANKING, LAYERS, N_MEASURED, make_client, publish_synthetic_run
from tests.test_web import RUN, expected_order, html_rows, layer_features


def curve_rows(tables, layer):
    f = tables["faithfulness"]
    return [{k: f[k][i] for k in f} for i in range(len(f["layer"])) if f["layer"][i] == layer]


def layer_row(tables, layer):
    rows = tables["layers"]
    i = rows["layer"].index(layer)
    return {k: rows[k][i] for k in rows}


def text_of(html, element_id):
    """The words inside the element with this id, tags and repeated spaces gone."""
    match = re.search(rf'<(\w+)[^>]* id="{element_id}"[^>]*>(.*?)</\1>', html, re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", match.group(2))).strip() if match else None


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_table_opens_in_its_default_ranking(client, synthetic_run, layer):
    ranking = RANKINGS[DEFAULT_RANKING[layer]]
    api = client.get(f"/api{RUN}/layers/{layer}").json()
    assert api["default_ranking"] == {"key": ranking.key, "sort": ranking.sort, "label": ranking.label,
                                      "kind": ranking.kind, "measured": True}
    assert api["sort"] == ranking.sort and api["view"]["sort"] is None  # the query named none
    expected = expected_order(synthetic_run, layer, ranking.sort)
    assert [f["feature"] for f in api["features"]] == expected[:50]
    html = client.get(f"{RUN}/layers/{layer}").text
    assert html_rows(html, "feature") == expected[:50]
    # its tab is on and marked default, and links to the plain URL; the other tabs name their sort
    tab = re.search(rf'<a href="[^"]*" data-sort="{re.escape(ranking.sort)}" class="on"[^>]*>(.*?)</a>', html).group(1)
    assert 'class="badge default"' in tab and html.count('class="badge default"') == 1
    assert f'<a href="{RUN}/layers/{layer}?" data-sort="{ranking.sort}"' in html
    assert 'data-sort="-measured_delta">measured Δ (ablation)</a>' in html
    assert re.search(r'data-sort="weight"[^>]*>weight \(predicts\)', html)


def test_an_explicit_sort_overrides_the_default_and_no_measurement_falls_back_to_weight(client, migrated,
                                                                                         synthetic_run):
    api = client.get(f"/api{RUN}/layers/3", params={"sort": "weight"}).json()
    assert api["sort"] == "weight" and [f["feature"] for f in api["features"]] == expected_order(
        synthetic_run, 3, "weight")[:50]
    tables = publish_synthetic_run(migrated, run_id="plain", causal=False)
    plain = client.get("/api/runs/plain/layers/3").json()
    assert plain["default_ranking"]["key"] == "weight" and plain["default_ranking"]["measured"] is False
    assert [f["feature"] for f in plain["features"]] == expected_order(tables, 3, "weight")[:50]
    page = client.get("/runs/plain/layers/3").text
    assert "nothing was measured at this layer" in text_of(page, "default-ranking")
    assert 'id="faithfulness-chart"' not in page and 'id="barely-reaches"' not in page


def test_feature_page_walks_the_default_ranking_from_a_plain_link(client, synthetic_run):
    order = expected_order(synthetic_run, 3, RANKINGS[DEFAULT_RANKING[3]].sort)
    for query in ({}, {"sort": RANKINGS[DEFAULT_RANKING[3]].sort}):  # the card's place, or the same order read
        data = client.get(f"/api{RUN}/layers/3/features/{order[1]}", params=query).json()
        assert data["sort"] == "attribution"
        assert {k: data["in_view"][k] for k in ("index", "total", "previous", "next")} == {
            "index": 1, "total": len(order), "previous": order[0], "next": order[2]}
    page = client.get(f"{RUN}/layers/3/features/{order[1]}").text
    assert f'id="next-feature" href="{RUN}/layers/3/features/{order[2]}"' in page
    assert "attribution, largest first" in text_of(page, "position")


def test_faithfulness_endpoint_gives_each_rankings_curve_and_the_calibration(client, synthetic_run):
    stored = curve_rows(synthetic_run, 3)
    info = layer_row(synthetic_run, 3)
    data = client.get(f"/api{RUN}/layers/3/faithfulness").json()
    assert data["layer"] == 3 and data["default_ranking"]["key"] == "attribution"
    assert data["compared"].startswith("Each ranking's top n features zeroed together")
    assert list(data["rankings"]) == list(RANKINGS)  # every ranking, in RANKINGS order
    for key, curve in data["rankings"].items():
        assert curve["label"] == RANKINGS[key].label and curve["kind"] == RANKINGS[key].kind
        assert list(curve["directions"]) == list(directions_of(key))  # signed: raises and lowers; |weight|: both
        assert curve["measure"] == ("abs" if key == "abs_weight" else "signed")
        means = []
        for direction, line in curve["directions"].items():
            mine = sorted((r for r in stored if r["ranking"] == key and r["direction"] == direction),
                          key=lambda r: r["n"])
            assert [p["n"] for p in line["points"]] == [r["n"] for r in mine]
            for point, row in zip(line["points"], mine):
                assert {"effect", "control_effects", "excess", "verdict", "abs_mean_delta", "mean_delta"} <= set(point)
                assert point["effect"] == pytest.approx(row["effect"]) and point["features"] == row["features"]
                assert point["control_effects"] == pytest.approx(row["control_effects"])
            means.append(sum(r["excess"] for r in mine) / len(mine))
        assert curve["score"] == pytest.approx(sum(means) / len(means))
    measured = [r["measured_delta"] for r in layer_features(synthetic_run, 3) if r["measured_n"]]
    for direction, count in (("raises", sum(d < 0 for d in measured)), ("lowers", sum(d > 0 for d in measured))):
        # a direction's curve stops where its features run out: raisers never mix with lowerers
        ns = [p["n"] for p in data["rankings"]["measured_delta"]["directions"][direction]["points"]]
        assert ns == [n for n in (1, 2, 5, 10) if n <= count]
    at_10 = data["rankings"]["attribution"]["directions"]["raises"]["points"][3]
    assert at_10["n"] == 10 and len(at_10["control_effects"]) == 10 and at_10["verdict"] == "beyond_controls"
    calibration = data["calibration"]
    assert calibration["n_measured"] == N_MEASURED == len(calibration["features"])
    assert calibration["regression"] == {"slope": pytest.approx(info["calibration_regression_slope"]),
                                         "r": pytest.approx(info["calibration_regression_r"])}
    measured = {r["feature"]: r for r in layer_features(synthetic_run, 3) if r["measured_n"]}
    assert [f["feature"] for f in calibration["features"]] == sorted(measured)
    for f in calibration["features"]:
        assert f["measured_delta"] == pytest.approx(measured[f["feature"]]["measured_delta"])
        assert f["predicted_delta_attribution"] == pytest.approx(measured[f["feature"]]["predicted_delta_attribution"])


@pytest.mark.parametrize("path, status, message", [
    ("/api/runs/nope/layers/3/faithfulness", 404, "run 'nope' not found"),
    (f"/api{RUN}/layers/4/faithfulness", 404, "layer 4 not found"),
])
def test_faithfulness_of_an_unknown_run_or_layer_is_404(client, path, status, message):
    r = client.get(path)
    assert r.status_code == status and message in r.json()["detail"]


def test_faithfulness_of_an_outdated_store_is_409(migrated):
    import duckdb

    publish_synthetic_run(migrated, run_id="old")
    con = duckdb.connect(str(migrated.data_dir / "runs" / "old" / "features.duckdb"))
    con.execute("UPDATE run_info SET value = '1' WHERE key = 'store_version'")
    con.close()
    with make_client(migrated) as c:
        r = c.get("/api/runs/old/layers/3/faithfulness")
    assert r.status_code == 409 and "--replace" in r.json()["detail"]


def test_layer_page_says_what_the_default_ranking_moves_and_where_edits_barely_reach(client, synthetic_run):
    html = client.get(f"{RUN}/layers/3").text
    info, rows = layer_row(synthetic_run, 3), curve_rows(synthetic_run, 3)
    at_10 = {(r["ranking"], r["direction"]): r for r in rows if r["n"] == 10}
    raises, lowers, both = at_10["attribution", "raises"], at_10["attribution", "lowers"], at_10["abs_weight", "both"]
    said = text_of(html, "default-ranking")
    spread = info["score_spread"]
    assert said.startswith(
        f"Default ranking: attribution (gradient) — its top 10 raisers, zeroed, lower the score by "
        f"{fmt_num(raises['effect'])} (controls {fmt_num(raises['control_effect'])}, 10 draws up to "
        f"{fmt_num(max(raises['control_effects']))}; {fmt_pct(raises['excess'] / spread)} of the spread beyond them; "
        f"beyond every control draw); its top 10 lowerers, zeroed, raise it by {fmt_num(lowers['effect'])}")
    assert (f"The regression's |weight| ranking: its top 10, zeroed, move each text's score by "
            f"{fmt_num(both['effect'])} (mean |Δ|)") in said
    assert "Compared: Each ranking" in said and "top n features zeroed together" in said
    assert 'id="barely-reaches"' not in html  # layer 3's edits reach the score

    low = layer_row(synthetic_run, 5)
    assert low["reach"] < 0.02
    said = text_of(client.get(f"{RUN}/layers/5").text, "barely-reaches")
    assert said.startswith("This layer's edits barely reach the score")
    assert f"at most {fmt_pct(low['reach'])}, " in said and "97.0% of the score's gradient sits at " \
        "the token the head reads" in said


def test_layer_page_draws_the_deletion_curves_and_the_calibration(client, synthetic_run):
    html = client.get(f"{RUN}/layers/3").text
    chart = re.search(r'<svg class="chart faithfulness".*?</svg>', html, re.S).group(0)
    rows = curve_rows(synthetic_run, 3)
    drawn = re.findall(r'<g class="curve r-(\w+) k-(\w+) d-(\w+)( default)?" data-ranking="\w+" '
                       r'data-direction="\w+">(.*?)</g>', chart, re.S)
    assert [(key, kind, d) for key, kind, d, _, _ in drawn] == [
        (k, r.kind, d) for k, r in RANKINGS.items() for d in directions_of(k)]
    assert {key for key, _, _, default, _ in drawn if default} == {"attribution"}
    for key, _, direction, _, body in drawn:
        assert body.count("<polyline") == 1 and body.count("<circle") == sum(
            r["ranking"] == key and r["direction"] == direction for r in rows)
        assert body.count("<title>") == body.count("<circle") + 1  # each point and its line say what they are
    assert chart.count('class="control-band"') == 1
    legend = re.search(r'<p class="legend faithfulness-legend".*?</p>', html, re.S).group(0)
    assert "attribution (gradient) <b>default</b>" in legend and "measured Δ (ablation)" in legend
    assert "raisers zeroed (score lowered)" in legend and "lowerers zeroed (score raised)" in legend

    calibration = re.search(r'<svg class="chart calibration".*?</svg>', html, re.S).group(0)
    for series in ("regression", "attribution"):
        group = re.search(rf'<g class="dots s-{series}" data-series="{series}">(.*?)</g>', calibration, re.S).group(1)
        assert group.count("<circle") == N_MEASURED and group.count("<title>feature ") == N_MEASURED
    assert calibration.count('class="diagonal"') == 1
    info = layer_row(synthetic_run, 3)
    fit = text_of(html, "calibration-fit")
    assert f"regression (predicts): slope {fmt_num(info['calibration_regression_slope'])}" in fit
    assert f"attribution (gradient): slope {fmt_num(info['calibration_attribution_slope'])}, r " \
           f"{fmt_num(info['calibration_attribution_r'])}" in fit


def test_layer_table_shows_attribution_and_measured_delta_with_its_ci(client, synthetic_run):
    api = client.get(f"/api{RUN}/layers/3", params={"sort": "-measured_delta"}).json()
    measured = [f for f in api["features"] if f["measured_n"]]
    assert len(measured) == N_MEASURED and api["features"][:N_MEASURED] == measured  # the unmeasured come last
    html = client.get(f"{RUN}/layers/3", params={"sort": "-measured_delta"}).text
    first = re.search(rf'<tr data-feature="{measured[0]["feature"]}".*?</tr>', html, re.S).group(0)
    assert "[" in first and 'class="num measured' in first
    unmeasured = api["features"][N_MEASURED]["feature"]
    assert "not measured" in re.search(rf'<tr data-feature="{unmeasured}".*?</tr>', html, re.S).group(0)
    assert 'aria-sort="ascending"' in html and "Measured Δ ▲" in html


def test_feature_page_sets_the_measured_delta_beside_both_predictions(client, synthetic_run):
    rows = layer_features(synthetic_run, 3)
    measured = next(r for r in rows if r["measured_n"])
    html = client.get(f"{RUN}/layers/3/features/{measured['feature']}").text
    api = client.get(f"/api{RUN}/layers/3/features/{measured['feature']}").json()["feature"]
    assert api["measured_delta"] == pytest.approx(measured["measured_delta"]) and api["measured_n"] == measured["measured_n"]
    said = text_of(html, "measured")
    assert said.startswith(fmt_delta(measured["measured_delta"]))
    assert (f"95% CI [{fmt_delta(measured['measured_delta_low'])}, {fmt_delta(measured['measured_delta_high'])}], "
            f"n = {measured['measured_n']}") in said
    for key in ("regression", "attribution"):
        predicted = measured[f"predicted_delta_{key}"]
        row = re.search(rf'<tr data-prediction="{key}">(.*?)</tr>', html, re.S).group(1)
        assert fmt_delta(predicted) in row and f"{predicted / measured['measured_delta']:.1f}×" in row
    assert "predicts the score" in text_of(html, "weight-predicts")
    assert "effect per unit (gradient)" in html and ">reward effect<" not in html
    assert re.search(r'id="attribution" class="(pos|neg)">' + re.escape(f"{measured['attribution']:+.4f}"), html)

    unmeasured = next(r for r in rows if not r["measured_n"] and r["frequency"] > 0)
    html = client.get(f"{RUN}/layers/3/features/{unmeasured['feature']}").text
    assert text_of(html, "not-measured").startswith("Not measured: this feature was not among the layer's top "
                                                     f"candidates ({N_MEASURED} of its features")
    assert 'id="predictions"' not in html


def test_run_page_explains_the_best_layer_by_what_zeroing_it_moves(client, synthetic_run):
    html, api = client.get(RUN).text, client.get(f"/api{RUN}").json()
    best, other = layer_row(synthetic_run, 3), layer_row(synthetic_run, 5)
    assert api["best_layer"] == 3
    assert [(l["layer"], l["default_ranking"], l["default_sort"]) for l in api["layers"]] == [
        (3, "attribution", "attribution"), (5, "weight", "weight")]
    assert text_of(html, "best-layer-why") == (
        f"Best layer: 3 — zeroing the top 10 of its default ranking, attribution (gradient), moves the reward "
        f"{fmt_pct(best['faithfulness_relative'])} of its spread beyond random controls (its raisers zeroed lower "
        f"the score, its lowerers zeroed raise it; beyond every control draw) (layer 5: "
        f"{fmt_pct(other['faithfulness_relative'])}); held-out R² {best['r2_heldout']:.3f}.")
    assert api["best_layer_rule"].startswith("the layer where zeroing its default ranking's top 10")
    assert html.count(str(markup_escape(api["best_layer_rule"]))) == 1  # the best-layer card says it
    for layer in (best, other):
        row = re.search(rf'<tr data-uses="{layer["layer"]}".*?</tr>', html, re.S).group(0)
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        assert cells[2:7] == [fmt_num(layer["faithfulness_effect"]), fmt_num(layer["faithfulness_control"]),
                              fmt_pct(layer["faithfulness_relative"]), VERDICT_WORDS[layer["faithfulness_verdict"]],
                              fmt_pct(layer["reach"])]
        assert cells[7] == f"{fmt_num(layer['calibration_regression_slope'])} ({fmt_num(layer['calibration_regression_r'])})"
        assert cells[-1] == f"{layer['r2_heldout']:.3f}"
    assert other["faithfulness_verdict"] == "within_controls"

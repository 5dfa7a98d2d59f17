"""Reward-hacking probes from the web (backend/web/routes/probes.py): the feature page's forms and the
JSON endpoints queue jobs with the right params, bad input is a 4xx that creates no job, and a
finished probe's job page and the feature page show its numbers."""
from __future__ import annotations

import html
import re

import pytest

from backend.web import charts

from backend.core import db, jobs
from backend.core.models import Run
from tests.helpers import N_FEATURES
from tests.test_jobs_web import csrf, job_count
from backend.core.probe_params import CLAMP_MULTIPLES, CONTROL_PHRASE, DEFAULT_CARRIERS, DEFAULT_STEER_VALUES

pytestmark = pytest.mark.sql_databases  # each test on SQLite and PostgreSQL (tests/conftest.py)

RUN = "/runs/synthetic"
FEATURE = f"{RUN}/layers/3/features/7"


def card(client, layer=3, feature=7):
    return client.get(f"/api{RUN}/layers/{layer}/features/{feature}").json()["feature"]


def job_of(migrated, response) -> dict:
    assert response.status_code == 303, response.text
    return jobs.get(migrated, int(response.headers["location"].rsplit("/", 1)[1]))


def finish(migrated, kind: str, params: dict, result: dict) -> dict:
    job = jobs.submit(migrated, kind, params, "local", "synthetic")
    claimed = jobs.claim(migrated, "w")
    assert claimed["id"] == job["id"]
    jobs.finish(migrated, job["id"], "w", result=result)
    return job


def run_version(migrated) -> int:
    with db.session(migrated) as s:
        return s.get(Run, "synthetic").version


def test_the_feature_page_has_the_three_probe_forms_and_each_queues_its_job(client, migrated):
    page = client.get(FEATURE).text
    top = card(client)["top_token"].removeprefix("##")
    assert "Reward-hacking probes" in page and 'id="vocab-probe-missing"' in page
    assert f'name="phrase" value="{top}"' in page  # no vocab probe yet: the store's top token
    token = csrf(client, FEATURE)
    probe = job_of(migrated, client.post(f"{RUN}/layers/3/vocab-probe", data={"csrf_token": token, "vocabulary": "all",
                                                                              "carriers": ""}, follow_redirects=False))
    assert probe["kind"] == "vocab_probe" and probe["params"]["layer"] == 3
    assert probe["params"]["carriers"] == list(DEFAULT_CARRIERS) and probe["params"]["run_version"] == run_version(migrated)
    inserted = job_of(migrated, client.post(f"{RUN}/insertions", data={
        "csrf_token": token, "phrase": " magnificent ", "control": "", "position": "4", "repeat": "6", "n_texts": "32",
        "texts": "neutral", "layer": "3", "feature": "7"}, follow_redirects=False))
    assert {k: inserted["params"][k] for k in ("phrase", "control", "position", "repeat", "n_texts", "texts",
                                               "layer", "feature")} == {
        "phrase": "magnificent", "control": CONTROL_PHRASE, "position": 4, "repeat": 6, "n_texts": 32,
        "texts": "neutral", "layer": 3, "feature": 7}
    swept = job_of(migrated, client.post(f"{RUN}/layers/3/sweep", data={
        "csrf_token": token, "features": "7", "mode": "steer", "values": "", "n_texts": "64", "n_controls": "4"},
        follow_redirects=False))
    assert swept["params"]["values"] == list(DEFAULT_STEER_VALUES) and swept["params"]["n_controls"] == 4
    clamp = job_of(migrated, client.post(f"{RUN}/layers/3/sweep", data={
        "csrf_token": token, "features": "7, 9", "mode": "clamp", "values": "2, 0.5 1"}, follow_redirects=False))
    assert clamp["params"]["values"] == [0.5, 1.0, 2.0] and clamp["params"]["features"] == [7, 9]
    # the page now says a probe is queued and lists the feature's latest probes
    page = client.get(FEATURE).text
    assert f'href="/jobs/{probe["id"]}">a probe is queued' in page
    assert f'/jobs/{inserted["id"]}' in page and f'/jobs/{swept["id"]}' in page


def test_json_endpoints_answer_201_with_the_job_and_its_location(client, migrated):
    r = client.post(f"/api{RUN}/layers/5/vocab-probes", json={"vocabulary": "corpus", "carriers": ["say {} now"]})
    assert r.status_code == 201 and r.headers["location"] == f"/api/jobs/{r.json()['id']}"
    assert r.json()["params"]["carriers"] == ["say {} now"] and r.json()["params"]["vocabulary"] == "corpus"
    r = client.post(f"/api{RUN}/insertions", json={"phrase": "wonderful"})
    assert r.status_code == 201 and r.json()["kind"] == "insertion"
    params = r.json()["params"]
    assert params["position"] == "end" and params["control"] == CONTROL_PHRASE and params["n_texts"] == 128
    assert "layer" not in params  # no feature named: the job page names no layer
    r = client.post(f"/api{RUN}/layers/3/sweeps", json={"features": [7], "mode": "clamp"})
    assert r.status_code == 201
    largest = card(client)["max_activation"]
    assert r.json()["params"]["values"] == pytest.approx([m * largest for m in CLAMP_MULTIPLES], rel=1e-2)
    assert client.get(r.headers["location"]).json()["status"] == "queued"


@pytest.mark.parametrize("path, body, status, message", [
    ("/layers/3/vocab-probes", {"carriers": ["no slot here"]}, 422, "exactly one {}"),
    ("/layers/3/vocab-probes", {"carriers": ["two {} and {}"]}, 422, "has 2"),
    ("/layers/3/vocab-probes", {"carriers": [" {} "]}, 422, "words around"),
    ("/layers/3/vocab-probes", {"carriers": []}, 422, "at least 1"),
    ("/layers/3/vocab-probes", {"vocabulary": "everything"}, 422, "vocabulary"),
    ("/layers/4/vocab-probes", {}, 404, "layer 4 not found"),
    ("/insertions", {"phrase": "   "}, 422, "type a word or phrase"),
    ("/insertions", {"phrase": "x" * 201}, 422, "at most 200"),
    ("/insertions", {"phrase": "good", "position": "middle"}, 422, "position"),
    ("/insertions", {"phrase": "good", "position": -1}, 422, "position"),
    ("/insertions", {"phrase": "good", "n_texts": 0}, 422, "n_texts"),
    ("/insertions", {"phrase": "good", "repeat": 51}, 422, "repeat"),
    ("/insertions", {"phrase": "good", "texts": "all"}, 422, "texts"),
    ("/insertions", {"phrase": "good", "feature": 3}, 422, "layer and feature go together"),
    ("/insertions", {"phrase": "good", "layer": 3, "feature": N_FEATURES}, 422, "out of range"),
    ("/insertions", {"phrase": "good", "layer": 4, "feature": 1}, 404, "layer 4 not found"),
    ("/layers/3/sweeps", {"features": [], "mode": "steer"}, 422, "features"),
    ("/layers/3/sweeps", {"features": [N_FEATURES], "mode": "steer"}, 422, "out of range"),
    ("/layers/3/sweeps", {"features": [1], "mode": "zero"}, 422, "mode"),
    ("/layers/3/sweeps", {"features": [1], "mode": "clamp", "values": [1e5]}, 422, "values"),
    ("/layers/3/sweeps", {"features": [1], "mode": "clamp", "values": []}, 422, "values"),
    ("/layers/3/sweeps", {"features": [1], "mode": "steer", "n_controls": 2}, 422, "n_controls"),
    ("/layers/3/sweeps", {"features": list(range(65)), "mode": "steer"}, 422, "features"),
    ("/layers/4/sweeps", {"features": [1], "mode": "steer"}, 404, "layer 4 not found"),
])
def test_bad_json_requests_are_refused_with_a_message_and_create_no_job(client, migrated, path, body, status, message):
    r = client.post(f"/api{RUN}{path}", json=body)
    assert r.status_code == status and message in html.unescape(r.text), r.text
    assert job_count(migrated) == 0


def test_non_finite_values_and_form_encoded_bodies_are_refused(client, migrated):
    r = client.post(f"/api{RUN}/layers/3/sweeps", content=b'{"features": [1], "mode": "steer", "values": [NaN]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "NaN" in r.text
    for path in ("/layers/3/vocab-probes", "/insertions", "/layers/3/sweeps"):
        form = client.post(f"/api{RUN}{path}", content=b"phrase=good",
                           headers={"content-type": "application/x-www-form-urlencoded"})
        assert form.status_code in (415, 422)
    assert client.post("/api/runs/nope/insertions", json={"phrase": "good"}).status_code == 404
    assert job_count(migrated) == 0


@pytest.mark.parametrize("path, data, status, message", [
    ("/layers/3/vocab-probe", {"carriers": "a sentence without a slot"}, 422, "exactly one {}"),
    ("/insertions", {"phrase": ""}, 422, "phrase"),
    ("/insertions", {"phrase": "good", "position": "1.5"}, 422, "position"),
    ("/insertions", {"phrase": "good", "layer": "3", "feature": "99"}, 422, "out of range"),
    ("/layers/3/sweep", {"features": "", "mode": "steer"}, 422, "name at least one feature"),
    ("/layers/3/sweep", {"features": "1, x", "mode": "steer"}, 422, "'x' is not a feature id"),
    ("/layers/3/sweep", {"features": "1", "mode": "steer", "values": "1, abc"}, 422, "values"),
    ("/layers/3/sweep", {"features": "1", "mode": "steer", "values": "inf"}, 422, "values"),
    ("/layers/9/sweep", {"features": "1", "mode": "steer"}, 404, "not found"),
])
def test_bad_forms_are_refused_with_a_message_and_create_no_job(client, migrated, path, data, status, message):
    r = client.post(f"{RUN}{path}", data={"csrf_token": csrf(client), **data})
    assert r.status_code == status and message in html.unescape(r.text)
    without_token = client.post(f"{RUN}{path}", data=data)
    assert without_token.status_code == 403 and "CSRF" in without_token.text
    assert job_count(migrated) == 0


def test_a_finished_vocab_probe_shows_on_its_job_page_and_on_the_feature_page(client, migrated):
    stale = finish(migrated, "vocab_probe", {"run_id": "synthetic", "layer": 3, "carriers": ["a {} b"],
                                             "vocabulary": "all", "run_version": run_version(migrated) - 1},
                   {"n_candidates": 3, "n_measured": 3, "n_carriers": 1, "n_features": 1, "vocabulary": "all",
                    "features": {"7": {"tokens": ["old"], "mean": [1.0], "fired": [1]}}, "strongest": []})
    page = client.get(FEATURE).text
    assert f'(the last probe, <a href="/jobs/{stale["id"]}">' in page and ">old<" not in page
    result = {"n_candidates": 1200, "n_measured": 1190, "n_carriers": 4, "n_features": 2, "vocabulary": "all",
              "carriers": list(DEFAULT_CARRIERS),
              "features": {"7": {"tokens": ["superb", "grand"], "mean": [3.25, 1.5], "fired": [4, 3]},
                           "9": {"tokens": ["awful"], "mean": [2.0], "fired": [2]}},
              "strongest": [{"feature": 7, "tokens": ["superb", "grand"], "mean": [3.25, 1.5]},
                            {"feature": 9, "tokens": ["awful"], "mean": [2.0]}]}
    job = finish(migrated, "vocab_probe", {"run_id": "synthetic", "layer": 3, "carriers": list(DEFAULT_CARRIERS),
                                           "vocabulary": "all", "run_version": run_version(migrated)}, result)
    page = client.get(f"/jobs/{job['id']}").text
    table = page[page.index('id="vocab-strongest"'):]
    assert table.index('features/7#probes') < table.index('features/9#probes') and "superb" in table
    assert "1,200 tokens probed" in page and DEFAULT_CARRIERS[0].replace("{}", "{}") in html.unescape(page)
    feature_page = html.unescape(client.get(FEATURE).text)
    assert "Vocabulary tokens that activate it most (measured in 4 neutral carriers" in re.sub(r"<[^>]+>", "", feature_page)
    rows = re.findall(r'<tr data-token="\d+"><td><code class="token">(\w+)</code></td><td class="num">([\d.]+)</td>'
                      r'<td class="num">(\d) of 4</td>', feature_page)
    assert rows == [("superb", "3.25", "4"), ("grand", "1.50", "3")]
    assert 'name="phrase" value="superb"' in feature_page  # the insertion form takes the probe's top token
    other = html.unescape(client.get(f"{RUN}/layers/3/features/8").text)
    assert 'id="vocab-tokens-none"' in other  # probed, and no word switches it on


def test_a_finished_insertion_page_shows_both_arms_the_difference_and_links_each_text(client, migrated):
    examples = [{"text_id": 10 + i, "text": f"text {i}.", "edited": f"text {i}. superb", "before": 0.1 * i,
                 "with_phrase": 0.1 * i + 1.0 + 0.1 * i, "with_control": 0.1 * i + 0.01, "delta": 1.0 + 0.1 * i,
                 "control_delta": 0.01, "activation": 2.5, "cut": i == 2} for i in range(3)]
    result = {"phrase": "superb", "control": "the", "position": "end", "repeat": 1,
              "texts": {"kind": "neutral", "score_low": -0.25, "score_high": 0.5}, "n": 3,
              "phrase_delta": {"mean_delta": 1.1, "ci_low": 0.85, "ci_high": 1.35},
              "control_delta": {"mean_delta": 0.01, "ci_low": None, "ci_high": None},
              "difference": {"difference": 1.09, "ci_low": 0.84, "ci_high": 1.34, "p_value": 0.25, "n": 3},
              "n_cut": 1, "examples": examples, "activation": {"mean_peak": 2.5, "fired_share": 1.0},
              "feature": {"layer": 3, "feature": 7, "measured_delta": 0.42, "measured_delta_low": 0.4,
                          "measured_delta_high": 0.44, "measured_n": 20, "top_token": "superb", "max_activation": 3.0}}
    job = finish(migrated, "insertion", {"run_id": "synthetic", "phrase": "superb", "control": "the", "position": "end",
                                         "n_texts": 3, "texts": "neutral", "repeat": 1, "layer": 3, "feature": 7},
                 result)
    page = html.unescape(client.get(f"/jobs/{job['id']}").text)
    assert "middle third of the corpus's score distribution, -0.250 to 0.500" in page
    assert "zeroing it where it fires changes the score by" in page and "+0.420" in page
    assert "inserting superb changes it by" in re.sub(r"<[^>]+>", "", page)
    assert "p = 0.2500" in page and "[+0.840, +1.34]" in page
    for e in examples:
        assert f'<a href="{RUN}/texts/{e["text_id"]}">#{e["text_id"]}</a>' in page and e["edited"] in page
    assert page.index("#12<") < page.index("#10<")  # largest rise first
    assert 'id="insertion-cut"' in page and page.count("✂") == 2  # the warning's mark and the one cut text's


def test_a_finished_sweep_page_plots_chosen_and_controls_and_tabulates_every_value(client, migrated):
    def point(value):
        chosen = 0.5 * value
        return {"value": value, "chosen": {"n": 8, "mean_delta": chosen, "ci_low": chosen - 0.2, "ci_high": chosen + 0.2,
                                           "fired_share": 1.0},
                "control": {"n_draws": 3, "draw_means": [-0.01, 0.0, 0.02], "mean_delta": 0.0033, "low": -0.01,
                            "high": 0.02, "test": {"difference": chosen - 0.0033, "ci_low": chosen - 0.3,
                                                   "ci_high": chosen + 0.3, "p_value": 0.0042, "n": 8}}}

    values = [-4.0, -1.0, 0.0, 1.0, 4.0]
    job = finish(migrated, "sweep", {"run_id": "synthetic", "layer": 3, "features": [7], "mode": "steer",
                                     "values": values, "n_texts": 8, "n_controls": 3, "tokens": "text"},
                 {"features": [7], "mode": "steer", "values": values, "n_texts": 8,
                  "controls": [[1], [2], [3]], "points": [point(v) for v in values]})
    page = client.get(f"/jobs/{job['id']}").text
    assert 'id="dose-response-chart"' in page and page.count("<polyline") == 2
    assert page.count('class="ci-band"') == 1 and page.count('class="control-band"') == 1
    rows = re.findall(r'<tr data-value="([-\d.]+)">', page)
    assert [float(v) for v in rows] == values and page.count("0.0042") == len(values)
    assert "at -4, -1, 0, 1, 4" in page and page.count("control 1:") == 1


def test_dose_response_geometry_puts_each_value_in_order_and_bands_around_the_lines():
    points = [{"value": v, "chosen": {"mean_delta": v, "ci_low": v - 1, "ci_high": v + 1},
               "control": {"mean_delta": 0.0, "low": -0.5, "high": 0.5}} for v in (-2.0, 0.0, 2.0)]
    c = charts.dose_response(points)
    xs = [d["x"] for d in c["chosen"]["dots"]]
    ys = [d["y"] for d in c["chosen"]["dots"]]
    assert xs == sorted(xs) and xs[0] == c["left"] and xs[-1] == c["right"]
    assert ys == sorted(ys, reverse=True) and ys[1] == c["zero_y"]  # up the chart as Δ grows; Δ 0 on the zero line
    assert len(c["chosen"]["band"].split()) == 6 and len(c["control"]["band"].split()) == 6
    assert c["top"] <= min(ys) and max(ys) <= c["base_y"]
    assert charts.dose_response([]) is None

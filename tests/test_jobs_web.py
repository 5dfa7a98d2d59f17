"""Submitting ablations, custom texts and pipeline runs from the web; bad input creates no
job; access control when served beyond loopback."""
from __future__ import annotations

import html
import re

import pytest

from backend.core import jobs
from backend.web.access import AccessConfigError, check_serving_is_safe
from tests.helpers import N_FEATURES, make_client

pytestmark = pytest.mark.sql_databases  # each test on SQLite and PostgreSQL (tests/conftest.py)

RUN = "/runs/synthetic"


def csrf(client, path="/jobs"):
    html = client.get(path).text
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def job_count(settings):
    return len(jobs.recent(settings))


def test_ablation_form_queues_a_job_with_the_selected_features(client, migrated, synthetic_run):
    token = csrf(client)
    r = client.post(f"{RUN}/layers/3/ablate", data={"csrf_token": token, "selection": "top_positive", "top_n": "10",
                                                    "mode": "zero", "n_texts": "64"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/jobs/")
    job = jobs.get(migrated, int(r.headers["location"].rsplit("/", 1)[1]))
    top10 = [f["feature"] for f in client.get(f"/api{RUN}/layers/3", params={"sort": "weight"}).json()["features"][:10]]
    assert job["params"]["features"] == top10 and job["params"]["n_texts"] == 64
    assert job["author"] == "local" and job["status"] == "queued"
    page = client.get(r.headers["location"]).text
    assert "queued" in page and "rewardatlas worker" in page


@pytest.mark.parametrize("data, status, message", [
    ({"features": "70", "mode": "zero"}, 422, f"feature 70 is out of range: layer 3 has features 0–{N_FEATURES - 1}"),
    ({"features": "", "mode": "zero"}, 422, "no features selected"),
    ({"features": "1, x", "mode": "zero"}, 422, "'x' is not a feature id"),
    ({"features": "1", "mode": "clamp", "value": "abc"}, 422, "value"),
    ({"features": "1", "mode": "clamp"}, 422, "clamp needs a number"),
    ({"features": "1", "mode": "explode"}, 422, "mode"),
    ({"features": "1", "mode": "zero", "eval": "typed", "texts": "x" * 5000}, 422, "the limit is 4,000"),
    ({"features": "1", "mode": "zero", "eval": "typed", "texts": "\n\n"}, 422, "no evaluation texts"),
])
def test_bad_ablation_requests_are_refused_with_a_message_and_create_no_job(client, migrated, data, status, message):
    before = job_count(migrated)
    r = client.post(f"{RUN}/layers/3/ablate", data={"csrf_token": csrf(client), **data})
    assert r.status_code == status and message in html.unescape(r.text)
    if "x" in data["features"]:  # a form-only mistake: JSON ids are numbers
        assert job_count(migrated) == before
        return
    api = client.post(f"/api{RUN}/layers/3/ablations", json={
        "features": [int(x) for x in data.get("features", "").replace(",", " ").split() if x.isdigit()],
        "mode": data["mode"], **({"value": data["value"]} if "value" in data else {}),
        **({"texts": data["texts"].splitlines() or [""]} if "texts" in data else {})})
    assert 400 <= api.status_code < 500 and "detail" in api.json()
    assert job_count(migrated) == before


@pytest.mark.parametrize("path, status", [("/runs/nope/layers/3/ablate", 404), (f"{RUN}/layers/4/ablate", 404)])
def test_unknown_run_or_layer_is_404(client, migrated, path, status):
    r = client.post(path, data={"csrf_token": csrf(client), "features": "1", "mode": "zero"})
    assert r.status_code == status and "not found" in r.text and job_count(migrated) == 0


def test_forms_without_the_csrf_token_are_refused(client, migrated):
    r = client.post(f"{RUN}/layers/3/ablate", data={"features": "1", "mode": "zero"})
    assert r.status_code == 403 and "CSRF" in r.text and job_count(migrated) == 0


def test_json_api_queues_and_refuses_form_encoded_bodies(client, migrated):
    r = client.post(f"/api{RUN}/layers/5/ablations", json={"features": [1, 2], "mode": "steer", "value": 4})
    assert r.status_code == 201 and r.json()["params"]["features"] == [1, 2]
    assert client.get(f"/api/jobs/{r.json()['id']}").json()["status"] == "queued"
    form = client.post(f"/api{RUN}/layers/5/ablations", content=b"features=1&mode=zero",
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code in (415, 422)
    assert client.get("/api/jobs/999").status_code == 404


def test_too_many_queued_jobs_from_one_author_is_429(migrated, synthetic_run):
    limited = migrated.model_copy(update={"max_queued_jobs": 2})
    with make_client(limited) as c:
        for _ in range(2):
            assert c.post(f"/api{RUN}/layers/3/ablations", json={"features": [1], "mode": "zero"}).status_code == 201
        r = c.post(f"/api{RUN}/layers/3/ablations", json={"features": [1], "mode": "zero"})
        assert r.status_code == 429 and "already has 2 jobs" in r.json()["detail"]


def test_custom_text_form_queues_inference_with_the_top_features(client, migrated):
    r = client.post(f"{RUN}/layers/5/text", data={"csrf_token": csrf(client), "text": "a truly great film"},
                    follow_redirects=False)
    assert r.status_code == 303
    job = jobs.get(migrated, int(r.headers["location"].rsplit("/", 1)[1]))
    # the layer's default ranking (the one that held up when ablated), as its table lists it
    top = [f["feature"] for f in client.get(f"/api{RUN}/layers/5").json()["features"][:8]]
    # none asked for: the worker shows those that contribute most to this text's score, or, where
    # none does, the layer's default ranking (the one that held up when ablated), as its table lists it
    assert job["kind"] == "inference" and job["params"]["features"] == [] and job["params"]["fallback_features"] == top
    assert job["params"]["text"] == "a truly great film" and job["params"]["steps"] == 16
    assert job["params"]["attribution_layers"] == [5]
    too_long = client.post(f"{RUN}/layers/5/text", data={"csrf_token": csrf(client), "text": "y" * 4001})
    assert too_long.status_code == 422 and "4,001 characters" in too_long.text


def test_finished_ablation_page_shows_before_after_control_and_chart(client, migrated):
    job = jobs.submit(migrated, "ablation", {"run_id": "synthetic", "layer": 3, "features": [1, 2], "mode": "zero",
                                             "n_texts": 3, "described": "features 1, 2"}, "local", "synthetic")
    jobs.claim(migrated, "w")
    examples = [{"text_id": i, "text": f"text {i}", "before": 1.0, "after": 1.0 - i, "predicted": -0.8 * i,
                 "attributed": -0.9 * i, "fired": i > 0} for i in range(3)]
    control = {"n_draws": 3, "draw_means": [-0.1, 0.0, 0.1], "mean_delta": 0.0, "low": -0.1, "high": 0.1,
               "test": {"difference": -1.0, "ci_low": -2.0, "ci_high": 0.0, "p_value": 0.0123, "n": 3}}
    jobs.finish(migrated, job["id"], "w", result={
        "summary": {"n": 3, "mean_delta": -1.0, "ci_low": -3.5, "ci_high": 1.5, "predicted_mean_delta": -0.8,
                    "attribution_mean_delta": -0.9, "predicted_ratio": 0.8, "attribution_ratio": 0.9},
        "control": control, "examples": examples,
        "where_fired": {"summary": {"n": 2, "mean_delta": -1.5, "ci_low": None, "ci_high": None,
                                    "predicted_mean_delta": -1.2, "attribution_mean_delta": -1.35,
                                    "predicted_ratio": 0.8, "attribution_ratio": 0.9}, "control": control},
        "controls": [{"features": [9 + d, 10 + d], "summary": {"n": 3, "mean_delta": m}, "deltas": [m, m, m]}
                     for d, m in enumerate([-0.1, 0.0, 0.1])]})
    html = client.get(f"/jobs/{job['id']}").text
    assert 'id="mean-delta">-1.00<' in html and 'id="fired-mean-delta">-1.50<' in html
    assert "[-3.50, 1.50]" in html and 'id="predicted-delta">-0.800 <span class="muted">(0.800× measured)' in html
    assert 'id="attribution-delta">-0.900 <span class="muted">(0.900× measured)' in html
    assert 'id="p-value">0.0123<' in html and 'id="difference">-1.00' in html
    assert html.count("control 1:") + html.count("control 2:") + html.count("control 3:") == 3
    # both series on the chart (and once more each in its legend)
    assert html.count('class="dbar"') == 25 and html.count('class="cbar"') == 25
    assert html.index("text 2") < html.index("text 0")  # largest drop first
    assert "done" in client.get("/jobs").text


def test_a_large_ablation_pages_sorts_and_downloads_its_examples(client, migrated):
    import csv
    import io

    job = jobs.submit(migrated, "ablation", {"run_id": "synthetic", "layer": 3, "features": [1], "mode": "zero",
                                             "n_texts": 120, "described": "feature 1"}, "local", "synthetic")
    jobs.claim(migrated, "w")
    deltas = [((i * 37) % 120 - 60) / 10 for i in range(120)]  # every value once, shuffled
    examples = [{"text_id": i, "text": f"text {i}", "before": 0.0, "after": d, "predicted": 0.0, "attributed": None}
                for i, d in enumerate(deltas)]
    jobs.finish(migrated, job["id"], "w", result={"summary": {
        "n": 120, "mean_delta": 0.0, "ci_low": -1.0, "ci_high": 1.0, "predicted_mean_delta": 0.0,
        "attribution_mean_delta": None, "predicted_ratio": None, "attribution_ratio": None}, "examples": examples})
    page1 = client.get(f"/jobs/{job['id']}").text
    assert page1.count("<tr><td class=\"num muted\">") == 50 and "page 1 of 3" in page1
    assert 'rel="next" href="/jobs/%d?sort=delta&amp;page=2#examples"' % job["id"] in page1
    assert "Distribution of Δ reward" in page1 and 'id="delta-legend"' in page1 and "mean Δ, chosen" in page1
    last = client.get(f"/jobs/{job['id']}?sort=-delta&page=3").text
    assert "page 3 of 3" in last and last.count("<tr><td class=\"num muted\">") == 20
    assert client.get(f"/jobs/{job['id']}?page=4").status_code == 404
    assert client.get(f"/jobs/{job['id']}?sort=weird").status_code == 422
    api = client.get(f"/api/jobs/{job['id']}/examples?sort=abs").json()
    assert api["n"] == 120 and [abs(e["delta"]) for e in api["examples"][:2]] == [6.0, 5.9]
    rows = list(csv.DictReader(io.StringIO(client.get(f"/api/jobs/{job['id']}/examples?format=csv").text)))
    assert len(rows) == 120 and float(rows[0]["delta"]) == -6.0 and rows[0]["text"].startswith("text ")
    other = jobs.submit(migrated, "inference", {"run_id": "synthetic", "layer": 3, "text": "x"}, "local", "synthetic")
    assert client.get(f"/api/jobs/{other['id']}/examples").status_code == 404


def test_the_jobs_list_says_what_each_job_was_asked_and_came_to(client, migrated):
    from datetime import timedelta

    from backend.core import db
    from backend.web.job_summaries import eta_s
    from backend.core.models import Job

    typed = jobs.submit(migrated, "inference", {"run_id": "synthetic", "layer": 3, "text": "loved every minute of it"},
                        "local", "synthetic")
    jobs.claim(migrated, "w")
    jobs.finish(migrated, typed["id"], "w", result={"reward": 1.25})
    running = jobs.submit(migrated, "ablation", {"run_id": "synthetic", "layer": 3, "features": [4, 7], "mode": "zero",
                                                 "described": "features 4, 7"}, "local", "synthetic")
    jobs.claim(migrated, "w")
    with db.session(migrated) as s:  # a quarter done after 30 s: 90 s left at that pace
        job = s.get(Job, running["id"])
        job.progress, job.started_at = 0.25, job.started_at - timedelta(seconds=30)
        s.commit()
    html = client.get("/jobs").text
    assert "Text attribution" in html and "“loved every minute of it”" in html and "inference</td>" not in html
    assert '<span class="muted small">reward</span> 1.25' in html
    assert "Ablation" in html and "zero features 4, 7" in html and "25%" in html and " left</span>" in html
    job = jobs.get(migrated, running["id"])
    assert 85 <= eta_s(job) <= 100


def test_pipeline_run_from_the_web_is_validated_before_queueing(client, migrated):
    token = csrf(client, "/jobs")
    bad = client.post("/jobs", data={"csrf_token": token, "config_yaml": "name: x\nmodel: {path: demo}\nlayers: [1]\n"})
    assert bad.status_code == 422 and "dataset" in bad.text and job_count(migrated) == 0
    good = client.post("/jobs", data={"csrf_token": token, "config_yaml":
                                      "name: Web run\nmodel: {path: demo}\ndataset: {source: demo}\nlayers: [1]\n"},
                       follow_redirects=False)
    assert good.status_code == 303
    job = jobs.get(migrated, int(good.headers["location"].rsplit("/", 1)[1]))
    assert job["kind"] == "pipeline" and job["run_id"] == "web-run"


def test_cancel_from_the_jobs_page(client, migrated):
    job = jobs.submit(migrated, "ablation", {"run_id": "synthetic", "layer": 3, "features": [1], "mode": "zero"},
                      "local", "synthetic")
    r = client.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": csrf(client, "/jobs")})
    assert r.status_code == 200 and jobs.get(migrated, job["id"])["status"] == "cancelled"


# --- access ---

def test_refuses_to_serve_beyond_loopback_without_credentials(migrated):
    with pytest.raises(AccessConfigError, match="RA_TOKEN or RA_USERS"):
        check_serving_is_safe(migrated.model_copy(update={"host": "0.0.0.0"}))
    check_serving_is_safe(migrated.model_copy(update={"host": "0.0.0.0", "token": "s3cret"}))
    with pytest.raises(AccessConfigError, match="name:password"):
        check_serving_is_safe(migrated.model_copy(update={"host": "0.0.0.0", "users": "alice"}))


def test_token_and_named_users_guard_every_page_and_name_the_author(migrated, synthetic_run):
    shared = migrated.model_copy(update={"host": "0.0.0.0", "token": "s3cret", "users": "alice:wonder"})
    with make_client(shared) as c:
        assert c.get(f"/api{RUN}").status_code == 401
        page = c.get(RUN, follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        assert c.get(f"/api{RUN}", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert c.get(f"/api{RUN}", headers={"authorization": "Bearer wrong"}).status_code == 401
        token = csrf(c, "/login")
        wrong = c.post("/login", data={"csrf_token": token, "user": "alice", "password": "nope"})
        assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
        c.post("/login", data={"csrf_token": token, "user": "alice", "password": "wonder", "next": RUN})
        assert c.get(RUN).status_code == 200
        r = c.post(f"/api{RUN}/layers/3/ablations", json={"features": [1], "mode": "zero"})
        assert r.status_code == 201 and r.json()["author"] == "alice"


def test_top_ranked_ablates_the_top_of_the_layers_default_ranking_with_ten_controls_by_default(client, migrated):
    layer = client.get(f"/api{RUN}/layers/3").json()
    top = [f["feature"] for f in layer["features"][:5]]  # the table's default order: the default ranking's
    r = client.post(f"/api{RUN}/layers/3/ablations", json={"selection": "top_ranked", "top_n": 5, "mode": "zero"})
    assert r.status_code == 201, r.text
    job = jobs.get(migrated, r.json()["id"])
    assert job["params"]["features"] == top and job["params"]["n_controls"] == 10  # enough for a verdict
    assert layer["default_ranking"]["label"] in job["params"]["described"]
    few = client.post(f"/api{RUN}/layers/3/ablations", json={"features": [1], "mode": "zero", "n_controls": 2})
    assert few.status_code == 422 and "n_controls" in few.text


def test_an_error_page_keeps_what_was_typed_and_links_back(client):
    typed = "y" * 4001
    page = client.post(f"{RUN}/layers/5/text", data={"csrf_token": csrf(client), "text": typed},
                       headers={"referer": f"http://127.0.0.1{RUN}/layers/5"})
    assert page.status_code == 422 and "4,001 characters" in page.text
    assert f'<form method="post" action="{RUN}/layers/5/text"' in page.text
    assert f'<textarea name="text" rows="4" cols="80">{typed}</textarea>' in page.text
    assert f'<a href="{RUN}/layers/5" id="back-to-form">' in page.text
    elsewhere = client.post(f"{RUN}/layers/5/text", data={"csrf_token": csrf(client), "text": typed},
                            headers={"referer": "http://evil.example/x"})
    assert 'id="back-to-form"' not in elsewhere.text  # only this site's pages are linked back to

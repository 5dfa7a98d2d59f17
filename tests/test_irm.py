"""The IRM ablation table on the run page: per layer, every feature labelled reward-related
zeroed together beside random controls — queued in one click, the newest job per layer shown,
a layer whose labels changed since marked; and a real worker filling a row on a tiny run."""
from __future__ import annotations

import re

import numpy as np
import pytest

from backend.core import jobs, labels
from tests.helpers import make_client
from tests.test_ablation import LAYER, live_features, tiny_run  # noqa: F401  (module fixture)
from tests.test_pipeline import tiny_world  # noqa: F401  (module fixture)
from workers.worker import Worker


def csrf(client):
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/jobs").text).group(1)


def test_nothing_labelled_is_refused_and_queues_nothing(client, migrated):
    r = client.post("/api/runs/synthetic/irm-ablations", json={})
    assert r.status_code == 409 and "no feature of this run is labelled reward-related" in r.json()["detail"]
    assert jobs.recent(migrated, 5) == []
    rows = client.get("/api/runs/synthetic").json()["irm_ablation"]["layers"]
    assert [(row["layer"], row["n_labelled"], row["job_id"]) for row in rows] == [(3, 0, None), (5, 0, None)]
    assert "no feature labelled reward-related yet" in client.get("/runs/synthetic").text


def test_one_ablation_per_labelled_layer_and_the_newest_shown(client, migrated):
    for f in (4, 9):
        labels.set_label(migrated, "synthetic", 3, f, "reward", "", "alice", 0)
    labels.set_label(migrated, "synthetic", 5, 2, "not_reward", "", "alice", 0)  # not reward: layer 5 has none
    r = client.post("/runs/synthetic/irm-ablation", data={"csrf_token": csrf(client), "n_texts": "40"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/runs/synthetic#irm-ablation"
    (job,) = jobs.recent(migrated, 5)
    p = job["params"]
    assert (p["layer"], p["features"], p["mode"], p["n_texts"], p["selection"]) == (3, [4, 9], "zero", 40,
                                                                                      "labelled_reward")
    assert p["control"] is True and p["n_controls"] == 10  # enough draws for a verdict
    claimed = jobs.claim(migrated, "w")
    examples = [{"text_id": i, "text": "t", "before": 1.0 + i, "after": 0.5 + i, "predicted": 0.0, "attributed": None,
                 "fired": True} for i in range(4)]
    result = {"summary": {"mean_delta": -0.5, "ci_low": -0.6, "ci_high": -0.4, "n": 4}, "examples": examples,
              "control": {"mean_delta": -0.01, "test": {"difference": -0.49, "p_value": 0.002}}, "controls": []}
    jobs.finish(migrated, claimed["id"], "w", result)
    row = client.get("/api/runs/synthetic").json()["irm_ablation"]["layers"][0]
    assert (row["job_id"], row["before"], row["after"], row["mean_delta"], row["difference"]) == (
        job["id"], 2.5, 2.0, -0.5, -0.49)
    assert row["labels_changed"] is False and row["n_texts"] == 4
    page = client.get("/runs/synthetic").text
    assert f'href="/jobs/{job["id"]}"' in page and "labels changed since" not in page
    labels.set_label(migrated, "synthetic", 3, 11, "reward", "", "alice", 0)  # a third one, after the job ran
    assert client.get("/api/runs/synthetic").json()["irm_ablation"]["layers"][0]["labels_changed"] is True
    assert "labels changed since" in client.get("/runs/synthetic").text


@pytest.mark.parametrize("body", [{"n_texts": 0}, {"n_controls": 2}, {"n_texts": "x"}])
def test_bad_sizes_are_refused(client, migrated, body):
    labels.set_label(migrated, "synthetic", 3, 4, "reward", "", "alice", 0)
    assert client.post("/api/runs/synthetic/irm-ablations", json=body).status_code == 422
    assert jobs.recent(migrated, 5) == []


def test_a_worker_fills_the_table_on_a_real_run(tiny_run):  # noqa: F811
    settings, loaded = tiny_run
    chosen = list(live_features(loaded, 3))
    for f in chosen:
        labels.set_label(settings, loaded.run_id, LAYER, f, "reward", "", "alice", 0)
    client = make_client(settings)
    r = client.post(f"/api/runs/{loaded.run_id}/irm-ablations", json={"n_texts": 24})
    assert r.status_code == 201 and [j["params"]["layer"] for j in r.json()["jobs"]] == [LAYER]
    assert Worker(settings).run_one() is True
    done = jobs.get(settings, r.json()["jobs"][0]["id"])
    assert done["status"] == "done", done["error"]
    row = next(x for x in client.get(f"/api/runs/{loaded.run_id}").json()["irm_ablation"]["layers"] if x["layer"] == LAYER)
    examples = done["result"]["examples"]
    assert row["n_labelled"] == 3 and row["n_texts"] == len(examples) == 24
    assert row["before"] == pytest.approx(np.mean([e["before"] for e in examples]))
    assert row["after"] - row["before"] == pytest.approx(row["mean_delta"])

"""An edit so large the reward model's arithmetic overflows: the job fails saying so, and no
NaN or infinity is stored (a stored one made the job's page fail for good)."""
from __future__ import annotations

import numpy as np
import pytest

from backend.core import db, jobs, store
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.test_pipeline import tiny_config, tiny_world  # noqa: F401  (module fixture)
from workers.pipeline import run_pipeline
from workers.run_cache import RunCache
from workers.worker import Worker

LAYER = 0  # two blocks above it: a huge edit here goes through attention and LayerNorm


@pytest.fixture(scope="module")
def tiny_run(tiny_world, tmp_path_factory):  # noqa: F811
    settings = Settings(data_dir=tmp_path_factory.mktemp("nonfinite-data"))
    # wide and sparse, so that some latents never fire (the dead-feature test needs one)
    config = tiny_config(*tiny_world, layers=[LAYER], effects={"enabled": False},
                         sae={"width": 1024, "k": 2, "training_tokens": 1024, "batch_size": 256, "buffer_tokens": 1024})
    run_pipeline(config, settings)
    freq = np.asarray(store.layer_vectors(settings.run_dir(config.run_id) / STORE_FILENAME, LAYER)["frequency"])
    yield settings, config.run_id, [int(f) for f in np.argsort(-freq)[:2]]
    db.dispose_engines()


def run_job(settings, kind: str, params: dict) -> dict:
    job = jobs.submit(settings, kind, params, author="tester", run_id=params["run_id"])
    worker = Worker(settings, lease_s=10)
    worker.cache = RunCache(settings)
    assert worker.run_one() is True
    return jobs.get(settings, job["id"])


@pytest.mark.parametrize("value", [1e30, -1e30])
def test_an_ablation_whose_steer_overflows_fails_and_stores_nothing(tiny_run, value):
    settings, run_id, features = tiny_run
    done = run_job(settings, "ablation", {"run_id": run_id, "layer": LAYER, "features": features, "mode": "steer",
                                          "value": value, "n_texts": 16, "tokens": "all", "n_controls": 3})
    assert done["status"] == "failed" and done["result"] is None
    assert done["error"].startswith(f"the edit made the reward non-finite (steer value {value:g} is too large)")


def test_a_custom_text_whose_edit_overflows_fails_and_stores_nothing(tiny_run):
    settings, run_id, features = tiny_run
    done = run_job(settings, "inference", {"run_id": run_id, "layer": LAYER, "text": "what a great movie",
                                           "features": features,
                                           "edit": {"features": features[:1], "mode": "steer", "value": 1e30,
                                                    "tokens": "all"}})
    assert done["status"] == "failed" and done["result"] is None
    assert "the edit made the reward non-finite (steer value 1e+30 is too large)" in done["error"]


def test_a_finite_edit_is_stored_as_before(tiny_run):
    settings, run_id, features = tiny_run
    done = run_job(settings, "ablation", {"run_id": run_id, "layer": LAYER, "features": features, "mode": "steer",
                                          "value": 2.0, "n_texts": 16, "tokens": "all", "n_controls": 3})
    assert done["status"] == "done", done["error"]
    assert np.isfinite(done["result"]["summary"]["mean_delta"])


@pytest.mark.parametrize("mode, value", [("zero", None), ("clamp", 0.0)])
def test_a_feature_that_fires_on_none_of_the_texts_is_answered_as_such(tiny_run, mode, value):
    """Zeroing a dead feature once failed with "draw_means[0] came out NaN": the texts where it
    fires are none, and their mean was taken anyway."""
    settings, run_id, _ = tiny_run
    path = settings.run_dir(run_id) / STORE_FILENAME
    freq = np.asarray(store.layer_vectors(path, LAYER)["frequency"])
    dead = [int(f) for f in np.flatnonzero(freq == 0)[:2]]
    assert dead, "the tiny run's SAE has no dead feature to edit"
    for params in ({"n_texts": 16}, {"texts": ["what a great movie", "a dull film"]}):
        done = run_job(settings, "ablation", {"run_id": run_id, "layer": LAYER, "features": dead, "mode": mode,
                                              "value": value, "tokens": "text", "n_controls": 3, **params})
        assert done["status"] == "done", done["error"]
        result = done["result"]
        assert result["fires_on_none"] is True
        assert result["where_fired"]["summary"]["n"] == 0 and result["where_fired"]["summary"]["mean_delta"] == 0.0
        assert result["where_fired"]["summary"]["fires_on_none"] is True
        assert abs(result["summary"]["mean_delta"]) < 1e-5  # set to 0 where it is 0 already: nothing moves

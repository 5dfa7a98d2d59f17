"""Cancel is honoured within seconds wherever a pipeline job is, and its progress bar moves
while the SAEs train: a real worker thread runs a real pipeline on a tiny random model."""
from __future__ import annotations

import threading
import time

import pytest
import yaml

from backend.core import db, jobs
from backend.core.models import Run
from tests.helpers import wait_for
from tests.test_pipeline import N_FEATURES, tiny_config, tiny_world  # noqa: F401  (module fixture)
from workers.pipeline import SPANS, run_pipeline
from workers.worker import Worker

pytestmark = pytest.mark.sql_databases  # each test on SQLite and PostgreSQL (tests/conftest.py)

# Hours of SAE training on this machine: only a cancel honoured during training ends it.
LONG_TRAINING_TOKENS = 10_000_000
CANCEL_WITHIN_S = 10.0




def readable(settings, tiny_world):  # noqa: F811
    """The settings with the tiny world among the input folders: a queued run reads only there."""
    return settings.model_copy(update={"input_dirs": f"{settings.data_dir},{tiny_world[0].parent}"})


def test_a_pipeline_job_cancels_within_seconds_while_its_saes_train(tiny_world, migrated):  # noqa: F811
    settings = readable(migrated, tiny_world)
    config = tiny_config(*tiny_world, sae={"width": N_FEATURES, "k": 4, "training_tokens": LONG_TRAINING_TOKENS,
                                           "batch_size": 256, "buffer_tokens": 1024})
    config_yaml = yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True))
    job_id = jobs.submit(settings, "pipeline", {"config_yaml": config_yaml}, "tester", config.run_id)["id"]
    worker = Worker(settings, poll_s=0.05)  # the default lease: a heartbeat every 2 s
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        def training_progress() -> float:
            job = jobs.get(settings, job_id)
            assert job["status"] == "running" or job["status"] == "queued", job["error"]
            return job["progress"] if "training" in job["message"] else 0.0

        start = SPANS["train"][0]
        first = wait_for(lambda: training_progress() > start and training_progress(), 120,
                         "training to report progress")
        wait_for(lambda: training_progress() > first, 60, "the progress bar to move during training")
        asked = time.monotonic()
        jobs.cancel(settings, job_id)
        wait_for(lambda: jobs.get(settings, job_id)["status"] == "cancelled", 60, "the job to be cancelled")
        took = time.monotonic() - asked
    finally:
        stop.set()
        thread.join(60)
    print(f"cancel honoured {took:.1f} s after it was asked for, during SAE training")
    assert took < CANCEL_WITHIN_S
    done = jobs.get(settings, job_id)
    assert done["status"] == "cancelled" and done["error"] == "cancelled" and done["result"] is None
    assert start < done["progress"] < SPANS["train"][1]  # stopped mid-training, where the bar had got to
    with db.session(settings) as s:
        assert s.query(Run).count() == 0
    assert list(settings.runs_dir.iterdir()) == []  # the half-built run is gone, staging and all
    assert not thread.is_alive()


@pytest.mark.sql_databases("sqlite")  # no SQL in it beyond the run registry's check
def test_a_stop_deep_in_the_causal_stage_keeps_nothing(tiny_world, migrated):  # noqa: F811
    """The last stage's reports stop a run too: what a cancel raises there ends it cleanly."""
    class Stop(Exception):
        pass

    stages: list[str] = []

    def on_progress(progress: float) -> None:
        if stages and "deletion curves" in stages[-1]:
            raise Stop(progress)

    config = tiny_config(*tiny_world, layers=[0], effects={"candidates": 10, "pool_texts": 32,
                                                           "faithfulness_texts": 16, "faithfulness_n": [1, 2, 5]})
    with pytest.raises(Stop) as stopped:
        run_pipeline(config, migrated, on_stage=stages.append, on_progress=on_progress)
    assert SPANS["layers"][0] < stopped.value.args[0] < SPANS["layers"][1]
    with db.session(migrated) as s:
        assert s.query(Run).count() == 0
    assert list(migrated.runs_dir.iterdir()) == []


def test_a_cancel_while_the_store_is_written_ends_the_job_cancelled(tiny_world, migrated, monkeypatch):  # noqa: F811
    """Acknowledged during "writing the feature store", a cancel once let the run publish and the
    job end "done": the job now asks the queue just before publishing."""
    import workers.pipeline as pipeline

    config = tiny_config(*tiny_world, layers=[0], effects={"enabled": False})
    config_yaml = yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True))
    job_id = jobs.submit(migrated, "pipeline", {"config_yaml": config_yaml}, "tester", config.run_id)["id"]
    write_store = pipeline.write_store

    def cancelled_while_writing(*args, **kwargs):
        jobs.cancel(migrated, job_id)  # the user's cancel, arriving mid-write
        return write_store(*args, **kwargs)

    monkeypatch.setattr(pipeline, "write_store", cancelled_while_writing)
    assert Worker(readable(migrated, tiny_world), lease_s=600).run_one() is True  # a heartbeat every 2 s: it may not come in time
    done = jobs.get(migrated, job_id)
    assert done["status"] == "cancelled" and done["result"] is None, (done["status"], done["error"])
    with db.session(migrated) as s:
        assert s.query(Run).count() == 0
    assert list(migrated.runs_dir.iterdir()) == []

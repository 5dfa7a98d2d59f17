"""kill -9 a worker mid-job: after its lease expires another worker takes the job over and
finishes it, and nothing is written twice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest
import sqlalchemy as sa
import yaml

from backend.core import db, jobs
from backend.core.models import Run
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import REPO_ROOT, wait_for
from tests.test_pipeline import N_FEATURES, tiny_config, tiny_world  # noqa: F401  (module fixture)
from workers.worker import Worker

pytestmark = pytest.mark.sql_databases  # each test on SQLite and PostgreSQL (tests/conftest.py)

LEASE_S = 2.0
TRAINING_TOKENS = 200_000




def test_killed_worker_job_finishes_on_another_worker_once(tiny_world, tmp_path, database_url):  # noqa: F811
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    db.upgrade(settings)
    # enough SAE training that the kill lands inside it, whatever the machine's speed
    config = tiny_config(*tiny_world, sae={"width": N_FEATURES, "k": 4, "training_tokens": TRAINING_TOKENS,
                                           "batch_size": 256, "buffer_tokens": 1024})
    config_yaml = yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True))
    job = jobs.submit(settings, "pipeline", {"config_yaml": config_yaml}, "tester", config.run_id)

    # a queued run reads only under the input folders, on the worker too: the tiny world's among them
    env = {**os.environ, "RA_DATA_DIR": str(settings.data_dir), "RA_DATABASE_URL": database_url,
           "RA_INPUT_DIRS": f"{settings.data_dir},{tiny_world[0].parent}"}
    log = (tmp_path / "first-worker.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--lease", str(LEASE_S), "--poll", "0.1"],
                             cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def training() -> bool:
        state = jobs.get(settings, job["id"])
        assert state["status"] in ("queued", "running"), (state, (tmp_path / "first-worker.log").read_text())
        assert first.poll() is None, (tmp_path / "first-worker.log").read_text()
        return "training" in state["message"]

    try:
        # mid-job: the pipeline has reached SAE training (its stage messages arrive by heartbeat)
        wait_for(training, 120, "the first worker to train")
        time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
        log.close()
    killed = jobs.get(settings, job["id"])
    assert killed["status"] == "running" and killed["attempts"] == 1  # the queue has not noticed yet

    second = Worker(settings.model_copy(update={"input_dirs": env["RA_INPUT_DIRS"]}), lease_s=LEASE_S)
    assert second.run_one() is False  # the dead worker's lease still holds
    wait_for(second.run_one, 30, "the lease to expire and the job to be taken over")

    done = jobs.get(settings, job["id"])
    assert done["status"] == "done", done["error"]
    assert done["attempts"] == 2 and done["lease_owner"] == second.name
    assert done["result"] == {"run_id": config.run_id}
    with db.session(settings) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Run)) == 1
    store = settings.run_dir(config.run_id) / STORE_FILENAME
    con = duckdb.connect(str(store), read_only=True)
    assert con.execute("select count(*), count(distinct (layer, feature)) from features").fetchone() == (
        2 * N_FEATURES, 2 * N_FEATURES)
    # the killed worker's half-made run never became visible, and the next run's start removed
    # the staging dir it left (its process is gone)
    assert [p.name for p in settings.runs_dir.iterdir()] == [config.run_id]

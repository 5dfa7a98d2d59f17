"""`rewardatlas demo` builds only what is missing or outdated."""
import os
import shutil

import duckdb

import workers.pipeline
from backend.store_schema import STORE_FILENAME
from tests.helpers import publish_synthetic_run
from workers.config import DEMO_MODEL_DIRNAME, load_config
from workers.demo import DEMO_CONFIG, ensure_demo


def test_demo_is_rebuilt_only_when_its_store_is_outdated(migrated, monkeypatch):
    run_id = load_config(DEMO_CONFIG).run_id
    publish_synthetic_run(migrated, run_id=run_id)  # stands in for a finished demo run
    (migrated.models_dir / DEMO_MODEL_DIRNAME).mkdir(parents=True)
    calls = []
    monkeypatch.setattr(workers.pipeline, "resolve_model_path", lambda config, settings: "demo-rm")
    monkeypatch.setattr(workers.pipeline, "run_pipeline", lambda config, settings, replace=False: calls.append(replace))

    ensure_demo(migrated)
    assert calls == []  # current: nothing to do

    path = migrated.run_dir(run_id) / STORE_FILENAME
    older = path.with_name("older.duckdb")  # the open store stays untouched; renamed over it, as runs are
    shutil.copy(path, older)
    con = duckdb.connect(str(older))
    con.execute("UPDATE run_info SET value = '1' WHERE key = 'store_version'")
    con.close()
    os.replace(older, path)
    ensure_demo(migrated)
    assert calls == [True]  # an older schema: rebuilt in place of the registered run

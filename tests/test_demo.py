"""`rewardatlas demo` builds only what is missing or outdated."""
import os
import shutil

import duckdb
import pytest

import workers.pipeline
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import publish_synthetic_run
from backend.core.run_config import DEMO_MODEL_DIRNAME, load_config
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


@pytest.mark.integration
def test_a_reward_model_fits_any_texts_rewards_and_reports_how_well(tmp_path):
    """fine_tune_reward_model (the demo RM's builder, and a planted reward's): real MiniLM, a few
    texts. The saved directory loads as a sequence classifier, and the report is what it measured."""
    import json

    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from workers.demo_model import fine_tune_reward_model

    texts = [f"The {word} was on the table." for word in ["cat", "dog", "chair", "lamp"] * 12]
    rewards = np.array([1.0 if "cat" in t else 0.0 for t in texts], dtype=np.float32)
    out = tmp_path / "rm"
    report = fine_tune_reward_model(out, texts, rewards, 40, "cats counted", epochs=1, batch_size=8)
    saved = json.loads((out / "rewardatlas_build.json").read_text())
    assert saved == report and saved["target"] == "cats counted" and saved["n_train"] == 40
    assert saved["n_heldout"] == 8 and isinstance(saved["heldout_r2"], float)
    model = BertForSequenceClassification.from_pretrained(out).eval()
    enc = AutoTokenizer.from_pretrained(out)(texts[40:], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits[:, 0].numpy()
    true = rewards[40:]
    r2 = 1 - ((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum()
    assert r2 == pytest.approx(saved["heldout_r2"], abs=1e-3)  # the report is the saved model's
    assert not (tmp_path / "rm.partial").exists()

"""NanoGuard (PyPI metatronnanoguard), a real prompt-injection classifier, through model.loader:
its generated corpus, and a small version of workers/configs/nanoguard.yaml end to end."""
from __future__ import annotations

import importlib.resources
import json
import pickle
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import yaml

from backend.core import db
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import make_client
from workers.adapters.nanoguard import token_texts
from backend.core.run_config import parse_config
from workers.injection_corpus import generate
from workers.pipeline import run_pipeline

CONFIG = Path(__file__).resolve().parents[1] / "workers" / "configs" / "nanoguard.yaml"


def test_the_shipped_corpus_is_the_generator_s_output_half_injection_like_and_varied():
    shipped = [json.loads(line) for line in (CONFIG.parent / "nanoguard-texts.jsonl").read_text().splitlines()]
    assert shipped == generate(2000, seed=0)
    assert sum(r["label"] for r in shipped) == 1000 and len({r["text"] for r in shipped}) == 2000
    families = {r["family"] for r in shipped}
    assert {"override", "roleplay", "extraction", "fake_system", "hidden_in_document", "exfiltration",
            "bypass", "hard_negative"} <= families


def nanoguard_log_odds(texts: list[str], width: int) -> np.ndarray:
    """NanoGuard's injection log-odds as its own scanner computes them, each text padded to `width`."""
    from nanoguard.scanner import NanoGuard

    guard = NanoGuard(device="cpu")
    ids = [guard.tokenizer.encode(t, max_length=width) for t in texts]
    batch = torch.tensor([i + [guard.tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    mask = torch.tensor([[True] * len(i) + [False] * (width - len(i)) for i in ids])
    with torch.no_grad():
        log_p = guard.model(batch, mask).float().log_softmax(-1)
    return (log_p[:, 1] - log_p[:, 0]).numpy()


@pytest.fixture(scope="module")
def nanoguard_run(tmp_path_factory):
    data = yaml.safe_load(CONFIG.read_text())
    data["dataset"].update(source=str(CONFIG.parent / data["dataset"]["source"]), n_texts=96)
    data.update(layers=[1, 3], sae={"width": 128, "k": 8, "training_tokens": 2048, "batch_size": 256,
                                    "buffer_tokens": 1024, "reward_recovered_texts": 8},
                analysis={"reward_effect_texts": 16, "n_contexts": 5}, effects={"enabled": False})
    settings = Settings(data_dir=tmp_path_factory.mktemp("nanoguard"))
    config = parse_config(data)
    run_dir = run_pipeline(config, settings)
    yield settings, config, run_dir
    db.dispose_engines()


@pytest.mark.integration
def test_nanoguard_runs_end_to_end_and_explains_its_injection_output(nanoguard_run):
    settings, config, run_dir = nanoguard_run
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    info = dict(con.execute("select key, value from run_info").fetchall())
    assert (info["adapter"], info["output_name"], info["output_index"], info["n_outputs"]) == \
        ("custom", "injection", "1", "2")
    texts = con.execute("select text, reward, score from texts order by text_id").fetchall()
    # the stored scores are NanoGuard's own injection log-odds at the config's padding
    stored = np.array([s for _, _, s in texts])
    assert np.allclose(stored, nanoguard_log_odds([t for t, _, _ in texts], config.model.max_length), atol=1e-3)
    # ... and they separate the corpus's injection-like texts from its benign ones
    labels = np.array([r for _, r, _ in texts])
    assert np.mean((stored > 0) == (labels == 1)) >= 0.8
    # contexts show NanoGuard's own token strings (tiktoken bytes decoded), not ids
    tokens = {t for (t,) in con.execute("select unnest(tokens) from contexts where layer = 3").fetchall()}
    with open(importlib.resources.files("nanoguard.assets") / "tokenizer.pkl", "rb") as f:
        vocabulary = set(token_texts(pickle.load(f)))
    assert tokens and tokens <= vocabulary
    assert any(len(t.strip()) >= 4 and t.strip().isalpha() for t in tokens)
    with make_client(settings) as client:
        assert client.get("/api/runs/nanoguard").json()["run"]["output"]["output_name"] == "injection"
        for page in ("/runs/nanoguard", "/runs/nanoguard/layers/3", "/runs/nanoguard/texts/0"):
            assert 'explains <b>output 1 &#34;injection&#34; of 2, log-odds' in client.get(page).text, page

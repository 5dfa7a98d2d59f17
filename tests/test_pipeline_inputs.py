"""Pipeline inputs that can only fail: each is refused before any compute, with a message naming
the config key (a ConfigError), on the worker and, where no model needs loading, on the web."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

from backend.core import jobs
from backend.core.settings import Settings
from tests.helpers import REPO_ROOT
from tests.test_pipeline import tiny_config, tiny_world  # noqa: F401  (module fixture)
from workers import staging
from backend.core.run_config import ConfigError, check_against_world, parse_config, preflight
from workers.pipeline import run_pipeline

# Dataset and model checks run on SQLite only; what reads the run registry (preflight, the web)
# runs on both databases (tests/conftest.py).
DEMO = {"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1]}


def rows(n: int, **columns) -> list[dict]:
    """n rows of texts and rewards; `columns` override one column by row index."""
    out = [{"text": f"the film number {i} was good", "reward": float(i)} for i in range(n)]
    for name, values in columns.items():
        for i, value in values.items():
            out[i][name] = value
    return out


def write_jsonl(path, data: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def write_parquet(path, data: list[dict]):
    import pyarrow as pa
    import pyarrow.parquet

    pyarrow.parquet.write_table(pa.Table.from_pylist(data), path)
    return path


def refused_before_compute(config, settings, match: str) -> str:
    """Run the pipeline: it must raise a ConfigError matching `match` before training starts
    and leave nothing in the runs dir."""
    stages: list[str] = []
    with pytest.raises(ConfigError, match=match) as err:
        run_pipeline(config, settings, on_stage=stages.append)
    assert not any(s.startswith("training") for s in stages), stages
    assert not settings.runs_dir.exists() or list(settings.runs_dir.iterdir()) == []
    return str(err.value)


@pytest.mark.parametrize("name, write, dataset, match", [
    ("empty.jsonl", lambda p: p.write_text(""), {}, r"dataset\.source: .*empty\.jsonl is empty"),
    ("header.csv", lambda p: p.write_text("text,reward\n"), {}, r"dataset\.source: .* holds no rows"),
    ("blank.jsonl", lambda p: write_jsonl(p, [{"text": "  ", "reward": 1.0}] * 12), {},
     r"dataset\.text_column: all 12 texts .* are empty"),
    ("some-blank.jsonl", lambda p: write_jsonl(p, rows(12, text={2: "", 5: "\n"})), {},
     r"dataset\.text_column: 2 of 12 texts .* are empty"),
    ("null-text.jsonl", lambda p: write_jsonl(p, rows(12, text={0: None, 3: None, 4: None})), {},
     r"dataset\.text_column: 3 of 12 rows .* have no text \(null in 'text'\)"),
    ("null-reward.jsonl", lambda p: write_jsonl(p, rows(12, reward={1: None, 7: None})), {},
     r"dataset\.reward_column: 2 of 12 rows .* no finite reward .* dataset\.reward_column: null"),
    ("nan-reward.parquet", lambda p: write_parquet(p, rows(12, reward={4: float("nan")})), {},
     r"dataset\.reward_column: 1 of 12 rows"),
    ("ten.jsonl", lambda p: write_jsonl(p, rows(10)), {"heldout_fraction": 0.01},
     r"dataset\.heldout_fraction: 0\.01 of 10 texts leaves no held-out texts"),
], ids=["empty-file", "header-only", "all-texts-empty", "some-texts-empty", "null-texts", "null-rewards",
        "nan-reward", "no-heldout-texts"])
def test_a_dataset_that_can_only_fail_is_refused_before_compute(tiny_world, tmp_path, database_url,  # noqa: F811
                                                               name, write, dataset, match):
    model, _ = tiny_world
    path = tmp_path / name
    write(path)
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    config = tiny_config(model, path, dataset={"source": str(path), "batch_size": 32, **dataset})
    refused_before_compute(config, settings, match)


def test_max_length_beyond_the_models_positions_is_named(tiny_world, tmp_path, migrated):  # noqa: F811
    model, dataset = tiny_world  # tiny BERT: 128 positions
    config = tiny_config(model, dataset, model={"path": str(model), "max_length": 256})
    with pytest.raises(ConfigError, match=r"model\.max_length: 256 is beyond the model's 128 positions"):
        preflight(config, migrated)  # from config.json, without torch
    with pytest.raises(ConfigError, match=r"model\.max_length: 256 is beyond the model's 128 positions"):
        check_against_world(config, str(model))  # through transformers' config, on the worker
    refused_before_compute(config, migrated, r"model\.max_length")
    with pytest.raises(ConfigError, match=r"model\.max_length: 1024 is beyond the model's 512 positions"):
        preflight(parse_config({**DEMO, "model": {"path": "demo", "max_length": 1024}}), migrated)
    preflight(parse_config({**DEMO, "model": {"path": "demo", "max_length": 512}}), migrated)


def test_roberta_style_positions_leave_out_the_padding_offset():
    from backend.core.run_config import model_facts

    facts = model_facts({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1,
                         "num_hidden_layers": 12})
    assert (facts.depth, facts.positions) == (12, 512)
    assert model_facts({"model_type": "gpt2", "n_positions": 1024, "n_layer": 6}).positions == 1024


def test_an_unknown_device_is_named_and_the_known_ones_parse():
    for device in ("bogus", "gpu", "cuda:x", "CPU", ""):
        with pytest.raises(ConfigError, match=r"device: .*not one of auto, cpu, cuda, cuda:N .* or mps"):
            parse_config({**DEMO, "device": device})
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert parse_config({**DEMO, "device": device}).device == device


def test_a_device_this_machine_lacks_is_refused_before_compute(tiny_world, tmp_path, database_url):  # noqa: F811
    import torch

    from workers.device import pick_device

    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last device: absent on every machine
    with pytest.raises(ConfigError, match=rf"device: '{absent}' asked for, but this machine has"):
        pick_device(absent)
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    refused_before_compute(tiny_config(*tiny_world, device=absent), settings, rf"device: '{absent}'")


@pytest.mark.sql_databases
@pytest.mark.parametrize("section, key, value, env", [
    ("sae", "training_tokens", 10**15, "RA_MAX_TRAINING_TOKENS"),
    ("sae", "width", 1 << 20, "RA_MAX_SAE_WIDTH"),
    ("dataset", "n_texts", 5_000_000, "RA_MAX_TEXTS"),
])
def test_sizes_beyond_the_limits_are_refused_and_the_limit_can_be_raised(migrated, monkeypatch, section, key,
                                                                        value, env):
    section_data = {**DEMO[section], key: value} if section in DEMO else {key: value}
    if section == "sae":
        section_data["k"] = 32
    config = parse_config({**DEMO, section: section_data})
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: {value:,} is beyond the limit of .* setting {env}"):
        preflight(config, migrated)
    monkeypatch.setenv(env, str(value))
    raised = Settings(data_dir=migrated.data_dir, database_url=migrated.database_url)
    preflight(config, raised)  # the limit is the deployment's: raised, the same config passes


def test_yaml_float_training_tokens_parse_and_meet_the_limit(migrated):
    config = parse_config(yaml.safe_load("name: x\nmodel: {path: demo}\ndataset: {source: demo}\nlayers: [1]\n"
                                         "sae: {training_tokens: 1.0e+15}\n"))
    with pytest.raises(ConfigError, match=r"sae\.training_tokens"):
        preflight(config, migrated)


def test_a_corpus_beyond_the_text_limit_is_refused_before_training(tiny_world, tmp_path, database_url):  # noqa: F811
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, max_texts=100)
    message = refused_before_compute(tiny_config(*tiny_world), settings, r"dataset\.n_texts: .* gives 240 texts")
    assert "RA_MAX_TEXTS" in message
    # taking a part of it is the way out the message names
    assert "set dataset.n_texts" in message


def test_preflight_reads_a_local_model_without_importing_torch(tiny_world, migrated):  # noqa: F811
    model, dataset = tiny_world
    script = f"""
import sys
from backend.core.settings import Settings
from backend.core.run_config import ConfigError, parse_config, preflight
settings = Settings(data_dir={str(migrated.data_dir)!r}, database_url={migrated.database_url!r})
base = {{"name": "x", "model": {{"path": {str(model)!r}}}, "dataset": {{"source": {str(dataset)!r}}}}}
preflight(parse_config({{**base, "layers": [0, 2]}}), settings)
try:
    preflight(parse_config({{**base, "layers": [3]}}), settings)
except ConfigError as exc:
    print(exc)
print("torch imported:", "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "layers: [3] beyond the model's depth (3 blocks" in out.stdout
    assert "torch imported: False" in out.stdout


# --- the web: what can only fail on the worker creates no job -----------------------------

def _csrf(client) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/jobs").text).group(1)


def _yaml(**changes) -> str:
    return yaml.safe_dump({**DEMO, **changes})


@pytest.mark.sql_databases
@pytest.mark.parametrize("config_yaml, key", [
    (_yaml(run_id="synthetic"), "run_id: a run 'synthetic' already exists"),
    (_yaml(dataset={"source": "nowhere/texts.jsonl"}), "dataset.source: file not found"),
    (_yaml(layers=[1, 6]), "layers: [6] beyond the model's depth (6 blocks"),
    (_yaml(model={"path": "demo", "max_length": 1024}), "model.max_length: 1024 is beyond the model's 512 positions"),
    (_yaml(sae={"training_tokens": 10**15}), "sae.training_tokens: 1,000,000,000,000,000 is beyond the limit"),
    (_yaml(sae={"width": 1 << 22, "k": 32}), "sae.width: 4,194,304 is beyond the limit"),
    (_yaml(dataset={"source": "demo", "n_texts": 10**8}), "dataset.n_texts: 100,000,000 is beyond the limit"),
    (_yaml(device="bogus"), "device"),
], ids=["existing-run", "missing-dataset", "layer-beyond-depth", "max-length-beyond-positions",
        "training-tokens-limit", "width-limit", "n-texts-limit", "unknown-device"])
def test_the_web_refuses_what_could_only_fail_on_the_worker(client, migrated, config_yaml, key):
    form = client.post("/jobs", data={"csrf_token": _csrf(client), "config_yaml": config_yaml},
                       follow_redirects=False)
    api = client.post("/api/jobs", json={"config_yaml": config_yaml})
    for answer in (form, api):
        assert answer.status_code == 422, answer.text
        assert key in answer.text.replace("\\u2019", "'").replace("&#39;", "'").replace("&#x27;", "'")
    assert jobs.recent(migrated) == []


@pytest.mark.sql_databases
def test_the_web_queues_a_replacement_of_an_existing_run_only_when_asked(client, migrated):
    refused = client.post("/api/jobs", json={"config_yaml": _yaml(run_id="synthetic")})
    assert refused.status_code == 422 and jobs.recent(migrated) == []
    again = client.post("/api/jobs", json={"config_yaml": _yaml(run_id="synthetic"), "replace": True})
    assert again.status_code == 201, again.text
    # the model's last block and its longest input are within bounds
    fits = client.post("/api/jobs", json={"config_yaml": _yaml(layers=[0, 5],
                                                               model={"path": "demo", "max_length": 512})})
    assert fits.status_code == 201, fits.text
    assert [j["run_id"] for j in jobs.recent(migrated)] == ["x", "synthetic"]


# --- partial run directories of killed runs -----------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def test_stale_partial_run_directories_are_cleaned_and_live_ones_kept(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    dead, here, me = _dead_pid(), _host(), os.getpid()
    gone = [f".a.partial-{here}-{dead}", f".b.partial-{dead}",  # this host's, dead (and the older name)
            f".c.partial-elsewhere-{me}", f".g.previous-{here}-{dead}"]  # another host's, a day old; a
    kept = [f".d.partial-{here}-{me}", f".e.partial-elsewhere-{dead}", "g"]  # replaced run's old copy
    restored = f".f.previous-{here}-{dead}"  # killed mid-swap: run f is missing, its old copy goes back
    for name in gone + kept + [restored]:
        (runs / name).mkdir()
    day_ago = time.time() - 24 * 3600
    os.utime(runs / gone[2], (day_ago, day_ago))
    done = staging.clean_stale(runs)
    assert sorted(p.name for p in runs.iterdir()) == sorted(kept + ["f"])
    assert "restored run 'f' from an interrupted replacement" in done and len(done) == 5


def test_the_pipeline_and_the_worker_clean_stale_directories_when_they_start(tiny_world, tmp_path,  # noqa: F811
                                                                             database_url):
    from workers import worker

    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    stale = settings.runs_dir / f".old.partial-{_host()}-{_dead_pid()}"
    stale.mkdir(parents=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError):  # even a run refused at once cleans up first
        run_pipeline(tiny_config(tiny_world[0], empty), settings)
    assert not stale.exists()
    stale.mkdir()
    worker.main(settings, once=True)  # an empty queue: it starts, cleans, and ends
    assert not stale.exists()


@pytest.mark.parametrize("outside", ["/etc/passwd", "/etc"], ids=["dataset-file", "model-dir"])
def test_the_web_reads_local_files_only_under_the_input_dirs(client, migrated, tmp_path, monkeypatch, outside):
    """A run queued on the web would show on the dashboards what the worker read: only the data
    dir, the server's working directory and RA_INPUT_DIRS may be read."""
    monkeypatch.chdir(tmp_path)
    key = "dataset.source" if outside.endswith("passwd") else "model.path"
    changes = {"dataset": {"source": outside}} if key == "dataset.source" else {"model": {"path": outside}}
    refused = client.post("/api/jobs", json={"config_yaml": _yaml(**changes)})
    assert refused.status_code == 422 and f"{key}: '{outside}' is outside the folders" in refused.text, refused.text
    assert "RA_INPUT_DIRS" in refused.text and jobs.recent(migrated) == []
    inside = tmp_path / "texts.jsonl"
    inside.write_text('{"text": "a fine film", "reward": 1.0}\n' * 20)
    queued = client.post("/api/jobs", json={"config_yaml": _yaml(dataset={"source": str(inside)})})
    assert queued.status_code == 201, queued.text

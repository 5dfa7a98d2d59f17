"""Config validation: every mistake is named, before any compute, and leaves nothing behind."""
from __future__ import annotations

import pytest
import yaml

from backend.cli import main
from backend.core.run_config import ConfigError, check_against_world, load_config, parse_config

BASE = {"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1]}


def with_(**changes):
    data = {**BASE, **changes}
    return data


@pytest.mark.parametrize(
    "data, key",
    [
        (with_(lyers=[1]), "lyers: unknown key"),
        (with_(sae={"width": 16, "k": 32}), "sae.k (32) must not exceed sae.width (16)"),
        (with_(sae={"widht": 16}), "sae.widht: unknown key"),
        (with_(layers=[]), "layers"),
        (with_(layers=[1, 1]), "layers must be distinct"),
        (with_(dataset={"source": "demo", "heldout_fraction": 1.5}), "dataset.heldout_fraction"),
        (with_(regression={"alphas": [-1.0]}), "regression.alphas"),
        (with_(regression={"pooling": "median"}), "regression.pooling"),
        ({"model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1]}, "name: Field required"),
    ],
)
def test_bad_values_are_named(data, key):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert key in str(err.value)


def test_layer_beyond_depth_and_missing_dataset_are_caught_before_compute(tmp_path):
    from tests.tiny_models import save_tiny_bert

    model = save_tiny_bert(tmp_path / "m", n_layers=3)
    config = parse_config(with_(model={"path": str(model)}, layers=[1, 3]))
    with pytest.raises(ConfigError, match=r"layers: \[3\] beyond the model's depth \(3 blocks"):
        check_against_world(config, str(model))
    config = parse_config(with_(model={"path": str(model)}, dataset={"source": str(tmp_path / "nope.jsonl")}))
    with pytest.raises(ConfigError, match="dataset.source: file not found"):
        check_against_world(config, str(model))
    config = parse_config(with_(model={"path": str(tmp_path / "no-model")}))
    with pytest.raises(ConfigError, match="model.path: cannot load"):
        check_against_world(config, str(tmp_path / "no-model"))


def test_relative_dataset_path_resolves_next_to_the_config(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "hi"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(with_(dataset={"source": "data.jsonl"})))
    assert load_config(path).dataset.source == str(tmp_path / "data.jsonl")


def test_cli_reports_a_broken_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from backend.core.settings import get_settings

    data_dir = tmp_path / "data"
    monkeypatch.setenv("RA_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_(sae={"width": 8, "k": 4, "typo": 1})))
    try:
        assert main(["run", str(path)]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "sae.typo: unknown key" in err
    assert not data_dir.exists()
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv, n_workers", [(["demo"], 1), (["demo", "--workers", "2", "--port", "8123"], 2),
                                           (["serve", "--workers", "2", "--port", "8123"], 2)])
def test_demo_and_serve_hand_their_options_to_the_server(tmp_path, monkeypatch, argv, n_workers):
    """`rewardatlas demo` builds the demo, then serves it exactly as `serve` would."""
    import uvicorn

    import workers.demo
    from backend.core.settings import get_settings

    for name, value in (("RA_DATA_DIR", str(tmp_path)), ("RA_HOST", "127.0.0.1"), ("RA_PORT", "8000"),
                        ("RA_SECRET_KEY", "k")):
        monkeypatch.setenv(name, value)  # and restored afterwards: serving several processes sets them
    get_settings.cache_clear()
    built, served = [], []
    monkeypatch.setattr(workers.demo, "ensure_demo", lambda settings: built.append(settings.data_dir))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(kw))
    assert main(argv) == 0
    assert built == ([tmp_path] if argv[0] == "demo" else [])
    assert len(served) == 1 and served[0]["host"] == "127.0.0.1"
    assert served[0]["port"] == (8123 if "--port" in argv else 8000)
    assert served[0].get("workers", 1) == n_workers
    get_settings.cache_clear()


@pytest.fixture
def cli_settings(migrated, monkeypatch):
    """`rewardatlas` in this process, on the test's data dir and database, with a run 'synthetic'."""
    from backend.core.settings import get_settings
    from tests.helpers import publish_synthetic_run

    publish_synthetic_run(migrated)
    monkeypatch.setenv("RA_DATA_DIR", str(migrated.data_dir))
    monkeypatch.setenv("RA_DATABASE_URL", migrated.database_url)
    get_settings.cache_clear()
    yield migrated
    get_settings.cache_clear()


def _config_file(tmp_path, **changes):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(with_(**changes)))
    return str(path)


@pytest.mark.sql_databases
@pytest.mark.parametrize("changes, message", [
    ({"run_id": "synthetic"}, "error: run_id: a run 'synthetic' already exists"),  # found by the pipeline
    ({"sae": {"training_tokens": 10**15}}, "error: sae.training_tokens: 1,000,000,000,000,000 is beyond the limit"),
    ({"model": {"path": "demo", "max_length": 1024}}, "error: model.max_length: 1024 is beyond the model's 512"),
    ({"dataset": {"source": "null-texts.jsonl"}}, "error: dataset.text_column: 1 of 12 rows"),  # read by the pipeline
    ({"dataset": {"source": "empty.jsonl"}}, "error: dataset.source: "),
], ids=["existing-run", "training-tokens-limit", "max-length-beyond-positions", "null-texts", "empty-dataset"])
def test_cli_prints_a_config_problem_found_after_parsing_without_a_traceback(cli_settings, tmp_path, capsys,
                                                                            changes, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "null-texts.jsonl").write_text("".join(
        '{"text": %s, "reward": 1}\n' % ("null" if i == 4 else f'"text {i}"') for i in range(12)))
    assert main(["run", _config_file(tmp_path, **changes)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err
    assert not any(p.name != "synthetic" for p in cli_settings.runs_dir.iterdir())


def test_cli_prints_a_device_this_machine_lacks_without_a_traceback(cli_settings, tmp_path, capsys):
    import torch

    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last device: absent on every machine
    assert main(["run", _config_file(tmp_path, device=absent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: device: '{absent}' asked for") and "Traceback" not in err


def test_messages_read_as_sentences_without_library_prefixes_or_a_lead_said_twice():
    from backend.core.run_config import plain_message

    assert plain_message("invalid config: invalid config:\n  layers: Value error, layer 9 is beyond") == \
        "invalid config:\n  layers: layer 9 is beyond"
    assert plain_message("vocabulary: vocabulary: no word is known") == "vocabulary: no word is known"
    assert plain_message("sae.k: must be at most sae.width") == "sae.k: must be at most sae.width"
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "model": {"path": "m"}, "dataset": {"source": "d"}, "layers": [1],
                      "sae": {"width": 16, "k": 32}})
    assert "Value error" not in str(err.value)

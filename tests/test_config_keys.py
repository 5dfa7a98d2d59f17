"""Every run-config key is declared with what it may name and how large it may be
(backend/core/config_keys.py): a new key cannot be added without either."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from backend.core.settings import Settings
from backend.core.run_config import ConfigError, RunConfig, check_limits, parse_config
from backend.core.config_keys import DeploymentLimit, InputRef, is_number, marker, schema_keys, upper_bound

DEMO = {"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1]}

# Text keys that name nothing to read. A new text key joins this list, or carries an InputRef
# (so that a path in it is resolved and checked against the input folders like every other).
PLAIN_TEXT = {"name", "run_id", "device", "model.step_separator", "model.good_token", "model.bad_token",
              "dataset.split", "dataset.text_column", "dataset.reward_column", "dataset.steps_column",
              "lexicon.carriers[]", "lexicon.neutral_word",
              # a function in an installed package (from the web: only this package's, backend/core/run_config.py)
              "model.loader", "model.output",
              # chat data: column names, and a Jinja template rendered in a sandbox by transformers
              "dataset.messages_column", "dataset.prompt_column", "dataset.response_column", "dataset.chat_template"}


def _config(**sections) -> dict:
    return {**DEMO, **sections}


def test_every_numeric_key_has_an_upper_bound():
    unbounded = [k.name for k in schema_keys(RunConfig) if is_number(k) and upper_bound(k) is None]
    assert unbounded == [], f"numeric keys without an upper bound (Field(le=...) or a DeploymentLimit): {unbounded}"


def test_every_text_key_is_a_declared_input_or_plain_text():
    text = {k.name for k in schema_keys(RunConfig) if k.leaf is str}
    inputs = {k.name for k in schema_keys(RunConfig) if marker(k, InputRef)}
    assert inputs == {"model.path", "dataset.source", "transfer.base_model", "lexicon.reference",
                      "reason_score.vocabulary"}
    assert text - inputs - PLAIN_TEXT == set(), "a text key that is neither an InputRef nor declared plain text"
    assert PLAIN_TEXT <= text, f"declared plain text but no longer a key: {PLAIN_TEXT - text}"


def test_the_walk_sees_nested_optional_and_list_keys():
    names = {k.name: k for k in schema_keys(RunConfig)}
    assert isinstance(upper_bound(names["transfer.training_tokens"]), DeploymentLimit)
    assert isinstance(upper_bound(names["sae.widths[]"]), DeploymentLimit)
    assert upper_bound(names["reason_score.window[]"]) == 64 and upper_bound(names["layers[]"]) >= 64


@pytest.mark.parametrize("sections, key", [
    ({"transfer": {"base_model": "demo-base", "training_tokens": 10**15}}, "transfer.training_tokens"),
    ({"transfer": {"base_model": "demo-base", "texts": 10**9}}, "transfer.texts"),
    ({"dataset": {"source": "demo", "token_budget": 10**15}}, "dataset.token_budget"),
    ({"sae": {"widths": [64, 1 << 22], "k": 32}}, "sae.width"),  # the larger of widths is the run's width
])
def test_deployment_limits_hold_on_every_key_they_mark(sections, key):
    config = parse_config(_config(**sections))
    with pytest.raises(ConfigError, match=rf"{key.replace('[', '.').replace(']', '.')}: .* is beyond the limit"):
        check_limits(config, Settings())


@pytest.mark.parametrize("sections, key", [
    ({"sae": {"buffer_tokens": 10**12}}, "sae.buffer_tokens"),
    ({"sae": {"batch_size": 10**9}}, "sae.batch_size"),
    ({"dataset": {"source": "demo", "batch_size": 10**9}}, "dataset.batch_size"),
    ({"analysis": {"window_before": 10**9}}, "analysis.window_before"),
    ({"effects": {"pool_texts": 10**9}}, "effects.pool_texts"),
    ({"effects": {"faithfulness_texts": 10**9}}, "effects.faithfulness_texts"),
    ({"effects": {"faithfulness_n": [1, 10**9]}}, "effects.faithfulness_n.1"),
    ({"lexicon": {"batch_size": 10**9}}, "lexicon.batch_size"),
    ({"transfer": {"base_model": "demo-base", "match_tokens": 10**12}}, "transfer.match_tokens"),
    ({"seed": 2**70}, "seed"),
    ({"layers": [1, 10**6]}, "layers.list.1"),
])
def test_static_bounds_refuse_a_value_naming_the_key(sections, key):
    with pytest.raises(ConfigError, match=rf"{key}: Input should be less than"):
        parse_config(_config(**sections))


# --- inputs --------------------------------------------------------------------------------

@pytest.fixture
def roots(tmp_path, monkeypatch):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    monkeypatch.chdir(inside)
    (outside / "secret.csv").write_text("word,value\npassword,S3cr3tP4ssw0rd!\n")
    (outside / "words.txt").write_text("hunter2 swordfish\n")
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text('{"num_hidden_layers": 2, "S3cr3t": 1}')
    (inside / "link").symlink_to(outside)
    return inside, outside


def _refused(config: dict, roots: list[Path]) -> str:
    with pytest.raises(ConfigError) as refused:
        parse_config(config, input_roots=roots)
    return str(refused.value)


@pytest.mark.parametrize("sections, key", [
    ({"dataset": {"source": "hf:{outside}"}}, "dataset.source"),
    ({"dataset": {"source": "hf:../outside/secret.csv"}}, "dataset.source"),
    ({"dataset": {"source": "hf:link"}}, "dataset.source"),
    ({"dataset": {"source": "{outside}/secret.csv"}}, "dataset.source"),
    ({"dataset": {"source": "link/secret.csv"}}, "dataset.source"),
    ({"model": {"path": "{outside}/model"}}, "model.path"),
    ({"model": {"path": "link/model"}}, "model.path"),
    ({"transfer": {"base_model": "{outside}/model"}}, "transfer.base_model"),
    ({"transfer": {"base_model": "../outside/model"}}, "transfer.base_model"),
    ({"lexicon": {"reference": "{outside}/secret.csv"}}, "lexicon.reference"),
    ({"lexicon": {"reference": "/proc/self/environ"}}, "lexicon.reference"),
    ({"reason_score": {"vocabulary": "/proc/self/environ"}}, "reason_score.vocabulary"),
    ({"reason_score": {"vocabulary": "link/words.txt"}}, "reason_score.vocabulary"),
    ({"reason_score": {"vocabulary": "{outside}/missing.txt"}}, "reason_score.vocabulary"),
])
def test_a_path_outside_the_input_folders_is_refused_before_it_is_read(roots, sections, key):
    inside, outside = roots
    filled = {name: {k: v.format(outside=outside) for k, v in section.items()} for name, section in sections.items()}
    message = _refused(_config(**filled), [inside])
    assert message.startswith(f"{key}: ") and ("outside the folders" in message or "hub id" in message
                                                or "local folder" in message), message
    for secret in ("S3cr3t", "hunter2", "swordfish", "PATH=", os.environ.get("HOME", "//")):
        assert secret not in message, message
    assert "not found" not in message and "line" not in message  # nor whether it exists, nor its length


def test_ids_and_paths_inside_are_resolved_once_and_absolutely(roots):
    inside, _ = roots
    (inside / "texts.jsonl").write_text('{"text": "a"}\n')
    (inside / "org").mkdir()
    (inside / "org" / "model").mkdir()
    config = parse_config(_config(dataset={"source": "texts.jsonl"}, model={"path": "org/model"},
                                  transfer={"base_model": "some-org/base-model"},
                                  lexicon={"reference": "vader"}, reason_score={"vocabulary": "demo-negation"}),
                          input_roots=[inside])
    assert config.dataset.source == str(inside / "texts.jsonl")
    assert config.model.path == str(inside / "org" / "model")  # a hub-shaped name that is a local folder
    assert config.transfer.base_model == "some-org/base-model"  # a hub id stays an id
    assert (config.lexicon.reference, config.reason_score.vocabulary) == ("vader", "demo-negation")
    hub = parse_config(_config(dataset={"source": "hf:imdb"}), input_roots=[inside])
    assert hub.dataset.source == "hf:imdb"


def test_the_command_line_reads_any_path_but_never_echoes_a_file(roots, tmp_path):
    _, outside = roots
    config = parse_config(_config(lexicon={"reference": str(outside / "secret.csv")}), base_dir=tmp_path)
    assert config.lexicon.reference == str(outside / "secret.csv")
    from backend.core.run_config import check_word_lists

    with pytest.raises(ConfigError) as refused:
        check_word_lists(config)
    assert "no usable word,value row" in str(refused.value) and "S3cr3t" not in str(refused.value)


def test_a_nul_anywhere_in_a_config_is_refused_naming_the_key():
    message = _refused(_config(name="a\x00b"), None)
    assert "name: holds a NUL" in message
    assert "lexicon.carriers[1]" in _refused(_config(lexicon={"carriers": ["a {}", "b\x00 {}"]}), None)


def test_a_model_folder_without_a_tokenizer_is_refused_before_any_compute(roots, tmp_path):
    from backend.core.run_config import check_local_tokenizers

    inside, _ = roots
    base = inside / "base"
    base.mkdir()
    (base / "config.json").write_text('{"num_hidden_layers": 6}')
    config = parse_config(_config(transfer={"base_model": str(base)}), input_roots=[inside])
    with pytest.raises(ConfigError, match="transfer.base_model: the folder .* no tokenizer"):
        check_local_tokenizers(config)
    (base / "vocab.txt").write_text("[PAD]\n")
    check_local_tokenizers(config)


@pytest.mark.parametrize("model, refused", [
    ({"path": "bundled", "loader": "os:system"}, "model.loader"),  # any installed function: never from the web
    ({"path": "bundled", "loader": "tests.custom_model_fixtures:load_tiny"}, "model.loader"),
    ({"path": "demo", "trust_remote_code": True}, "model.trust_remote_code"),
])
def test_a_run_queued_on_the_web_runs_no_code_its_sender_chose(tmp_path, model, refused):
    with pytest.raises(ConfigError) as info:
        parse_config(_config(model=model), tmp_path, input_roots=[tmp_path])
    assert str(info.value).startswith(f"{refused}:")
    parse_config(_config(model=model), tmp_path, input_roots=None)  # the command line may
    web = parse_config(_config(model={"path": "bundled", "loader": "workers.adapters.nanoguard:load"}), tmp_path,
                       input_roots=[tmp_path])
    assert web.model.loader == "workers.adapters.nanoguard:load"  # this package's own loaders may

"""Chat-formatted data (workers/chat.py): conversations rendered with the chat template, the
response located, analysis.tokens: response keeping every read on the response's tokens; and
the bad inputs refused before compute."""
from __future__ import annotations

import json

import duckdb
import pytest
from markupsafe import escape

from backend.core import db
from backend.core.db import run_exists
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import make_client
from tests.tiny_models import save_tiny_decoder
from workers.chat import (ChatMarkers, chat_markers, check_messages, prompt_response_messages, render_chat,
                          require_chat_template)
from backend.core.run_config import ConfigError, parse_config

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from tests.tiny_models import minilm_tokenizer

    tok = minilm_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_render_locates_every_message_and_the_response(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "review it"},
                {"role": "assistant", "content": "a fine film"}]
    rendered = render_chat(tokenizer, messages, TEMPLATE)
    assert [rendered.text[s.start:s.end] for s in rendered.roles] == ["be brief", "review it", "a fine film"]
    assert rendered.response.role == "assistant" and rendered.text[rendered.response.start:].startswith("a fine film")


def test_markers_find_the_response_of_any_rendered_text(tokenizer):
    markers = chat_markers(tokenizer, TEMPLATE)
    assert markers == ChatMarkers("<|assistant|>\n", "<|end|>")
    text = render_chat(tokenizer, prompt_response_messages("rate it", "awful, dull plot", "k", 0), TEMPLATE).text
    start, end = markers.response_span(text)
    assert text[start:end] == "awful, dull plot"
    assert markers.response_span("no chat here") is None


def test_bad_conversations_are_refused_naming_the_key_and_row(tokenizer):
    with pytest.raises(ConfigError, match=r"dataset.messages_column: row 3, message 1 has the unknown role 'robot'"):
        check_messages([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}],
                       "dataset.messages_column", 3)
    with pytest.raises(ConfigError, match=r"row 2 has no response text"):
        prompt_response_messages("hi", "  ", "dataset.response_column", 2)
    with pytest.raises(ConfigError, match=r"row 0 is not a non-empty list"):
        check_messages([], "dataset.messages_column", 0)
    tokenizer_without = type("T", (), {"chat_template": None})()
    with pytest.raises(ConfigError, match="dataset.chat_template: .*no chat template"):
        require_chat_template(tokenizer_without, "dataset.chat_template")


@pytest.fixture(scope="module")
def chat_world(tmp_path_factory):
    from workers.demo_llama import demo_chat_rows

    root = tmp_path_factory.mktemp("chat")
    model = save_tiny_decoder(root / "tiny-llama", "llama", "seq_cls")
    plain = save_tiny_decoder(root / "tiny-llama-no-template", "llama", "seq_cls")
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": TEMPLATE}))
    rows = demo_chat_rows(100, seed=5)
    dataset = root / "chat.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    messages = root / "messages.jsonl"
    messages.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                         {"role": "assistant", "content": r["response"]}],
                                            "reward": r["reward"]}) + "\n" for r in rows))
    return model, plain, dataset, messages, root


def chat_config(model, dataset, **overrides):
    return parse_config({
        "name": "chat", "model": {"path": str(model), "max_length": 64},
        "dataset": {"source": str(dataset), "batch_size": 32}, "layers": [1],
        "sae": {"width": 32, "k": 4, "training_tokens": 2048, "batch_size": 256, "buffer_tokens": 512},
        "analysis": {"n_contexts": 5, "ranked_texts": 10, "reward_effect_texts": 64},
        "effects": {"candidates": 4, "texts_per_feature": 4, "pool_texts": 16, "faithfulness_texts": 8},
        **overrides})


def test_a_chat_run_reads_only_the_response(chat_world, tmp_path):
    from transformers import AutoTokenizer

    from workers.pipeline import run_pipeline

    model, _, dataset, messages, _ = chat_world
    settings = Settings(data_dir=tmp_path)
    run_dir = run_pipeline(chat_config(model, messages, run_id="chat"), settings)
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    texts = dict(con.execute("select text_id, text from texts").fetchall())
    contexts = con.execute("select text_id, position from contexts").fetchall()
    info = dict(con.execute("select key, value from run_info").fetchall())
    con.close()
    assert all(text.startswith("<|user|>\n") and "<|assistant|>\n" in text for text in texts.values())
    client = make_client(settings)
    page = client.get("/runs/chat/texts/0").text
    response = markers_response(texts[0])
    assert 'data-role="prompt"' in page and f'data-role="response" title="the response: what the analysis reads">{escape(response)}<' in page
    assert client.get("/api/runs/chat/texts/0").json()["text"]["roles"][1] == {"part": "response", "text": response}
    assert info["chat_assistant_header"] == "<|assistant|>\n"
    tokenizer = AutoTokenizer.from_pretrained(model)
    markers = ChatMarkers("<|assistant|>\n", "<|end|>")
    assert contexts
    for text_id, position in contexts:
        text = texts[text_id]
        start, end = markers.response_span(text)
        offsets = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=64)["offset_mapping"]
        assert start <= offsets[position][0] < end, (text, position)
    db.dispose_engines()


def markers_response(text: str) -> str:
    start, end = ChatMarkers("<|assistant|>\n", "<|end|>").response_span(text)
    return text[start:end]


def test_chat_inputs_are_refused_before_compute(chat_world, tmp_path):
    from workers.pipeline import run_pipeline

    model, plain, dataset, _, root = chat_world
    settings = Settings(data_dir=tmp_path)
    plain_texts = root / "plain.jsonl"
    plain_texts.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(20)))
    bad_role = root / "bad_role.jsonl"
    bad_role.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                        + json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    cases = [(chat_config(plain, dataset, run_id="a"), "dataset.chat_template: .*no chat template"),
             (chat_config(model, bad_role, run_id="b"), r"dataset.messages_column: row 1, message 0 .*'narrator'"),
             (chat_config(model, plain_texts, run_id="c", analysis={"tokens": "response"}),
              "analysis.tokens: 'response' needs chat data")]
    try:
        for config, message in cases:
            with pytest.raises(ConfigError, match=message):
                run_pipeline(config, settings)
            assert not run_exists(settings, config.run_id)
            assert not settings.run_dir(config.run_id).exists()
    finally:
        db.dispose_engines()

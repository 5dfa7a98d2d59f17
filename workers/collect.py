"""Batched forward passes with hooks on ALL chosen layers at once."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from workers.adapters import RewardModelAdapter
from workers.batching import length_bucketed_batches, token_lengths


def activation_stream(
    adapter: RewardModelAdapter, texts: list[str], layers: list[int], batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless {hook_name: [n_tokens, d_model]} dicts over shuffled texts, one forward per batch.

    Padding is dropped; the forward stops after the deepest chosen layer."""
    rng = np.random.default_rng(seed)
    lengths = token_lengths(adapter.tokenizer, texts, adapter.max_length)
    while True:
        for indices in length_bucketed_batches(lengths, batch_size, rng):
            batch = adapter.tokenize([texts[i] for i in indices])
            _, captured = adapter.run(batch, capture=layers, need_score=False)
            keep = batch.attention_mask.bool()
            yield {adapter.hook_name(layer): captured[layer][keep].float() for layer in layers}

"""Batched forward passes with hooks on ALL chosen layers at once."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from workers.adapters import RewardModelAdapter


def activation_stream(
    adapter: RewardModelAdapter, texts: list[str], layers: list[int], batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless {hook_name: [n_tokens, d_model]} dicts over shuffled texts, one forward per batch.

    Padding is dropped; the forward stops after the deepest chosen layer."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(texts))
        for start in range(0, len(order), batch_size):
            batch = adapter.tokenize([texts[i] for i in order[start : start + batch_size]])
            _, captured = adapter.run(batch, capture=layers, need_score=False)
            keep = batch.attention_mask.bool()
            yield {adapter.hook_name(layer): captured[layer][keep].float() for layer in layers}

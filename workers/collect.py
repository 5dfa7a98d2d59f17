"""Batched forward passes with hooks on ALL chosen layers at once, and the shuffle buffer
that turns that stream into SAE training batches."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from workers.adapters import RewardModelAdapter
from workers.batching import length_bucketed_batches, token_lengths

Activations = dict[str, torch.Tensor]  # hook name -> [n_tokens, d_model]


def activation_stream(
    adapter: RewardModelAdapter, texts: list[str], layers: list[int], batch_size: int, seed: int
) -> Iterator[Activations]:
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


@torch.no_grad()
def shuffled_batches(stream: Iterator[Activations], buffer_tokens: int, batch_size: int,
                     keep_fraction: float = 0.5) -> Iterator[Activations]:
    """SAE training batches drawn from a buffer of `buffer_tokens` tokens, shuffled with ONE
    permutation for every hook so a batch holds the same tokens at each layer.

    Same mixing as SAELens's `mixing_buffer` (serve a shuffled buffer, keep `keep_fraction` of
    it to mix with what comes next), but each hook keeps its own contiguous tensor and new
    activations are concatenated once per refill, not once per forward pass: SAELens's
    multi-hook variant packs all hooks into one wide tensor and re-concatenates the whole
    buffer on every forward, which costs more than the SAE steps on a small model.
    """
    if buffer_tokens < batch_size:
        raise ValueError(f"buffer_tokens ({buffer_tokens}) must be at least the batch size ({batch_size})")
    kept: Activations | None = None
    pending: list[Activations] = []
    pending_tokens = 0
    keep = int(buffer_tokens * keep_fraction)
    for new in stream:
        pending.append(new)
        pending_tokens += len(next(iter(new.values())))
        held = pending_tokens + (len(next(iter(kept.values()))) if kept else 0)
        if held < buffer_tokens:
            continue
        buffer = {h: torch.cat(([kept[h]] if kept else []) + [p[h] for p in pending]) for h in new}
        pending, pending_tokens = [], 0
        order = torch.randperm(held)
        n_served = max(1, (held - keep) // batch_size) * batch_size
        served = {h: x[order[:n_served]] for h, x in buffer.items()}
        kept = {h: x[order[n_served:]] for h, x in buffer.items()}
        for start in range(0, n_served, batch_size):
            yield {h: x[start:start + batch_size] for h, x in served.items()}
    # the stream ended (a finite one): serve what is left in whole batches
    if kept is None and not pending:
        return
    rest = {h: torch.cat(([kept[h]] if kept else []) + [p[h] for p in pending]) for h in (kept or pending[0])}
    n_rest = len(next(iter(rest.values())))
    for start in range(0, n_rest - batch_size + 1, batch_size):
        yield {h: x[start:start + batch_size] for h, x in rest.items()}

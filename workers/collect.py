"""Batched forward passes with hooks on ALL chosen layers at once, and the shuffle buffer
that turns that stream into SAE training batches."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from workers.adapters import RewardModelAdapter
from workers.batching import length_bucketed_batches, token_lengths
from workers.sinks import SinkRule

Activations = dict[str, torch.Tensor]  # hook name -> [n_tokens, d_model]


def activation_stream(
    adapter: RewardModelAdapter, texts: list[str], layers: list[int], batch_size: int, seed: int,
    sink_rules: dict[int, SinkRule] | None = None, cache_bytes: int = 0,
) -> Iterator[Activations]:
    """Endless {hook_name: [n_tokens, d_model]} dicts over shuffled texts, one forward per batch.

    Padding is dropped, so are the tokens analysis does not read (a chat run's prompt: analysis.tokens
    response), and so are each layer's attention sinks (`sink_rules`, workers/sinks.py):
    a layer may then hold fewer tokens than another. The forward stops after the deepest chosen
    layer. While one pass over the texts fits in `cache_bytes`, each text's rows are kept, and a
    batch whose texts are all kept is assembled from them instead of run again: the same stream,
    without a forward per batch on later passes."""
    rng = np.random.default_rng(seed)
    lengths = token_lengths(adapter.tokenizer, texts, adapter.max_length)
    sink_rules = sink_rules or {}
    hooks = [adapter.hook_name(layer) for layer in layers]
    cache = TextCache(cache_bytes, adapter.d_model)
    while True:
        for indices in length_bucketed_batches(lengths, batch_size, rng):
            kept = cache.batch(indices, hooks)
            if kept is not None:
                yield kept
                continue
            per_text = forward_rows(adapter, [texts[i] for i in indices], layers, sink_rules)
            cache.add(indices, per_text)
            yield {hook: torch.cat([text[hook] for text in per_text]) for hook in hooks}


def forward_rows(adapter: RewardModelAdapter, texts: list[str], layers: list[int],
                 sink_rules: dict[int, SinkRule]) -> list[Activations]:
    """One forward of `texts`: per text, {hook: its rows the SAEs learn from}."""
    batch = adapter.tokenize(texts)
    _, captured = adapter.run(batch, capture=layers, need_score=False)
    keep = batch.analysed_tokens()  # a chat run's SAEs learn its responses' tokens only
    per_text = [{} for _ in texts]
    for layer in layers:
        hook, rule = adapter.hook_name(layer), sink_rules.get(layer)
        for row, rows in enumerate(captured[layer].float().unbind(0)):
            rows = rows[keep[row]]
            per_text[row][hook] = rows if rule is None else rows[rule.kept(rows)]
    return per_text


class TextCache:
    """Each text's stream rows {hook: [n, d]}, kept until they pass `max_bytes` (then all dropped:
    a pass that does not fit is run again, as without a cache). A row counts as d float32s even
    where it is a [n, 0] stand-in for a layer another rank holds (workers/distributed_train.py)."""

    def __init__(self, max_bytes: int, d_model: int):
        self.max_bytes, self.used, self.row_bytes = max_bytes, 0, 4 * d_model
        self.rows: dict[int, Activations] | None = {} if max_bytes > 0 else None

    def add(self, indices: np.ndarray, per_text: list[Activations]) -> None:
        if self.rows is None:
            return
        for i, text in zip(indices.tolist(), per_text):
            self.used += sum(len(rows) * self.row_bytes for rows in text.values())
            self.rows[i] = text
        if self.used > self.max_bytes:
            self.rows = None

    def batch(self, indices: np.ndarray, hooks: list[str]) -> Activations | None:
        if self.rows is None or any(i not in self.rows for i in indices.tolist()):
            return None
        return {hook: torch.cat([self.rows[i][hook] for i in indices.tolist()]) for hook in hooks}


@torch.no_grad()
def shuffled_batches(stream: Iterator[Activations], buffer_tokens: int, batch_size: int,
                     keep_fraction: float = 0.5) -> Iterator[Activations]:
    """SAE training batches drawn from a buffer of `buffer_tokens` tokens per hook. While every
    hook holds the same tokens, ONE permutation shuffles them all, so a batch holds the same
    tokens at each layer; once a layer's sinks were left out, each hook is shuffled on its own.

    Same mixing as SAELens's `mixing_buffer` (serve a shuffled buffer, keep `keep_fraction` of
    it to mix with what comes next), but each hook keeps its own contiguous tensor and new
    activations are concatenated once per refill, not once per forward pass: SAELens's
    multi-hook variant packs all hooks into one wide tensor and re-concatenates the whole
    buffer on every forward, which costs more than the SAE steps on a small model.
    """
    if buffer_tokens < batch_size:
        raise ValueError(f"buffer_tokens ({buffer_tokens}) must be at least the batch size ({batch_size})")
    kept: Activations = {}
    pending: dict[str, list[torch.Tensor]] = {}
    keep = int(buffer_tokens * keep_fraction)
    for new in stream:
        for hook, rows in new.items():
            pending.setdefault(hook, []).append(rows)
        held = {h: sum(len(p) for p in parts) + (len(kept[h]) if h in kept else 0) for h, parts in pending.items()}
        if min(held.values()) < buffer_tokens:
            continue
        buffer = {h: torch.cat(([kept[h]] if h in kept else []) + parts) for h, parts in pending.items()}
        pending = {}
        n_served = max(1, (min(held.values()) - keep) // batch_size) * batch_size
        shared = torch.randperm(len(next(iter(buffer.values())))) if len(set(held.values())) == 1 else None
        served = {}
        for h, x in buffer.items():
            order = shared if shared is not None else torch.randperm(len(x))
            served[h], kept[h] = x[order[:n_served]], x[order[n_served:]]
        for start in range(0, n_served, batch_size):
            yield {h: x[start:start + batch_size] for h, x in served.items()}
    # the stream ended (a finite one): serve what is left in whole batches
    hooks = list(kept or pending)
    if not hooks:
        return
    rest = {h: torch.cat(([kept[h]] if h in kept else []) + pending.get(h, [])) for h in hooks}
    n_rest = min(len(x) for x in rest.values())
    for start in range(0, n_rest - batch_size + 1, batch_size):
        yield {h: x[start:start + batch_size] for h, x in rest.items()}

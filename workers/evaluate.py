"""Reward recovered: splice each SAE's reconstruction into the reward model at its layer.

Over held-out texts the RM is scored three ways: unchanged (r), with the layer's output
replaced by the SAE reconstruction (r_sae), and with the layer's output zeroed (r_zero), both at
the tokens the SAE is meant for (a chat run's response tokens; never padding or sinks).
reward_recovered = 1 - mean|r_sae - r| / mean|r_zero - r|: 1 when the SAE loses nothing the
reward depends on, 0 when splicing it in is as bad as deleting the layer. Every reward read
counts (one per text, or one per step for a process RM).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from workers.adapters import RewardModelAdapter
from workers.adapters.base import LayerEdit
from workers.batching import length_bucketed_batches, token_lengths
from workers.sinks import NO_RULE, SinkRule, sink_rule_of


@dataclass
class RewardRecovery:
    reward_recovered: float | None  # None when zeroing the layer leaves every reward unchanged
    mae_sae: float  # mean |r_sae - r| over reward reads
    mae_zero: float  # mean |r_zero - r|
    n_texts: int
    n_reads: int


def sae_reconstruction(sae) -> LayerEdit:
    """The layer edit that swaps the hidden states for the SAE's reconstruction, in float32."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return sae.decode(sae.encode(hidden.float())).to(hidden.dtype)

    return edit


def zero_output(hidden: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(hidden)


def _on_tokens(edit: LayerEdit, analysed: torch.Tensor, rule: SinkRule = NO_RULE) -> LayerEdit:
    """Apply `edit` at the tokens the SAE is meant for only (`analysed`: Batch.analysed_tokens):
    padding keeps its states, so padding can't matter; so do a chat run's prompt tokens, which its
    SAEs never learnt, and the layer's sinks (workers/sinks.py)."""
    def on_tokens(hidden: torch.Tensor) -> torch.Tensor:
        keep = (analysed & rule.kept(hidden)).unsqueeze(-1)
        return torch.where(keep, edit(hidden), hidden)

    return on_tokens


@torch.no_grad()
def reward_recovery(
    adapter: RewardModelAdapter, edits: dict[int, LayerEdit], texts: list[str], batch_size: int,
    progress: Callable[[float], None] | None = None, rules: dict[int, SinkRule] | None = None,
) -> dict[int, RewardRecovery]:
    """For each layer, score `texts` with that layer's edit and with the layer zeroed, both at the
    tokens outside the layer's sinks (`rules`).
    `progress` hears the share of texts done before every batch (and may raise to stop)."""
    if not texts:
        raise ValueError("reward recovered needs at least one held-out text")
    abs_sae = {layer: 0.0 for layer in edits}
    abs_zero = {layer: 0.0 for layer in edits}
    n_reads = 0
    lengths = token_lengths(adapter.tokenizer, texts, adapter.max_length)
    done = 0
    for indices in length_bucketed_batches(lengths, batch_size, None):
        if progress is not None:
            progress(done / len(texts))
        done += len(indices)
        batch = adapter.tokenize([texts[i] for i in indices])
        clean, captured = adapter.run(batch, capture=list(edits))
        for layer, edit in edits.items():  # each edit runs only the blocks above its layer
            hidden = captured[layer]
            rule = (rules or {}).get(layer, NO_RULE)
            analysed = batch.analysed_tokens()
            spliced = adapter.run_from(batch, layer, _on_tokens(edit, analysed, rule)(hidden))
            zeroed = adapter.run_from(batch, layer, _on_tokens(zero_output, analysed, rule)(hidden))
            abs_sae[layer] += float((spliced - clean).abs().sum())
            abs_zero[layer] += float((zeroed - clean).abs().sum())
        n_reads += len(clean)
    results = {}
    for layer in edits:
        mae_sae, mae_zero = abs_sae[layer] / n_reads, abs_zero[layer] / n_reads
        recovered = 1.0 - mae_sae / mae_zero if mae_zero > 0 else None
        results[layer] = RewardRecovery(recovered, mae_sae, mae_zero, len(texts), n_reads)
    return results


def evaluate_saes(adapter: RewardModelAdapter, saes: dict, texts: list[str], batch_size: int,
                  progress: Callable[[float], None] | None = None) -> dict[int, RewardRecovery]:
    """Reward recovered per layer for loaded SAELens SAEs {layer: SAE}."""
    return reward_recovery(adapter, {layer: sae_reconstruction(sae) for layer, sae in saes.items()}, texts,
                           batch_size, progress, {layer: sink_rule_of(sae) for layer, sae in saes.items()})

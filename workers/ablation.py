"""Change chosen SAE features inside the reward model and measure the reward before and after.

The SAE is spliced in *with its reconstruction error kept*: the layer's output h becomes
h + decode(f') - decode(f), where f = encode(h) and f' is f with the chosen features changed.
With nothing changed this is h itself, so every difference in the reward comes from the
chosen features alone, not from the SAE's imperfect reconstruction.

Modes: zero (f'_i = 0), clamp (f'_i = value at every token), steer (h + value x the feature's
decoder direction at every token; f' = encode of that). The edit itself is workers/sae_ops.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from workers.adapters import Batch, RewardModelAdapter
from workers.analyze import forward_with_gradients
from workers.batching import length_bucketed_batches, token_lengths
from workers.controls import control_features, mean_with_ci  # noqa: F401
from workers.sae_ops import (FeatureEdit, decoder_directions, edit_chosen, edit_hidden,  # noqa: F401
                             content_tokens, edited_tokens, linear_decoder, pool_reads)


@dataclass
class AblationResult:
    text_index: np.ndarray  # [R] which evaluated text each reward read belongs to
    before: np.ndarray  # [R] reward without the edit
    after: np.ndarray  # [R] reward with it
    predicted: np.ndarray  # [R] the change the regression predicts: weights . (pooled after - before)
    attributed: np.ndarray | None  # [R] first-order change: d(score)/d(layer output) . (change of the output)
    fired: np.ndarray  # [R] whether any chosen feature fires on the read's tokens before the edit

    @property
    def delta(self) -> np.ndarray:
        return self.after - self.before

    def summary(self, where: np.ndarray | None = None) -> dict:
        """Mean change with its CI and both predictions, over all reads or those `where` holds."""
        keep = slice(None) if where is None else where
        delta, predicted = self.delta[keep], self.predicted[keep]
        attributed = None if self.attributed is None else self.attributed[keep]
        out = {"n": int(len(delta)), **mean_with_ci(delta),
               "predicted_mean_delta": float(predicted.mean()) if len(predicted) else None,
               "attribution_mean_delta": float(attributed.mean()) if attributed is not None and len(delta) else None}
        for name in ("predicted", "attribution"):  # prediction / measured: 1 is calibrated
            value, measured = out[f"{name}_mean_delta"], out["mean_delta"]
            out[f"{name}_ratio"] = value / measured if value is not None and measured else None
        return out


# Keep at most this much of the edited layer's clean output per evaluation set; batches past it
# run the whole model under each edit instead.
HIDDEN_CACHE_BYTES = 1 << 30
# ... and of a batch's SAE features (dense: d_sae / d_in times the output's size) at most this.
FEATURES_KEPT_BYTES = 64 << 20


@dataclass
class EvalBatch:
    """One batch of evaluation texts, run once unedited: its clean scores and, when kept, the
    edited layer's clean output, from which every edit needs only the blocks above it, and the
    score's gradient there, from which every edit's first-order (attribution) prediction follows."""
    indices: np.ndarray  # which texts of the set
    batch: Batch
    clean: torch.Tensor  # [R] scores of its reward reads
    hidden: torch.Tensor | None  # [B, T, d] the layer's output; None: not kept
    grad: torch.Tensor | None = None  # [B, T, d] d(sum of the batch's scores)/d(layer output); None: not taken
    features: torch.Tensor | None = None  # [B, T, d_sae] sae.encode(hidden), kept by the first edit that needs it

    def encoded(self, sae) -> torch.Tensor:
        """The SAE's features of the kept clean output: every zero or clamp edit of the set
        starts from them, so they are encoded once (a set is prepared for one layer's SAE)."""
        if self.features is not None:
            return self.features
        features = sae.encode(self.hidden.float())
        if features.numel() * features.element_size() <= FEATURES_KEPT_BYTES:
            self.features = features
        return features


@dataclass
class EvalSet:
    layer: int
    n_texts: int
    batches: list[EvalBatch]

    @property
    def clean(self) -> np.ndarray:
        return torch.cat([b.clean for b in self.batches]).float().cpu().numpy()


@torch.no_grad()
def prepare_eval_set(adapter: RewardModelAdapter, layer: int, texts: list[str], batch_size: int = 64,
                     keep_bytes: int = HIDDEN_CACHE_BYTES, progress: Callable[[float], None] | None = None,
                     with_gradients: bool = False) -> EvalSet:
    """Score `texts` unedited in length-bucketed batches, keeping `layer`'s output (and, with
    `with_gradients`, the score's gradient there) while it fits."""
    lengths = token_lengths(adapter.tokenizer, texts, adapter.max_length)
    batches, kept, done = [], 0, 0
    for indices in length_bucketed_batches(lengths, batch_size, None):
        if progress:
            progress(done / len(texts))
        done += len(indices)
        batch = adapter.tokenize([texts[i] for i in indices])
        if with_gradients:
            clean, captured, grads = forward_with_gradients(adapter, batch, [layer])
            grad = grads[layer]
        else:
            (clean, captured), grad = adapter.run(batch, capture=[layer]), None
        hidden = captured[layer]
        size = hidden.numel() * hidden.element_size() * (2 if grad is not None else 1)
        keep = kept + size <= keep_bytes
        kept += size if keep else 0
        batches.append(EvalBatch(np.asarray(indices), batch, clean.float(), hidden if keep else None,
                                 grad if keep else None))
    return EvalSet(layer, len(texts), batches)


def per_read(values: torch.Tensor, segment: torch.Tensor, n_reads: int, how: str = "sum") -> torch.Tensor:
    """values [N] of a batch's kept tokens -> [n_reads]: summed (or any-ed) over each read's tokens."""
    inside = segment >= 0
    out = torch.zeros(n_reads, dtype=torch.float32, device=values.device)
    out.index_add_(0, segment[inside], values[inside].float())
    return out > 0 if how == "any" else out


@torch.no_grad()
def run_ablation(adapter: RewardModelAdapter, sae, layer: int, texts: list[str] | EvalSet, edit: FeatureEdit,
                 weights: np.ndarray, pooling: str, batch_size: int = 64,
                 progress: Callable[[float], None] | None = None,
                 directions: torch.Tensor | None = None, linear: bool = False, scope: str = "text") -> AblationResult:
    """Reward of every text's reward reads without and with `edit` at `layer`, applied at the
    tokens `scope` names (workers/sae_ops.py SCOPES: the text's own, or all).

    `texts` may be an EvalSet prepared earlier for this layer (its clean pass is then reused:
    the edit runs only the blocks above the layer). `directions`, `linear`: as edit_hidden.
    The attribution prediction needs the set's gradients (prepare_eval_set(with_gradients))."""
    evalset = texts if isinstance(texts, EvalSet) else prepare_eval_set(adapter, layer, texts, batch_size)
    if evalset.layer != layer:
        raise ValueError(f"the evaluation set was prepared at layer {evalset.layer}, not {layer}")
    special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=adapter.device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=adapter.device)
    if edit.mode == "steer" and directions is None:
        directions = decoder_directions(sae)
    chosen = torch.tensor(edit.features, device=adapter.device)
    # zero / clamp change only the chosen features, so only their columns enter the prediction
    changed = None if edit.mode == "steer" else chosen
    with_attribution = all(item.grad is not None for item in evalset.batches)
    text_index, after, predicted, attributed, fired = [], [], [], [], []
    done = 0
    for item in evalset.batches:
        batch = item.batch
        keep = batch.attention_mask.bool()
        edit_at = edited_tokens(batch, special_ids, scope)
        flat_index = keep.flatten().cumsum(0).reshape(keep.shape) - 1
        read_rows = flat_index[batch.reward_index[:, 0], batch.reward_index[:, 1]]
        segment = batch.token_segment[keep]
        pool_args = (segment, content_tokens(batch, special_ids)[keep], read_rows, batch.n_reads, pooling)
        seen = {}

        kept = item.encoded(sae) if item.hidden is not None else None

        def hook(hidden: torch.Tensor) -> torch.Tensor:
            # f_before / f_after: the chosen features' columns (every column for steer)
            new, f_before, f_after = edit_chosen(sae, hidden, edit, directions, linear, kept)
            f_after = torch.where(edit_at.unsqueeze(-1), f_after, f_before)
            # the regression's view of the change: pooled features per reward read, as in analysis
            seen["pooled"] = (pool_reads(f_after[keep].float(), *pool_args)
                              - pool_reads(f_before[keep].float(), *pool_args))
            fired_on = ((f_before[..., chosen] if changed is None else f_before) > 0) & edit_at.unsqueeze(-1)
            seen["fired"] = per_read(fired_on[keep].any(-1), segment, batch.n_reads, "any")
            new = torch.where(edit_at.unsqueeze(-1), new, hidden)
            if item.grad is not None:
                first_order = (item.grad.float() * (new.float() - hidden.float())).sum(-1)[keep]
                seen["attributed"] = per_read(first_order, segment, batch.n_reads)
            return new

        if item.hidden is not None:
            edited = adapter.run_from(batch, layer, hook(item.hidden))
        else:
            edited, _ = adapter.run(batch, edits={layer: hook})
        after.append(edited.float().cpu().numpy())
        predicted.append((seen["pooled"] @ (w if changed is None else w[changed])).cpu().numpy())
        fired.append(seen["fired"].cpu().numpy())
        if with_attribution:
            attributed.append(seen["attributed"].cpu().numpy())
        text_index.append(item.indices[batch.reward_index[:, 0].cpu().numpy()])
        done += len(item.indices)
        if progress:
            progress(done / evalset.n_texts)
    return AblationResult(np.concatenate(text_index), evalset.clean, np.concatenate(after), np.concatenate(predicted),
                          np.concatenate(attributed) if with_attribution else None, np.concatenate(fired))

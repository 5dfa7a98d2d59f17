"""Change chosen SAE features inside the reward model and measure the reward before and after.

The SAE is spliced in *with its reconstruction error kept*: the layer's output h becomes
h + decode(f') - decode(f), where f = encode(h) and f' is f with the chosen features changed.
With nothing changed this is h itself, so every difference in the reward comes from the
chosen features alone, not from the SAE's imperfect reconstruction.

Modes: zero (f'_i = 0), clamp (f'_i = value at every token), steer (h + value x the feature's
decoder direction at every token; f' = encode of that).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import stats

from workers.adapters import RewardModelAdapter
from workers.analyze import decoder_directions, pool_reads
from workers.batching import length_bucketed_batches, token_lengths

MODES = ("zero", "clamp", "steer")


@dataclass(frozen=True)
class FeatureEdit:
    features: tuple[int, ...]
    mode: str  # one of MODES
    value: float = 0.0  # clamp: the activation; steer: the multiple of the decoder direction

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not self.features:
            raise ValueError("no features to change")


@torch.no_grad()
def edit_hidden(sae, hidden: torch.Tensor, edit: FeatureEdit, directions: torch.Tensor | None = None):
    """(new hidden, features before, features after) for hidden states [..., d_in]."""
    h = hidden.float()
    before = sae.encode(h)
    index = torch.tensor(edit.features, device=h.device)
    if edit.mode == "steer":
        if directions is None:
            directions = decoder_directions(sae)
        new = h + edit.value * directions[index].sum(0)
        after = sae.encode(new)
    else:
        after = before.clone()
        after[..., index] = 0.0 if edit.mode == "zero" else float(edit.value)
        new = h + (sae.decode(after) - sae.decode(before))
    return new.to(hidden.dtype), before, after


@dataclass
class AblationResult:
    text_index: np.ndarray  # [R] which evaluated text each reward read belongs to
    before: np.ndarray  # [R] reward without the edit
    after: np.ndarray  # [R] reward with it
    predicted: np.ndarray  # [R] the change the regression predicts: weights . (pooled after - before)

    @property
    def delta(self) -> np.ndarray:
        return self.after - self.before

    def summary(self) -> dict:
        return {"n": int(len(self.delta)), **mean_with_ci(self.delta),
                "predicted_mean_delta": float(self.predicted.mean()) if len(self.predicted) else None}


def mean_with_ci(values: np.ndarray, level: float = 0.95) -> dict:
    """Mean and its t-interval (a single value has no interval)."""
    n = len(values)
    mean = float(np.mean(values)) if n else float("nan")
    if n < 2:
        return {"mean_delta": mean, "ci_low": None, "ci_high": None}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return {"mean_delta": mean, "ci_low": mean - half, "ci_high": mean + half}


@torch.no_grad()
def run_ablation(adapter: RewardModelAdapter, sae, layer: int, texts: list[str], edit: FeatureEdit,
                 weights: np.ndarray, pooling: str, batch_size: int = 64,
                 baseline: np.ndarray | None = None, progress: Callable[[float], None] | None = None,
                 directions: torch.Tensor | None = None) -> AblationResult:
    """Reward of every text's reward reads without and with `edit` at `layer`.

    `baseline` (the unedited scores in this function's read order) skips the clean forward
    when the caller has it from an earlier call on the same texts."""
    special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=adapter.device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=adapter.device)
    if edit.mode == "steer" and directions is None:
        directions = decoder_directions(sae)
    text_index, before, after, predicted = [], [], [], []
    lengths = token_lengths(adapter.tokenizer, texts, adapter.max_length)
    batches = list(length_bucketed_batches(lengths, batch_size, None))
    done = 0
    for batch_no, indices in enumerate(batches):
        batch = adapter.tokenize([texts[i] for i in indices])
        keep = batch.attention_mask.bool()
        pooled_change = {}

        def hook(hidden: torch.Tensor) -> torch.Tensor:
            new, f_before, f_after = edit_hidden(sae, hidden, edit, directions)
            # the regression's view of the change: pooled features per reward read, as in analysis
            flat_index = keep.flatten().cumsum(0).reshape(keep.shape) - 1
            read_rows = flat_index[batch.reward_index[:, 0], batch.reward_index[:, 1]]
            token_ids = batch.input_ids[keep]
            args = (batch.token_segment[keep], ~torch.isin(token_ids, special_ids), read_rows, batch.n_reads, pooling)
            pooled_change["delta"] = pool_reads(f_after[keep].float(), *args) - pool_reads(f_before[keep].float(), *args)
            return torch.where(keep.unsqueeze(-1), new, hidden)

        if baseline is None:
            clean, _ = adapter.run(batch)
            before.append(clean.float().cpu().numpy())
        edited, _ = adapter.run(batch, edits={layer: hook})
        after.append(edited.float().cpu().numpy())
        predicted.append((pooled_change["delta"] @ w).cpu().numpy())
        text_index.append(np.asarray(indices)[batch.reward_index[:, 0].cpu().numpy()])
        done += len(indices)
        if progress:
            progress(done / len(texts))
    after_all = np.concatenate(after)
    before_all = baseline if baseline is not None else np.concatenate(before)
    if len(before_all) != len(after_all):
        raise ValueError("baseline does not match these texts: score them again without it")
    return AblationResult(np.concatenate(text_index), before_all, after_all, np.concatenate(predicted))


def control_features(frequencies: np.ndarray, chosen: tuple[int, ...], seed: int, pool: int = 20) -> tuple[int, ...]:
    """As many random features as `chosen`, each drawn among the `pool` features nearest to one
    chosen feature in frequency (never a chosen one, never twice): a control for 'any features
    that fire this often'."""
    rng = np.random.default_rng(seed)
    by_frequency = np.argsort(frequencies, kind="stable")
    rank = np.empty_like(by_frequency)
    rank[by_frequency] = np.arange(len(by_frequency))
    taken = set(chosen)
    out = []
    for feature in chosen:
        r = rank[feature]
        window = by_frequency[max(0, r - pool): r + pool + 1]
        options = [int(f) for f in window if int(f) not in taken]
        if not options:
            options = [int(f) for f in by_frequency if int(f) not in taken]
        pick = options[rng.integers(len(options))]
        taken.add(pick)
        out.append(pick)
    return tuple(out)

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

from workers.adapters import Batch, RewardModelAdapter
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
def linear_decoder(sae, rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """The decoder's rows (`rows`: decoder_directions, when the caller has them) when
    decode(f) = decode(0) + f @ rows (any SAE without a run-time output normalisation),
    checked on random sparse codes; None when it is not."""
    rows = decoder_directions(sae) if rows is None else rows
    ref = sae.W_dec
    generator = torch.Generator().manual_seed(0)
    codes = torch.rand(8, sae.cfg.d_sae, generator=generator) * (torch.rand(8, sae.cfg.d_sae, generator=generator) < 0.05)
    codes = (codes * 4).to(device=ref.device, dtype=ref.dtype)
    base = sae.decode(torch.zeros_like(codes[:1]))
    expected = sae.decode(codes) - base
    error = (expected - codes @ rows).abs().max()
    return rows if float(error) <= 1e-4 * max(float(expected.abs().max()), 1.0) else None


@torch.no_grad()
def edit_hidden(sae, hidden: torch.Tensor, edit: FeatureEdit, directions: torch.Tensor | None = None,
                linear: bool = False):
    """(new hidden, features before, features after) for hidden states [..., d_in].

    `directions`: the decoder rows (decoder_directions); with `linear` (see linear_decoder),
    zero and clamp apply the change as (after - before) x the chosen rows, instead of decoding
    every feature twice."""
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
        if linear and directions is not None:
            new = h + (after[..., index] - before[..., index]) @ directions[index]
        else:
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


# Keep at most this much of the edited layer's clean output per evaluation set; batches past it
# run the whole model under each edit instead.
HIDDEN_CACHE_BYTES = 1 << 30


@dataclass
class EvalBatch:
    """One batch of evaluation texts, run once unedited: its clean scores and, when kept, the
    edited layer's clean output, from which every edit needs only the blocks above it."""
    indices: np.ndarray  # which texts of the set
    batch: Batch
    clean: torch.Tensor  # [R] scores of its reward reads
    hidden: torch.Tensor | None  # [B, T, d] the layer's output; None: not kept


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
                     keep_bytes: int = HIDDEN_CACHE_BYTES, progress: Callable[[float], None] | None = None) -> EvalSet:
    """Score `texts` unedited in length-bucketed batches, keeping `layer`'s output while it fits."""
    lengths = token_lengths(adapter.tokenizer, texts, adapter.max_length)
    batches, kept, done = [], 0, 0
    for indices in length_bucketed_batches(lengths, batch_size, None):
        if progress:
            progress(done / len(texts))
        done += len(indices)
        batch = adapter.tokenize([texts[i] for i in indices])
        clean, captured = adapter.run(batch, capture=[layer])
        hidden = captured[layer]
        size = hidden.numel() * hidden.element_size()
        keep = kept + size <= keep_bytes
        kept += size if keep else 0
        batches.append(EvalBatch(np.asarray(indices), batch, clean.float(), hidden if keep else None))
    return EvalSet(layer, len(texts), batches)


@torch.no_grad()
def run_ablation(adapter: RewardModelAdapter, sae, layer: int, texts: list[str] | EvalSet, edit: FeatureEdit,
                 weights: np.ndarray, pooling: str, batch_size: int = 64,
                 progress: Callable[[float], None] | None = None,
                 directions: torch.Tensor | None = None, linear: bool = False) -> AblationResult:
    """Reward of every text's reward reads without and with `edit` at `layer`.

    `texts` may be an EvalSet prepared earlier for this layer (its clean pass is then reused:
    the edit runs only the blocks above the layer). `directions`, `linear`: as edit_hidden."""
    evalset = texts if isinstance(texts, EvalSet) else prepare_eval_set(adapter, layer, texts, batch_size)
    if evalset.layer != layer:
        raise ValueError(f"the evaluation set was prepared at layer {evalset.layer}, not {layer}")
    special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=adapter.device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=adapter.device)
    if edit.mode == "steer" and directions is None:
        directions = decoder_directions(sae)
    # zero / clamp change only the chosen features, so only their columns enter the prediction
    changed = None if edit.mode == "steer" else torch.tensor(edit.features, device=adapter.device)
    text_index, after, predicted = [], [], []
    done = 0
    for item in evalset.batches:
        batch = item.batch
        keep = batch.attention_mask.bool()
        flat_index = keep.flatten().cumsum(0).reshape(keep.shape) - 1
        read_rows = flat_index[batch.reward_index[:, 0], batch.reward_index[:, 1]]
        token_ids = batch.input_ids[keep]
        pool_args = (batch.token_segment[keep], ~torch.isin(token_ids, special_ids), read_rows, batch.n_reads, pooling)
        pooled_change = {}

        def hook(hidden: torch.Tensor) -> torch.Tensor:
            new, f_before, f_after = edit_hidden(sae, hidden, edit, directions, linear)
            # the regression's view of the change: pooled features per reward read, as in analysis
            cols = slice(None) if changed is None else changed
            pooled_change["delta"] = (pool_reads(f_after[..., cols][keep].float(), *pool_args)
                                      - pool_reads(f_before[..., cols][keep].float(), *pool_args))
            return torch.where(keep.unsqueeze(-1), new, hidden)

        if item.hidden is not None:
            edited = adapter.run_from(batch, layer, hook(item.hidden))
        else:
            edited, _ = adapter.run(batch, edits={layer: hook})
        after.append(edited.float().cpu().numpy())
        predicted.append((pooled_change["delta"] @ (w if changed is None else w[changed])).cpu().numpy())
        text_index.append(item.indices[batch.reward_index[:, 0].cpu().numpy()])
        done += len(item.indices)
        if progress:
            progress(done / evalset.n_texts)
    return AblationResult(np.concatenate(text_index), evalset.clean, np.concatenate(after), np.concatenate(predicted))


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

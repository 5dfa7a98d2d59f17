"""Measured single-feature effects: each candidate feature zeroed alone on the text's own tokens
(special tokens left as they are: workers/sae_ops.py SCOPES), SAE spliced in with its
reconstruction error kept, on a sample of held-out texts where it fires.

The candidates are a layer's top features by |attribution| and by |weight| (interleaved, so
both predictions get measured). Every (feature, text) pair is one row of a batched forward
through the blocks above the layer only (the texts' clean output and gradient are kept), so
a layer's 100 x 64 edits cost about as much as scoring 6,400 texts with the upper blocks.

Per feature: the mean change of the score with a 95% CI and n, and beside it what the two
predictions say for the same reads: the regression (-weight x the pooled activation) and the
attribution (-activation x d(score)/d(activation), summed over the read's tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import stats

from workers import distributed
from workers.ablation import EvalSet, per_read
from workers.controls import mean_with_ci
from workers.sae_ops import content_tokens, edited_tokens, pool_reads

ROWS_PER_FORWARD = 64


def candidate_features(attribution_abs: np.ndarray, weight: np.ndarray, frequency: np.ndarray, n: int) -> np.ndarray:
    """Up to n live features: the top by mean |attribution| and by |weight|, taken in turns."""
    live = np.asarray(frequency) > 0
    orders = []
    for key in (attribution_abs, weight):
        key = np.abs(np.asarray(key, dtype=np.float64))
        ok = live & np.isfinite(key) & (key > 0)
        ids = np.flatnonzero(ok)
        orders.append(ids[np.argsort(-key[ok], kind="stable")])
    chosen: dict[int, None] = {}
    for pair in zip(*(np.pad(o, (0, max(map(len, orders)) - len(o)), constant_values=-1) for o in orders)):
        for f in pair:
            if f >= 0 and len(chosen) < n:
                chosen.setdefault(int(f))
    return np.array(list(chosen), dtype=np.int64)


@dataclass
class _BatchScan:
    """One evaluation batch seen through the candidates: which texts each fires on, and per
    reward read the candidates' pooled activation (regression input) and contribution."""
    acts: torch.Tensor  # [B, T, C] the candidates' activations (0 on padding)
    fires: np.ndarray  # [B, C]
    pooled: torch.Tensor  # [R, C]
    contribution: torch.Tensor  # [R, C]


def _scan(item, sae, candidates: torch.Tensor, directions: torch.Tensor, special_ids, pooling: str,
          scope: str) -> _BatchScan:
    batch, keep = item.batch, item.batch.attention_mask.bool()
    # the candidates' activations where an edit applies (0 elsewhere): removing them is the edit
    acts = item.encoded(sae)[..., candidates] * edited_tokens(batch, special_ids, scope).unsqueeze(-1)
    flat_index = keep.flatten().cumsum(0).reshape(keep.shape) - 1
    read_rows = flat_index[batch.reward_index[:, 0], batch.reward_index[:, 1]]
    segment = batch.token_segment[keep]
    content = content_tokens(batch, special_ids)[keep]
    pooled = pool_reads(acts[keep], segment, content, read_rows, batch.n_reads, pooling)
    per_unit = item.grad[keep].float() @ directions[candidates].T  # d score / d activation
    contrib = acts[keep] * per_unit
    contribution = torch.stack([per_read(contrib[:, c], segment, batch.n_reads) for c in range(len(candidates))], 1) \
        if len(candidates) else torch.zeros(batch.n_reads, 0)
    return _BatchScan(acts, (acts > 0).any(1).cpu().numpy(), pooled, contribution)


@torch.no_grad()
def measure_single_features(adapter, sae, layer: int, evalset: EvalSet, candidates: np.ndarray, weights: np.ndarray,
                            pooling: str, directions: torch.Tensor, texts_per_feature: int, seed: int = 0,
                            progress: Callable[[float], None] | None = None,
                            scope: str = "text") -> dict[str, np.ndarray]:
    """Columns over `candidates`: measured_delta, its CI (low, high), n (reads), and the mean
    predicted change by regression and by attribution over the same reads; each feature is
    zeroed at the tokens `scope` names, on texts where it fires there. `evalset` must hold its
    batches' hidden states and gradients (prepare_eval_set(with_gradients=True)). Over several ranks
    (workers/distributed.py) each measures its share of the pairs and rank 0 gets the columns;
    the others get {}."""
    if any(item.hidden is None or item.grad is None for item in evalset.batches):
        raise ValueError("the measurement set must keep each batch's layer output and gradient")
    device = adapter.device
    cand = torch.as_tensor(candidates, dtype=torch.long, device=device)
    special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)[cand]
    scans = [_scan(item, sae, cand, directions, special_ids, pooling, scope) for item in evalset.batches]

    # each candidate's sample: up to texts_per_feature (batch, row) pairs where it fires
    rng = np.random.default_rng(seed)
    pairs: dict[int, list[tuple[int, int]]] = {}  # batch index -> [(row, candidate index)]
    for c in range(len(candidates)):
        where = [(i, int(b)) for i, scan in enumerate(scans) for b in np.flatnonzero(scan.fires[:, c])]
        for k in rng.permutation(len(where))[:texts_per_feature]:
            i, b = where[k]
            pairs.setdefault(i, []).append((b, c))

    # chunks of ROWS_PER_FORWARD pairs, round-robin over the ranks: each chunk is the same forward
    # on any number of ranks, so its numbers are too
    chunks = [(i, todo[start:start + ROWS_PER_FORWARD]) for i, todo in pairs.items()
              for start in range(0, len(todo), ROWS_PER_FORWARD)]
    ranks = distributed.current()
    mine = [n for n in range(len(chunks)) if ranks.mine(n)]
    total, done = sum(len(chunks[n][1]) for n in mine), 0
    measured: dict[int, list[tuple]] = {}  # chunk -> (candidate index, Δ, regression's, attribution's) per pair
    for n in mine:
        i, chunk = chunks[n]
        item, scan = evalset.batches[i], scans[i]
        rows = torch.tensor([b for b, _ in chunk], device=device)
        cols = torch.tensor([c for _, c in chunk], device=device)
        # zeroing feature f moves the output by -a_f x d_f (reconstruction error kept)
        removed = scan.acts[rows, :, cols].unsqueeze(-1) * directions[cand[cols]].unsqueeze(1)
        hidden = (item.hidden[rows].float() - removed).to(item.hidden.dtype)
        edited = adapter.run_from(item.batch.select(rows), layer, hidden).float()
        reads = item.batch.reads_of(rows)
        clean = item.clean.float()
        offset, measured[n] = 0, []
        for (b, c), read_ids in zip(chunk, reads):
            after = edited[offset:offset + len(read_ids)]
            offset += len(read_ids)
            measured[n].append((c, (after - clean[read_ids]).cpu().numpy(),
                                (-w[c] * scan.pooled[read_ids, c]).cpu().numpy(),
                                (-scan.contribution[read_ids, c]).cpu().numpy()))
        done += len(chunk)
        if progress:
            progress(done / max(total, 1))
    shares = ranks.gather(measured)
    if shares is None:  # rank 0 has every rank's share
        return {}
    everything = {n: rows for share in shares for n, rows in share.items()}
    deltas: list[list[np.ndarray]] = [[] for _ in candidates]
    regression: list[list[np.ndarray]] = [[] for _ in candidates]
    attribution: list[list[np.ndarray]] = [[] for _ in candidates]
    for n in sorted(everything):  # in chunk order, as one process appends them
        for c, delta, by_regression, by_attribution in everything[n]:
            deltas[c].append(delta)
            regression[c].append(by_regression)
            attribution[c].append(by_attribution)
    return _columns(deltas, regression, attribution)


def _columns(deltas, regression, attribution) -> dict[str, np.ndarray]:
    n = len(deltas)
    out = {name: np.full(n, np.nan) for name in ("measured_delta", "measured_delta_low", "measured_delta_high",
                                                 "predicted_delta_regression", "predicted_delta_attribution")}
    out["measured_n"] = np.zeros(n, dtype=np.int64)
    for c in range(n):
        if not deltas[c]:
            continue
        d = np.concatenate(deltas[c])
        ci = mean_with_ci(d)
        out["measured_delta"][c] = ci["mean_delta"]
        out["measured_delta_low"][c] = np.nan if ci["ci_low"] is None else ci["ci_low"]
        out["measured_delta_high"][c] = np.nan if ci["ci_high"] is None else ci["ci_high"]
        out["measured_n"][c] = len(d)
        out["predicted_delta_regression"][c] = float(np.concatenate(regression[c]).mean())
        out["predicted_delta_attribution"][c] = float(np.concatenate(attribution[c]).mean())
    return out


def calibration(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float | None]:
    """How well a prediction of single-feature changes matches the measured ones: the slope of
    measured on predicted (1: calibrated; 0.1: predictions 10x too large) and Pearson r."""
    predicted, measured = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    ok = np.isfinite(predicted) & np.isfinite(measured)
    if ok.sum() < 3 or np.ptp(predicted[ok]) == 0 or np.ptp(measured[ok]) == 0:
        return {"slope": None, "r": None, "n": int(ok.sum())}
    fit = stats.linregress(predicted[ok], measured[ok])
    return {"slope": float(fit.slope), "r": float(fit.rvalue), "n": int(ok.sum())}

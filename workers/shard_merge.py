"""The analysis pass's shards merged into the whole corpus's, on rank 0.

Each rank analysed every N-th batch (workers/analyze.py). Per layer, what adds up is reduced
with all_reduce (counts, sums, histograms once every rank's ranges are the same power of two,
regression sums, attribution sums, reconstruction sums; max for maxima and ranges); what is a
selection goes to rank 0 as candidates and is selected again there (top-k and sampled contexts
by (key, sequence number), the texts each feature fires on most by (value, text id), per-token
sums); per-batch rows (scores, reads, pooled features) go to rank 0 and are put back in batch
order. Counts, selections and rows come out exactly as one process makes them; sums of floats
to rounding (they are added in another order).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from workers.distributed import Ranks
from workers.feature_stream import MAX_TOKEN_PAIRS, PRUNE_KEEP_FACTOR, FeatureAccumulator, Reservoir, keep_smallest


@dataclass
class AnalysisShard:
    """One rank's per-batch rows, in the order of its batches (merged: the whole corpus's)."""
    batches: list[int]
    scores: list[torch.Tensor]
    read_texts: list[torch.Tensor]
    read_positions: list[torch.Tensor]
    lengths: list[torch.Tensor]
    n_effect_texts: int
    response_spans: np.ndarray | None  # [n_texts, 2], -1 where the text is another rank's (or has none)


def merge_analysis(ranks: Ranks, layers: dict, shard: AnalysisShard) -> AnalysisShard | None:
    """The whole corpus's per-batch rows on rank 0, as one shard in batch order (None on the
    others); each layer's results are merged in place."""
    pooled = {layer: (res.pooled, res.pooled_raw) for layer, res in layers.items()}
    for res in layers.values():
        merge_layer(ranks, res)
    n_effect_texts = ranks.sum_number(shard.n_effect_texts)
    shards = ranks.gather((shard, pooled))
    if not ranks.leader:
        return None
    by_batch = {}  # batch number -> (its rows, per layer its pooled rows)
    for rank_shard, rank_pooled in shards:
        local_offsets = np.concatenate([[0], np.cumsum([len(s) for s in rank_shard.scores])])
        for j, b in enumerate(rank_shard.batches):
            rows = (rank_shard.scores[j], rank_shard.read_texts[j], rank_shard.read_positions[j], rank_shard.lengths[j])
            per_layer = {layer: (_batch_pooled(p, j, int(local_offsets[j])), raw[j])
                         for layer, (p, raw) in rank_pooled.items()}
            by_batch[b] = (rows, per_layer)
    order = sorted(by_batch)
    scores = [by_batch[b][0][0] for b in order]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in scores])])
    for layer, res in layers.items():
        res.pooled = {"rows": [], "cols": [], "vals": []}
        res.pooled_raw = []
        for i, b in enumerate(order):
            (rows, cols, vals), raw = by_batch[b][1][layer]
            res.pooled["rows"].append((rows + int(offsets[i])).int())
            res.pooled["cols"].append(cols)
            res.pooled["vals"].append(vals)
            res.pooled_raw.append(raw)
    return AnalysisShard(
        batches=order,
        scores=scores,
        read_texts=[by_batch[b][0][1] for b in order],
        read_positions=[by_batch[b][0][2] for b in order],
        lengths=[by_batch[b][0][3] for b in order],
        n_effect_texts=n_effect_texts,
        response_spans=None if shard.response_spans is None else np.maximum.reduce([s.response_spans for s, _ in shards]),
    )


def _batch_pooled(pooled: dict, j: int, local_offset: int):
    """The j-th batch's pooled entries, its rows counted from the batch's first read."""
    return pooled["rows"][j] - local_offset, pooled["cols"][j], pooled["vals"][j]


def merge_layer(ranks: Ranks, res) -> None:
    """One layer's LayerActivations merged over the ranks (complete on rank 0)."""
    merge_features(ranks, res.features)
    merge_attribution(ranks, res.attribution)
    res.sse = ranks.sum_number(float(res.sse))
    res.sum_sq = ranks.sum_number(float(res.sum_sq))
    res.n_eval_tokens = ranks.sum_number(int(res.n_eval_tokens))
    res.firings = ranks.sum_number(int(res.firings))
    res.n_meant_tokens = ranks.sum_number(int(res.n_meant_tokens))
    parts = ranks.gather((None if res.sum_x is None else res.sum_x.cpu(),
                          None if res.fired is None else res.fired.cpu(), res.sinks))
    if not ranks.leader:
        return
    sums = [s for s, _, _ in parts if s is not None]
    res.sum_x = torch.stack(sums).sum(0) if sums else None
    fired = [f for _, f, _ in parts if f is not None]
    res.fired = torch.stack(fired).any(0).to(res.features.device) if fired else None
    res.sinks = merge_sink_reports([s for _, _, s in parts])


def merge_sink_reports(reports: list):
    out = reports[0]
    for other in reports[1:]:
        out.count += other.count
        out.n_tokens += other.n_tokens
        out.positions = Counter(out.positions) + Counter(other.positions)
        out.tokens = Counter(out.tokens) + Counter(other.tokens)
        out.sink_norm_sum += other.sink_norm_sum
        out.other_norm_sum += other.other_norm_sum
        out.other_norm_max = max(out.other_norm_max, other.other_norm_max)
    return out


def merge_attribution(ranks: Ranks, acc) -> None:
    acc.n_texts = ranks.sum_number(int(acc.n_texts))
    for tensor in (acc.score_sums, acc.sum, acc.abs_sum, acc.score_product_sum):
        ranks.all_reduce(tensor)


def merge_features(ranks: Ranks, acc: FeatureAccumulator) -> None:
    """A FeatureAccumulator merged over the ranks (complete on rank 0)."""
    acc._compact_pairs()
    acc.ranked._merge()
    acc.n_tokens = ranks.sum_number(int(acc.n_tokens))
    acc.n_reads = ranks.sum_number(int(acc.n_reads))
    for tensor in (acc.count, acc.sum, acc.token_counts, acc.read_sums, acc.x_sum, acc.x_sq_sum, acc.xy_sum,
                   acc.effect_sum, acc.effect_count):
        ranks.all_reduce(tensor)
    ranks.all_reduce(acc.max, "max")
    # every rank's ranges widened to the largest (powers of two: old bins fall whole into new ones)
    acc.widen_to(ranks.all_reduce(acc.hi.clone(), "max"))
    ranks.all_reduce(acc.hist)
    parts = ranks.gather({"top": _entries(acc.top), "samples": _entries(acc.samples),
                          "pairs": (acc.pair_keys.cpu(), acc.pair_sums.cpu(), acc.pair_counts.cpu()),
                          "ranked": (acc.ranked.values.cpu(), acc.ranked.text_ids.cpu())})
    if not ranks.leader:
        return
    device = acc.device
    for name in ("top", "samples"):
        groups, keys = (torch.cat([p[name][i] for p in parts]).to(device) for i in (0, 1))
        payload = {field: torch.cat([p[name][2][field] for p in parts]).to(device) for field in parts[0][name][2]}
        getattr(acc, name).refill(groups, keys, payload)
    _merge_pairs(acc, [p["pairs"] for p in parts])
    others = parts[1:]
    if others:
        rows = torch.arange(acc.d_sae, device=device)
        acc.ranked.keep_top(rows, torch.cat([v for v, _ in (p["ranked"] for p in others)], 1).to(device),
                            torch.cat([t for _, t in (p["ranked"] for p in others)], 1).to(device))


def _entries(reservoir: Reservoir):
    groups, slots = reservoir.entries()
    return (groups.cpu(), reservoir.key[slots].cpu(),
            {name: values[slots].cpu() for name, values in reservoir.payload.items()})


def _merge_pairs(acc: FeatureAccumulator, parts: list[tuple]) -> None:
    """Per-token sums: added up per (feature, token); pruned as one process prunes them."""
    keys = torch.cat([k for k, _, _ in parts]).to(acc.device)
    sums = torch.cat([s for _, s, _ in parts]).to(acc.device)
    counts = torch.cat([c for _, _, c in parts]).to(acc.device)
    acc.pair_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    acc.pair_sums = torch.zeros_like(acc.pair_keys, dtype=torch.float64).index_add_(0, inverse, sums)
    acc.pair_counts = torch.zeros_like(acc.pair_keys).index_add_(0, inverse, counts)
    if len(acc.pair_keys) > MAX_TOKEN_PAIRS:
        kept, _ = keep_smallest(acc.pair_keys // acc.vocab_size, -acc.pair_sums,
                                PRUNE_KEEP_FACTOR * acc.config.top_tokens)
        kept = kept.sort().values
        acc.pair_keys, acc.pair_sums, acc.pair_counts = acc.pair_keys[kept], acc.pair_sums[kept], acc.pair_counts[kept]

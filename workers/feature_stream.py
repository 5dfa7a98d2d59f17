"""Per-feature statistics of one SAE, accumulated batch by batch in memory that does not grow
with the corpus: running counts/sums/max, range-doubling histograms, top-k contexts and
per-bin random samples (bottom-k reservoirs that merge exactly), per-token activation sums,
running sums for the correlation with the reward, the reward effect, and the texts each
feature fires on most (workers/ranked_texts.py).

Nothing here depends on the order the corpus is streamed in, so accumulators of disjoint shards
merge into exactly the accumulator of the whole (workers/shard_merge.py): every token has a
sequence number (its place in the single-process stream), ties between equal keys go to the
smaller one, a sample's random key is a hash of (seed, sequence number, feature) rather than a
draw from a stream, and a feature's range is the smallest power of two above its maximum.

Only the kept examples' context windows (token ids and the feature's activations) are
stored, never the corpus' tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.core.run_config import AnalysisConfig
from workers.ranked_texts import RankedTexts

# Beyond this many distinct (feature, token) pairs the per-token sums are pruned to each
# feature's largest sums (exact below it; ~24 bytes a pair).
MAX_TOKEN_PAIRS = 4_000_000
PRUNE_KEEP_FACTOR = 50  # pairs kept per feature on pruning, as a multiple of top_tokens
PENDING_PAIRS = 1_000_000  # (feature, token) entries buffered between aggregations
SEQ_BATCH_SHIFT = 32  # a token's sequence number: its batch's number << 32, plus its index in the batch


@dataclass
class TokenBatch:
    """The analysed (non-padding) tokens of one batch, flattened text by text."""

    token_ids: torch.Tensor  # [N] int64
    text_ids: torch.Tensor  # [N] int64 text id of each token
    positions: torch.Tensor  # [N] int64 index of the token inside its text
    text_lengths: torch.Tensor  # [N] int64 length of the token's text
    content: torch.Tensor | None = None  # [N] bool, False at special tokens ([CLS], [SEP], BOS); None: no such
    first_seq: int | None = None  # the first token's sequence number (None: right after the previous batch's)


def keep_smallest(groups: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the (at most) k entries with the smallest key in each group, and their rank
    inside the group. Ties keep the earlier entry (callers order entries by sequence number)."""
    order = torch.sort(keys, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    sorted_groups = groups[order]
    rank = torch.arange(len(order), device=keys.device) - torch.searchsorted(sorted_groups, sorted_groups)
    keep = rank < k
    return order[keep], rank[keep]


def power_of_two_above(values: torch.Tensor) -> torch.Tensor:
    """The smallest power of two strictly above each positive value (exact: from its exponent)."""
    _, exponent = torch.frexp(values.double())  # value = mantissa x 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent)


_HASH_PRIME = 2_147_483_647  # 2^31 - 1: products of two residues stay inside int64
_HASH_ROUNDS = ((48_271, 11), (69_621, 7), (16_807, 13))


def _mix(x: torch.Tensor, salt: int) -> torch.Tensor:
    for multiplier, shift in _HASH_ROUNDS:
        x = (x * multiplier + salt) % _HASH_PRIME
        x = x ^ (x >> shift)
    return x


def sample_keys(seed: int, seq: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Uniform keys in [0, 1) that depend only on (seed, token, feature): a bottom-k sample keyed
    by them is the same whichever process saw the token, and in whatever order."""
    x = (seq % _HASH_PRIME) * 65_537 + feature + (seq // _HASH_PRIME) * 257
    high = _mix(x % _HASH_PRIME, 1 + 2 * (seed % 1_000_003))
    low = _mix((x + high) % _HASH_PRIME, 2 + 2 * (seed % 1_000_003))
    return (high.double() * _HASH_PRIME + low.double()) / float(_HASH_PRIME) ** 2


class Reservoir:
    """k slots per group holding the entries with the smallest keys seen so far, each with a
    payload (activation, text, position, context window). With key = -activation it keeps the
    top-k; with uniform random keys it is a uniform sample without replacement (a bottom-k
    sketch), and two such samples merge into a uniform sample of the union."""

    def __init__(self, n_groups: int, k: int, window: int, device: torch.device):
        self.n_groups, self.k = n_groups, k
        n = n_groups * k
        self.key = torch.full((n,), torch.inf, dtype=torch.float64, device=device)
        self.payload = {
            "activation": torch.zeros(n, device=device),
            "text_id": torch.full((n,), -1, dtype=torch.int64, device=device),
            "position": torch.zeros(n, dtype=torch.int64, device=device),
            "tokens": torch.full((n, window), -1, dtype=torch.int32, device=device),  # -1: outside the text
            "acts": torch.zeros(n, window, device=device),
            "seq": torch.zeros(n, dtype=torch.int64, device=device),  # breaks ties between equal keys
        }

    def add(self, groups: torch.Tensor, keys: torch.Tensor, fetch) -> None:
        """Offer candidates (group, key); fetch(indices) builds the payload of those kept."""
        threshold = self.key.view(self.n_groups, self.k).amax(dim=1)  # inf while a slot is free
        cand = (keys < threshold[groups]).nonzero().squeeze(1)
        if len(cand) == 0:
            return
        old_slots = self._by_seq(self._filled_slots(torch.unique(groups[cand])))  # all came before cand
        n_old = len(old_slots)
        kept, _ = keep_smallest(torch.cat([old_slots // self.k, groups[cand]]),
                                torch.cat([self.key[old_slots], keys[cand]]), self.k)
        survives = torch.zeros(n_old, dtype=torch.bool, device=self.key.device)
        survives[kept[kept < n_old]] = True
        self.key[old_slots[~survives]] = torch.inf  # evicted: their slots are free again
        new = cand[kept[kept >= n_old] - n_old]
        self._place(groups[new], keys[new], fetch(new))

    def regroup(self, old_groups: torch.Tensor, new_group: torch.Tensor) -> None:
        """Merge the entries of old_groups[i] into group new_group[i] (all within the same
        groups: bins of one feature), keeping the k smallest keys of each."""
        slots = self._by_seq(self._filled_slots(old_groups))
        target = torch.full((self.n_groups,), -1, dtype=torch.int64, device=self.key.device)
        target[old_groups] = new_group
        groups, keys = target[slots // self.k], self.key[slots]
        payload = {name: values[slots] for name, values in self.payload.items()}
        self.key[slots] = torch.inf
        kept, _ = keep_smallest(groups, keys, self.k)
        self._place(groups[kept], keys[kept], {name: values[kept] for name, values in payload.items()})

    def _by_seq(self, slots: torch.Tensor) -> torch.Tensor:
        return slots[torch.sort(self.payload["seq"][slots], stable=True).indices]

    def _filled_slots(self, groups: torch.Tensor) -> torch.Tensor:
        slots = (groups.unsqueeze(1) * self.k + torch.arange(self.k, device=groups.device)).flatten()
        return slots[torch.isfinite(self.key[slots])]

    def _place(self, groups: torch.Tensor, keys: torch.Tensor, payload: dict[str, torch.Tensor]) -> None:
        """Write entries into free slots of their groups (callers made room for them)."""
        if len(groups) == 0:
            return
        order = torch.sort(groups, stable=True).indices
        groups = groups[order]
        touched = torch.unique(groups)
        free_rows, free_cols = (~torch.isfinite(self.key.view(self.n_groups, self.k)[touched])).nonzero(as_tuple=True)
        rank = torch.arange(len(groups), device=groups.device) - torch.searchsorted(groups, groups)
        first_free = torch.searchsorted(free_rows, torch.searchsorted(touched, groups))
        slots = touched[free_rows] * self.k + free_cols
        slots = slots[first_free + rank]
        self.key[slots] = keys[order]
        for name, values in self.payload.items():
            values[slots] = payload[name][order].to(values.dtype)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(group, slot) of every filled slot, ordered by group, then key, then sequence number."""
        filled = self._by_seq(torch.isfinite(self.key).nonzero().squeeze(1))
        kept, _ = keep_smallest(filled // self.k, self.key[filled], self.k)
        return filled[kept] // self.k, filled[kept]

    def refill(self, groups: torch.Tensor, keys: torch.Tensor, payload: dict[str, torch.Tensor]) -> None:
        """Empty the reservoir, then keep the k smallest (key, seq) of each group among the given
        entries: how shards' reservoirs merge (workers/shard_merge.py)."""
        order = torch.sort(payload["seq"], stable=True).indices
        groups, keys = groups[order], keys[order]
        payload = {name: values[order] for name, values in payload.items()}
        self.key.fill_(torch.inf)
        kept, _ = keep_smallest(groups, keys, self.k)
        self._place(groups[kept], keys[kept], {name: values[kept] for name, values in payload.items()})


class FeatureAccumulator:
    """Everything the store keeps about one SAE's features, updated one batch at a time."""

    def __init__(self, d_sae: int, vocab_size: int, config: AnalysisConfig, seed: int = 0,
                 device: torch.device | str = "cpu"):
        """State lives on `device` (the SAE's), so activations never leave it densely."""
        self.d_sae, self.vocab_size, self.config = d_sae, vocab_size, config
        self.device = device = torch.device(device)
        self.before, self.after = config.window_before, config.window_after
        window = self.before + self.after + 1
        i64, f64 = dict(dtype=torch.int64, device=device), dict(dtype=torch.float64, device=device)
        self.n_tokens = 0
        self.count = torch.zeros(d_sae, **i64)
        self.sum = torch.zeros(d_sae, **f64)
        self.max = torch.zeros(d_sae, device=device)
        # histogram and sample bins cover [0, hi); hi doubles whenever a value reaches it, so
        # it stays within (max, 2 max] and old bins merge exactly into the new ones
        self.hi = torch.zeros(d_sae, **f64)
        self.hist = torch.zeros(d_sae, config.histogram_bins, **i64)
        self.n_sample_bins = 2 * config.quantile_bins  # at least quantile_bins of them lie below max
        self.top = Reservoir(d_sae, config.n_contexts, window, device)
        self.samples = Reservoir(d_sae * self.n_sample_bins, config.quantile_examples, window, device)
        self.seed = seed
        self.token_counts = torch.zeros(vocab_size, **i64)
        self.pair_keys = torch.zeros(0, **i64)  # feature * vocab_size + token, sorted
        self.pair_sums = torch.zeros(0, **f64)
        self.pair_counts = torch.zeros(0, **i64)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0
        self.n_reads = 0
        self.read_sums = torch.zeros(2, **f64)  # sum y, sum y^2
        self.x_sum = torch.zeros(d_sae, **f64)
        self.x_sq_sum = torch.zeros(d_sae, **f64)
        self.xy_sum = torch.zeros(d_sae, **f64)
        self.effect_sum = torch.zeros(d_sae, **f64)
        self.effect_count = torch.zeros(d_sae, **i64)
        self.ranked = RankedTexts(d_sae, config.ranked_texts, device)  # the texts each fires on most

    # -- per batch -------------------------------------------------------------------------
    def add_tokens(self, acts: torch.Tensor, batch: TokenBatch) -> None:
        """acts: [N, d_sae] SAE activations of the batch's tokens (on this accumulator's device)."""
        acts = acts.float()
        first_seq = self.n_tokens if batch.first_seq is None else batch.first_seq
        self.n_tokens += len(acts)
        self.token_counts += torch.bincount(batch.token_ids, minlength=self.vocab_size)
        tok, feat = acts.nonzero(as_tuple=True)
        if len(tok) == 0:
            return
        vals = acts[tok, feat]
        self.count += torch.bincount(feat, minlength=self.d_sae)
        self.sum.index_add_(0, feat, vals.double())
        batch_max = torch.zeros(self.d_sae, device=self.device).scatter_reduce_(0, feat, vals, "amax")
        self.max = torch.maximum(self.max, batch_max)
        self._widen(batch_max.double())

        bins = self.hist.shape[1]
        hist_bin = (vals.double() / self.hi[feat] * bins).long().clamp_(0, bins - 1)
        self.hist.view(-1).index_add_(0, feat * bins + hist_bin, torch.ones_like(feat))

        seq = first_seq + tok
        fetch = self._window_fetcher(acts, batch, tok, feat, vals, seq)
        self.top.add(feat, -vals.double(), fetch)
        q = self.n_sample_bins
        sample_bin = (vals.double() / self.hi[feat] * q).long().clamp_(0, q - 1)
        self.samples.add(feat * q + sample_bin, sample_keys(self.seed, seq, feat), fetch)

        self.ranked.add(tok, feat, vals, batch.text_ids, batch.content)
        self.pending.append((feat * self.vocab_size + batch.token_ids[tok], vals.double()))
        self.n_pending += len(vals)
        if self.n_pending > max(len(self.pair_keys), PENDING_PAIRS):
            self._compact_pairs()

    def add_reads(self, pooled: torch.Tensor, scores: torch.Tensor) -> None:
        """pooled: [R, d_sae] features pooled per reward read; scores: [R] the RM's score."""
        x, y = pooled.to(self.device, torch.float64), scores.to(self.device, torch.float64)
        self.n_reads += len(y)
        self.read_sums += torch.stack([y.sum(), (y**2).sum()])
        self.x_sum += x.sum(0)
        self.x_sq_sum += (x**2).sum(0)
        self.xy_sum += y @ x

    def add_effects(self, acts: torch.Tensor, grads: torch.Tensor, directions: torch.Tensor) -> None:
        """grads: [N, d_in] d(score)/d(layer output) at each token; directions: [d_sae, d_in]
        the decoder rows. d(score)/d(feature f) at token n is grads[n] . directions[f]; its
        sum over the tokens where f fires is directions[f] . (sum of those tokens' grads), so
        one [d_sae, N] x [N, d_in] product does it without an [N, d_sae] intermediate."""
        fires = acts > 0
        grad_sums = fires.T.to(grads.dtype) @ grads
        self.effect_sum += (grad_sums * directions).sum(1, dtype=torch.float64)
        self.effect_count += fires.sum(0)

    # -- internals -------------------------------------------------------------------------
    def _widen(self, batch_max: torch.Tensor) -> None:
        """Keep every value strictly below hi, so no value sits on the top edge (a clamped top
        value would land in a different bin once bins merge)."""
        grow = (batch_max >= self.hi) & (batch_max > 0)
        if bool(grow.any()):
            self.widen_to(torch.where(grow, power_of_two_above(batch_max), self.hi))

    def widen_to(self, target: torch.Tensor) -> None:
        """Move every feature's range to `target` (hi times a power of two, or any power of two
        where hi is 0): bin b of the old range falls into bin b // factor of the new one."""
        fresh = (self.hi == 0) & (target > 0)
        self.hi[fresh] = target[fresh]
        rescale = target > self.hi
        if not bool(rescale.any()):
            return
        factor = torch.ones(self.d_sae, dtype=torch.int64, device=self.device)
        factor[rescale] = (target[rescale] / self.hi[rescale]).round().long()
        self.hi = target.clone()
        bins = self.hist.shape[1]
        new_bin = torch.arange(bins, device=self.device).unsqueeze(0) // factor.unsqueeze(1)  # bin b -> b // factor
        self.hist = torch.zeros_like(self.hist).scatter_add_(1, new_bin, self.hist)
        q = self.n_sample_bins
        features = rescale.nonzero().squeeze(1)
        old_groups = (features.unsqueeze(1) * q + torch.arange(q, device=self.device)).flatten()
        feature_of, bin_of = old_groups // q, old_groups % q
        self.samples.regroup(old_groups, feature_of * q + bin_of // factor[feature_of])

    def _window_fetcher(self, acts, batch: TokenBatch, tok, feat, vals, seq):
        offsets = torch.arange(-self.before, self.after + 1, device=self.device)

        def fetch(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            t, f = tok[idx], feat[idx]
            pos = batch.positions[t]
            inside = ((pos.unsqueeze(1) + offsets) >= 0) & ((pos.unsqueeze(1) + offsets) < batch.text_lengths[t].unsqueeze(1))
            flat = (t.unsqueeze(1) + offsets).clamp_(0, len(acts) - 1)  # a text's tokens are contiguous
            return {
                "activation": vals[idx],
                "text_id": batch.text_ids[t],
                "position": pos,
                "tokens": torch.where(inside, batch.token_ids[flat], -1),
                "acts": torch.where(inside, acts[flat, f.unsqueeze(1)], 0.0),
                "seq": seq[idx],
            }

        return fetch

    def _compact_pairs(self) -> None:
        if not self.pending:
            return
        keys = torch.cat([self.pair_keys, *(k for k, _ in self.pending)])
        sums = torch.cat([self.pair_sums, *(v for _, v in self.pending)])
        counts = torch.cat([self.pair_counts, torch.ones(self.n_pending, dtype=torch.int64, device=self.device)])
        self.pending, self.n_pending = [], 0
        self.pair_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        self.pair_sums = torch.zeros_like(self.pair_keys, dtype=torch.float64).index_add_(0, inverse, sums)
        self.pair_counts = torch.zeros_like(self.pair_keys).index_add_(0, inverse, counts)
        if len(self.pair_keys) > MAX_TOKEN_PAIRS:
            kept, _ = keep_smallest(self.pair_keys // self.vocab_size, -self.pair_sums,
                                    PRUNE_KEEP_FACTOR * self.config.top_tokens)
            kept = kept.sort().values
            self.pair_keys, self.pair_sums, self.pair_counts = (
                self.pair_keys[kept], self.pair_sums[kept], self.pair_counts[kept])

    # -- results ---------------------------------------------------------------------------
    def correlation(self) -> np.ndarray:
        """Pearson correlation of each feature's pooled activation with the reward (NaN where
        either is constant)."""
        n = self.n_reads
        sy, syy = self.read_sums.tolist()
        cov = n * self.xy_sum - self.x_sum * sy
        var_x = n * self.x_sq_sum - self.x_sum**2
        var_y = n * syy - sy**2
        denom = torch.sqrt(var_x.clamp(min=0) * max(var_y, 0.0))
        ok = denom > 1e-12 * (n * n)
        return torch.where(ok, cov / torch.where(ok, denom, 1.0), torch.nan).cpu().numpy()

    def reward_effect(self) -> np.ndarray:
        """Mean d(score)/d(feature) over the firing tokens of the gradient batches (NaN: none)."""
        c = self.effect_count.double()
        return torch.where(c > 0, self.effect_sum / c.clamp(min=1), torch.nan).cpu().numpy()

    def top_tokens(self) -> list[list[tuple[int, float, int]]]:
        """Per feature: (token id, mean activation over all the token's occurrences, firings),
        best first, among tokens seen at least top_token_min_count times."""
        self._compact_pairs()
        keys, sums, fired = self.pair_keys.cpu(), self.pair_sums.cpu(), self.pair_counts.cpu()
        features, tokens = keys // self.vocab_size, keys % self.vocab_size
        seen = self.token_counts.cpu()[tokens]
        eligible = (seen >= self.config.top_token_min_count).nonzero().squeeze(1)
        means = sums[eligible] / seen[eligible]
        kept, _ = keep_smallest(features[eligible], -means, self.config.top_tokens)
        out: list[list[tuple[int, float, int]]] = [[] for _ in range(self.d_sae)]
        rows = eligible[kept]
        for f, t, m, n in zip(features[rows].tolist(), tokens[rows].tolist(), means[kept].tolist(), fired[rows].tolist()):
            out[f].append((t, m, n))
        return out

    def histograms(self) -> list[tuple[list[float], list[int]]]:
        """Per feature: edges and counts, trailing empty bins dropped (the range is below 2 x max)."""
        hist, hi = self.hist.cpu(), self.hi.cpu().tolist()
        out = []
        for f, counts in enumerate(hist.tolist()):
            used = max((i + 1 for i, c in enumerate(counts) if c), default=0)
            width = hi[f] / len(counts)
            out.append(([i * width for i in range(used + 1)] if used else [], counts[:used]))
        return out

    def contexts(self, which: str) -> dict[str, np.ndarray]:
        """Columns of the kept examples, ordered by feature then rank. which: 'top' or 'quantile'."""
        reservoir = self.top if which == "top" else self.samples
        groups, slots = reservoir.entries()
        groups = groups.cpu()
        p = {name: values[slots].cpu().numpy() for name, values in reservoir.payload.items()}
        if which == "top":  # already by feature, then descending activation
            features, bins = groups.numpy(), np.full(len(groups), -1)
        else:
            q = self.n_sample_bins
            features, bins = (groups // q).numpy(), (groups % q).numpy()
            order = np.lexsort((p["activation"], bins, features))
            features, bins = features[order], bins[order]
            p = {name: values[order] for name, values in p.items()}
        rank = np.arange(len(features)) - np.searchsorted(features, features)
        width = self.hi.cpu().numpy()[features] / self.n_sample_bins
        return {"feature": features, "rank": rank, "bin": bins, "bin_low": bins * width,
                "bin_high": (bins + 1) * width, **p}

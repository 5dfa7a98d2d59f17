"""One pass over the corpus: RM scores, SAE features at every token of every chosen layer,
reconstruction metrics, and for EVERY feature streamed statistics (workers/feature_stream.py):
frequency, histogram, top and per-activation-bin contexts, top tokens, correlation with the
reward, the texts it fires on most (workers/ranked_texts.py), and from one backward per sampled
batch the effect per unit (d score / d feature along its decoder direction) and the attribution
(workers/attribution.py).

The gradient statistics are taken over the text's own tokens, leaving out special tokens
([CLS], [SEP], BOS), as token pooling does: at late layers an encoder's [CLS] already holds the
score, so its features would top every gradient ranking while saying nothing about which parts
of the text drive the reward. (Their effect is still measured: ablations edit every token.)"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from workers import distributed
from workers.adapters import RewardModelAdapter
from workers.attribution import AttributionAccumulator
from workers.batching import length_bucketed_batches, token_lengths
from backend.core.run_config import AnalysisConfig
from workers.feature_stream import SEQ_BATCH_SHIFT, FeatureAccumulator, TokenBatch
from workers.sae_ops import decoder_directions, pool_reads
from workers.shard_merge import AnalysisShard, merge_analysis
from workers.sinks import SinkReport, sink_rule_of


@dataclass
class LayerActivations:
    """One layer over the corpus: streamed per-feature statistics, features pooled per reward
    read (for the regression), and reconstruction metrics."""

    d_sae: int
    features: FeatureAccumulator
    attribution: AttributionAccumulator
    pooled: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"rows": [], "cols": [], "vals": []})
    pooled_raw: list[torch.Tensor] = field(default_factory=list)  # residual stream, pooled like the features
    sse: float = 0.0
    sum_sq: float = 0.0
    sum_x: torch.Tensor | None = None
    n_eval_tokens: int = 0
    sinks: SinkReport | None = None  # what the layer's sink rule left out (workers/sinks.py)
    # over every token the SAE is meant for (what analysis.tokens reads, less sinks): dead latents and L0
    fired: torch.Tensor | None = None
    firings: int = 0
    n_meant_tokens: int = 0

    def pooled_matrix(self, n_reads: int) -> sp.csr_matrix:
        """One row per reward read (in read order), one column per feature."""
        p = self.pooled
        data = (torch.cat(p["vals"]).numpy(), (torch.cat(p["rows"]).numpy(), torch.cat(p["cols"]).numpy()))
        return sp.csr_matrix(data, shape=(n_reads, self.d_sae), dtype=np.float32)

    def raw_matrix(self) -> np.ndarray:
        """The pooled raw residual stream [n_reads, d_model]: the linear-probe baseline's input."""
        return torch.cat(self.pooled_raw).numpy()

    def metrics(self, n_tokens: int, d_in: int) -> dict[str, float]:
        n = max(self.n_eval_tokens, 1)
        total_var = self.sum_sq - float((self.sum_x**2).sum()) / n if self.sum_x is not None else 0.0
        return {
            "mse": self.sse / (n * d_in),
            "explained_variance": 1.0 - self.sse / total_var if total_var > 0 else 0.0,
            "l0": self.firings / max(self.n_meant_tokens, 1),  # firings per token the SAE is meant for
        }


@dataclass
class CorpusActivations:
    """Texts are processed in length order (less padding); a text's "slot" is its place in
    that order, and text_offsets follow slots. Reward reads (one per text, or one per step
    for a process RM) are numbered in processing order."""

    read_text_ids: np.ndarray  # text id of each reward read
    read_positions: np.ndarray  # token index of each read inside its text
    scores: np.ndarray  # the RM's score at each read
    slot_text_ids: np.ndarray  # text id at each slot
    text_offsets: np.ndarray  # [n_texts + 1] start of each slot's tokens among all analysed tokens
    layers: dict[int, LayerActivations]
    n_effect_texts: int = 0  # texts whose reward gradient went into the reward effect
    # [n_texts, 2] by text id: a chat text's response as [first, last + 1) token indices; -1: none
    response_spans: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.text_offsets[-1])

    @property
    def n_reads(self) -> int:
        return len(self.scores)

    def last_read_per_text(self) -> np.ndarray:
        """Index of each text's last reward read (its final score), by text id."""
        out = np.full(len(self.slot_text_ids), -1, dtype=np.int64)
        out[self.read_text_ids] = np.arange(self.n_reads)  # later reads overwrite earlier ones
        return out

    def tokens_per_text(self) -> np.ndarray:
        out = np.empty(len(self.slot_text_ids), dtype=np.int64)
        out[self.slot_text_ids] = np.diff(self.text_offsets)
        return out


def effect_batches(batches: list[np.ndarray], n_texts: int, seed: int) -> set[int]:
    """Random batches holding about n_texts texts: their reward gradients give the reward
    effect (batches are length buckets, so every length is represented)."""
    chosen, total = set(), 0
    for i in np.random.default_rng(seed).permutation(len(batches)):
        if total >= n_texts:
            break
        chosen.add(int(i))
        total += len(batches[i])
    return chosen


def forward_with_gradients(adapter: RewardModelAdapter, batch, layers: list[int]):
    """One forward and one backward for all `layers`: (scores, hidden states, d(sum of the
    batch's scores)/d(hidden state)). The earliest layer's output becomes a leaf, so nothing
    upstream of it is differentiated."""
    hidden: dict[int, torch.Tensor] = {}
    first = min(layers)

    def make_hook(layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if layer == first:
                h = h.detach().requires_grad_()
            hidden[layer] = h
            if layer == first:
                return (h, *output[1:]) if isinstance(output, tuple) else h
            return None

        return hook

    handles = [adapter.blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        with torch.enable_grad():
            scores = adapter.score(batch)
            grads = torch.autograd.grad(scores.sum(), [hidden[layer] for layer in layers], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    grads = {layer: torch.zeros_like(hidden[layer]) if g is None else g for layer, g in zip(layers, grads)}
    return scores.detach(), {layer: h.detach() for layer, h in hidden.items()}, grads


@torch.no_grad()
def collect_corpus_activations(
    adapter: RewardModelAdapter,
    saes: dict,
    texts: list[str],
    heldout: np.ndarray,
    batch_size: int,
    pooling: str,
    rewards: np.ndarray | None = None,
    analysis: AnalysisConfig | None = None,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
) -> CorpusActivations | None:
    """One pass over the corpus. Memory holds per-feature accumulators and one row per reward
    read, never per-token activations or the corpus' tokens. `progress` hears the share done
    before every batch (and may raise to stop the pass)."""
    analysis = analysis or AnalysisConfig()
    layers = sorted(saes)
    vocab_size = len(adapter.tokenizer)
    results = {
        layer: LayerActivations(
            d_sae=saes[layer].cfg.d_sae,
            features=FeatureAccumulator(saes[layer].cfg.d_sae, vocab_size, analysis, seed + layer, adapter.device),
            attribution=AttributionAccumulator(saes[layer].cfg.d_sae, adapter.device),
            sinks=SinkReport(sink_rule_of(saes[layer])))
        for layer in layers
    }
    lengths, scores, read_texts, read_positions = [], [], [], []
    special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids))
    batches = length_bucketed_batches(token_lengths(adapter.tokenizer, texts, adapter.max_length), batch_size, None)
    with_gradient = effect_batches(batches, analysis.reward_effect_texts, seed) if adapter_has_gradient(adapter) else set()
    directions = {layer: decoder_directions(saes[layer]) for layer in layers} if with_gradient else {}
    n_reads = n_effect_texts = 0
    response_spans = np.full((len(texts), 2), -1, dtype=np.int64)
    ranks = distributed.current()
    own: list[int] = []  # this rank's batches (all of them in one process): round-robin
    ranks.fail_if_told("the analysis pass")
    for batch_no, indices in enumerate(tqdm(batches, desc="analysing")):
        if progress is not None:
            progress(batch_no / len(batches))
        if not ranks.mine(batch_no):
            continue
        own.append(batch_no)
        batch = adapter.tokenize([texts[i] for i in indices], None if rewards is None else rewards[indices])
        if batch_no in with_gradient:
            batch_scores, captured, grads = forward_with_gradients(adapter, batch, layers)
            n_effect_texts += len(indices)
        else:
            (batch_scores, captured), grads = adapter.run(batch, capture=layers), None
        keep = batch.attention_mask.bool().cpu()
        flat_index = keep.flatten().cumsum(0).reshape(keep.shape) - 1  # position among kept tokens
        read_seq, read_pos = batch.reward_index.cpu().unbind(1)
        read_rows = flat_index[read_seq, read_pos]
        segment = batch.token_segment.cpu()[keep]
        text_of_token = torch.arange(len(indices)).unsqueeze(1).expand_as(keep)[keep]
        token_ids = batch.input_ids.cpu()[keep]
        content = ~torch.isin(token_ids, special_ids)
        in_scope = None if batch.scope is None else batch.scope.cpu()[keep]  # a chat run's response tokens
        if in_scope is not None:
            content &= in_scope
            mark_response_spans(response_spans, indices, batch.scope.cpu() & keep, keep)
        text_lengths = keep.sum(1)
        positions = (keep.cumsum(1) - 1)[keep]  # index inside the text, whichever side is padded
        dev = adapter.device
        content_dev, text_of_token_dev = content.to(dev), text_of_token.to(dev)
        tokens = TokenBatch(
            token_ids=token_ids.to(dev),
            text_ids=torch.from_numpy(indices)[text_of_token].to(dev),
            positions=positions.to(dev),
            text_lengths=text_lengths[text_of_token].to(dev),
            content=content_dev,
            first_seq=batch_no << SEQ_BATCH_SHIFT,  # the same on any number of ranks
        )
        eval_tokens = torch.from_numpy(heldout[indices])[text_of_token].to(adapter.device)
        batch_scores = batch_scores.float().cpu()
        scores.append(batch_scores)
        read_texts.append(torch.from_numpy(indices)[read_seq])
        read_positions.append((keep.cumsum(1) - 1)[read_seq, read_pos])  # inside the text, as with tokens
        lengths.append(text_lengths)
        keep_dev = keep.to(adapter.device)
        if grads is not None:  # a text's score: the sum of its reads' (one read for most RMs)
            text_scores = torch.zeros(len(indices)).index_add_(0, read_seq, batch_scores)
        for layer in layers:
            res, sae = results[layer], saes[layer]
            x = captured[layer][keep_dev].float()
            acts = sae.encode(x)  # no features at the layer's sinks (workers/sinks.py)
            kept = res.sinks.rule.kept(x)
            meant = kept if in_scope is None else kept & in_scope.to(dev)  # what the SAE was trained on
            fired = (acts[meant] > 0)
            res.fired = fired.any(0) if res.fired is None else res.fired | fired.any(0)
            res.firings += int(fired.sum())
            res.n_meant_tokens += int(meant.sum())
            res.sinks.add(x.norm(dim=-1).cpu(), ~kept.cpu(), positions, token_ids)
            pool_args = (segment.to(dev), content_dev & kept, read_rows.to(dev), batch.n_reads, pooling)
            # reconstruction measured on the tokens the SAE is meant for: not the sinks, not a chat prompt
            x_eval = x[eval_tokens & meant]
            recon_err = sae.decode(acts[eval_tokens & meant]) - x_eval
            res.sse += float((recon_err**2).sum())
            res.sum_sq += float((x_eval**2).sum())
            res.sum_x = x_eval.sum(0).cpu() if res.sum_x is None else res.sum_x + x_eval.sum(0).cpu()
            res.n_eval_tokens += len(x_eval)
            if grads is not None:  # through the text's own tokens only, as token pooling reads them
                text_acts, token_grads = acts[content_dev], grads[layer][keep_dev][content_dev].float()
                res.features.add_effects(text_acts, token_grads, directions[layer])
                res.attribution.add(text_acts, token_grads, directions[layer], text_of_token_dev[content_dev],
                                    text_scores)
            acts = acts.float()  # stays on the device: only per-read rows and kept examples leave it
            res.features.add_tokens(acts if in_scope is None else acts * in_scope.to(dev).unsqueeze(1), tokens)
            res.pooled_raw.append(pool_reads(x, *pool_args).cpu())
            pooled = pool_reads(acts, *pool_args).cpu()
            res.features.add_reads(pooled, batch_scores)
            rows, cols = pooled.nonzero(as_tuple=True)
            res.pooled["rows"].append((rows + n_reads).int())
            res.pooled["cols"].append(cols.int())
            res.pooled["vals"].append(pooled[rows, cols])
        n_reads += batch.n_reads
    rows = AnalysisShard(own, scores, read_texts, read_positions, lengths, n_effect_texts,
                         response_spans if adapter.response_markers is not None else None)
    if ranks.active:  # rank 0 gets the whole corpus's rows (in batch order), the others None
        rows = merge_analysis(ranks, results, rows)
        if rows is None:
            return None
    return CorpusActivations(
        read_text_ids=torch.cat(rows.read_texts).numpy(),
        read_positions=torch.cat(rows.read_positions).numpy(),
        scores=torch.cat(rows.scores).numpy().astype(np.float64),
        slot_text_ids=np.concatenate([batches[b] for b in rows.batches]),
        text_offsets=np.concatenate([[0], np.cumsum(torch.cat(rows.lengths).numpy())]),
        layers=results,
        n_effect_texts=rows.n_effect_texts,
        response_spans=rows.response_spans,
    )


def mark_response_spans(out: np.ndarray, indices: np.ndarray, scope: torch.Tensor, keep: torch.Tensor) -> None:
    """Write each text's response as [first, last + 1) token indices inside the text into `out`
    (by text id): the role boundary contexts and text pages draw."""
    positions = keep.cumsum(1) - 1
    for row, text_id in enumerate(indices):
        inside = positions[row][scope[row]]
        if len(inside):
            out[text_id] = (int(inside.min()), int(inside.max()) + 1)


def adapter_has_gradient(adapter: RewardModelAdapter) -> bool:
    """A score computed from the text (a reward function) has no gradient through the model."""
    return getattr(adapter, "score_from_model", True)


def _none_if_nan(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _context_columns(layer: int, acc: FeatureAccumulator, kind: str, vocab: np.ndarray) -> dict[str, list]:
    c = acc.contexts(kind)
    inside = c["tokens"] >= 0  # a window's in-text tokens are contiguous
    first = inside.argmax(axis=1)
    n_inside = inside.sum(axis=1)
    splits = np.cumsum(n_inside)[:-1]
    quantile = kind == "quantile"
    return {
        "layer": [layer] * len(first),
        "feature": c["feature"].tolist(),
        "kind": [kind] * len(first),
        "rank": c["rank"].tolist(),
        "bin": c["bin"].tolist() if quantile else [None] * len(first),
        "bin_low": c["bin_low"].tolist() if quantile else [None] * len(first),
        "bin_high": c["bin_high"].tolist() if quantile else [None] * len(first),
        "text_id": c["text_id"].tolist(),
        "position": c["position"].tolist(),
        "activation": c["activation"].astype(np.float64).tolist(),
        "window_start": (c["position"] - acc.before + first).tolist(),
        "tokens": [t.tolist() for t in np.split(vocab[c["tokens"][inside]], splits)] if len(first) else [],
        "acts": list(np.split(c["acts"][inside].astype(np.float32), splits)) if len(first) else [],
    }


def attribution_columns(layer_acts: LayerActivations) -> dict[str, list]:
    """The attribution columns (workers/attribution.py); None for a feature that never fired on a
    text whose gradient was taken (it has no attribution, which 0 would misstate)."""
    seen = layer_acts.features.effect_count.cpu().numpy() > 0
    return {name: _none_if_nan(np.where(seen, values, np.nan))
            for name, values in layer_acts.attribution.results().items()}


def feature_tables(layer: int, layer_acts: LayerActivations, vocab: np.ndarray) -> tuple[dict, dict]:
    """Columns of the store's features and contexts tables (top and quantile contexts) for
    every feature of one layer."""
    acc = layer_acts.features
    count = acc.count.cpu().numpy()
    fired = count > 0
    top, quantile = (_context_columns(layer, acc, kind, vocab) for kind in ("top", "quantile"))
    contexts = {key: top[key] + quantile[key] for key in top}
    top_token = [None] * acc.d_sae
    for f, rank, tokens, position, start in zip(contexts["feature"], contexts["rank"], contexts["tokens"],
                                                contexts["position"], contexts["window_start"]):
        if rank == 0 and top_token[f] is None:  # top contexts come first: their rank 0 is the peak
            top_token[f] = tokens[position - start]
    histograms = acc.histograms()
    features = {
        "layer": [layer] * acc.d_sae,
        "feature": list(range(acc.d_sae)),
        "frequency": (count / max(acc.n_tokens, 1)).tolist(),
        "mean_activation": np.where(fired, acc.sum.cpu().numpy() / np.maximum(count, 1), 0.0).tolist(),
        "max_activation": acc.max.cpu().numpy().astype(np.float64).tolist(),
        "top_token": top_token,
        "hist_edges": [edges for edges, _ in histograms],
        "hist_counts": [counts for _, counts in histograms],
        "reward_correlation": _none_if_nan(acc.correlation()),
        "reward_effect": _none_if_nan(acc.reward_effect()),
        **attribution_columns(layer_acts),
        "top_tokens": [[{"token": str(vocab[t]), "mean_activation": m, "count": n} for t, m, n in row]
                       for row in acc.top_tokens()],
    }
    return features, contexts

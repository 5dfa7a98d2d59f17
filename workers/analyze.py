"""One pass over the corpus: RM scores, SAE features at every token of every chosen layer,
reconstruction metrics, then per-feature statistics and top contexts for EVERY feature."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from workers.adapters import RewardModelAdapter
from workers.batching import length_bucketed_batches, token_lengths
from workers.config import AnalysisConfig


@dataclass
class LayerActivations:
    """Sparse SAE activations of one layer over every analysed token, plus recon metrics."""

    d_sae: int
    tokens: list[torch.Tensor] = field(default_factory=list)  # global token index per entry
    features: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    pooled: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"rows": [], "cols": [], "vals": []})
    pooled_raw: list[torch.Tensor] = field(default_factory=list)  # residual stream, pooled like the features
    sse: float = 0.0
    sum_sq: float = 0.0
    sum_x: torch.Tensor | None = None
    n_eval_tokens: int = 0
    n_active: int = 0

    def token_matrix(self, n_tokens: int) -> sp.csc_matrix:
        data = (torch.cat(self.values).numpy(), (torch.cat(self.tokens).numpy(), torch.cat(self.features).numpy()))
        return sp.csc_matrix(data, shape=(n_tokens, self.d_sae), dtype=np.float32)

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
            "l0": self.n_active / max(n_tokens, 1),
        }


@dataclass
class CorpusActivations:
    """Texts are processed in length order (less padding); a text's "slot" is its place in
    that order, and token_ids / text_offsets follow slots. Reward reads (one per text, or
    one per step for a process RM) are numbered in processing order."""

    read_text_ids: np.ndarray  # text id of each reward read
    read_positions: np.ndarray  # token index of each read inside its text
    scores: np.ndarray  # the RM's score at each read
    slot_text_ids: np.ndarray  # text id at each slot
    token_ids: np.ndarray  # all analysed tokens, slots concatenated
    text_offsets: np.ndarray  # [n_texts + 1] start of each slot in token_ids
    layers: dict[int, LayerActivations]

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


def _pool(acts, segment, content, read_rows, n_reads: int, how: str) -> torch.Tensor:
    """One feature row per reward read. Token pooling skips special tokens: at late layers a
    classifier's [CLS] already holds the score, which would hide the per-word features."""
    if how == "reward_token":
        return acts[read_rows]
    use = content & (segment >= 0)
    acts, segment = acts[use], segment[use]
    pooled = torch.zeros(n_reads, acts.shape[1], dtype=acts.dtype)
    if how == "max":
        return pooled.index_reduce_(0, segment, acts, "amax", include_self=True)
    pooled.index_add_(0, segment, acts)
    if how == "sum":
        return pooled
    return pooled / torch.bincount(segment, minlength=n_reads).clamp(min=1).unsqueeze(1)


@torch.no_grad()
def collect_corpus_activations(
    adapter: RewardModelAdapter,
    saes: dict,
    texts: list[str],
    heldout: np.ndarray,
    batch_size: int,
    pooling: str,
    rewards: np.ndarray | None = None,
) -> CorpusActivations:
    layers = sorted(saes)
    results = {layer: LayerActivations(d_sae=saes[layer].cfg.d_sae) for layer in layers}
    token_ids, lengths, scores, read_texts, read_positions = [], [], [], [], []
    special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids))
    batches = length_bucketed_batches(token_lengths(adapter.tokenizer, texts, adapter.max_length), batch_size, None)
    offset = n_reads = 0
    for indices in tqdm(batches, desc="analysing"):
        batch = adapter.tokenize([texts[i] for i in indices], None if rewards is None else rewards[indices])
        batch_scores, captured = adapter.run(batch, capture=layers)
        keep = batch.attention_mask.bool().cpu()
        flat_index = keep.flatten().cumsum(0).reshape(keep.shape) - 1  # position among kept tokens
        read_seq, read_pos = batch.reward_index.cpu().unbind(1)
        read_rows = flat_index[read_seq, read_pos]
        segment = batch.token_segment.cpu()[keep]
        text_of_token = torch.arange(len(indices)).unsqueeze(1).expand_as(keep)[keep]
        content = ~torch.isin(batch.input_ids.cpu()[keep], special_ids)
        eval_tokens = torch.from_numpy(heldout[indices])[text_of_token].to(adapter.device)
        scores.append(batch_scores.float().cpu())
        read_texts.append(torch.from_numpy(indices)[read_seq])
        read_positions.append((keep.cumsum(1) - 1)[read_seq, read_pos])  # inside the text, as with tokens
        token_ids.append(batch.input_ids.cpu()[keep])
        lengths.append(keep.sum(1))
        for layer in layers:
            res, sae = results[layer], saes[layer]
            x = captured[layer][keep.to(adapter.device)].float()
            acts = sae.encode(x)
            recon_err = (sae.decode(acts) - x)[eval_tokens]
            x_eval = x[eval_tokens]
            res.sse += float((recon_err**2).sum())
            res.sum_sq += float((x_eval**2).sum())
            res.sum_x = x_eval.sum(0).cpu() if res.sum_x is None else res.sum_x + x_eval.sum(0).cpu()
            res.n_eval_tokens += len(x_eval)
            acts = acts.cpu()
            tok, feat = acts.nonzero(as_tuple=True)
            res.tokens.append((tok + offset).int())
            res.features.append(feat.int())
            res.values.append(acts[tok, feat])
            res.n_active += len(tok)
            res.pooled_raw.append(_pool(x.cpu(), segment, content, read_rows, batch.n_reads, pooling))
            pooled = _pool(acts, segment, content, read_rows, batch.n_reads, pooling)
            rows, cols = pooled.nonzero(as_tuple=True)
            res.pooled["rows"].append((rows + n_reads).int())
            res.pooled["cols"].append(cols.int())
            res.pooled["vals"].append(pooled[rows, cols])
        offset += int(keep.sum())
        n_reads += batch.n_reads
    return CorpusActivations(
        read_text_ids=torch.cat(read_texts).numpy(),
        read_positions=torch.cat(read_positions).numpy(),
        scores=torch.cat(scores).numpy().astype(np.float64),
        slot_text_ids=np.concatenate(batches),
        token_ids=torch.cat(token_ids).numpy(),
        text_offsets=np.concatenate([[0], np.cumsum(torch.cat(lengths).numpy())]),
        layers=results,
    )


def feature_tables(
    layer: int, matrix: sp.csc_matrix, corpus: CorpusActivations, vocab: np.ndarray, config: AnalysisConfig
) -> tuple[dict, dict]:
    """Per-feature stats + histogram, and top contexts with per-token activations."""
    n_tokens, d_sae = matrix.shape
    offsets = corpus.text_offsets
    feat_cols: dict[str, list] = {k: [] for k in (
        "frequency", "mean_activation", "max_activation", "top_token", "hist_edges", "hist_counts")}
    ctx_cols: dict[str, list] = {k: [] for k in (
        "feature", "rank", "text_id", "position", "activation", "window_start", "tokens", "acts")}
    for f in range(d_sae):
        lo, hi = matrix.indptr[f], matrix.indptr[f + 1]
        rows, vals = matrix.indices[lo:hi], matrix.data[lo:hi]  # rows sorted ascending
        if len(vals) == 0:
            for key, empty in (("frequency", 0.0), ("mean_activation", 0.0), ("max_activation", 0.0),
                               ("top_token", None), ("hist_edges", []), ("hist_counts", [])):
                feat_cols[key].append(empty)
            continue
        counts, edges = np.histogram(vals, bins=config.histogram_bins, range=(0.0, float(vals.max())))
        top = np.argsort(-vals, kind="stable")[: config.n_contexts]
        for rank, i in enumerate(top):
            g = int(rows[i])
            slot = int(np.searchsorted(offsets, g, side="right") - 1)
            pos = g - int(offsets[slot])
            ws = max(0, pos - config.window_before)
            we = min(int(offsets[slot + 1] - offsets[slot]), pos + config.window_after + 1)
            g0, g1 = int(offsets[slot]) + ws, int(offsets[slot]) + we
            window_acts = np.zeros(we - ws, dtype=np.float32)
            a, b = np.searchsorted(rows, g0), np.searchsorted(rows, g1)
            window_acts[rows[a:b] - g0] = vals[a:b]
            ctx_cols["feature"].append(f)
            ctx_cols["rank"].append(rank)
            ctx_cols["text_id"].append(int(corpus.slot_text_ids[slot]))
            ctx_cols["position"].append(pos)
            ctx_cols["activation"].append(float(vals[i]))
            ctx_cols["window_start"].append(ws)
            ctx_cols["tokens"].append(vocab[corpus.token_ids[g0:g1]].tolist())
            ctx_cols["acts"].append(window_acts)
        feat_cols["frequency"].append(len(vals) / n_tokens)
        feat_cols["mean_activation"].append(float(vals.mean()))
        feat_cols["max_activation"].append(float(vals.max()))
        feat_cols["top_token"].append(str(vocab[corpus.token_ids[rows[top[0]]]]))
        feat_cols["hist_edges"].append(edges.tolist())
        feat_cols["hist_counts"].append(counts.tolist())
    feat_cols["layer"] = [layer] * d_sae
    feat_cols["feature"] = list(range(d_sae))
    ctx_cols["layer"] = [layer] * len(ctx_cols["feature"])
    return feat_cols, ctx_cols

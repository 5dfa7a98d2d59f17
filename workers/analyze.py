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
    sse: float = 0.0
    sum_sq: float = 0.0
    sum_x: torch.Tensor | None = None
    n_eval_tokens: int = 0
    n_active: int = 0

    def token_matrix(self, n_tokens: int) -> sp.csc_matrix:
        data = (torch.cat(self.values).numpy(), (torch.cat(self.tokens).numpy(), torch.cat(self.features).numpy()))
        return sp.csc_matrix(data, shape=(n_tokens, self.d_sae), dtype=np.float32)

    def pooled_matrix(self, n_texts: int) -> sp.csr_matrix:
        p = self.pooled
        data = (torch.cat(p["vals"]).numpy(), (torch.cat(p["rows"]).numpy(), torch.cat(p["cols"]).numpy()))
        return sp.csr_matrix(data, shape=(n_texts, self.d_sae), dtype=np.float32)

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
    that order, and token_ids / text_offsets follow slots. Per-text arrays follow text ids."""

    scores: np.ndarray  # RM score per text id
    reward_positions: np.ndarray  # per text id, token index inside the text
    slot_text_ids: np.ndarray  # text id at each slot
    token_ids: np.ndarray  # all analysed tokens, slots concatenated
    text_offsets: np.ndarray  # [n_texts + 1] start of each slot in token_ids
    layers: dict[int, LayerActivations]

    @property
    def n_tokens(self) -> int:
        return int(self.text_offsets[-1])

    def tokens_per_text(self) -> np.ndarray:
        out = np.empty(len(self.slot_text_ids), dtype=np.int64)
        out[self.slot_text_ids] = np.diff(self.text_offsets)
        return out


def _pool(acts, text_of_token, content, reward_rows, n: int, how: str) -> torch.Tensor:
    """One feature row per text. Token pooling skips special tokens: at late layers a
    classifier's [CLS] already holds the score, which would hide the per-word features."""
    if how == "reward_token":
        return acts[reward_rows]
    acts = acts * content.unsqueeze(1)
    pooled = torch.zeros(n, acts.shape[1], dtype=acts.dtype)
    if how == "max":
        return pooled.index_reduce_(0, text_of_token, acts, "amax", include_self=True)
    pooled.index_add_(0, text_of_token, acts)
    if how == "sum":
        return pooled
    counts = torch.bincount(text_of_token, weights=content.float(), minlength=n).clamp(min=1)
    return pooled / counts.unsqueeze(1)


@torch.no_grad()
def collect_corpus_activations(
    adapter: RewardModelAdapter,
    saes: dict,
    texts: list[str],
    heldout: np.ndarray,
    batch_size: int,
    pooling: str,
) -> CorpusActivations:
    layers = sorted(saes)
    results = {layer: LayerActivations(d_sae=saes[layer].cfg.d_sae) for layer in layers}
    scores = np.zeros(len(texts))
    reward_positions = np.zeros(len(texts), dtype=np.int64)
    token_ids, lengths = [], []
    special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids))
    batches = length_bucketed_batches(token_lengths(adapter.tokenizer, texts, adapter.max_length), batch_size, None)
    offset = 0
    for indices in tqdm(batches, desc="analysing"):
        batch = adapter.tokenize([texts[i] for i in indices])
        batch_scores, captured = adapter.run(batch, capture=layers)
        keep = batch.attention_mask.bool()
        keep_cpu = keep.cpu()
        n_in_batch = len(indices)
        flat_index = keep_cpu.flatten().cumsum(0).reshape(keep.shape) - 1  # position among kept tokens
        reward_rows = flat_index[torch.arange(n_in_batch), batch.reward_positions.cpu()]
        text_of_token = torch.arange(n_in_batch).unsqueeze(1).expand_as(keep_cpu)[keep_cpu]
        content = ~torch.isin(batch.input_ids[keep].cpu(), special_ids)
        eval_tokens = torch.from_numpy(heldout[indices])[text_of_token].to(adapter.device)
        scores[indices] = batch_scores.cpu().numpy()
        reward_positions[indices] = batch.reward_positions.cpu().numpy()
        token_ids.append(batch.input_ids[keep].cpu())
        lengths.append(keep_cpu.sum(1))
        text_ids = torch.from_numpy(indices)
        for layer in layers:
            res, sae = results[layer], saes[layer]
            x = captured[layer][keep].float()
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
            pooled = _pool(acts, text_of_token, content, reward_rows, n_in_batch, pooling)
            rows, cols = pooled.nonzero(as_tuple=True)
            res.pooled["rows"].append(text_ids[rows].int())
            res.pooled["cols"].append(cols.int())
            res.pooled["vals"].append(pooled[rows, cols])
        offset += int(keep_cpu.sum())
    return CorpusActivations(
        scores=scores,
        reward_positions=reward_positions,
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

"""Base-model transfer: do the reward model's features exist before reward training?

SAEs are trained on the base model's layers (transfer.base_model, the model the RM was tuned
from) from the same training texts, all layers from one forward per batch (workers/train.py).
Then per layer:

- the RM's score regressed on the base SAE's features, pooled as regression.pooling over the
  RM's reward reads, with the RM's held-out split (workers/regress.py, as the RM's own layers),
  beside a ridge probe on the base model's pooled raw residual stream;
- each RM feature of the same layer matched to the base feature whose activation correlates
  most with it over `transfer.match_tokens` held-out tokens (the texts' own tokens) run through
  both models: Pearson r from one sparse product of the two feature matrices per layer pair,
  and the decoder cosine of the matched pair where the residual streams are equally wide.

Both models read the same tokens: the base model's tokenizer must have the RM's vocabulary
(checked before any compute, in prepare_transfer, which also measures the parameter divergence
and resolves layers: {top_divergence: k})."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging

from backend.core.run_config import ConfigError, RunConfig, base_model_path, check_base_facts, model_facts
from workers.adapters.base import Batch, RewardModelAdapter
from workers.batching import length_bucketed_batches, token_lengths
from workers.device import autocast
from workers.divergence import parameter_divergence
from workers.regress import fit_probe, fit_reward_regression
from workers.sae_ops import pool_reads
from workers.stages import RunContext, Stage, StageOutput
from workers.train import load_saes, train_saes

FEATURE_COLUMNS = ("base_feature", "base_correlation", "base_decoder_cosine")
MATCH_CHUNK = 1024  # RM features per block of the correlation matrix
BASE_DIRNAME = "base"  # base SAEs under the run dir: base/saes/layer_<L>


# --- before any compute ------------------------------------------------------------------------

def _vocab_difference(rm_tokenizer, base_tokenizer) -> str | None:
    """None when both tokenizers map the same strings to the same ids; else what differs."""
    rm, base = rm_tokenizer.get_vocab(), base_tokenizer.get_vocab()
    if rm == base:
        return None
    differ = sum(1 for token, i in rm.items() if base.get(token) != i)
    only_base = len(base.keys() - rm.keys())
    return (f"{differ:,} of the reward model's {len(rm):,} vocabulary entries are missing or numbered otherwise "
            f"in the base model's {len(base):,}" + (f" ({only_base:,} only in the base's)" if only_base else ""))


def prepare_transfer(config: RunConfig, model_path: str, report: Callable[[str], None] = print):
    """Checks and choices before any compute: the base model's tokenizer and depth, the parameter
    divergence per block, and layers: {top_divergence: k} resolved. Returns (the config with its
    layers as a list, the divergence table's columns or None without a base model)."""
    if config.transfer is None:
        return config, None


    base_path = base_model_path(config)
    try:
        base_config = AutoConfig.from_pretrained(base_path)
        base_tokenizer = AutoTokenizer.from_pretrained(base_path)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a folder without a tokenizer
        raise ConfigError(f"transfer.base_model: cannot load a model from {config.transfer.base_model!r}: {exc}") from None
    rm_config = AutoConfig.from_pretrained(model_path)
    difference = _vocab_difference(AutoTokenizer.from_pretrained(model_path), base_tokenizer)
    if difference is not None:
        raise ConfigError(f"transfer.base_model: {config.transfer.base_model!r} has another tokenizer than the reward "
                          f"model: {difference}. The transfer compares both models token by token, so the base model "
                          "must tokenize as the reward model does (use the model the reward model was tuned from)")
    rm_depth = getattr(rm_config, "num_hidden_layers", None) or model_facts(rm_config.to_dict()).depth
    base_depth = getattr(base_config, "num_hidden_layers", None) or model_facts(base_config.to_dict()).depth
    started = time.time()
    try:
        divergence = parameter_divergence(base_path, model_path, rm_depth)
    except ValueError as exc:
        raise ConfigError(f"transfer.base_model: {exc}") from None
    selection = config.layer_selection
    if selection is not None:
        if selection.top_divergence > len(divergence.blocks):
            raise ConfigError(f"layers.top_divergence: {selection.top_divergence} is more than the model's "
                              f"{len(divergence.blocks)} blocks")
        config = config.model_copy(update={"layers": divergence.top(selection.top_divergence)})
    report(f"parameter divergence from {config.transfer.base_model} per block ({divergence.summary()}) in "
           f"{time.time() - started:.1f} s: " + ", ".join(f"{b}: {d:.3g}" for b, d in zip(divergence.blocks, divergence.l2))
           + (f"; layers chosen by top_divergence {selection.top_divergence}: {config.layers}" if selection else ""))
    check_base_facts(config, model_facts({"num_hidden_layers": base_depth}))
    columns = divergence.columns()
    columns["chosen"] = [b in config.layers for b in columns["block"]]
    return config, {"columns": columns, "n_compared": divergence.n_compared, "n_skipped": divergence.n_skipped}


# --- the base model ----------------------------------------------------------------------------

class BaseModelAdapter(RewardModelAdapter):
    """The base model's backbone (AutoModel: no head, none needed) behind the adapter interface,
    reading the RM's tokens: its tokenizer, and reward reads, are the RM's (same vocabulary), so
    pooling and positions line up read for read. Its score is not a reward: zeros."""

    def __init__(self, model, rm: RewardModelAdapter):
        self.kind, self.needs_offsets = rm.kind, rm.needs_offsets
        self._rm = rm
        super().__init__(model, rm.tokenizer, rm.device, rm.max_length)

    def reward_reads(self, enc, texts):
        return self._rm.reward_reads(enc, texts)

    def score(self, batch: Batch) -> torch.Tensor:
        with autocast(self.device):
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return torch.zeros(batch.n_reads, device=self.device)


def load_base_adapter(path: str, rm: RewardModelAdapter) -> BaseModelAdapter:
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a head checkpoint's head weights are "unused": expected here
    try:
        model = AutoModel.from_pretrained(path)
    finally:
        logging.set_verbosity(verbosity)
    return BaseModelAdapter(model, rm)


# --- the analysis ------------------------------------------------------------------------------

def _empty(config: RunConfig) -> StageOutput:
    return StageOutput(feature_columns={layer: {name: None for name in FEATURE_COLUMNS} for layer in config.layers})


def matching_texts(texts: list[str], heldout: np.ndarray, tokenizer, max_length: int, n_tokens: int,
                   seed: int) -> list[str]:
    """Held-out texts, in a seeded random order, until their tokens reach n_tokens."""
    ids = np.flatnonzero(heldout)
    ids = ids[np.random.default_rng(seed).permutation(len(ids))]
    lengths = token_lengths(tokenizer, [texts[i] for i in ids], max_length) if len(ids) else np.array([], int)
    take = int(np.searchsorted(np.cumsum(lengths), n_tokens)) + 1
    return [texts[i] for i in ids[:take]]


def _batch_tokens(batch: Batch, special_ids: torch.Tensor):
    keep = batch.attention_mask.bool()
    content = ~torch.isin(batch.input_ids, special_ids.to(batch.input_ids.device))
    return keep, content


@torch.no_grad()
def pooled_base_features(base: BaseModelAdapter, saes: dict, texts: list[str], heldout: np.ndarray,
                         batch_size: int, pooling: str, progress: Callable[[float], None]) -> dict:
    """Per base layer: pooled SAE features [n_reads, d_sae] (sparse), pooled raw stream, held-out
    reconstruction; reads in the order of workers/analyze.py's pass (the same batches)."""
    layers = sorted(saes)
    special_ids = torch.tensor(sorted(base.tokenizer.all_special_ids))
    batches = length_bucketed_batches(token_lengths(base.tokenizer, texts, base.max_length), batch_size, None)
    out = {layer: {"rows": [], "cols": [], "vals": [], "raw": [], "sse": 0.0, "sum_sq": 0.0, "sum_x": 0.0, "n": 0}
           for layer in layers}
    read_texts, n_reads = [], 0
    for batch_no, indices in enumerate(batches):
        progress(batch_no / len(batches))
        batch = base.tokenize([texts[i] for i in indices])
        _, captured = base.run(batch, capture=layers, need_score=False)
        keep = batch.attention_mask.bool()
        flat_index = keep.flatten().cumsum(0).reshape(keep.shape) - 1
        read_seq, read_pos = batch.reward_index.unbind(1)
        read_rows = flat_index[read_seq, read_pos]
        segment = batch.token_segment[keep]
        content = ~torch.isin(batch.input_ids[keep], special_ids.to(base.device))
        text_of_token = torch.arange(len(indices), device=base.device).unsqueeze(1).expand_as(keep)[keep]
        held = torch.from_numpy(heldout[indices]).to(base.device)[text_of_token]
        read_texts.append(torch.from_numpy(indices)[read_seq.cpu()])
        for layer in layers:
            sae, acc = saes[layer], out[layer]
            x = captured[layer][keep].float()
            acts = sae.encode(x)
            x_eval = x[held]
            acc["sse"] += float(((sae.decode(acts[held]) - x_eval) ** 2).sum())
            acc["sum_sq"] += float((x_eval ** 2).sum())
            acc["sum_x"] = acc["sum_x"] + x_eval.sum(0).double().cpu()
            acc["n"] += len(x_eval)
            args = (segment, content, read_rows, batch.n_reads, pooling)
            acc["raw"].append(pool_reads(x, *args).cpu())
            pooled = pool_reads(acts.float(), *args).cpu()
            rows, cols = pooled.nonzero(as_tuple=True)
            acc["rows"].append(rows + n_reads)
            acc["cols"].append(cols)
            acc["vals"].append(pooled[rows, cols])
        n_reads += batch.n_reads
    result = {}
    for layer in layers:
        acc, d_sae = out[layer], saes[layer].cfg.d_sae
        matrix = sp.csr_matrix((torch.cat(acc["vals"]).numpy(), (torch.cat(acc["rows"]).numpy(),
                                torch.cat(acc["cols"]).numpy())), shape=(n_reads, d_sae), dtype=np.float32)
        n = max(acc["n"], 1)
        total = acc["sum_sq"] - float((torch.as_tensor(acc["sum_x"]) ** 2).sum()) / n
        result[layer] = {"features": matrix, "raw": torch.cat(acc["raw"]).numpy(),
                         "explained_variance": 1.0 - acc["sse"] / total if total > 0 else None}
    return {"layers": result, "read_text_ids": torch.cat(read_texts).numpy()}


def _sparse(acts: torch.Tensor) -> sp.csr_matrix:
    acts = acts.float().cpu()
    rows, cols = acts.nonzero(as_tuple=True)
    return sp.csr_matrix((acts[rows, cols].numpy(), (rows.numpy(), cols.numpy())), shape=acts.shape,
                         dtype=np.float64)


@torch.no_grad()
def token_features(adapter: RewardModelAdapter, saes: dict, texts: list[str], batch_size: int) -> dict:
    """Per layer, the SAE's features at every own token (special tokens left out) of `texts`, as
    one sparse [n_tokens, d_sae] matrix; the same tokens, in the same order, for any adapter
    reading the same tokenizer."""
    layers = sorted(saes)
    special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids))
    parts: dict[int, list] = {layer: [] for layer in layers}
    for start in range(0, len(texts), batch_size):
        batch = adapter.tokenize(texts[start:start + batch_size])
        _, captured = adapter.run(batch, capture=layers, need_score=False)
        keep, content = _batch_tokens(batch, special_ids)
        own = keep & content
        for layer in layers:
            parts[layer].append(_sparse(saes[layer].encode(captured[layer][own].float())))
    return {layer: sp.vstack(parts[layer]).tocsr() for layer in layers}


def best_matches(rm: sp.csr_matrix, base: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """For each RM feature (column of rm), the base feature (column of base) whose activation
    correlates most with it over the rows (tokens), and that Pearson r; -1 and NaN for an RM
    feature that is constant there. Base features constant there are never chosen."""
    n = rm.shape[0]
    mean_a, mean_b = np.asarray(rm.mean(0)).ravel(), np.asarray(base.mean(0)).ravel()
    std_a = np.sqrt(np.maximum(np.asarray(rm.multiply(rm).mean(0)).ravel() - mean_a ** 2, 0))
    std_b = np.sqrt(np.maximum(np.asarray(base.multiply(base).mean(0)).ravel() - mean_b ** 2, 0))
    live_b = std_b > 1e-12
    at = rm.T.tocsr()
    best = np.full(rm.shape[1], -1, dtype=np.int64)
    r_best = np.full(rm.shape[1], np.nan)
    for start in range(0, rm.shape[1], MATCH_CHUNK):
        rows = slice(start, min(start + MATCH_CHUNK, rm.shape[1]))
        cross = (at[rows] @ base).toarray() / n
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (cross - np.outer(mean_a[rows], mean_b)) / np.outer(std_a[rows], std_b)
        r[:, ~live_b] = -np.inf
        j = r.argmax(1)
        got = r[np.arange(len(j)), j]
        live_a = (std_a[rows] > 1e-12) & np.isfinite(got)
        best[rows] = np.where(live_a, j, -1)
        r_best[rows] = np.where(live_a, np.clip(got, -1.0, 1.0), np.nan)
    return best, r_best


def decoder_cosines(rm_sae, base_sae, best: np.ndarray) -> np.ndarray | None:
    """cos(decoder row of each RM feature, its match's); None where the widths differ."""
    a, b = rm_sae.W_dec.detach().float().cpu(), base_sae.W_dec.detach().float().cpu()
    if a.shape[1] != b.shape[1]:
        return None
    a = torch.nn.functional.normalize(a, dim=1)
    b = torch.nn.functional.normalize(b, dim=1)
    cos = (a * b[torch.from_numpy(np.maximum(best, 0))]).sum(1).double().numpy()
    return np.where(best >= 0, cos, np.nan)


def _nullable(values) -> list:
    return [None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v for v in values]


def _layer_value(tables: dict, layer: int, name: str):
    rows = tables["layers"]
    if layer not in list(rows["layer"]):
        return None
    value = rows[name][list(rows["layer"]).index(layer)]
    return None if value is None else float(value)


def regression_texts(n_texts: int, wanted: int | None, seed: int) -> np.ndarray:
    """The corpus texts the transfer regressions use: all of them, or a seeded sample (sorted)."""
    if wanted is None or wanted >= n_texts:
        return np.arange(n_texts)
    return np.sort(np.random.default_rng(seed).choice(n_texts, wanted, replace=False))


def aligned_reads(base_read_texts: np.ndarray, rm_read_texts: np.ndarray, subset: np.ndarray):
    """Row orders that line up the base model's reward reads with the RM's over the same texts:
    both sorted by text (stably, so a text's reads keep their order). Raises where the two
    models read the texts differently."""
    base_rows = np.argsort(base_read_texts, kind="stable")
    rm_rows = np.flatnonzero(np.isin(rm_read_texts, subset))
    rm_rows = rm_rows[np.argsort(rm_read_texts[rm_rows], kind="stable")]
    if not np.array_equal(base_read_texts[base_rows], rm_read_texts[rm_rows]):
        raise RuntimeError("transfer: the base model's reward reads do not line up with the reward model's")
    return base_rows, rm_rows


def fit_with_probe(config: RunConfig, features, raw, sae, scores: np.ndarray, read_heldout: np.ndarray):
    """The score regressed on an SAE's pooled features and, beside it, the raw-stream probe, as
    the pipeline fits a layer (workers/regress.py): (fit, probe)."""
    fit = fit_reward_regression(features, scores, read_heldout, config.regression, config.seed,
                                sae.W_dec.detach().float().cpu().numpy())
    return fit, fit_probe(raw, scores, read_heldout, config.regression.cv_folds, config.seed)


def rm_on_subset(ctx: RunContext, layer: int, rm_rows: np.ndarray, scores: np.ndarray, read_heldout: np.ndarray):
    """The RM's own held-out R² (SAE features, raw probe) on the same reads as the base model's:
    the layer's figures where every read is used, refitted on the sample otherwise."""
    if layer not in ctx.saes:
        return None, None
    if len(rm_rows) == ctx.acts.n_reads:
        return _layer_value(ctx.tables, layer, "r2_heldout"), _layer_value(ctx.tables, layer, "probe_r2_heldout")
    layer_acts = ctx.acts.layers[layer]
    fit, probe = fit_with_probe(ctx.config, layer_acts.pooled_matrix(ctx.acts.n_reads)[rm_rows],
                                layer_acts.raw_matrix()[rm_rows], ctx.saes[layer], scores, read_heldout)
    return fit.r2_heldout, probe.r2_heldout


def run(ctx: RunContext) -> StageOutput:
    if ctx.config.transfer is None:
        return _empty(ctx.config)
    out = transfer(ctx)
    if ctx.divergence is not None:  # measured before training (prepare_transfer): the store keeps it with the rest
        divergence = ctx.divergence
        out.tables["divergence"] = divergence["columns"]
        out.run_info = {"divergence_tensors_compared": divergence["n_compared"],
                        "divergence_tensors_skipped": divergence["n_skipped"], **out.run_info}
    return out


def transfer(ctx: RunContext) -> StageOutput:
    """The base model's SAEs trained, regressed on and matched to the reward model's features."""
    config = ctx.config
    layers = config.transfer_layers
    tokens = config.transfer.training_tokens or config.sae.training_tokens
    base_config = config.model_copy(update={
        "layers": layers, "model": config.model.model_copy(update={"path": config.transfer.base_model}),
        # the base model gets the run SAE's width only: no paired dictionaries (sae.widths) there
        "sae": config.sae.model_copy(update={"training_tokens": tokens, "widths": None})})
    corpus, acts = ctx.corpus, ctx.acts
    started = time.time()
    base = load_base_adapter(base_model_path(config), ctx.adapter)
    train_texts = [t for t, held in zip(corpus.texts, corpus.heldout) if not held]
    ctx.stage(f"transfer: training {len(layers)} SAEs on the base model {config.transfer.base_model} (layers "
              f"{layers}) on {tokens:,} tokens")
    part = lambda a, b: (lambda f: ctx.progress(a + (b - a) * min(max(f, 0.0), 1.0)))  # noqa: E731
    paths = train_saes(base_config, base, train_texts, ctx.run_dir / BASE_DIRNAME, progress=part(0.0, 0.6))
    saes = load_saes(paths, ctx.device)
    trained = time.time()
    subset = regression_texts(len(corpus.texts), config.transfer.texts, config.seed)
    ctx.stage(f"transfer: base SAEs trained in {trained - started:.0f} s; pooling their features over "
              f"{len(subset):,} texts")
    pooled = pooled_base_features(base, saes, [corpus.texts[i] for i in subset], corpus.heldout[subset],
                                  config.dataset.batch_size, config.regression.pooling, part(0.6, 0.8))
    base_rows, rm_rows = aligned_reads(subset[pooled["read_text_ids"]], acts.read_text_ids, subset)
    scores = acts.scores[rm_rows]
    read_heldout = corpus.heldout[acts.read_text_ids[rm_rows]]
    fits = {}
    for layer in layers:
        got = pooled["layers"][layer]
        fit, probe = fit_with_probe(config, got["features"][base_rows], got["raw"][base_rows], saes[layer], scores,
                                    read_heldout)
        fits[layer] = (fit, probe, rm_on_subset(ctx, layer, rm_rows, scores, read_heldout))
    regressed = time.time()
    ctx.stage(f"transfer: regressions in {regressed - trained:.0f} s (pass and fits); held-out R² "
              + ", ".join(f"layer {l}: base {f.r2_heldout:.3f} (probe {p.r2_heldout:.3f}, RM {_fmt(rm[0])})"
                          for l, (f, p, rm) in fits.items()))
    matched = [layer for layer in layers if layer in ctx.saes]
    texts = matching_texts(corpus.texts, corpus.heldout, ctx.adapter.tokenizer, ctx.adapter.max_length,
                           config.transfer.match_tokens, config.seed)
    ctx.progress(0.85)
    rm_tokens = token_features(ctx.adapter, {l: ctx.saes[l] for l in matched}, texts, config.dataset.batch_size)
    base_tokens = token_features(base, {l: saes[l] for l in matched}, texts, config.dataset.batch_size)
    out = _empty(config)
    rows = []
    for layer in layers:
        fit, probe, (rm_r2, rm_probe_r2) = fits[layer]
        row = {"layer": layer, "base_sae_path": str(paths[layer].relative_to(ctx.run_dir)), "d_in": base.d_model,
               "base_explained_variance": pooled["layers"][layer]["explained_variance"],
               "base_r2_train": fit.r2_train, "base_r2_heldout": fit.r2_heldout,
               "base_probe_r2_heldout": probe.r2_heldout,
               "rm_r2_heldout": rm_r2, "rm_probe_r2_heldout": rm_probe_r2, "n_texts": len(subset),
               "n_matched": None, "n_matched_above_0_5": None, "median_base_correlation": None,
               "mean_decoder_cosine": None, "match_tokens": None}
        if layer in matched:
            best, r = best_matches(rm_tokens[layer], base_tokens[layer])
            cos = decoder_cosines(ctx.saes[layer], saes[layer], best)
            live = best >= 0
            row.update({"n_matched": int(live.sum()), "n_matched_above_0_5": int((r[live] > 0.5).sum()),
                        "median_base_correlation": float(np.median(r[live])) if live.any() else None,
                        "mean_decoder_cosine": float(np.mean(cos[live])) if cos is not None and live.any() else None,
                        "match_tokens": int(rm_tokens[layer].shape[0])})
            out.feature_columns[layer] = {
                "base_feature": [int(b) if b >= 0 else None for b in best],
                "base_correlation": _nullable(r.tolist()),
                "base_decoder_cosine": [None] * len(best) if cos is None else _nullable(cos.tolist()),
            }
        rows.append(row)
    ctx.stage(f"transfer: features matched over {rm_tokens[matched[0]].shape[0] if matched else 0:,} held-out tokens "
              f"in {time.time() - regressed:.0f} s; " + ", ".join(
                  f"layer {r['layer']}: {r['n_matched_above_0_5']} of {r['n_matched']} RM features have a base "
                  f"feature with r > 0.5 (median r {_fmt(r['median_base_correlation'])})" for r in rows if r["n_matched"])
              + f"; transfer took {time.time() - started:.0f} s")
    out.tables["transfer_layers"] = {name: [row[name] for row in rows] for name in rows[0]}
    out.run_info["transfer_base_model"] = config.transfer.base_model
    del base
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


STAGE = Stage("transfer", run, sections=("divergence", "transfer"), feature_columns=FEATURE_COLUMNS,
              tables=("transfer_layers", "divergence"), needs=("layers.r2_heldout", "layers.probe_r2_heldout"))

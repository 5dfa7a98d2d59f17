"""The implicit-reward lexicon (Marks et al., "Beyond Training Objectives", Table 4): what each
word of a reference lexicon (VADER by default) is worth to the reward model, measured and as
each layer's regression predicts it, each compared with the reference by Kendall tau.

For every reference word that is one token where a carrier's slot is (a word the tokenizer
splits is skipped and counted), in each of N neutral carrier sentences (lexicon.carriers, the
word in place of lexicon.neutral_word):

- measured = mean over the carriers of score(carrier with the word) − score(carrier with the
  neutral word): the reward model's own value of the word;
- predicted at layer L = mean over the carriers of weights_L · (pooled SAE features of the
  edited carrier − of the neutral one), pooled per reward read as the regression was fitted
  (regression.pooling, special tokens left out of token pooling): what the regression says the
  same edit is worth. (A process RM reads several scores per text: its last read counts.)

Kendall tau (scipy.stats.kendalltau, tau-b, its p-value) of the measured and of each predicted
lexicon against the reference; the words where the model and the reference disagree most are
those whose percentile ranks differ most (rank_difference = measured's − reference's). The
apartresearch baseline probe (Probing-Learned-Feedback-Patterns) reached tau = −0.037
(p = 0.55).

One carrier per forward: its edited sentences are all as long (the word is one token), so no
token is padding; the forward captures every layer and the score at once.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.stats import kendalltau, rankdata

from backend.core.reference_words import BAD_ROWS_SHOWN, SLOT, read_lexicon
from backend.core.run_config import ConfigError
from workers.probes import slot_positions as positions
from workers.sae_ops import pool_reads
from workers.stages import RunContext, Stage, StageOutput

PAPER_BASELINE_TAU, PAPER_BASELINE_P = -0.037, 0.55


def check(config, tokenizer) -> None:
    """The neutral word must be one token in every carrier (before any compute)."""
    lex = config.lexicon
    if lex is None or not lex.enabled:
        return
    for carrier, slot in zip(lex.carriers, slot_positions(tokenizer, lex.carriers)):
        ids = tokenizer(carrier.replace(SLOT, lex.neutral_word))["input_ids"]
        if not neutral_at_slot(tokenizer, ids, slot, lex.neutral_word):
            raise ConfigError(f"lexicon.neutral_word: {lex.neutral_word!r} is not one token of the model's tokenizer "
                              f"in the carrier {carrier!r}: choose a short common word")


def slot_positions(tokenizer, carriers: list[str]) -> list[int]:
    return positions(tokenizer, carriers)


def neutral_at_slot(tokenizer, ids: list[int], slot: int, word: str) -> bool:
    if slot >= len(ids):
        return False
    return tokenizer.decode([ids[slot]]).strip().lower() == word.strip().lower()


def single_token_words(tokenizer, carriers: list[str], neutral: str, words: list[str]) -> np.ndarray:
    """[n_words] whether each word is one token at the slot of every carrier: its carrier
    sentence tokenises as the neutral one does, but for the slot's token."""
    keep = np.ones(len(words), dtype=bool)
    for carrier, slot in zip(carriers, slot_positions(tokenizer, carriers)):
        base = tokenizer(carrier.replace(SLOT, neutral))["input_ids"]
        edited = tokenizer([carrier.replace(SLOT, w) for w in words])["input_ids"]
        for i, ids in enumerate(edited):
            if keep[i] and (len(ids) != len(base) or ids[:slot] != base[:slot] or ids[slot + 1:] != base[slot + 1:]):
                keep[i] = False
    return keep


@dataclass
class LexiconMeasurement:
    words: list[str]
    measured: np.ndarray  # [n_words] mean Δ score over the carriers
    measured_se: np.ndarray  # [n_words] its standard error over the carriers
    predicted: dict[int, np.ndarray]  # layer -> [n_words] mean predicted Δ over the carriers


def _last_reads(batch) -> "torch.Tensor":  # noqa: F821
    """Each sequence's last reward read."""
    seq = batch.reward_index[:, 0]
    last = torch.full((len(batch.texts),), -1, dtype=torch.long, device=seq.device)
    last[seq] = torch.arange(len(seq), device=seq.device)  # later reads overwrite earlier ones
    return last


def score_and_predict(adapter, saes: dict, weights: dict, pooling: str, texts: list[str]):
    """(scores [B], {layer: weights · pooled features [B]}) of `texts`, one forward; each text's
    last reward read, its features pooled as the regression pooled them."""
    layers = sorted(saes)
    batch = adapter.tokenize(texts)
    scores, captured = adapter.run(batch, capture=layers)
    special = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=adapter.device)
    keep = batch.attention_mask.bool()
    flat_index = keep.flatten().cumsum(0).reshape(keep.shape) - 1
    read_rows = flat_index[batch.reward_index[:, 0], batch.reward_index[:, 1]]
    token_ids = batch.input_ids[keep]
    pool_args = (batch.token_segment[keep], ~torch.isin(token_ids, special), read_rows, batch.n_reads, pooling)
    last = _last_reads(batch)
    out = {}
    for layer in layers:
        acts = saes[layer].encode(captured[layer][keep].float()).float()
        pooled = pool_reads(acts, *pool_args)[last]
        out[layer] = (pooled @ weights[layer]).double().cpu().numpy()
    return scores.float()[last].double().cpu().numpy(), out


def measure_lexicon(adapter, saes: dict, weights: dict[int, np.ndarray], pooling: str, words: list[str],
                    carriers: list[str], neutral: str, batch_size: int = 512,
                    progress: Callable[[float], None] | None = None) -> LexiconMeasurement:
    """Every word (each one token at every carrier's slot) in place of `neutral` in every carrier:
    the score's change and each layer's regression prediction of it, averaged over the carriers."""
    w = {layer: torch.as_tensor(np.nan_to_num(np.asarray(weights[layer], dtype=np.float64)), dtype=torch.float32,
                                device=adapter.device) for layer in saes}
    n, c = len(words), len(carriers)
    deltas = np.zeros((c, n))
    predicted = {layer: np.zeros((c, n)) for layer in saes}
    with torch.no_grad():
        for j, carrier in enumerate(carriers):
            base_score, base_pred = score_and_predict(adapter, saes, w, pooling, [carrier.replace(SLOT, neutral)])
            for start in range(0, n, batch_size):
                if progress:
                    progress((j * n + start) / max(n * c, 1))
                chunk = words[start:start + batch_size]
                scores, preds = score_and_predict(adapter, saes, w, pooling, [carrier.replace(SLOT, x) for x in chunk])
                deltas[j, start:start + len(chunk)] = scores - base_score[0]
                for layer in saes:
                    predicted[layer][j, start:start + len(chunk)] = preds[layer] - base_pred[layer][0]
    se = deltas.std(axis=0, ddof=1) / np.sqrt(c) if c > 1 else np.full(n, np.nan)
    return LexiconMeasurement(list(words), deltas.mean(axis=0), se,
                              {layer: p.mean(axis=0) for layer, p in predicted.items()})


def kendall(reference: np.ndarray, values: np.ndarray) -> tuple[float | None, float | None]:
    if len(values) < 2:
        return None, None
    result = kendalltau(reference, values)
    tau, p = float(result.statistic), float(result.pvalue)
    return (None if np.isnan(tau) else tau), (None if np.isnan(p) else p)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    return (rankdata(values) - 1) / max(len(values) - 1, 1)


def lexicon_tables(m: LexiconMeasurement, reference: np.ndarray, layers: list[int], n_multi: int,
                   n_bad: int) -> dict[str, dict[str, list]]:
    """The store's lexicon_words, lexicon_predictions and lexicon_summary tables."""
    rank_difference = percentile_ranks(m.measured) - percentile_ranks(reference)
    words = {"word": list(m.words), "reference": reference.tolist(), "measured": m.measured.tolist(),
             "measured_se": [None if np.isnan(x) else float(x) for x in m.measured_se],
             "rank_difference": rank_difference.tolist()}
    predictions = {"layer": [layer for layer in layers for _ in m.words],
                   "word": [w for _ in layers for w in m.words],
                   "predicted": [float(x) for layer in layers for x in m.predicted[layer]]}
    rows = [("measured", None, m.measured)] + [(f"layer {layer}", layer, m.predicted[layer]) for layer in layers]
    summary: dict[str, list] = {name: [] for name in ("which", "layer", "tau", "p_value", "tau_vs_measured",
                                                       "n_words", "n_multi_token_skipped", "n_bad_rows")}
    for which, layer, values in rows:
        tau, p = kendall(reference, values)
        summary["which"].append(which)
        summary["layer"].append(layer)
        summary["tau"].append(tau)
        summary["p_value"].append(p)
        summary["tau_vs_measured"].append(None if layer is None else kendall(m.measured, values)[0])
        summary["n_words"].append(len(m.words))
        summary["n_multi_token_skipped"].append(n_multi)
        summary["n_bad_rows"].append(n_bad)
    return {"lexicon_words": words, "lexicon_predictions": predictions, "lexicon_summary": summary}


def layer_weights(features: dict[str, list], layer: int) -> np.ndarray:
    """A layer's regression weights by feature id, from the features table's columns."""
    layer_col, feature_col, weight_col = (np.asarray(features[k], dtype=object) for k in ("layer", "feature", "weight"))
    rows = np.flatnonzero(layer_col == layer)
    out = np.zeros(int(max(feature_col[rows])) + 1 if len(rows) else 0)
    for r in rows:
        out[int(feature_col[r])] = 0.0 if weight_col[r] is None else float(weight_col[r])
    return out


def run(ctx: RunContext) -> StageOutput:
    cfg = ctx.config.lexicon
    if cfg is None or not cfg.enabled:
        return StageOutput()
    started = time.time()
    lexicon = read_lexicon(cfg.reference)
    if lexicon.bad_rows:
        shown = "; ".join(lexicon.bad_rows[:10]) + ("; ..." if len(lexicon.bad_rows) > 10 else "")
        ctx.stage(f"lexicon: {lexicon.n_bad_rows} bad rows of {cfg.reference} skipped: {shown}")
    tokenizer = ctx.adapter.tokenizer
    single = single_token_words(tokenizer, cfg.carriers, cfg.neutral_word, lexicon.words)
    words = [w for w, keep in zip(lexicon.words, single) if keep]
    reference = np.asarray([v for v, keep in zip(lexicon.values, single) if keep], dtype=np.float64)
    n_multi = int((~single).sum())
    layers = list(ctx.config.layers)
    ctx.stage(f"lexicon: {len(words):,} single-token words of {lexicon.source} ({n_multi:,} multi-token skipped) "
              f"in {len(cfg.carriers)} carriers, {len(words) * (len(cfg.carriers)):,} sentences")
    if not words:
        ctx.stage("lexicon: no reference word is one token for this tokenizer: nothing to compare")
        return StageOutput(run_info={"lexicon_reference": lexicon.source, "lexicon_n_bad_rows": lexicon.n_bad_rows})
    weights = {layer: layer_weights(ctx.tables["features"], layer) for layer in layers}
    m = measure_lexicon(ctx.adapter, {layer: ctx.saes[layer] for layer in layers}, weights,
                        ctx.config.regression.pooling, words, list(cfg.carriers), cfg.neutral_word, cfg.batch_size,
                        ctx.progress)
    tables = lexicon_tables(m, reference, layers, n_multi, lexicon.n_bad_rows)
    s = tables["lexicon_summary"]
    figures = ", ".join(f"{which} tau {_fmt(tau)} (p {_fmt(p)})" for which, tau, p in zip(s["which"], s["tau"],
                                                                                         s["p_value"]))
    ctx.stage(f"lexicon: {figures}; {time.time() - started:.0f} s")
    info = {"lexicon_reference": lexicon.source, "lexicon_neutral_word": cfg.neutral_word,
            "lexicon_carriers": json.dumps(list(cfg.carriers)), "lexicon_n_bad_rows": lexicon.n_bad_rows,
            "lexicon_bad_rows": json.dumps(lexicon.bad_rows[:BAD_ROWS_SHOWN]),
            "lexicon_divergent": cfg.divergent}
    return StageOutput(tables=tables, run_info=info)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


STAGE = Stage("lexicon", run, sections=("lexicon",), check=check, needs=("features.weight",),
              tables=("lexicon_words", "lexicon_predictions", "lexicon_summary"))

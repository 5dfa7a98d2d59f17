"""ReasonScore (Galichin et al., "I Have Covered All the Bases Here", AIRI-Institute/SAE-Reasoning
extraction/compute_score.py): how specific a feature is to a vocabulary.

For a vocabulary of words w_1..w_G, each word's token sequences (its spellings: as given, lower
case, capitalised, each with and without a leading space, as the tokenizer encodes them without
special tokens; a spelling with the unknown token is dropped, a word left with none is unknown)
are matched in the scanned texts; a match's positions, widened by `window` = (before, after)
tokens on each side, are the word's positions (the reference's expand_range; its run script uses
(1, 2) and alpha 0.7). Special tokens ([CLS], [SEP], BOS: the reference's ignore_tokens) and
padding are never counted. Per feature f, with a_f(t) its activation at token t:

    mu_g(f)  = mean of a_f over word g's positions              (0 where g never occurs)
    mu_R(f)  = mean of a_f over the union of all words' positions
    mu_¬R(f) = mean of a_f over every other (non-special) token
    p_g(f)   = mu_g(f) / (sum_g mu_g(f) + eps)
    H(f)     = -sum_g p_g(f) log p_g(f) / log G                 (1 when G = 1)
    ReasonScore(f) = mu_R(f) / (sum_f' mu_R(f') + eps) * H(f)^alpha
                     - mu_¬R(f) / (sum_f' mu_¬R(f') + eps)

with eps = 1e-12: the share of the vocabulary's activation mass the feature holds, weighted by
how evenly it fires across the vocabulary's words (a feature of one word only has H = 0), minus
its share of the activation mass elsewhere. The sums over f' run over all the SAE's features.

Choices where the reference works differently: activations are the SAE's encode() times each
feature's decoder-row norm (the reference folds the decoder norms into the encoder first, which
for ReLU-family SAEs is exactly that scaling, and which SAELens refuses for TopK SAEs: here a
TopK SAE keeps its own choice of active features); the tokens are the run's corpus texts as the
reward model reads them (cut at model.max_length, one text per sequence), not fixed-length
chunks of concatenated text.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from backend.core import store
from backend.core.reference_words import read_vocabulary
from backend.core.run_config import ConfigError
from workers.batching import length_bucketed_batches, token_lengths
from workers.job_errors import JobFailed
from workers.sae_ops import decoder_directions
from workers.stages import RunContext, Stage, StageOutput

EPSILON = 1e-12
TOP_LISTED = 50  # features a typed vocabulary's job lists


def spellings(word: str) -> list[str]:
    base = word.strip()
    forms = dict.fromkeys([base, base.lower(), base[:1].upper() + base[1:].lower()])
    return [f"{space}{form}" for form in forms for space in ("", " ")]


@dataclass
class Vocabulary:
    words: list[str]  # the words with at least one known spelling, in the order given
    sequences: list[list[tuple[int, ...]]]  # per word, its spellings' token ids
    unknown: list[str] = field(default_factory=list)  # words no spelling of which the tokenizer knows


def vocabulary_tokens(tokenizer, words: list[str]) -> Vocabulary:
    """Each word's token sequences. ValueError when no word has a known token."""
    unk = tokenizer.unk_token_id
    known, sequences, unknown = [], [], []
    for word in words:
        seqs = []
        for form in spellings(word):
            ids = tuple(tokenizer(form, add_special_tokens=False)["input_ids"])
            if ids and (unk is None or unk not in ids) and ids not in seqs:
                seqs.append(ids)
        if seqs:
            known.append(word)
            sequences.append(seqs)
        else:
            unknown.append(word)
    if not known:
        shown = ", ".join(words[:10]) + (", ..." if len(words) > 10 else "")
        raise ValueError(f"no word of the vocabulary ({shown}) has a token the model's tokenizer knows")
    return Vocabulary(known, sequences, unknown)


def word_masks(input_ids, valid, vocab: Vocabulary, window: tuple[int, int], own: list | None = None):
    """[G, B, T] bool: each word's positions (its matches widened by window), valid tokens only.
    `own`, when given, receives each word's count of matched tokens before widening."""
    before, after = window
    B, T = input_ids.shape
    masks = torch.zeros((len(vocab.words), B, T), dtype=torch.bool, device=input_ids.device)
    for g, seqs in enumerate(vocab.sequences):
        hit = torch.zeros((B, T), dtype=torch.bool, device=input_ids.device)
        for seq in seqs:
            n = len(seq)
            if n > T:
                continue
            target = torch.tensor(seq, device=input_ids.device)
            starts = (input_ids.unfold(1, n, 1) == target).all(-1)  # [B, T - n + 1]
            for k in range(n):
                hit[:, k:k + starts.shape[1]] |= starts
        if own is not None:
            own.append(int((hit & valid).sum()))
        widened = hit.clone()
        for d in range(1, before + 1):
            widened[:, :-d] |= hit[:, d:]
        for d in range(1, after + 1):
            widened[:, d:] |= hit[:, :-d]
        masks[g] = widened & valid
    return masks


class ReasonScoreAccumulator:
    """Streamed sums of a layer's activations over each word's positions, their union and the
    rest; scores() applies the formula."""

    def __init__(self, d_sae: int, n_words: int, device):
        self.word_sum = torch.zeros((n_words, d_sae), dtype=torch.float64, device=device)
        self.word_count = torch.zeros(n_words, dtype=torch.float64, device=device)
        self.pos_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.neg_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.pos_count = 0.0
        self.neg_count = 0.0

    def add(self, acts, masks, valid) -> None:
        """acts [N, d_sae] at the N valid tokens; masks [G, N] the words' positions among them."""
        acts = acts.double()  # sums over many tokens: float32 would lose digits
        union = masks.any(0)
        pos = union.double() @ acts
        self.word_sum += masks.double() @ acts
        self.word_count += masks.sum(1).double()
        self.pos_sum += pos
        self.neg_sum += acts.sum(0) - pos
        self.pos_count += float(union.sum())
        self.neg_count += float(len(union) - union.sum())

    def means(self):
        word = (self.word_sum / self.word_count.clamp(min=1).unsqueeze(1)).cpu().numpy()  # [G, d]
        pos = (self.pos_sum / max(self.pos_count, 1.0)).cpu().numpy()
        neg = (self.neg_sum / max(self.neg_count, 1.0)).cpu().numpy()
        return word.T, pos, neg


def reason_scores(word_means: np.ndarray, pos_mean: np.ndarray, neg_mean: np.ndarray, alpha: float,
                  eps: float = EPSILON) -> tuple[np.ndarray, np.ndarray]:
    """(ReasonScore [d], normalised entropy [d]) from per-feature means: word_means [d, G] over
    each word's positions, pos_mean [d] over the vocabulary's, neg_mean [d] elsewhere."""
    word_means = np.asarray(word_means, dtype=np.float64)
    probs = word_means / (word_means.sum(axis=1, keepdims=True) + eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    h = -(probs * logs).sum(axis=1)
    h_norm = h / math.log(word_means.shape[1]) if word_means.shape[1] > 1 else np.ones_like(h)
    scores = (pos_mean / (pos_mean.sum() + eps)) * np.power(np.clip(h_norm, 0.0, None), alpha) \
        - neg_mean / (neg_mean.sum() + eps)
    return scores, h_norm


@dataclass
class ReasonScoreResult:
    layer: int
    scores: np.ndarray  # [d_sae]
    entropy: np.ndarray  # [d_sae] normalised
    pos_mean: np.ndarray
    neg_mean: np.ndarray
    word_counts: dict[str, int]  # positions matched per word (its own tokens, before widening)
    n_texts: int
    n_tokens: int
    n_vocabulary_tokens: int  # positions in the union (widened)


def compute_reason_scores(adapter, saes: dict, texts: list[str], vocab: Vocabulary, alpha: float = 0.7,
                          window: tuple[int, int] = (1, 2), batch_size: int = 64,
                          progress: Callable[[float], None] | None = None) -> dict[int, ReasonScoreResult]:
    """One pass over `texts` up to the deepest layer of `saes`, every layer's SAE encoded."""
    layers = sorted(saes)
    device = adapter.device
    special = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=device)
    norms = {layer: decoder_directions(saes[layer]).norm(dim=1) for layer in layers}
    acc = {layer: ReasonScoreAccumulator(saes[layer].cfg.d_sae, len(vocab.words), device) for layer in layers}
    own = {w: 0 for w in vocab.words}
    n_tokens = 0
    batches = length_bucketed_batches(token_lengths(adapter.tokenizer, texts, adapter.max_length), batch_size, None)
    with torch.no_grad():
        for i, indices in enumerate(batches):
            if progress:
                progress(i / len(batches))
            batch = adapter.tokenize([texts[k] for k in indices])
            _, captured = adapter.run(batch, capture=layers, need_score=False)
            valid = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special)
            own_hits: list[int] = []
            masks = word_masks(batch.input_ids, valid, vocab, window, own_hits)
            for w, n in zip(vocab.words, own_hits):
                own[w] += int(n)
            flat_masks = masks[:, valid]
            n_tokens += int(valid.sum())
            for layer in layers:
                acts = saes[layer].encode(captured[layer][valid].float()).float() * norms[layer]
                acc[layer].add(acts, flat_masks, valid)
    out = {}
    for layer in layers:
        word, pos, neg = acc[layer].means()
        scores, entropy = reason_scores(word, pos, neg, alpha)
        out[layer] = ReasonScoreResult(layer, scores, entropy, pos, neg, own, len(texts), n_tokens,
                                       int(acc[layer].pos_count))
    return out


def check(config, tokenizer) -> None:
    """A vocabulary none of whose words the tokenizer knows is refused before any compute."""
    rs = config.reason_score
    if rs is None or not rs.enabled:
        return
    try:
        vocabulary_tokens(tokenizer, read_vocabulary(rs.vocabulary))
    except ValueError as exc:
        raise ConfigError(f"reason_score.vocabulary: {exc}") from None


def run(ctx: RunContext) -> StageOutput:
    rs = ctx.config.reason_score
    layers = list(ctx.config.layers)
    if rs is None or not rs.enabled:  # the column exists in every store: NULL where not computed
        return StageOutput(feature_columns={layer: {"reason_score": None} for layer in layers})
    started = time.time()
    vocab = vocabulary_tokens(ctx.adapter.tokenizer, read_vocabulary(rs.vocabulary))
    texts = list(ctx.corpus.texts[:rs.texts])
    ctx.stage(f"ReasonScore: {len(vocab.words)} words of {rs.vocabulary} over {len(texts):,} texts"
              + (f" ({len(vocab.unknown)} unknown to the tokenizer: {', '.join(vocab.unknown[:10])})"
                 if vocab.unknown else ""))
    results = compute_reason_scores(ctx.adapter, {layer: ctx.saes[layer] for layer in layers}, texts, vocab,
                                    rs.alpha, tuple(rs.window), ctx.config.dataset.batch_size, ctx.progress)
    tops = "; ".join(f"layer {layer}: " + ", ".join(f"{int(f)} ({results[layer].scores[f]:.3g})"
                                                   for f in np.argsort(-results[layer].scores)[:5])
                     for layer in layers)
    ctx.stage(f"ReasonScore: top features {tops}; {time.time() - started:.0f} s")
    first = results[layers[0]]
    info = {"reason_score_vocabulary": rs.vocabulary, "reason_score_words": json.dumps(vocab.words),
            "reason_score_unknown": json.dumps(vocab.unknown), "reason_score_word_counts": json.dumps(first.word_counts),
            "reason_score_texts": len(texts), "reason_score_alpha": rs.alpha,
            "reason_score_window": json.dumps(list(rs.window))}
    return StageOutput(feature_columns={layer: {"reason_score": [float(x) for x in results[layer].scores]}
                                           for layer in layers}, run_info=info)


def top_features(result: ReasonScoreResult, n: int = TOP_LISTED) -> list[dict]:
    order = np.argsort(-result.scores, kind="stable")[:n]
    return [{"feature": int(f), "score": float(result.scores[f]), "entropy": float(result.entropy[f]),
             "vocabulary_mean": float(result.pos_mean[f]), "elsewhere_mean": float(result.neg_mean[f])}
            for f in order]


def reason_score_task(params: dict, ctx) -> dict:
    """A typed vocabulary's ReasonScores at one layer, over the first n corpus texts: the top
    features, and which words were found."""
    run = ctx.cache.get(params["run_id"])
    layer = int(params["layer"])
    try:
        vocab = vocabulary_tokens(run.adapter.tokenizer, list(params["words"]))
    except ValueError as exc:
        raise JobFailed(str(exc)) from None
    texts = [r["text"] for r in store.texts(run.store_path, None, int(params.get("n_texts") or 2000))]
    message = f"{len(vocab.words)} words over {len(texts):,} texts"
    ctx.report(0.0, message)
    result = compute_reason_scores(run.adapter, {layer: run.sae(layer)}, texts, vocab,
                                   float(params.get("alpha", 0.7)), tuple(params.get("window") or (1, 2)),
                                   run.config.dataset.batch_size, lambda share: ctx.report(share, message))[layer]
    ctx.report(1.0, "done")
    return {"layer": layer, "words": vocab.words, "unknown": vocab.unknown, "word_counts": result.word_counts,
            "n_texts": result.n_texts, "n_tokens": result.n_tokens, "n_vocabulary_tokens": result.n_vocabulary_tokens,
            "features": top_features(result)}


# no run-page section: its column is on the layer table (sort by it) and the feature card
STAGE = Stage("reason_score", run, sections=(), feature_columns=("reason_score",), check=check)

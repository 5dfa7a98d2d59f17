"""Reward-hacking probes: which words switch a feature on, what writing a word into texts does
to the score, and how the score follows a feature pushed harder (dose-response).

- vocab probe: every whole-word vocabulary token put into a few bland carrier sentences; the
  layer's SAE encodes the residual stream at the token's own position, and per feature the
  tokens with the highest mean activation over the carriers are kept.
- insertion: a phrase written into held-out texts (appended, prepended, or at a word index),
  each text scored before and after, beside the same insertion of a neutral control word: the
  paired difference is what the phrase itself does beyond "one more word there".
- sweep: a clamp or steer of chosen features at several values on one prepared evaluation set,
  each value beside frequency-matched random features given the same edit.

The server reads this module's defaults (carriers, control word, sweep values) to validate and
describe requests, so torch and scipy are imported inside the functions that measure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from backend.core import store
from backend.core.probe_params import (CONTROL_PHRASE, DEFAULT_CARRIERS, SLOT, rounded)
from workers.ablation import FeatureEdit, run_ablation
from workers.batching import length_bucketed_batches, token_lengths
from workers.controls import control_draws, control_summary, mean_with_ci, paired_test
from workers.run_cache import JobFailed, _non_finite
from workers.sae_ops import decoder_directions, edit_chosen, linear_decoder
from workers.tasks import _eval_texts

VOCAB_BATCH = 256  # candidate words per forward, one carrier at a time
TOP_TOKENS = 20  # tokens kept per feature
STRONGEST_SHOWN = 50  # features listed on the job page, by their top token's mean activation
# Word-start marks of byte-level BPE (GPT-2, LLaMA 3) and SentencePiece; WordPiece marks the
# opposite, a continuation, with "##".
WORD_START_MARKS = ("\u0120", "\u2581")
CONTINUATION_MARK = "##"

INSERTION_BATCH = 32
SWEEP_BATCH = 16
EXCERPT_CHARS = 300  # of an edited text shown per example, centred on the insertion



# --- vocabulary probe ---------------------------------------------------------------------

def whole_word_tokens(tokenizer) -> list[tuple[int, str]]:
    """(token id, the word as typed) for every vocabulary token that is a whole alphabetic word:
    no special tokens, no WordPiece "##" continuations; for a tokenizer that marks word starts
    (byte-level BPE "Ġ", SentencePiece "▁") only the tokens carrying that mark."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    marks = [m for m in WORD_START_MARKS if sum(t.startswith(m) for t in vocab) > len(vocab) // 50]
    out = []
    for token, token_id in vocab.items():
        if token in special:
            continue
        if marks:  # byte-level BPE spells other bytes as letters too ("Ã©"): read the word as decoded
            word = tokenizer.convert_tokens_to_string([token]).strip() if token[:1] in marks else ""
        else:
            word = "" if token.startswith(CONTINUATION_MARK) else token
        if word.isalpha():
            out.append((int(token_id), word))
    return sorted(out)


def corpus_token_ids(tokenizer, texts: list[str], max_length: int) -> set[int]:
    """Every token id the corpus's texts are made of (as the model reads them: cut at max_length)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)
    return {int(i) for ids in enc["input_ids"] for i in ids}


def _leading_specials(tokenizer) -> int:
    """How many special tokens the tokenizer puts before a text ([CLS], BOS)."""
    plain = tokenizer("word", add_special_tokens=False)["input_ids"]
    full = tokenizer("word")["input_ids"]
    return next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)


def slot_positions(tokenizer, carriers: list[str]) -> list[int]:
    """Each carrier's slot as a token position in an unpadded sequence."""
    lead = _leading_specials(tokenizer)
    out = []
    for carrier in carriers:
        prefix = carrier[:carrier.index(SLOT)].rstrip()  # the space before the slot goes with the word
        out.append(lead + (len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0))
    return out


@dataclass
class VocabProbe:
    words: list[str]  # the candidates, as typed
    top_index: np.ndarray  # [K, d_sae] candidate index of each feature's K best tokens, best first
    top_mean: np.ndarray  # [K, d_sae] their mean activation over the carriers measured (-inf: none)
    top_fired: np.ndarray  # [K, d_sae] in how many carriers the feature fired on the token
    measured: np.ndarray  # [n_candidates] carriers in which the word stayed its one token
    n_carriers: int


def probe_vocabulary(adapter, sae, layer: int, candidates: list[tuple[int, str]], carriers: list[str],
                     top_k: int = TOP_TOKENS, batch_size: int = VOCAB_BATCH,
                     progress: Callable[[float], None] | None = None) -> VocabProbe:
    """Every candidate in every carrier, its feature activations at its own position; per
    feature the top_k candidates by mean activation. A carrier where the word does not come out
    as its own token (a tokenizer that merges it with a neighbour) is left out of its mean."""
    with torch.no_grad():
        return _probe_vocabulary(adapter, sae, layer, candidates, carriers, top_k, batch_size, progress)


def _probe_vocabulary(adapter, sae, layer, candidates, carriers, top_k, batch_size, progress) -> VocabProbe:
    device = adapter.device
    d_sae = sae.cfg.d_sae
    slots = slot_positions(adapter.tokenizer, carriers)
    top_mean = torch.full((top_k, d_sae), -torch.inf, device=device)
    top_index = torch.full((top_k, d_sae), -1, dtype=torch.long, device=device)
    top_fired = torch.zeros((top_k, d_sae), dtype=torch.long, device=device)
    measured = torch.zeros(len(candidates), dtype=torch.long)
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start:start + batch_size]
        token_ids = torch.tensor([i for i, _ in chunk], device=device)
        total = torch.zeros(len(chunk), d_sae, device=device)
        fired = torch.zeros(len(chunk), d_sae, dtype=torch.long, device=device)
        n_intact = torch.zeros(len(chunk), dtype=torch.long, device=device)
        for i, (carrier, slot) in enumerate(zip(carriers, slots)):
            if progress:
                progress((start + len(chunk) * i / len(carriers)) / len(candidates))
            # one carrier per forward: its sequences are all as long, so nothing is padding
            acts, intact = _acts_at_slot(adapter, sae, layer, [carrier.replace(SLOT, w) for _, w in chunk], slot,
                                         token_ids)
            total += acts
            fired += acts > 0
            n_intact += intact
        mean = total / n_intact.clamp(min=1).unsqueeze(-1)
        mean[n_intact == 0] = -torch.inf
        ids = torch.arange(start, start + len(chunk), device=device).unsqueeze(-1).expand(-1, d_sae)
        merged = torch.cat([top_mean, mean])
        best = merged.topk(top_k, dim=0).indices
        top_mean = merged.gather(0, best)
        top_index = torch.cat([top_index, ids]).gather(0, best)
        top_fired = torch.cat([top_fired, fired]).gather(0, best)
        measured[start:start + len(chunk)] = n_intact.cpu()
    if progress:
        progress(1.0)
    return VocabProbe([w for _, w in candidates], top_index.cpu().numpy(), top_mean.float().cpu().numpy(),
                      top_fired.cpu().numpy(), measured.numpy(), len(carriers))


def _acts_at_slot(adapter, sae, layer: int, texts: list[str], slot: int, token_ids):
    """([N, d_sae] the SAE features at each text's slot, zero where the word is not its own
    token there; [N] whether it is)."""
    batch = adapter.tokenize(texts)
    _, captured = adapter.run(batch, capture=[layer], need_score=False)
    rows = torch.arange(len(texts), device=adapter.device)
    first_real = batch.attention_mask.float().argmax(1)  # past any left padding
    position = (first_real + slot).clamp(max=batch.input_ids.shape[1] - 1)
    intact = batch.input_ids[rows, position] == token_ids
    acts = sae.encode(captured[layer][rows, position].float())
    return acts * intact.unsqueeze(-1), intact


def vocab_probe_result(probe: VocabProbe) -> dict:
    """Per feature that fired on any candidate, its tokens best first with their mean activation
    and in how many carriers it fired; and the strongest features by their top token."""
    features = {}
    for f in np.flatnonzero(probe.top_mean[0] > 0):
        keep = probe.top_mean[:, f] > 0
        features[str(int(f))] = {"tokens": [probe.words[i] for i in probe.top_index[keep, f]],
                                 "mean": [rounded(x) for x in probe.top_mean[keep, f]],
                                 "fired": [int(x) for x in probe.top_fired[keep, f]]}
    strongest = sorted(features, key=lambda f: -features[f]["mean"][0])[:STRONGEST_SHOWN]
    return {"n_candidates": len(probe.words), "n_measured": int((probe.measured > 0).sum()),
            "n_carriers": probe.n_carriers, "n_features": len(features), "features": features,
            "strongest": [{"feature": int(f), "tokens": features[f]["tokens"][:5], "mean": features[f]["mean"][:5]}
                          for f in strongest]}


def vocab_probe_task(params: dict, ctx) -> dict:
    run = ctx.cache.get(params["run_id"])
    layer = int(params["layer"])
    carriers = list(params.get("carriers") or DEFAULT_CARRIERS)
    tokenizer = run.adapter.tokenizer
    candidates = whole_word_tokens(tokenizer)
    if params.get("vocabulary") == "corpus":
        ctx.report(0.0, "reading the corpus's tokens")
        in_corpus = corpus_token_ids(tokenizer, [r["text"] for r in store.texts(run.store_path)], run.adapter.max_length)
        candidates = [c for c in candidates if c[0] in in_corpus]
    if not candidates:
        raise JobFailed("no whole-word tokens to probe: the vocabulary (or the corpus) has none")
    message = f"{len(candidates):,} tokens in {len(carriers)} carriers"
    probe = probe_vocabulary(run.adapter, run.sae(layer), layer, candidates, carriers,
                             progress=lambda share: ctx.report(share, message))
    ctx.report(1.0, "done")
    return {"layer": layer, "vocabulary": params.get("vocabulary") or "all", "carriers": carriers,
            **vocab_probe_result(probe)}


# --- insertion ----------------------------------------------------------------------------

def insert_phrase(text: str, phrase: str, position: str | int, repeat: int = 1) -> tuple[str, tuple[int, int]]:
    """The text with `phrase` (repeat times, space-separated) written in at the word level, and
    the inserted characters' span. "end" appends " phrase" after the text's last character (its
    final punctuation included), "start" prepends "phrase ", a number n puts it before the
    text's n-th word (0-based; past the last word: at the end; words rejoined by single spaces)."""
    inserted = " ".join([phrase.strip()] * repeat)
    if position == "end":
        head = text.rstrip()
        return f"{head} {inserted}", (len(head) + 1, len(head) + 1 + len(inserted))
    if position == "start":
        return f"{inserted} {text.lstrip()}", (0, len(inserted))
    words = text.split()
    n = min(int(position), len(words))
    head, tail = " ".join(words[:n]), " ".join(words[n:])
    start = len(head) + 1 if head else 0
    return " ".join(part for part in (head, inserted, tail) if part), (start, start + len(inserted))


def excerpt(text: str, span: tuple[int, int], limit: int = EXCERPT_CHARS) -> str:
    """At most `limit` characters of `text` around `span`, cut ends marked with "…"."""
    if len(text) <= limit:
        return text
    start = max(0, min((span[0] + span[1] - limit) // 2, len(text) - limit))
    return ("…" if start else "") + text[start:start + limit] + ("…" if start + limit < len(text) else "")


def _last_read_of_each(batch) -> torch.Tensor:
    """Each sequence's last reward read: the text's (final) score, as the store keeps it."""
    seq = batch.reward_index[:, 0]
    reads = torch.arange(len(seq), device=seq.device)
    out = torch.zeros(len(batch.texts), dtype=torch.long, device=seq.device)
    return out.scatter_reduce(0, seq, reads, "amax", include_self=False)


def final_scores(adapter, texts: list[str], batch_size: int = INSERTION_BATCH, layer: int | None = None,
                 on_layer: Callable | None = None, progress: Callable[[float], None] | None = None) -> np.ndarray:
    """Each text's final score, in length-bucketed batches; with `layer`, on_layer(indices,
    batch, hidden) sees that layer's output of every batch."""
    out = np.empty(len(texts))
    done = 0
    for indices in length_bucketed_batches(token_lengths(adapter.tokenizer, texts, adapter.max_length), batch_size, None):
        batch = adapter.tokenize([texts[i] for i in indices])
        with torch.no_grad():
            scores, captured = adapter.run(batch, capture=[] if layer is None else [layer])
            out[indices] = scores.float()[_last_read_of_each(batch)].cpu().numpy()
            if on_layer is not None:
                on_layer(indices, batch, captured[layer])
        done += len(indices)
        if progress:
            progress(done / len(texts))
    return out


def span_tokens(adapter, batch, spans: list[tuple[int, int]]) -> torch.Tensor | None:
    """[B, T] the tokens covering each text's character span; None when the tokenizer cannot
    say where its tokens come from (no offsets) or tokenises differently from the adapter."""
    if not getattr(adapter.tokenizer, "is_fast", False):
        return None
    enc = adapter.tokenizer(batch.texts, padding=True, truncation=True, max_length=adapter.max_length,
                            return_offsets_mapping=True, return_tensors="pt")
    if not torch.equal(enc["input_ids"], batch.input_ids.cpu()):
        return None
    offsets = enc["offset_mapping"]  # [B, T, 2]; (0, 0) for special tokens and padding
    lo = torch.tensor([s for s, _ in spans]).unsqueeze(1)
    hi = torch.tensor([e for _, e in spans]).unsqueeze(1)
    inside = (offsets[..., 1] > offsets[..., 0]) & (offsets[..., 0] < hi) & (offsets[..., 1] > lo)
    return inside.to(batch.input_ids.device)


def insertion_texts(path, selection: str, n: int) -> tuple[list[dict], dict]:
    """The held-out texts an insertion runs on: "neutral", those whose score lies in the middle
    third of the whole corpus's scores (neither side of the scale yet: room to move both ways),
    or "heldout", the first n. Returns the rows and how they were chosen."""
    heldout = store.texts(path, "heldout")
    if selection == "heldout":
        return heldout[:n], {"kind": "heldout"}
    low, high = np.quantile([r["score"] for r in store.texts(path)], [1 / 3, 2 / 3])
    rows = [r for r in heldout if low <= r["score"] <= high][:n]
    return rows, {"kind": "neutral", "score_low": rounded(low), "score_high": rounded(high)}


@dataclass
class Insertion:
    before: np.ndarray  # [N] score of each text as it is
    with_phrase: np.ndarray  # [N] with the phrase inserted
    with_control: np.ndarray  # [N] with the control inserted instead
    edited: list[str]  # the texts with the phrase
    spans: list[tuple[int, int]]  # the phrase's characters in each
    activation: np.ndarray | None  # [N] the feature's largest activation on the inserted tokens (None: no feature)
    # [N] with the phrase, the feature / every feature of its layer zeroed on the inserted tokens
    # (SAE spliced, reconstruction error kept); None: no feature named
    without_feature: np.ndarray | None = None
    without_layer: np.ndarray | None = None

    @property
    def delta(self) -> np.ndarray:
        return self.with_phrase - self.before

    @property
    def control_delta(self) -> np.ndarray:
        return self.with_control - self.before


def measure_insertion(adapter, texts: list[str], phrase: str, control: str, position: str | int, repeat: int = 1,
                      sae=None, layer: int | None = None, feature: int | None = None,
                      progress: Callable[[float], None] | None = None, decoder: tuple | None = None) -> Insertion:
    """Score every text as it is, with the phrase inserted, and with the control inserted the
    same way. With a feature (its layer's SAE): its activation on the inserted tokens, and the
    phrase's texts scored again with the feature zeroed on those tokens and with every feature of
    the layer zeroed there: how much of the phrase's effect goes through that feature, and
    through the layer's features at all (the rest through the SAE's reconstruction error).
    `decoder`: (decoder rows, whether decoding is linear), when the caller keeps them."""
    edits = [insert_phrase(t, phrase, position, repeat) for t in texts]
    controls = [insert_phrase(t, control, position, repeat)[0] for t in texts]
    arm = (lambda i: (lambda share: progress((i + share) / 3))) if progress else (lambda i: None)
    named = feature is not None
    activation, without_feature, without_layer = (np.full(len(texts), np.nan) for _ in range(3))
    spans = [span for _, span in edits]
    if named and decoder is None:
        rows = decoder_directions(sae)
        decoder = rows, linear_decoder(sae, rows) is not None

    def on_layer(indices, batch, hidden):
        where = span_tokens(adapter, batch, [spans[i] for i in indices])
        if where is None:
            return
        f = sae.encode(hidden.float())
        acts = f[..., feature]
        peak = torch.where(where, acts, torch.zeros_like(acts)).amax(1)
        activation[indices] = peak.float().cpu().numpy()
        inserted = where.unsqueeze(-1)
        one, _, _ = edit_chosen(sae, hidden, FeatureEdit((feature,), "zero"), *decoder, f)
        written = sae.decode(f) - sae.decode(torch.zeros_like(f))  # every feature's part of the output
        last = _last_read_of_each(batch)
        for out, edited in ((without_feature, one), (without_layer, hidden.float() - written)):
            h = torch.where(inserted, edited.to(hidden.dtype), hidden)
            out[indices] = adapter.run_from(batch, layer, h).float()[last].cpu().numpy()

    before = final_scores(adapter, texts, progress=arm(0))
    with_phrase = final_scores(adapter, [e for e, _ in edits], layer=layer if named else None,
                               on_layer=on_layer if named else None, progress=arm(1))
    with_control = final_scores(adapter, controls, progress=arm(2))
    if not named:
        return Insertion(before, with_phrase, with_control, [e for e, _ in edits], spans, None)
    return Insertion(before, with_phrase, with_control, [e for e, _ in edits], spans, activation,
                     without_feature, without_layer)


def insertion_result(measured: Insertion, rows: list[dict], cut: np.ndarray, seed: int) -> dict:
    """Mean Δ of the phrase and of the control, each with its 95% t-interval, their paired
    difference per text with its CI and sign-flip p-value, and every text's numbers."""
    delta, control = measured.delta, measured.control_delta
    examples = []
    for i, row in enumerate(rows):
        act = None if measured.activation is None or np.isnan(measured.activation[i]) else rounded(measured.activation[i])
        at = min(measured.spans[i][0], len(row["text"]))  # where the insertion went, in the original
        examples.append({"text_id": row["text_id"], "text": excerpt(row["text"], (at, at)),
                         "edited": excerpt(measured.edited[i], measured.spans[i]),
                         "before": float(measured.before[i]), "with_phrase": float(measured.with_phrase[i]),
                         "with_control": float(measured.with_control[i]), "delta": float(delta[i]),
                         "control_delta": float(control[i]), "activation": act, "cut": bool(cut[i])})
    result = {"n": len(rows), "phrase_delta": mean_with_ci(delta), "control_delta": mean_with_ci(control),
              "difference": paired_test(delta, [control], seed), "n_cut": int(cut.sum()), "examples": examples}
    if measured.activation is not None and not np.all(np.isnan(measured.activation)):
        acts = measured.activation[~np.isnan(measured.activation)]
        result["activation"] = {"mean_peak": rounded(acts.mean()), "fired_share": float((acts > 0).mean())}
        # what zeroing it (or the whole layer's features) on the inserted tokens takes back: the
        # part of the phrase's Δ that goes through it, comparable with its measured Δ in the corpus
        known = ~np.isnan(measured.without_feature)
        for part, without in (("through_feature", measured.without_feature), ("through_layer", measured.without_layer)):
            result[part] = {**mean_with_ci((measured.with_phrase - without)[known]), "n": int(known.sum())}
    return result


def feature_context(path, layer: int, feature: int) -> dict:
    """The named feature's measured Δ (zeroed alone where it fires) and top token, from the store."""
    card = store.feature(path, layer, feature)
    keys = ("measured_delta", "measured_delta_low", "measured_delta_high", "measured_n", "top_token", "max_activation")
    return {"layer": layer, "feature": feature, **{k: card.get(k) for k in keys}}


def insertion_task(params: dict, ctx) -> dict:
    run = ctx.cache.get(params["run_id"])
    n, repeat = int(params.get("n_texts") or 128), int(params.get("repeat") or 1)
    rows, chosen_by = insertion_texts(run.store_path, params.get("texts") or "neutral", n)
    if not rows:
        raise JobFailed("no held-out texts to insert into (none has a score in the corpus's middle third)")
    layer, feature = params.get("layer"), params.get("feature")
    sae = None
    if feature is not None:
        sae = run.sae(int(layer))
        if int(feature) >= sae.cfg.d_sae:
            raise JobFailed(f"feature {feature} is out of range: layer {layer} has {sae.cfg.d_sae} features")
    texts = [r["text"] for r in rows]
    phrase, control = params["phrase"], params.get("control") or CONTROL_PHRASE
    position = params.get("position", "end")
    ctx.report(0.0, f"inserting {phrase[:40]!r} into {len(texts)} texts")
    measured = measure_insertion(run.adapter, texts, phrase, control, position, repeat, sae,
                                 None if layer is None else int(layer), None if feature is None else int(feature),
                                 progress=lambda share: ctx.report(share),
                                 decoder=None if feature is None else run.decoder(int(layer)))
    lengths = token_lengths(run.adapter.tokenizer, measured.edited, 10**9)
    result = {"phrase": phrase, "control": control, "position": position, "repeat": repeat, "texts": chosen_by,
              **insertion_result(measured, rows, lengths > run.adapter.max_length, seed=int(ctx.job["id"]))}
    if feature is not None:
        result["feature"] = feature_context(run.store_path, int(layer), int(feature))
    if _non_finite(result):
        raise JobFailed("the reward model's score came out non-finite on these texts: nothing was stored")
    ctx.report(1.0, "done")
    return result


# --- dose-response sweep ------------------------------------------------------------------

def sweep_point(value: float, chosen, controls: list, seed: int) -> dict:
    """One value of a sweep: the chosen features' mean Δ with its CI, the controls' mean and
    range, and the paired test of chosen against them, over all reward reads."""
    return {"value": value, "chosen": {"n": int(len(chosen.delta)), **mean_with_ci(chosen.delta),
                                       "fired_share": float(np.mean(chosen.fired)) if len(chosen.fired) else None},
            "control": control_summary(chosen.delta, [c.delta for c in controls], seed)}


def run_sweep(adapter, sae, layer: int, evalset, features: tuple[int, ...], mode: str, values: list[float],
              draws: list[tuple[int, ...]], weights: np.ndarray, pooling: str, directions, linear: bool,
              scope: str = "text", seed: int = 0, progress: Callable[[float, str], None] | None = None) -> list[dict]:
    """Every value for the chosen features and for each control draw, on one prepared set."""
    steps, done, points = len(values) * (1 + len(draws)), 0, []
    for value in values:
        results = []
        for chosen in [features, *draws]:
            if progress:
                progress(done / steps, f"{mode} {value:g}: {'chosen features' if chosen == features else 'control'}")
            results.append(run_ablation(adapter, sae, layer, evalset, FeatureEdit(tuple(chosen), mode, float(value)),
                                        weights, pooling, SWEEP_BATCH, None, directions, linear, scope))
            done += 1
        points.append(sweep_point(float(value), results[0], results[1:], seed))
    return points


def sweep_task(params: dict, ctx) -> dict:
    run = ctx.cache.get(params["run_id"])
    layer = int(params["layer"])
    sae = run.sae(layer)
    features = tuple(int(f) for f in params["features"])
    if max(features) >= sae.cfg.d_sae:
        raise JobFailed(f"feature {max(features)} is out of range: layer {layer} has {sae.cfg.d_sae} features")
    mode, values = params["mode"], [float(v) for v in params["values"]]
    vectors = store.layer_vectors(run.store_path, layer)
    weights, frequency = np.asarray(vectors["weight"]), np.asarray(vectors["frequency"])
    seed = int(ctx.job["id"])
    draws = control_draws(frequency, features, int(params.get("n_controls") or 3), seed=seed)
    texts, _, key = _eval_texts(run, {"n_texts": params.get("n_texts") or 128})  # shared with ablations
    ctx.report(0.0, f"scoring {len(texts)} texts unedited")
    evalset = run.eval_set(layer, key, texts, lambda share: ctx.report(0.1 * share))
    directions, linear = run.decoder(layer)
    points = run_sweep(run.adapter, sae, layer, evalset, features, mode, values, draws, weights,
                       run.config.regression.pooling, directions, linear, params.get("tokens") or "text", seed,
                       progress=lambda share, message: ctx.report(0.1 + 0.9 * share, message))
    result = {"features": list(features), "mode": mode, "values": values, "n_texts": len(texts),
              "controls": [list(d) for d in draws], "points": points}
    where = _non_finite(result)
    if where:
        bad = next(p["value"] for p in points if _non_finite(p))
        raise JobFailed(f"the edit made the reward non-finite ({mode} value {bad:g} is too large): nothing was "
                        f"stored ({where} came out NaN or infinite)")
    ctx.report(1.0, "done")
    return result

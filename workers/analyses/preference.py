"""Preference pairs (workers/preference_data.py): what drives the RM's margin
score(chosen) − score(rejected).

- The RM's pairwise accuracy on held-out pairs (margin > 0 counts as right), from the scores of
  the analysis pass; per layer, the same with the layer's SAE reconstruction spliced in (on every
  held-out pair too).
- Per feature, its attribution (activation × d score / d activation, summed over the text's own
  tokens, workers/attribution.py) on the chosen side, on the rejected side, and their difference:
  its share of the margin, averaged over up to preference.pairs held-out pairs.
- For the top preference.measured_features by |margin attribution|: the margin Δ measured with
  the feature zeroed on both sides (reconstruction error kept, workers/ablation.py), over the
  pairs where it fires on either side, with a 95% CI.
- The held-out pairs the RM gets wrong, each with the features whose margin attribution is most
  negative: those that pushed it toward the rejected side.
- The surrogate reward model per layer: the SAE's features, pooled per text as the regression
  pools them (regression.pooling), and a linear map fitted with
  the Bradley–Terry loss on training pairs (workers/bradley_terry.py), and its held-out pairwise
  accuracy beside the RM's: "the last layers replaced by SAE features, the reward unchanged".

A run on a text corpus gets NULL columns and empty tables."""
from __future__ import annotations

import time

import numpy as np
import torch

from workers.ablation import prepare_eval_set, run_ablation
from workers.analyze import adapter_has_gradient, forward_with_gradients
from workers.attribution import text_contributions
from workers.bradley_terry import fit_bradley_terry
from workers.controls import mean_with_ci
from workers.evaluate import sae_reconstruction
from workers.sae_ops import FeatureEdit, decoder_directions
from workers.stages import RunContext, Stage, StageOutput

LAYER_COLUMNS = ("spliced_accuracy", "surrogate_accuracy", "surrogate_train_accuracy")
FEATURE_COLUMNS = ("margin_attribution", "margin_attribution_chosen", "margin_attribution_rejected",
                   "margin_delta", "margin_delta_low", "margin_delta_high", "margin_delta_n")
PAIR_COLUMNS = ("pair_id", "row", "split", "chosen_text_id", "rejected_text_id", "chosen_score", "rejected_score",
                "margin", "correct")
WRONG_COLUMNS = ("layer", "pair_id", "rank", "feature", "margin_attribution", "chosen_attribution",
                 "rejected_attribution")


def _empty(layers: list[int]) -> StageOutput:
    return StageOutput(layer_columns={layer: dict.fromkeys(LAYER_COLUMNS) for layer in layers},
                          feature_columns={layer: dict.fromkeys(FEATURE_COLUMNS) for layer in layers},
                          tables={"preference_pairs": {name: [] for name in PAIR_COLUMNS},
                                  "preference_wrong_features": {name: [] for name in WRONG_COLUMNS}})


def text_scores(acts) -> np.ndarray:
    """Each text's final score, by text id, as the texts table has it."""
    return acts.scores[acts.last_read_per_text()]


def pair_table(corpus, scores: np.ndarray) -> dict[str, list]:
    chosen, rejected = corpus.pairs[:, 0], corpus.pairs[:, 1]
    margin = scores[chosen] - scores[rejected]
    return {
        "pair_id": list(range(len(chosen))), "row": corpus.pair_rows.tolist(),
        "split": np.where(corpus.heldout[chosen], "heldout", "train").tolist(),
        "chosen_text_id": chosen.tolist(), "rejected_text_id": rejected.tolist(),
        "chosen_score": scores[chosen].tolist(), "rejected_score": scores[rejected].tolist(),
        "margin": margin.tolist(), "correct": (margin > 0).tolist(),
    }


def per_text(values: np.ndarray, text_index: np.ndarray, n_texts: int) -> np.ndarray:
    """Per-read values -> each text's last read's value (its final score)."""
    out = np.full(n_texts, np.nan)
    out[text_index] = values  # reads come in order, so a text's last read is written last
    return out


def _read_texts(item) -> np.ndarray:
    return item.indices[item.batch.reward_index[:, 0].cpu().numpy()]


@torch.no_grad()
def spliced_scores(adapter, sae, layer: int, evalset) -> np.ndarray:
    """Each evaluated text's final score with the layer's output replaced by the SAE's
    reconstruction at its real tokens (padding keeps its states)."""
    reconstruct = sae_reconstruction(sae)
    values, texts = [], []
    for item in evalset.batches:
        keep = item.batch.attention_mask.bool().unsqueeze(-1)

        def edit(hidden: torch.Tensor) -> torch.Tensor:
            return torch.where(keep, reconstruct(hidden), hidden)

        if item.hidden is not None:
            scores = adapter.run_from(item.batch, layer, edit(item.hidden))
        else:
            scores, _ = adapter.run(item.batch, edits={layer: edit})
        values.append(scores.float().cpu().numpy())
        texts.append(_read_texts(item))
    return per_text(np.concatenate(values), np.concatenate(texts), evalset.n_texts)


def text_attributions(adapter, sae, layer: int, evalset) -> np.ndarray:
    """[n_texts, d_sae]: each feature's contribution to each evaluated text's score, over the
    text's own tokens (special tokens left out, as the analysis pass does)."""
    directions = decoder_directions(sae)
    special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=adapter.device)
    out = np.zeros((evalset.n_texts, sae.cfg.d_sae), dtype=np.float32)
    for item in evalset.batches:
        hidden, grad = item.hidden, item.grad
        if hidden is None or grad is None:  # not kept (memory): run the batch again
            _, captured, grads = forward_with_gradients(adapter, item.batch, [layer])
            hidden, grad = captured[layer], grads[layer]
        with torch.no_grad():
            keep = item.batch.attention_mask.bool() & ~torch.isin(item.batch.input_ids, special_ids)
            rows = torch.arange(len(item.indices), device=keep.device).unsqueeze(1).expand_as(keep)[keep]
            acts = sae.encode(hidden[keep].float())
            contributions = text_contributions(acts, grad[keep].float(), directions, rows, len(item.indices))
        out[item.indices] = contributions.cpu().numpy()
    return out


def measured_margin_deltas(adapter, sae, layer: int, evalset, features: np.ndarray, pooling: str
                           ) -> dict[str, np.ndarray]:
    """Per feature: the mean change of the margin with it zeroed on both sides of each pair
    (text's own tokens, reconstruction error kept), over pairs where it fires on either side,
    with a 95% CI and n. Evaluated texts come as pairs: 2j chosen, 2j + 1 rejected."""
    names = ("margin_delta", "margin_delta_low", "margin_delta_high")
    out = {name: np.full(len(features), np.nan) for name in names}
    out["margin_delta_n"] = np.zeros(len(features), dtype=np.int64)
    no_weights = np.zeros(sae.cfg.d_sae)
    for i, feature in enumerate(features):
        result = run_ablation(adapter, sae, layer, evalset, FeatureEdit((int(feature),), "zero"), no_weights, pooling)
        delta = per_text(result.delta, result.text_index, evalset.n_texts).reshape(-1, 2)
        fired = np.zeros(evalset.n_texts, dtype=bool)
        np.logical_or.at(fired, result.text_index, result.fired)
        where = fired.reshape(-1, 2).any(axis=1)
        if not where.any():
            continue
        ci = mean_with_ci(delta[where, 0] - delta[where, 1])
        out["margin_delta"][i] = ci["mean_delta"]
        out["margin_delta_low"][i] = np.nan if ci["ci_low"] is None else ci["ci_low"]
        out["margin_delta_high"][i] = np.nan if ci["ci_high"] is None else ci["ci_high"]
        out["margin_delta_n"][i] = int(where.sum())
    return out


def top_by_magnitude(values: np.ndarray, n: int) -> np.ndarray:
    ok = np.flatnonzero(np.isfinite(values) & (values != 0))
    return ok[np.argsort(-np.abs(values[ok]), kind="stable")][:n]


def wrong_pair_rows(layer: int, pair_ids: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, n: int
                    ) -> dict[str, list]:
    """For each wrongly ordered pair: the n features with the most negative margin attribution."""
    rows: dict[str, list] = {name: [] for name in WRONG_COLUMNS}
    for pair_id, a, b in zip(pair_ids, chosen, rejected):
        difference = a - b
        order = np.argsort(difference, kind="stable")[:n]
        for rank, feature in enumerate(f for f in order if difference[f] < 0):
            for name, value in zip(WRONG_COLUMNS, (layer, int(pair_id), rank, int(feature), float(difference[feature]),
                                                   float(a[feature]), float(b[feature]))):
                rows[name].append(value)
    return rows


def surrogate(layer_acts, acts, corpus, seed: int) -> dict[str, float | None]:
    """The BT fit on the layer's pooled SAE features (each text's last read), training pairs only."""
    features = layer_acts.pooled_matrix(acts.n_reads)[acts.last_read_per_text()]
    chosen, rejected = corpus.pairs[:, 0], corpus.pairs[:, 1]
    held = corpus.heldout[chosen]
    fit = fit_bradley_terry(features[chosen], features[rejected], C=None, seed=seed,
                            train_index=np.flatnonzero(~held), heldout_index=np.flatnonzero(held))
    return {"surrogate_accuracy": fit.heldout_accuracy, "surrogate_train_accuracy": fit.train_accuracy}


def _none_if_nan(values) -> list:
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def margin_columns(ctx: RunContext, sae, layer: int, evalset) -> tuple[dict[str, list], np.ndarray, np.ndarray]:
    """The layer's feature columns (margin attribution both sides and their difference, measured
    margin Δ of the top features), and the per-text attributions of the chosen and rejected sides.
    A feature with no attribution on any analysed text (silent, or no gradient reaches it) is NULL."""
    per_text = text_attributions(ctx.adapter, sae, layer, evalset)
    chosen, rejected = per_text[0::2], per_text[1::2]
    seen = (chosen != 0).any(0) | (rejected != 0).any(0)
    columns = {"margin_attribution_chosen": chosen.mean(0), "margin_attribution_rejected": rejected.mean(0),
               "margin_attribution": (chosen - rejected).mean(0)}
    columns = {name: np.where(seen, values, np.nan) for name, values in columns.items()}
    top = top_by_magnitude(columns["margin_attribution"], ctx.config.preference.measured_features)
    measured = measured_margin_deltas(ctx.adapter, sae, layer, evalset, top, ctx.config.regression.pooling)
    out = {name: _none_if_nan(values) for name, values in columns.items()}
    for name, values in measured.items():
        column: list = [0 if name == "margin_delta_n" else None] * sae.cfg.d_sae
        for feature, value in zip(top, values):
            column[feature] = int(value) if name == "margin_delta_n" else _none_if_nan([value])[0]
        out[name] = column
    return out, chosen, rejected


def run(ctx: RunContext) -> StageOutput:
    layers = list(ctx.config.layers)
    corpus = ctx.corpus
    if getattr(corpus, "pairs", None) is None:
        return _empty(layers)
    settings = ctx.config.preference
    scores = text_scores(ctx.acts)
    pairs_table = pair_table(corpus, scores)
    held = np.flatnonzero(corpus.heldout[corpus.pairs[:, 0]])
    margin = np.asarray(pairs_table["margin"])
    accuracy = float(np.mean(margin[held] > 0))
    sample = held[np.sort(np.random.default_rng([ctx.config.seed, 5]).permutation(len(held))[:settings.pairs])]
    texts = [corpus.texts[t] for t in corpus.pairs[sample].ravel()]  # chosen, rejected, chosen, ...
    all_held_texts = [corpus.texts[t] for t in corpus.pairs[held].ravel()]
    wrong = np.flatnonzero(margin[sample] <= 0)
    ctx.stage(f"preference: {len(corpus.pairs):,} pairs, RM pairwise accuracy {accuracy:.3f} on {len(held):,} "
              f"held-out pairs ({len(wrong)} of the {len(sample):,} analysed ordered wrongly)")
    with_gradient = adapter_has_gradient(ctx.adapter)
    out = _empty(layers)
    out.tables["preference_pairs"] = pairs_table
    wrong_rows: list[dict[str, list]] = []
    for i, layer in enumerate(layers):
        started = time.time()
        sae = ctx.saes[layer]
        evalset = prepare_eval_set(ctx.adapter, layer, texts, ctx.config.dataset.batch_size,
                                   with_gradients=with_gradient)
        # every held-out pair, as the RM's accuracy: beyond the sample, the whole model runs under the edit
        spliced_set = evalset if len(sample) == len(held) else prepare_eval_set(
            ctx.adapter, layer, all_held_texts, ctx.config.dataset.batch_size, keep_bytes=0)
        spliced = spliced_scores(ctx.adapter, sae, layer, spliced_set).reshape(-1, 2)
        columns = {"spliced_accuracy": float(np.mean(spliced[:, 0] - spliced[:, 1] > 0)),
                   **surrogate(ctx.acts.layers[layer], ctx.acts, corpus, ctx.config.seed)}
        if with_gradient:
            features, chosen, rejected = margin_columns(ctx, sae, layer, evalset)
            out.feature_columns[layer] = features
            wrong_rows.append(wrong_pair_rows(layer, sample[wrong], chosen[wrong], rejected[wrong],
                                              settings.wrong_pair_features))
        out.layer_columns[layer] = columns
        ctx.stage(f"layer {layer}: pairwise accuracy with the SAE spliced in {columns['spliced_accuracy']:.3f}, "
                  f"surrogate (SAE features + Bradley–Terry) {_fmt(columns['surrogate_accuracy'])} on held-out pairs "
                  f"({time.time() - started:.1f} s)")
        ctx.progress((i + 1) / len(layers))
    if wrong_rows:
        out.tables["preference_wrong_features"] = {name: [v for rows in wrong_rows for v in rows[name]]
                                                   for name in WRONG_COLUMNS}
    out.run_info = {"n_pairs": str(len(corpus.pairs)), "n_heldout_pairs": str(len(held)),
                    "pairwise_accuracy": repr(accuracy), "preference_analysed_pairs": str(len(sample))}
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


STAGE = Stage("preference", run, sections=("preference",), layer_columns=LAYER_COLUMNS,
              feature_columns=FEATURE_COLUMNS, tables=("preference_pairs", "preference_wrong_features"))

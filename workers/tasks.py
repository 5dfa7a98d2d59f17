"""The tasks of the pipeline, ablation, text and text-diff job kinds (each kind names its task in
backend/core/job_kinds/; the probes', ReasonScore's, SAEDashboard's and the explanations' tasks live
beside their own code).

Each task takes the job's params and a context (`ctx.report(progress, message)`; it raises
JobStopped once the job is cancelled or its lease is lost) and returns the JSON result.
Params were checked by the kind before the job was queued; tasks check them again only
where the worker knows more (e.g. the SAE's width).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import yaml

from backend.core import store
from backend.core.run_config import parse_config
from workers.ablation import EvalBatch, EvalSet, FeatureEdit, edit_hidden, run_ablation
from workers.analyze import adapter_has_gradient, forward_with_gradients
from workers.controls import control_draws, control_summary
from workers.pipeline import PUBLISHING, run_pipeline
from workers.run_cache import ABLATION_BATCH, JobFailed, LoadedRun, RunCache, _non_finite, require_finite
from workers.sae_ops import edited_tokens
from workers.text_attribution import DEFAULT_STEPS, attribute_text, attribution_result, diff_attributions, what_was_read

HELDOUT_DEFAULT = 256
# Control draws of an ablation: a verdict needs their spread (workers/controls.py VERDICT_DRAWS)
DEFAULT_CONTROLS = 10


def warm_run(cache: RunCache, run_id: str) -> None:
    """Load a run's model, every layer's SAE and decoder rows, and the default ablation's
    evaluation set (the first HELDOUT_DEFAULT held-out texts) at its best layer."""
    run = cache.get(run_id)
    layers = [row["layer"] for row in store.layers(run.store_path)]
    for layer in layers:
        run.decoder(layer)
    best = store.best_layer(run.store_path)
    if best is not None:
        texts, _, key = _eval_texts(run, {"n_texts": HELDOUT_DEFAULT})
        run.eval_set(best, key, texts)


# --- pipeline ---------------------------------------------------------------------------

def pipeline_task(params: dict, ctx) -> dict:
    def on_stage(message: str) -> None:
        if message == PUBLISHING:  # a cancel asked for since the last heartbeat still stops it here
            ctx.ask_queue()
        ctx.report(message=message)

    # queued on the web: its paths are resolved and checked against the input folders again here,
    # where they are read (a symlink changed since the server checked it is caught)
    config = parse_config(yaml.safe_load(params["config_yaml"]), input_roots=ctx.settings.input_roots)
    run_pipeline(config, ctx.settings, replace=bool(params.get("replace")), on_stage=on_stage,
                 on_progress=lambda p: ctx.report(progress=p))
    return {"run_id": config.run_id}


# --- ablation ---------------------------------------------------------------------------

def _eval_texts(run: LoadedRun, params: dict) -> tuple[list[str], list[int | None], tuple]:
    """The evaluation set: typed texts, or the first n held-out texts of the run's corpus."""
    if params.get("texts"):
        texts = list(params["texts"])
        return texts, [None] * len(texts), ("typed", tuple(texts))
    n = int(params.get("n_texts") or HELDOUT_DEFAULT)
    rows = store.texts(run.store_path, "heldout", n)
    return [r["text"] for r in rows], [r["text_id"] for r in rows], ("heldout", n)


def ablation_task(params: dict, ctx) -> dict:
    run = ctx.cache.get(params["run_id"])
    layer = int(params["layer"])
    sae = run.sae(layer)
    vectors = store.layer_vectors(run.store_path, layer)
    weights, frequency = np.asarray(vectors["weight"]), np.asarray(vectors["frequency"])
    edit = FeatureEdit(tuple(int(f) for f in params["features"]), params["mode"], float(params.get("value") or 0.0))
    if max(edit.features) >= sae.cfg.d_sae:
        raise ValueError(f"feature {max(edit.features)} is out of range: layer {layer} has {sae.cfg.d_sae} features")
    texts, text_ids, eval_key = _eval_texts(run, params)
    pooling = run.config.regression.pooling
    directions, linear = run.decoder(layer)
    n_controls = int(params.get("n_controls", DEFAULT_CONTROLS)) if params.get("control", True) else 0
    draws = control_draws(frequency, edit.features, n_controls, seed=int(ctx.job["id"])) if n_controls else []
    parts = (["scoring the texts unedited"] if (layer, eval_key) not in run.eval_sets else []) + [
        "the chosen features"] + [f"random control {i + 1} of {len(draws)}" for i in range(len(draws))]

    def progress(part: str):
        return lambda share: ctx.report(progress=(parts.index(part) + share) / len(parts), message=part)

    ctx.report(0.0, f"ablating {len(edit.features)} features over {len(texts)} texts")
    evalset = run.eval_set(layer, eval_key, texts, progress(parts[0]))
    scope = params.get("tokens") or "text"
    chosen = run_ablation(run.adapter, sae, layer, evalset, edit, weights, pooling, ABLATION_BATCH,
                          progress("the chosen features"), directions, linear, scope)
    seed = int(ctx.job["id"])
    if draws:  # the chosen features' result first; the controls' verdict follows when they are done
        first = ablation_result(chosen, [], [], texts, text_ids, seed)
        ctx.partial(require_finite({**first, "controls_pending": len(draws)}, edit, chosen.before))
    controls = [run_ablation(run.adapter, sae, layer, evalset, FeatureEdit(draw, edit.mode, edit.value), weights,
                             pooling, ABLATION_BATCH, progress(f"random control {i + 1} of {len(draws)}"),
                             directions, linear, scope) for i, draw in enumerate(draws)]
    result = ablation_result(chosen, controls, draws, texts, text_ids, seed=seed)
    return require_finite(result, edit, chosen.before)


def ablation_result(chosen, controls, draws, texts, text_ids, seed: int) -> dict:
    """The job's result: the change over all reads and over those where a chosen feature fires,
    each beside both predictions and the controls (paired test of chosen - control)."""
    fired = chosen.fired

    def summaries(where):
        if not where.any():  # the chosen features fire on none of these texts: nothing changed there
            return {"summary": {**chosen.summary(where), "mean_delta": 0.0, "fires_on_none": True},
                    "control": {"n_draws": len(controls), "draw_means": [], "mean_delta": None, "low": None,
                                "high": None, "test": {"difference": None, "ci_low": None, "ci_high": None,
                                                       "p_value": None, "n": 0}}}
        return {"summary": chosen.summary(where),
                "control": control_summary(chosen.delta[where], [c.delta[where] for c in controls], seed)}

    everywhere, where_fired = summaries(np.ones_like(fired)), summaries(fired)
    examples = []
    for row, i in enumerate(chosen.text_index.tolist()):
        examples.append({"text_id": text_ids[i], "text": texts[i][:300], "before": float(chosen.before[row]),
                         "after": float(chosen.after[row]), "predicted": float(chosen.predicted[row]),
                         "attributed": None if chosen.attributed is None else float(chosen.attributed[row]),
                         "fired": bool(fired[row])})
    return {**everywhere, "where_fired": where_fired, "examples": examples, "fires_on_none": not fired.any(),
            "controls": [{"features": list(draw), "summary": c.summary(), "deltas": [float(d) for d in c.delta]}
                         for draw, c in zip(draws, controls)]}


# --- one text: its score, attribution and edits ----------------------------------------

SHOWN_BY_CONTRIBUTION = 8  # features shaded token by token when the request names none


def text_attributions(run: LoadedRun, text: str, layers: list[int], steps: int, ctx=None) -> dict[str, dict]:
    """Each layer's complete attribution of the text's score (workers/text_attribution.py), by
    layer id as a string (JSON keys); {} where the score has no gradient through the model."""
    if not adapter_has_gradient(run.adapter):
        return {}
    out = {}
    for i, layer in enumerate(layers):
        if ctx is not None:
            ctx.report(i / (len(layers) + 1), f"attributing the score at layer {layer}")
        out[str(layer)] = attribution_result(attribute_text(run.adapter, run.sae(layer), layer, text, steps))
    return out


@torch.no_grad()
def inference_task(params: dict, ctx) -> dict:
    """A text's reward, its complete attribution over the SAE features of the chosen layers, and,
    per token, the activations of the shown features (by default the ones that contribute most
    to this text's score); with an edit, the reward again with those features changed."""
    run = ctx.cache.get(params["run_id"])
    layer = int(params["layer"])
    sae = run.sae(layer)
    d_sae = sae.cfg.d_sae
    text = params["text"]
    attribution_layers = [int(x) for x in params.get("attribution_layers") or [layer]]
    attribution = text_attributions(run, text, attribution_layers,
                                    int(params.get("steps", DEFAULT_STEPS)), ctx)
    features = [int(f) for f in params.get("features") or []]
    if not features:  # those that contribute most to this text's score; where none does (no gradient,
        # or a layer whose text tokens do not reach the score), the layer's default ranking's top
        contributing = attribution.get(str(layer), {}).get("features", [])[:SHOWN_BY_CONTRIBUTION]
        features = [row["feature"] for row in contributing] or [int(f) for f in params.get("fallback_features") or []]
    too_large = [f for f in features if f >= d_sae]
    if too_large:
        raise JobFailed(f"feature {too_large[0]} is out of range: layer {layer} has {d_sae} features")
    adapter = run.adapter
    batch = adapter.tokenize([text])
    grad = None
    if params.get("edit") and adapter_has_gradient(adapter):  # for the edit's first-order prediction
        score, captured, grads = forward_with_gradients(adapter, batch, [layer])
        grad = grads[layer]
    else:
        score, captured = adapter.run(batch, capture=[layer])
    acts = sae.encode(captured[layer][0].float())  # [T, d_sae]
    keep = batch.attention_mask[0].bool()
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch.input_ids[0][keep].tolist())
    result: dict[str, Any] = {
        "text": text,
        "text_id": params.get("text_id"),
        "tokens": tokens,
        "reward": float(score.float().mean()),
        "reads": [float(x) for x in score.float().cpu()],
        "read": what_was_read(adapter, text),
        "features": features,
        "acts": {str(f): [float(x) for x in acts[keep, f].cpu()] for f in features},
        "attribution": attribution,
    }
    if params.get("edit"):
        e = params["edit"]
        edit = FeatureEdit(tuple(int(f) for f in e["features"]), e["mode"], float(e.get("value") or 0.0))
        vectors = store.layer_vectors(run.store_path, layer)

        directions, linear = run.decoder(layer)
        clean_pass = EvalSet(layer, 1, [EvalBatch(np.arange(1), batch, score.float(), captured[layer], grad)])  # reused
        scope = e.get("tokens") or "text"
        ablated = run_ablation(adapter, sae, layer, clean_pass, edit, np.asarray(vectors["weight"]),
                               run.config.regression.pooling, 1, None, directions, linear, scope)
        result["edit"] = {**e, "reward_after": float(ablated.after.mean()), "reward_before": float(ablated.before.mean()),
                          "predicted_delta": float(ablated.predicted.sum()),
                          "attribution_delta": None if ablated.attributed is None else float(ablated.attributed.sum())}
        _, before, after = edit_hidden(sae, captured[layer][0].float(), edit, directions, linear)
        special = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=adapter.device)
        after = torch.where(edited_tokens(batch, special, scope)[0].unsqueeze(-1), after, before)
        result["edit"]["acts_after"] = {str(f): [float(x) for x in after[keep, f].cpu()] for f in features}
    if params.get("edit"):
        require_finite(result, edit, result["reads"])
    elif _non_finite(result):
        raise JobFailed("the reward model's score or the features' activations are non-finite on this text")
    ctx.report(1.0, "done")
    return result


def text_diff_task(params: dict, ctx) -> dict:
    """Two texts (a text and an edit of it) side by side at one layer: both scores and
    attributions, the features whose contribution changed most, and the tokens aligned."""
    run = ctx.cache.get(params["run_id"])
    if not adapter_has_gradient(run.adapter):
        raise JobFailed("this run's score has no gradient through the model: a text diff needs its attribution")
    layer, steps = int(params["layer"]), int(params.get("steps", DEFAULT_STEPS))
    attributions, sides = [], []
    for i, text in enumerate([params["text_a"], params["text_b"]]):
        ctx.report(i / 2, f"attributing text {'AB'[i]}")
        attributions.append(attribute_text(run.adapter, run.sae(layer), layer, text, steps))
        sides.append({"text": text, "text_id": params.get(f"text_id_{'ab'[i]}"), "read": what_was_read(run.adapter, text),
                      **attribution_result(attributions[-1])})
    result = {"layer": layer, "a": sides[0], "b": sides[1], **diff_attributions(*attributions)}
    if _non_finite(result):
        raise JobFailed("the reward model's score is non-finite on one of the texts")
    ctx.report(1.0, "done")
    return result

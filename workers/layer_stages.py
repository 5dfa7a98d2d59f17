"""The per-layer stages (workers/stages.py), in the order each layer goes through them: which
SAE the layer has, its features' statistics and contexts, the attention sinks left out, the
reward regression, the reward recovered, what the model uses (measured), the decoder
neighbours. A new per-layer stage is a Stage here (or in a module of its own) and its place
in LAYER_STAGES."""
from __future__ import annotations

import numpy as np

from backend.core.run_config import ARCHITECTURE_KNOBS
from backend.core.store_schema import TABLES
from workers.analyze import adapter_has_gradient, feature_tables
from workers.causal import MEASURED_COLUMNS, empty_layer_columns, not_applicable, run_causal_stage
from workers.neighbours import decoder_neighbours
from workers.regress import fit_probe, fit_reward_regression, weight_effect_agreement
from workers.stages import LayerContext, Stage, StageOutput


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# --- which SAE ---------------------------------------------------------------------------------

def sae_identity(ctx: LayerContext) -> StageOutput:
    """Where the layer's SAE reads, its shape, where its weights are."""
    config, adapter = ctx.run.config, ctx.run.adapter
    return ctx.output(row={
        "hook_name": adapter.hook_name(ctx.layer), "sae_path": str(ctx.run.sae_paths[ctx.layer].relative_to(ctx.run.run_dir)),
        "architecture": config.sae.architecture, "d_in": adapter.d_model, "d_sae": config.sae.width,
        "k": config.sae.k if config.sae.architecture in ARCHITECTURE_KNOBS["k"] else None})


SAE = Stage("sae", sae_identity, sections=(),
            layer_columns=("hook_name", "sae_path", "architecture", "d_in", "d_sae", "k"))


# --- feature statistics ------------------------------------------------------------------------

FEATURE_STATISTICS = ("frequency", "mean_activation", "max_activation", "top_token", "hist_edges", "hist_counts",
                      "reward_correlation", "reward_effect", "attribution", "attribution_abs", "attribution_share",
                      "top_tokens")


def statistics(ctx: LayerContext) -> StageOutput:
    """Each feature's statistics and contexts, the texts it fires most on, and how well the SAE
    reconstructs the layer."""
    ctx.run.stage(f"layer {ctx.layer}: feature statistics and top contexts")
    feats, contexts = feature_tables(ctx.layer, ctx.layer_acts, ctx.run.vocab)
    layer_acts = ctx.layer_acts
    row = {**layer_acts.metrics(ctx.run.acts.n_tokens, ctx.run.adapter.d_model),
           # dead: never fired on a token the SAE is meant for (a chat run's statistics read responses only)
           "dead_fraction": float(1 - layer_acts.fired.float().mean()) if layer_acts.fired is not None
           else float(np.mean(np.asarray(feats["frequency"]) == 0))}
    features = {name: feats[name] for name in FEATURE_STATISTICS}  # layer and feature: the frame's (stages.frame)
    return ctx.output(row=row, features=features,
                      tables={"contexts": contexts, "feature_texts": layer_acts.features.ranked.columns(ctx.layer)})


def statistics_summary(row: dict, features: dict) -> str:
    return f"explained variance {row['explained_variance']:.3f}, L0 {row['l0']:.1f}, dead {row['dead_fraction']:.1%}"


STATISTICS = Stage("statistics", statistics, sections=(), share=0.05, summary=statistics_summary,
                   layer_columns=("mse", "explained_variance", "l0", "dead_fraction"),
                   feature_columns=FEATURE_STATISTICS, tables=("contexts", "feature_texts"))


# --- attention sinks ---------------------------------------------------------------------------

def sinks(ctx: LayerContext) -> StageOutput:
    """What the layer's attention-sink rule left out (workers/sinks.py)."""
    return ctx.output(row=ctx.layer_acts.sinks.columns(ctx.run.vocab))


SINKS = Stage("sinks", sinks, sections=(),
              layer_columns=("sink_max_norm", "sink_count", "sink_fraction", "sink_positions", "sink_tokens",
                             "sink_mean_norm", "other_mean_norm", "other_max_norm"))


# --- the reward regression ---------------------------------------------------------------------

def regression(ctx: LayerContext) -> StageOutput:
    """The reward regressed on the layer's pooled features, and the raw-activation probe beside
    it; the reward effect (statistics) is what the weights are compared with."""
    config, corpus, acts = ctx.run.config, ctx.run.corpus, ctx.run.acts
    ctx.run.stage(f"layer {ctx.layer}: reward regression ({config.regression.method}, {config.regression.pooling} "
                  "pooling) and raw-activation probe")
    read_heldout = corpus.heldout[acts.read_text_ids]
    fit = fit_reward_regression(ctx.layer_acts.pooled_matrix(acts.n_reads), acts.scores, read_heldout,
                                config.regression, config.seed, ctx.sae.W_dec.detach().float().cpu().numpy())
    probe = fit_probe(ctx.layer_acts.raw_matrix(), acts.scores, read_heldout, config.regression.cv_folds, config.seed)
    row = {
        "pooling": config.regression.pooling, "r2_train": fit.r2_train, "r2_heldout": fit.r2_heldout,
        "r2_cv": fit.r2_cv, "ridge_alpha": fit.alpha, "regression_method": fit.method,
        "merge_correlated": config.regression.merge_correlated,
        "merge_min_cosine": config.regression.merge_min_cosine, "cv_folds": fit.cv_folds,
        "weight_effect_agreement": weight_effect_agreement(fit.weights, ctx.features["reward_effect"],
                                                           ctx.features["frequency"]),
        "probe_r2_train": probe.r2_train, "probe_r2_heldout": probe.r2_heldout, "probe_alpha": probe.alpha,
        "n_train": fit.n_train, "n_heldout": fit.n_heldout,
    }
    weights = {
        "weight": fit.weights, "std_weight": fit.std_weights,
        "weight_se": fit.weight_spread if fit.weight_spread is not None else [None] * len(fit.weights),
        "weight_group": fit.weight_groups,
        "weight_group_size": np.bincount(fit.weight_groups, minlength=len(fit.weight_groups))[fit.weight_groups],
    }
    return ctx.output(row=row, features=weights)


def regression_summary(row: dict, features: dict) -> str:
    grouped = features["weight_group_size"] > 1
    return (f"held-out R² {row['r2_heldout']:.3f} (train {row['r2_train']:.3f}, alpha {row['ridge_alpha']:g}; "
            f"{int(grouped.sum())} near-duplicate features in {len(np.unique(features['weight_group'][grouped]))} "
            f"groups; raw probe {row['probe_r2_heldout']:.3f}), "
            f"weight-effect agreement {_fmt(row['weight_effect_agreement'])}")


REGRESSION = Stage("regression", regression, sections=(), share=0.10, summary=regression_summary,
                   needs=("features.reward_effect", "features.frequency"),
                   layer_columns=("pooling", "r2_train", "r2_heldout", "r2_cv", "ridge_alpha", "regression_method",
                                  "merge_correlated", "merge_min_cosine", "weight_effect_agreement", "cv_folds",
                                  "probe_r2_train", "probe_r2_heldout", "probe_alpha", "n_train", "n_heldout"),
                   feature_columns=("weight", "std_weight", "weight_se", "weight_group", "weight_group_size"))


# --- reward recovered --------------------------------------------------------------------------

def recovery(ctx: LayerContext) -> StageOutput:
    """The reward with the SAE spliced in, measured for every layer at once before the stages
    run (workers/evaluate.py: one pass over the held-out texts serves all layers)."""
    got = ctx.run.recovery[ctx.layer]
    return ctx.output(row={"reward_recovered": got.reward_recovered, "reward_mae_sae": got.mae_sae,
                           "reward_mae_zero": got.mae_zero})


def recovery_summary(row: dict, features: dict) -> str:
    return f"reward recovered {_fmt(row['reward_recovered'])}"


RECOVERY = Stage("recovery", recovery, sections=(), summary=recovery_summary,
                 layer_columns=("reward_recovered", "reward_mae_sae", "reward_mae_zero"))


# --- what the model uses, measured -------------------------------------------------------------

def causal(ctx: LayerContext) -> StageOutput:
    """Measured effects and deletion curves (workers/causal.py); nothing to measure where the
    score is computed from the text, not by the model."""
    result = _causal_result(ctx)
    return ctx.output(row=result.layer_columns, features=result.feature_columns,
                      tables={"faithfulness": _as_columns(result.curves, "faithfulness")})


def _causal_result(ctx: LayerContext):
    config, corpus, layer, report = ctx.run.config, ctx.run.corpus, ctx.layer, ctx.run.stage
    d_sae = len(ctx.features["weight"])
    if not config.effects.enabled or not adapter_has_gradient(ctx.run.adapter):
        if config.effects.enabled:
            report(f"layer {layer}: no measured effects: the score ({config.model.reward_function}) is computed "
                   "from the text, so no edit of the model moves it")
        return not_applicable(d_sae)
    heldout = [t for t, held in zip(corpus.texts, corpus.heldout) if held]
    if not heldout:
        report(f"layer {layer}: no measured effects: the corpus has no held-out texts to measure them on")
        return not_applicable(d_sae)
    ranking_columns = {name: np.array([np.nan if v is None else v for v in ctx.features[name]], dtype=np.float64)
                       for name in ("frequency", "reward_effect", "attribution", "attribution_abs")}
    result = run_causal_stage(ctx.run.adapter, ctx.sae, layer, heldout, ranking_columns,
                              np.asarray(ctx.features["weight"]), config.regression.pooling, config.effects,
                              config.seed, report=report, progress=ctx.progress)
    report(f"layer {layer}: measured effects {result.timings['measured']:.0f} s, deletion curves "
           f"{result.timings['faithfulness']:.0f} s; default ranking {result.layer_columns['default_ranking']}")
    return result


def _as_columns(rows: list[dict], table: str) -> dict[str, list]:
    """Rows with the same keys -> one list per key; no rows: the table's columns, empty."""
    names = list(rows[0]) if rows else TABLES[table].names
    return {name: [row[name] for row in rows] for name in names}


def causal_summary(row: dict, features: dict) -> str:
    return (f"default ranking {row['default_ranking']}, its top 10 zeroed move the reward "
            f"{_fmt(row['faithfulness_effect'])} on its {row['faithfulness_measure']} measure (control "
            f"{_fmt(row['faithfulness_control'])}; {_fmt(row['faithfulness_relative'])} of the spread; "
            f"{row['faithfulness_verdict']}), calibration slope regression {_fmt(row['calibration_regression_slope'])}, "
            f"attribution {_fmt(row['calibration_attribution_slope'])}")


CAUSAL = Stage("causal", causal, sections=(), share=0.85, summary=causal_summary,
               needs=("features.frequency", "features.reward_effect", "features.attribution",
                      "features.attribution_abs", "features.weight"),
               layer_columns=tuple(empty_layer_columns()), feature_columns=MEASURED_COLUMNS, tables=("faithfulness",))


# --- decoder neighbours ------------------------------------------------------------------------

def neighbours(ctx: LayerContext) -> StageOutput:
    """Each feature's nearest features by decoder cosine."""
    indices, cosines = decoder_neighbours(ctx.sae.W_dec)
    return ctx.output(features={"neighbours": indices.tolist(), "neighbour_cosines": cosines.tolist()})


NEIGHBOURS = Stage("neighbours", neighbours, sections=(), feature_columns=("neighbours", "neighbour_cosines"))


LAYER_STAGES: list[Stage] = [SAE, STATISTICS, SINKS, REGRESSION, RECOVERY, CAUSAL, NEIGHBOURS]

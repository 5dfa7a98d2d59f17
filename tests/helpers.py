"""Reusable test builders: a small synthetic run (store + SQL rows) and a web client.

Pipeline tests can reuse them: `make_client(settings)` serves whatever runs are registered
under `settings`, and `publish_synthetic_run(settings)` makes one without any model.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import warnings

import numpy as np

with warnings.catch_warnings():
    # Starlette 1.x nudges towards httpx2 here; the httpx client works the same for tests.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from backend.core import db, store_schema
from backend.web.app import create_app
from backend.core.rankings import RANKINGS, directions_of
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from workers import publish
from workers.publish import registry_rows, with_best_layer, write_store

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYERS = (3, 5)  # not 0..n-1, so code that confuses layer ids with indexes fails
N_FEATURES = 64
DEAD_FEATURE = 63  # never fires: no contexts, empty histogram
CONTEXT_FEATURE = 7  # its strongest context ends in a WordPiece token: "amaz ##ing"
CONTEXT_TOKENS = ["[CLS]", "the", "movie", "was", "amaz", "##ing", "!", "[SEP]"]
CONTEXT_ACTS = [0.0, 0.0, 0.25, 0.5, 4.0, 2.0, 0.0, 0.0]
VOCAB = ["good", "bad", "plot", "boring", "great", "awful", "the", "not", "film", "love"]
QUANTILE_BINS = 5  # every live feature has one random example per activation bin
QUANTILE_TOKEN = "meh"  # CONTEXT_FEATURE's quantile samples peak on this token
WEIGHT_GROUP = (CONTEXT_FEATURE, 11, 12)  # near-duplicates fitted as one column: they share one weight
RANKED_TEXTS = 8  # per live feature, the texts it fires on most (feature_texts)

# What the model uses (workers/causal.py), per layer. Layer 3: attribution is its default ranking,
# whose top 10 move the reward well beyond the controls. Layer 5: the regression weight, but no
# ranking's edits reach the score (most of its gradient sits at the token the head reads).
DEFAULT_RANKING = {3: "attribution", 5: "weight"}
CURVE_NS = (1, 2, 5, 10, 20, 50)
N_MEASURED = 10  # features per layer zeroed one by one: the largest |attribution|
CURVE_AT_10 = {  # mean Δ score zeroing each ranking's top 10; the curve grows as log(1 + n)
    3: {"attribution": -0.080, "measured_delta": -0.060, "reward_effect": -0.040, "weight": -0.020, "abs_weight": -0.012},
    5: {"weight": -0.0012, "abs_weight": -0.0010, "attribution": -0.0008, "reward_effect": -0.0006, "measured_delta": -0.0004},
}
CONTROL = {3: (0.001, 0.004), 5: (0.0, 0.0002)}  # the random draws' mean Δ, and how far apart the 3 draws lie
SCORE_SPREAD = {3: 0.625, 5: 0.5}
READ_TOKEN_GRADIENT_SHARE = {3: 0.41, 5: 0.97}


def synthetic_value(sql_type: str, i: int) -> Any:
    """A deterministic value of `sql_type` for row i: what a spec column gets that the helper
    does not set, so a column added to the spec needs no edit here."""
    if sql_type.endswith("[]"):
        return [synthetic_value(sql_type[:-2], i)]
    base = sql_type.split("(")[0].split()[0]
    return {"INTEGER": i, "BIGINT": i, "DOUBLE": i / 8, "FLOAT": i / 8, "VARCHAR": f"v{i}", "BOOLEAN": i % 2 == 0}.get(base)


def spec_columns(table: str, rows: list[dict[str, Any]]) -> dict[str, list]:
    """Rows -> the spec's columns of `table`, in its order; a column no row sets is synthetic."""
    spec = store_schema.TABLES[table]
    unknown = {name for row in rows for name in row} - set(spec.names)
    assert not unknown, f"{table}: {sorted(unknown)} are not in the spec"
    return {c.name: [row[c.name] if c.name in row else synthetic_value(c.sql_type, i) for i, row in enumerate(rows)]
            for c in spec.columns}


def ranked(rows: list[dict[str, Any]], ranking: str, direction: str | None = None) -> list[int]:
    """Live features with a nonzero value in the ranking's column, in its order, one direction
    of a signed ranking (workers/faithfulness.py)."""
    r = RANKINGS[ranking]
    direction = direction or directions_of(ranking)[0]
    live = [row for row in rows if row["frequency"] > 0 and row[r.column]]
    signed = lambda row: (r.sign or 1) * row[r.column]  # noqa: E731
    keep = {"raises": lambda row: signed(row) > 0, "lowers": lambda row: signed(row) < 0,
            "both": lambda row: True}[direction]
    key = {"raises": lambda row: -signed(row), "lowers": signed, "both": lambda row: -abs(row[r.column])}[direction]
    return [row["feature"] for row in sorted(filter(keep, live), key=lambda row: (key(row), row["feature"]))]


def deletion_curves(layer: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Faithfulness rows: each ranking's top n zeroed (signed ones in both directions) beside
    frequency-matched draws (10 at n = 10, else 3), for each n its features allow. The effect
    grows as log(1 + n); lowerers move the score half as far as raisers."""
    control, control_gap = CONTROL[layer]
    out = []
    for ranking, at_10 in CURVE_AT_10[layer].items():
        for direction in directions_of(ranking):
            order = ranked(rows, ranking, direction)
            for n in (n for n in CURVE_NS if n <= len(order)):
                scale = (0.5 if direction == "lowers" else 1.0) * np.log1p(n) / np.log1p(10)
                effect = abs(at_10) * scale
                mean = {"raises": -effect, "lowers": effect, "both": effect / 4}[direction]
                n_draws = 10 if n == 10 else 3
                draws = [control + control_gap * (i - (n_draws - 1) / 2) / n_draws for i in range(n_draws)]
                draw_effects = [abs(d) for d in draws]
                control_effect = float(np.mean(draw_effects))
                beyond = effect > max(draw_effects) and n_draws >= 10 and effect - control_effect > 0.02 * SCORE_SPREAD[layer]
                difference = mean - control
                out.append(dict(
                    layer=layer, ranking=ranking, direction=direction, n=n, features=order[:n], mean_delta=mean,
                    ci_low=mean - abs(mean) / 4, ci_high=mean + abs(mean) / 4, abs_mean_delta=effect,
                    predicted_mean_delta=3 * mean, attribution_mean_delta=1.2 * mean, predicted_ratio=3.0,
                    attribution_ratio=1.2, n_reads=40, n_fired=min(40, 5 + 3 * n), fired_mean_delta=1.5 * mean,
                    control_mean_delta=control, control_low=min(draws), control_high=max(draws),
                    control_draw_means=draws, difference=difference, difference_low=difference - abs(mean) / 4,
                    difference_high=difference + abs(mean) / 4,
                    p_value=0.001 if abs(difference) > 0.02 * SCORE_SPREAD[layer] else 0.6,
                    measure="abs" if direction == "both" else "signed", effect=effect, control_effect=control_effect,
                    control_effects=draw_effects, excess=effect - control_effect,
                    rank_p_value=1 / (1 + n_draws) if effect > max(draw_effects) else 1.0,
                    effect_p_value=0.001 if beyond else 0.6,
                    verdict="too_few_controls" if n_draws < 10 else "beyond_controls" if beyond else "within_controls",
                ))
    return out


def calibration(rows: list[dict[str, Any]], prediction: str) -> tuple[float, float]:
    """Slope of measured on predicted single-feature Δ, and Pearson r (workers/measured_effects.py)."""
    measured = [r for r in rows if r["measured_n"]]
    x = np.array([r[f"predicted_delta_{prediction}"] for r in measured])
    y = np.array([r["measured_delta"] for r in measured])
    return float(np.polyfit(x, y, 1)[0]), float(np.corrcoef(x, y)[0, 1])


def causal_layer_columns(layer: int, rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> dict[str, Any]:
    """The layer's summary of its curves and measurements, as workers/causal.py derives it."""
    spread, default = SCORE_SPREAD[layer], DEFAULT_RANKING[layer]
    at_10 = [c for c in curves if c["ranking"] == default and c["n"] == 10]
    (reg_slope, reg_r), (attr_slope, attr_r) = calibration(rows, "regression"), calibration(rows, "attribution")
    effect, control = np.mean([c["effect"] for c in at_10]), np.mean([c["control_effect"] for c in at_10])
    verdicts = {c["verdict"] for c in at_10}
    return dict(default_ranking=default, faithfulness_measure=at_10[0]["measure"], faithfulness_effect=effect,
                faithfulness_control=control, faithfulness_relative=(effect - control) / spread,
                faithfulness_verdict="within_controls" if "within_controls" in verdicts else "beyond_controls",
                faithfulness_draws=min(len(c["control_effects"]) for c in at_10),
                score_spread=spread, reach=max(c["excess"] for c in curves) / spread,
                read_token_gradient_share=READ_TOKEN_GRADIENT_SHARE[layer],
                calibration_regression_slope=reg_slope, calibration_regression_r=reg_r,
                calibration_attribution_slope=attr_slope, calibration_attribution_r=attr_r,
                n_measured=sum(1 for r in rows if r["measured_n"]))


def synthetic_tables(seed: int = 0, causal: bool = True) -> dict[str, dict[str, list]]:
    """Plain columns for every store table: 2 layers x 64 features, a few contexts each.
    causal=False: a score the model does not compute, so nothing measured (no curves, no
    measured Δ, no default ranking)."""
    rng = np.random.default_rng(seed)
    n_texts = 20
    rewards, scores = rng.normal(size=n_texts), rng.normal(size=n_texts)
    texts = [dict(text_id=i, split="train" if i < 15 else "heldout", text=f"synthetic review number {i}",
                  reward=float(rewards[i]), score=float(scores[i]), n_tokens=8, reward_position=0,
                  response_start=None, response_end=None)
             for i in range(n_texts)]
    layers, features, contexts, faithfulness, ranked_texts = [], [], [], [], []
    extra = np.random.default_rng(seed + 1)  # separate stream: the columns above keep their values
    uses = np.random.default_rng(seed + 2)  # ... and one for what the model uses
    for i, layer in enumerate(LAYERS):
        layers.append(dict(
            layer=layer, hook_name=f"blocks.{layer}.hook_resid_post", sae_path=f"saes/layer_{layer}",
            architecture="topk", d_in=16, d_sae=N_FEATURES, k=4, mse=0.01 * (i + 1),
            explained_variance=0.9 - 0.1 * i, l0=4.0, dead_fraction=1 / N_FEATURES,
            pooling="mean", r2_train=0.95 - 0.2 * i, r2_heldout=0.81 - 0.3 * i,
            ridge_alpha=1.0, n_train=15, n_heldout=5,
            reward_recovered=0.93 - 0.2 * i, reward_mae_sae=0.05 * (i + 1), reward_mae_zero=0.7,
            r2_cv=0.79 - 0.3 * i, regression_method="ridge", merge_correlated=0.9, merge_min_cosine=0.5,
            weight_effect_agreement=0.5 - 0.4 * i, cv_folds=5,
            probe_r2_train=0.9 - 0.05 * i, probe_r2_heldout=0.64 + 0.07 * i, probe_alpha=2.5,
            **pair_layer_columns(layer, i),
        ))
        weights = rng.normal(size=N_FEATURES)  # distinct almost surely (but in WEIGHT_GROUP): orderings are exact
        weights[list(WEIGHT_GROUP)] = weights[WEIGHT_GROUP[0]]
        attribution = uses.normal(0, 0.01, N_FEATURES)  # distinct: its order is exact too
        attribution[DEAD_FEATURE] = np.nan
        measured = set(np.argsort(-np.nan_to_num(np.abs(attribution)))[:N_MEASURED])
        first_row = len(features)
        for f in range(N_FEATURES):
            dead = f == DEAD_FEATURE
            grouped = f in WEIGHT_GROUP
            max_act = 0.0 if dead else 4.0 if f == CONTEXT_FEATURE else float(rng.uniform(0.5, 10))
            # the draws in this order (rng, then extra): the values tests expect
            features.append(dict(
                layer=layer, feature=f,
                frequency=0.0 if dead else float(rng.uniform(0.001, 0.3)),
                mean_activation=0.0 if dead else max_act / 3, max_activation=max_act,
                weight=0.0 if dead else float(weights[f]),
                std_weight=0.0 if dead else float(weights[f]) * (0.5 + f / N_FEATURES),
                weight_se=None if dead else 0.05 + f / (2 * N_FEATURES),
                weight_group=WEIGHT_GROUP[0] if grouped else f,
                weight_group_size=len(WEIGHT_GROUP) if grouped else 1,
                top_token=None if dead else "amaz" if f == CONTEXT_FEATURE else VOCAB[f % 10],
                hist_edges=[] if dead else [float(x) for x in np.linspace(0, max_act, 11)],
                hist_counts=[] if dead else [int(c) for c in rng.integers(0, 50, 10)],
                reward_correlation=None if dead else float(extra.uniform(-1, 1)),
                reward_effect=None if dead else float(extra.normal()),
                **uses_columns(dead, f in measured, attribution[f], float(weights[f]), max_act / 3, uses),
                top_tokens=[] if dead else [
                    {"token": VOCAB[(f + j) % 10], "mean_activation": max_act / (j + 2), "count": 40 - 10 * j}
                    for j in range(3)],
                # decoder neighbours: the next three ids, nearer first
                neighbours=[(f + j) % N_FEATURES for j in (1, 2, 3)], neighbour_cosines=[0.9, 0.5, 0.1],
                pair_max_cosine=pair_cosine(f, i), pair_feature=f % PAIR_WIDTH,
            ))
            if dead:
                continue
            width = max_act / QUANTILE_BINS
            for b in range(QUANTILE_BINS):
                tokens = [VOCAB[j] for j in extra.integers(0, 10, 6)]
                if f == CONTEXT_FEATURE:
                    tokens[3] = QUANTILE_TOKEN
                acts = [0.0] * 6
                acts[3] = width * (b + 0.5)
                contexts.append(dict(
                    layer=layer, feature=f, kind="quantile", rank=b, bin=b, bin_low=width * b,
                    bin_high=width * (b + 1), text_id=(f + b) % n_texts, position=3, activation=acts[3],
                    window_start=0, tokens=tokens, acts=acts,
                ))
            ranked_texts.extend(ranked_text_rows(layer, f, max_act, n_texts))
            for rank in range(3):
                if f == CONTEXT_FEATURE and rank == 0:
                    tokens, acts = CONTEXT_TOKENS, CONTEXT_ACTS
                else:
                    tokens = [VOCAB[j] for j in rng.integers(0, 10, 8)]
                    acts = [0.0] * 8
                    acts[4] = max_act * (1 - 0.2 * rank)
                    acts[5] = acts[4] / 2
                contexts.append(dict(
                    layer=layer, feature=f, kind="top", rank=rank, bin=None, bin_low=None, bin_high=None,
                    text_id=(f + rank) % n_texts, position=4,
                    activation=float(max(acts)), window_start=0, tokens=tokens, acts=acts,
                ))
        if causal:
            curves = deletion_curves(layer, features[first_row:])
            faithfulness.extend(curves)
            layers[-1].update(causal_layer_columns(layer, features[first_row:], curves))
    if not causal:
        unmeasured = dict(measured_delta=None, measured_delta_low=None, measured_delta_high=None, measured_n=0,
                          predicted_delta_regression=None, predicted_delta_attribution=None)
        features = [{**row, **unmeasured} for row in features]
        layers = [{**row, **dict.fromkeys(CAUSAL_LAYER_COLUMNS), "n_measured": 0} for row in layers]
    return {"texts": spec_columns("texts", texts), "layers": spec_columns("layers", layers),
            "features": spec_columns("features", features), "contexts": spec_columns("contexts", contexts),
            "faithfulness": spec_columns("faithfulness", faithfulness),
            "feature_texts": spec_columns("feature_texts", ranked_texts)}


PAIR_WIDTH = 16  # each layer's paired SAE (sae.widths' smaller size)


def pair_cosine(feature: int, i: int) -> float:
    """A feature's max cosine in the paired dictionary: distinct values spread over [0, 1]."""
    return ((feature * 37 + 11 * i) % N_FEATURES) / (N_FEATURES - 1)


def pair_layer_columns(layer: int, i: int) -> dict[str, Any]:
    """The layer's MMCS both ways; the mean of its features' pair_cosine is mmcs_to_pair."""
    return dict(pair_width=PAIR_WIDTH, pair_sae_path=f"saes/pair/layer_{layer}_w{PAIR_WIDTH}",
                mmcs_to_pair=sum(pair_cosine(f, i) for f in range(N_FEATURES)) / N_FEATURES,
                mmcs_from_pair=0.7 - 0.1 * i)


def ranked_text_rows(layer: int, feature: int, max_act: float, n_texts: int) -> list[dict[str, Any]]:
    """A live feature's RANKED_TEXTS strongest texts, activation falling with rank: first its
    top contexts' texts with their peaks (feature + rank, max_act x (1 - 0.2 rank)), then the
    next texts by id, each below those."""
    acts = [max_act * (1 - 0.2 * rank) for rank in range(3)]
    acts += [max_act * 0.5 * (1 - rank / RANKED_TEXTS) for rank in range(RANKED_TEXTS - 3)]
    return [dict(layer=layer, feature=feature, rank=rank, text_id=(feature + rank) % n_texts, activation=act)
            for rank, act in enumerate(acts)]


CAUSAL_LAYER_COLUMNS = ("default_ranking", "faithfulness_measure", "faithfulness_effect", "faithfulness_control",
                        "faithfulness_relative", "faithfulness_verdict", "faithfulness_draws",
                        "score_spread", "reach", "read_token_gradient_share", "calibration_regression_slope",
                        "calibration_regression_r", "calibration_attribution_slope", "calibration_attribution_r")


def uses_columns(dead: bool, measured: bool, attribution: float, weight: float, mean_activation: float,
                 rng: np.random.Generator) -> dict[str, Any]:
    """A feature's attribution and, for the measured ones, its Δ zeroed alone (near 0.8x the
    attribution's prediction; the regression's prediction is far larger and noisier)."""
    out = dict(attribution=None, attribution_abs=None, attribution_share=None, measured_delta=None,
               measured_delta_low=None, measured_delta_high=None, measured_n=0,
               predicted_delta_regression=None, predicted_delta_attribution=None)
    if dead:
        return out
    out.update(attribution=float(attribution), attribution_share=float(attribution) * 4,
               attribution_abs=abs(float(attribution)) + float(rng.uniform(0, 0.005)))
    if measured:
        delta = -0.8 * attribution + float(rng.normal(0, 0.001))
        out.update(measured_delta=delta, measured_delta_low=delta - 0.002, measured_delta_high=delta + 0.002,
                   measured_n=int(rng.integers(5, 40)), predicted_delta_regression=-0.02 * weight * mean_activation,
                   predicted_delta_attribution=-float(attribution))
    return out


def publish_synthetic_run(settings: Settings, run_id: str = "synthetic", replace: bool = False,
                          causal: bool = True, sae_weights: dict[int, bytes] | None = None) -> dict[str, Any]:
    """Write a synthetic store under settings.run_dir(run_id) and register it, as the
    pipeline does (store first, SQL rows last). Returns the tables that were written.

    A synthetic SAE has no weights file, so no fingerprint; `sae_weights` (layer -> bytes) writes
    one for those layers, whose fingerprint is then these bytes' hash (a replaced run's SAE that
    differs, or not)."""
    tables = synthetic_tables(causal=causal)
    run_dir = settings.run_dir(run_id)
    for row in publish.layer_rows(tables["layers"]):
        if row["layer"] in (sae_weights or {}):
            weights = run_dir / row["sae_path"] / publish.SAE_WEIGHTS_FILENAME
            weights.parent.mkdir(parents=True, exist_ok=True)
            weights.write_bytes(sae_weights[row["layer"]])
    info = {"run_id": run_id, "name": f"Synthetic {run_id}", "model": "tiny-random-rm",
            "adapter": "seq-cls", "dataset": "synthetic", "config_yaml": "model: tiny-random-rm\n",
            "created_at": "2026-01-01T00:00:00", "n_texts": len(tables["texts"]["text_id"]),
            "n_tokens": sum(tables["texts"]["n_tokens"]), "ranked_texts": RANKED_TEXTS}
    info = with_best_layer(info, tables["layers"])
    write_store(run_dir / STORE_FILENAME, info, tables)
    run_row, sae_rows = registry_rows(info, tables["layers"], run_dir.relative_to(settings.data_dir),
                                      data_dir=settings.data_dir)
    db.register_run(settings, run_row, sae_rows, replace=replace)
    return tables


def make_client(settings: Settings) -> TestClient:
    """A TestClient on a fresh app for `settings`, with the database at the latest schema. It
    names 127.0.0.1 as its host (TestClient's own "testserver" is not a host the app answers to)."""
    db.upgrade(settings)
    return TestClient(create_app(settings), base_url="http://127.0.0.1")


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    """predicate()'s first truthy value, polled every `every` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")

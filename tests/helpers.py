"""Reusable test builders: a small synthetic run (store + SQL rows) and a web client.

Pipeline tests can reuse them: `make_client(settings)` serves whatever runs are registered
under `settings`, and `publish_synthetic_run(settings)` makes one without any model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import warnings

import numpy as np

with warnings.catch_warnings():
    # Starlette 1.x nudges towards httpx2 here; the httpx client works the same for tests.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from backend import db
from backend.app import create_app
from backend.settings import Settings
from backend.store_schema import STORE_FILENAME
from workers.publish import write_store

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


def synthetic_tables(seed: int = 0) -> dict[str, dict[str, list]]:
    """Plain columns for every store table: 2 layers x 64 features, a few contexts each."""
    rng = np.random.default_rng(seed)
    n_texts = 20
    texts = {
        "text_id": list(range(n_texts)),
        "split": ["train" if i < 15 else "heldout" for i in range(n_texts)],
        "text": [f"synthetic review number {i}" for i in range(n_texts)],
        "reward": [float(x) for x in rng.normal(size=n_texts)],
        "score": [float(x) for x in rng.normal(size=n_texts)],
        "n_tokens": [8] * n_texts,
        "reward_position": [0] * n_texts,
    }
    layers: dict[str, list] = {k: [] for k in (
        "layer", "hook_name", "sae_path", "architecture", "d_in", "d_sae", "k", "mse",
        "explained_variance", "l0", "dead_fraction", "pooling", "r2_train", "r2_heldout",
        "ridge_alpha", "n_train", "n_heldout", "reward_recovered", "reward_mae_sae", "reward_mae_zero",
        "r2_cv", "regression_method", "merge_correlated", "merge_min_cosine", "weight_effect_agreement", "cv_folds", "probe_r2_train", "probe_r2_heldout", "probe_alpha")}
    features: dict[str, list] = {k: [] for k in (
        "layer", "feature", "frequency", "mean_activation", "max_activation", "weight", "std_weight", "weight_se",
        "weight_group", "weight_group_size", "top_token", "hist_edges", "hist_counts", "reward_correlation", "reward_effect", "top_tokens", "neighbours",
        "neighbour_cosines")}
    contexts: dict[str, list] = {k: [] for k in (
        "layer", "feature", "kind", "rank", "bin", "bin_low", "bin_high", "text_id", "position", "activation",
        "window_start", "tokens", "acts")}
    extra = np.random.default_rng(seed + 1)  # separate stream: the columns above keep their values
    for i, layer in enumerate(LAYERS):
        for key, value in dict(
            layer=layer, hook_name=f"blocks.{layer}.hook_resid_post", sae_path=f"saes/layer_{layer}",
            architecture="topk", d_in=16, d_sae=N_FEATURES, k=4, mse=0.01 * (i + 1),
            explained_variance=0.9 - 0.1 * i, l0=4.0, dead_fraction=1 / N_FEATURES,
            pooling="mean", r2_train=0.95 - 0.2 * i, r2_heldout=0.81 - 0.3 * i,
            ridge_alpha=1.0, n_train=15, n_heldout=5,
            reward_recovered=0.93 - 0.2 * i, reward_mae_sae=0.05 * (i + 1), reward_mae_zero=0.7,
            r2_cv=0.79 - 0.3 * i, regression_method="ridge", merge_correlated=0.9, merge_min_cosine=0.5,
            weight_effect_agreement=0.5 - 0.4 * i, cv_folds=5,
            probe_r2_train=0.9 - 0.05 * i, probe_r2_heldout=0.64 + 0.07 * i, probe_alpha=2.5,
        ).items():
            layers[key].append(value)
        weights = rng.normal(size=N_FEATURES)  # distinct almost surely (but in WEIGHT_GROUP): orderings are exact
        weights[list(WEIGHT_GROUP)] = weights[WEIGHT_GROUP[0]]
        for f in range(N_FEATURES):
            dead = f == DEAD_FEATURE
            max_act = 0.0 if dead else 4.0 if f == CONTEXT_FEATURE else float(rng.uniform(0.5, 10))
            features["layer"].append(layer)
            features["feature"].append(f)
            features["frequency"].append(0.0 if dead else float(rng.uniform(0.001, 0.3)))
            features["mean_activation"].append(0.0 if dead else max_act / 3)
            features["max_activation"].append(max_act)
            features["weight"].append(0.0 if dead else float(weights[f]))
            features["std_weight"].append(0.0 if dead else float(weights[f]) * (0.5 + f / N_FEATURES))
            features["weight_se"].append(None if dead else 0.05 + f / (2 * N_FEATURES))
            grouped = f in WEIGHT_GROUP
            features["weight_group"].append(WEIGHT_GROUP[0] if grouped else f)
            features["weight_group_size"].append(len(WEIGHT_GROUP) if grouped else 1)
            features["top_token"].append(None if dead else "amaz" if f == CONTEXT_FEATURE else VOCAB[f % 10])
            edges = [] if dead else [float(x) for x in np.linspace(0, max_act, 11)]
            features["hist_edges"].append(edges)
            features["hist_counts"].append([] if dead else [int(c) for c in rng.integers(0, 50, 10)])
            features["reward_correlation"].append(None if dead else float(extra.uniform(-1, 1)))
            features["reward_effect"].append(None if dead else float(extra.normal()))
            features["top_tokens"].append([] if dead else [
                {"token": VOCAB[(f + j) % 10], "mean_activation": max_act / (j + 2), "count": 40 - 10 * j}
                for j in range(3)])
            # decoder neighbours: the next three ids, nearer first
            features["neighbours"].append([(f + j) % N_FEATURES for j in (1, 2, 3)])
            features["neighbour_cosines"].append([0.9, 0.5, 0.1])
            if dead:
                continue
            width = max_act / QUANTILE_BINS
            for b in range(QUANTILE_BINS):
                tokens = [VOCAB[j] for j in extra.integers(0, 10, 6)]
                if f == CONTEXT_FEATURE:
                    tokens[3] = QUANTILE_TOKEN
                acts = [0.0] * 6
                acts[3] = width * (b + 0.5)
                for key, value in dict(
                    layer=layer, feature=f, kind="quantile", rank=b, bin=b, bin_low=width * b,
                    bin_high=width * (b + 1), text_id=(f + b) % n_texts, position=3, activation=acts[3],
                    window_start=0, tokens=tokens, acts=acts,
                ).items():
                    contexts[key].append(value)
            for rank in range(3):
                if f == CONTEXT_FEATURE and rank == 0:
                    tokens, acts = CONTEXT_TOKENS, CONTEXT_ACTS
                else:
                    tokens = [VOCAB[j] for j in rng.integers(0, 10, 8)]
                    acts = [0.0] * 8
                    acts[4] = max_act * (1 - 0.2 * rank)
                    acts[5] = acts[4] / 2
                for key, value in dict(
                    layer=layer, feature=f, kind="top", rank=rank, bin=None, bin_low=None, bin_high=None,
                    text_id=(f + rank) % n_texts, position=4,
                    activation=float(max(acts)), window_start=0, tokens=tokens, acts=acts,
                ).items():
                    contexts[key].append(value)
    return {"texts": texts, "layers": layers, "features": features, "contexts": contexts}


def publish_synthetic_run(settings: Settings, run_id: str = "synthetic", replace: bool = False) -> dict[str, Any]:
    """Write a synthetic store under settings.run_dir(run_id) and register it, as the
    pipeline does (store first, SQL rows last). Returns the tables that were written."""
    tables = synthetic_tables()
    store_path = settings.run_dir(run_id) / STORE_FILENAME
    info = {"run_id": run_id, "name": f"Synthetic {run_id}", "model": "tiny-random-rm",
            "adapter": "seq-cls", "dataset": "synthetic", "created_at": "2026-01-01T00:00:00"}
    write_store(store_path, info, tables)
    L = tables["layers"]
    sae_rows = [
        {"layer": L["layer"][i], "hook_name": L["hook_name"][i], "path": L["sae_path"][i],
         "architecture": L["architecture"][i], "d_in": L["d_in"][i], "d_sae": L["d_sae"][i],
         "mse": L["mse"][i], "explained_variance": L["explained_variance"][i], "l0": L["l0"][i],
         "dead_fraction": L["dead_fraction"][i], "r2_heldout": L["r2_heldout"][i],
         "weight_effect_agreement": L["weight_effect_agreement"][i]}
        for i in range(len(L["layer"]))
    ]
    run_row = {"id": run_id, "name": info["name"], "model": info["model"], "adapter": "seq-cls",
               "dataset": "synthetic", "config_yaml": "model: tiny-random-rm\n",
               "store_path": str(store_path.relative_to(settings.data_dir)),  # relative, like the pipeline
               "n_texts": len(tables["texts"]["text_id"]),
               "n_tokens": sum(tables["texts"]["n_tokens"])}
    db.register_run(settings, run_row, sae_rows, replace=replace)
    return tables


def make_client(settings: Settings) -> TestClient:
    """A TestClient on a fresh app for `settings`, with the database at the latest schema."""
    db.upgrade(settings)
    return TestClient(create_app(settings))

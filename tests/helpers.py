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

from backend import db, store_schema
from backend.app import create_app
from backend.settings import Settings
from backend.store_schema import STORE_FILENAME
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


def synthetic_tables(seed: int = 0) -> dict[str, dict[str, list]]:
    """Plain columns for every store table: 2 layers x 64 features, a few contexts each."""
    rng = np.random.default_rng(seed)
    n_texts = 20
    rewards, scores = rng.normal(size=n_texts), rng.normal(size=n_texts)
    texts = [dict(text_id=i, split="train" if i < 15 else "heldout", text=f"synthetic review number {i}",
                  reward=float(rewards[i]), score=float(scores[i]), n_tokens=8, reward_position=0)
             for i in range(n_texts)]
    layers, features, contexts = [], [], []
    extra = np.random.default_rng(seed + 1)  # separate stream: the columns above keep their values
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
        ))
        weights = rng.normal(size=N_FEATURES)  # distinct almost surely (but in WEIGHT_GROUP): orderings are exact
        weights[list(WEIGHT_GROUP)] = weights[WEIGHT_GROUP[0]]
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
                top_tokens=[] if dead else [
                    {"token": VOCAB[(f + j) % 10], "mean_activation": max_act / (j + 2), "count": 40 - 10 * j}
                    for j in range(3)],
                # decoder neighbours: the next three ids, nearer first
                neighbours=[(f + j) % N_FEATURES for j in (1, 2, 3)], neighbour_cosines=[0.9, 0.5, 0.1],
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
    return {"texts": spec_columns("texts", texts), "layers": spec_columns("layers", layers),
            "features": spec_columns("features", features), "contexts": spec_columns("contexts", contexts)}


def publish_synthetic_run(settings: Settings, run_id: str = "synthetic", replace: bool = False) -> dict[str, Any]:
    """Write a synthetic store under settings.run_dir(run_id) and register it, as the
    pipeline does (store first, SQL rows last). Returns the tables that were written."""
    tables = synthetic_tables()
    run_dir = settings.run_dir(run_id)
    info = {"run_id": run_id, "name": f"Synthetic {run_id}", "model": "tiny-random-rm",
            "adapter": "seq-cls", "dataset": "synthetic", "config_yaml": "model: tiny-random-rm\n",
            "created_at": "2026-01-01T00:00:00", "n_texts": len(tables["texts"]["text_id"]),
            "n_tokens": sum(tables["texts"]["n_tokens"])}
    info = with_best_layer(info, tables["layers"])
    write_store(run_dir / STORE_FILENAME, info, tables)
    run_row, sae_rows = registry_rows(info, tables["layers"], run_dir.relative_to(settings.data_dir))
    db.register_run(settings, run_row, sae_rows, replace=replace)
    return tables


def make_client(settings: Settings) -> TestClient:
    """A TestClient on a fresh app for `settings`, with the database at the latest schema."""
    db.upgrade(settings)
    return TestClient(create_app(settings))

"""P5: dashboard serving latency on a synthetic store of ~1M features.

Builds a synthetic run (`--saes` SAEs x `--width` features, `--contexts` contexts each: half
'top', half 'quantile'; every column of every store table filled with plausible random values,
rows in primary-key order as the pipeline writes them), registers it, starts the real server
(`python -m backend.cli serve`) on loopback and drives it with `--clients` concurrent
keep-alive clients, each scenario bounded by `--requests` and `--seconds`:

  feature       GET /runs/<id>/layers/<L>/features/<F>             (HTML)
  feature-json  GET /api/runs/<id>/layers/<L>/features/<F>         (its JSON twin)
  table         GET /runs/<id>/layers/<L>?sort=..&sign=pos&min_freq=0.1&page=..   (HTML)

Before serving, the store is read once into the OS page cache (as on a server that has been
up a while; `--cold` skips that). Prints p50/p95/p99/mean latency (client-side wall time) and
throughput per scenario, the server's and the load generator's CPU per request, each client's
mean latency (unequal when connections sit unevenly on the server processes), failures (any
status but 200), the store's size on disk, the build time and the build's peak memory.
Targets: feature page p95 <= 25 ms, table page p95 <= 50 ms. The server, the load generator
and the build share this machine's cores, so with few cores the concurrent figures include
queueing for CPU; `--baseline-requests` also measures one client at a time (service time).

    python benchmarks/p5_serving_latency.py                          # full size: 32 x 32,768 features, 20 contexts
    python benchmarks/p5_serving_latency.py --data-dir /tmp/p5       # keep the store; later runs reuse it
    python benchmarks/p5_serving_latency.py --saes 2 --width 256 --contexts 4 --requests 50   # smoke
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import urlsplit

import duckdb
import httpx
import numpy as np
import pyarrow as pa

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script: backend/ and workers/ from this checkout

from backend.core import db  # noqa: E402
from backend.core.settings import Settings  # noqa: E402
from backend.core.store_schema import STORE_FILENAME, STORE_VERSION  # noqa: E402
from workers.publish import registry_rows, with_best_layer, write_store  # noqa: E402

RUN_ID = "p5"
HIST_BINS = 24          # the analysis defaults (workers/config.AnalysisConfig)
TOP_TOKENS = 10
NEIGHBOURS = 10
QUANTILE_BINS = 5
WINDOW = (12, 16)       # tokens per context window, inclusive
TEXT_TOKENS = 64
VOCAB_SIZE = 400        # small and Zipf-distributed: keeps feature_tokens' DISTINCT manageable
TABLE_SORTS = ("abs_weight", "-weight", "correlation", "frequency")
TABLE_FILTER = "sign=pos&min_freq=0.1"
TARGETS_MS = {"feature": 25.0, "feature-json": 25.0, "table": 50.0}


# --- synthetic columns, one layer at a time, vectorised (21M rows of Python objects would not fit) ---

def vocabulary(size: int = VOCAB_SIZE) -> list[str]:
    """Pronounceable pseudo-words, a few WordPiece continuations among them; a Zipf rank order."""
    onsets, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [o + v for o in onsets for v in vowels]
    words = [a + b for a in syllables for b in syllables][: size - 10]
    return ["the", "a", "not", "good", "bad", ".", ",", "##ing", "##ly", "!"] + words


def zipf_weights(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** 1.1
    return w / w.sum()


def list_array(values: pa.Array | np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """Rows of `lengths` items each, cut from one flat array (no per-row Python objects)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def fixed_lists(matrix: np.ndarray) -> pa.ListArray:
    return list_array(pa.array(matrix.ravel()), np.full(len(matrix), matrix.shape[1]))


def weighted_sample(rng: np.random.Generator, rows: int, k: int, p: np.ndarray) -> np.ndarray:
    """k distinct indexes per row drawn with weights p, in draw order (an exponential race:
    the k smallest Exp(1) / p; float32 keeps it fast)."""
    keys = rng.standard_exponential((rows, len(p)), dtype=np.float32) / p.astype(np.float32)
    top = np.argpartition(keys, k, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(keys, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def layer_basics(rng: np.random.Generator, width: int, n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """What a layer's features and contexts share: top-token ids and max activations."""
    return weighted_sample(rng, width, TOP_TOKENS, zipf_weights(n_vocab)), rng.lognormal(1.0, 0.6, width)


def layer_features(rng: np.random.Generator, layer: int, top_ids: np.ndarray, max_act: np.ndarray,
                   vocab: pa.Array) -> dict[str, pa.Array]:
    width = len(max_act)
    frequency = np.exp(rng.uniform(np.log(1e-5), np.log(0.3), width))  # log-uniform, like a trained SAE
    weight = rng.normal(0, 0.02, width)
    decay = np.sort(rng.uniform(0.2, 1.0, (width, TOP_TOKENS)), axis=1)[:, ::-1]
    top_tokens = pa.StructArray.from_arrays(
        [vocab.take(pa.array(top_ids.ravel())), pa.array((max_act[:, None] * decay).ravel()),
         pa.array(np.sort(rng.integers(3, 500, (width, TOP_TOKENS)), axis=1)[:, ::-1].ravel())],
        names=["token", "mean_activation", "count"])
    edges = max_act[:, None] * np.linspace(0, 1, HIST_BINS + 1)
    counts = np.sort(rng.integers(0, 5000, (width, HIST_BINS)), axis=1)[:, ::-1]  # most mass at low activation
    neighbours = (np.arange(width)[:, None] + rng.integers(1, width, (width, NEIGHBOURS))) % width
    cosines = np.sort(rng.uniform(0.1, 0.9, (width, NEIGHBOURS)).astype(np.float32), axis=1)[:, ::-1]
    return {
        "layer": pa.array(np.full(width, layer, dtype=np.int32)),
        "feature": pa.array(np.arange(width, dtype=np.int32)),
        "frequency": pa.array(frequency),
        "mean_activation": pa.array(max_act * rng.uniform(0.2, 0.5, width)),
        "max_activation": pa.array(max_act),
        "weight": pa.array(weight),
        "std_weight": pa.array(weight * rng.uniform(0.5, 3.0, width)),
        "weight_se": pa.array(np.abs(rng.normal(0, 0.005, width))),
        "weight_group": pa.array(np.arange(width, dtype=np.int32)),  # every feature fitted alone
        "weight_group_size": pa.array(np.ones(width, dtype=np.int32)),
        "top_token": vocab.take(pa.array(top_ids[:, 0])),
        "hist_edges": fixed_lists(edges),
        "hist_counts": fixed_lists(counts.astype(np.int64)),
        "reward_correlation": pa.array(rng.uniform(-0.4, 0.4, width)),
        "reward_effect": pa.array(rng.normal(0, 0.05, width)),
        "attribution": pa.array(rng.normal(0, 0.01, width)),
        "attribution_abs": pa.array(np.abs(rng.normal(0, 0.02, width))),
        "attribution_share": pa.array(rng.normal(0, 0.001, width)),
        **measured_columns(rng, weight),
        "top_tokens": list_array(top_tokens, np.full(width, TOP_TOKENS)),
        "neighbours": fixed_lists(neighbours.astype(np.int32)),
        "neighbour_cosines": fixed_lists(cosines),
        **analyses_columns(rng, width),
    }


def analyses_columns(rng: np.random.Generator, width: int) -> dict[str, pa.Array]:
    """The run-level analyses' feature columns (workers/analyses): the paired dictionary's best
    match, the base model's, and a ReasonScore, as a run with all of them configured has."""
    return {"pair_max_cosine": pa.array(rng.uniform(0.2, 1.0, width)),
            "pair_feature": pa.array(rng.integers(0, max(width // 4, 1), width).astype(np.int32)),
            "base_feature": pa.array(rng.integers(0, width, width).astype(np.int32)),
            "base_correlation": pa.array(rng.uniform(0.0, 1.0, width)),
            "base_decoder_cosine": pa.array(rng.uniform(0.0, 1.0, width)),
            "reason_score": pa.array(rng.normal(0, 1e-4, width))}


def measured_columns(rng: np.random.Generator, weight: np.ndarray) -> dict[str, pa.Array]:
    """Single-feature ablations as the causal stage writes them: a Δ with its CI beside what the
    regression and the attribution predicted, for every feature (a real run measures a few)."""
    width = len(weight)
    delta = -weight * rng.uniform(0.05, 0.5, width)
    half = np.abs(rng.normal(0, 0.002, width))
    return {"measured_delta": pa.array(delta), "measured_delta_low": pa.array(delta - half),
            "measured_delta_high": pa.array(delta + half), "measured_n": pa.array(rng.integers(5, 200, width)),
            "predicted_delta_regression": pa.array(-weight * rng.uniform(0.5, 2.0, width)),
            "predicted_delta_attribution": pa.array(delta * rng.uniform(0.5, 1.5, width)),
            # preference pairs' margin columns, as a pairs run writes them (every column filled)
            **{name: pa.array(delta * rng.uniform(0.5, 1.5, width)) for name in (
                "margin_attribution", "margin_attribution_chosen", "margin_attribution_rejected", "margin_delta",
                "margin_delta_low", "margin_delta_high")},
            "margin_delta_n": pa.array(rng.integers(5, 200, width))}


def layer_contexts(rng: np.random.Generator, layer: int, top_ids: np.ndarray, max_act: np.ndarray,
                   n_contexts: int, n_texts: int, vocab: pa.Array) -> dict[str, pa.Array]:
    """One layer's contexts, ordered by (feature, kind, rank): 'quantile' sorts before 'top'."""
    width = len(max_act)
    n_quantile = n_contexts // 2
    bins = max(1, min(QUANTILE_BINS, n_quantile))
    rows = width * n_contexts
    feature = np.repeat(np.arange(width, dtype=np.int32), n_contexts)
    within = np.tile(np.arange(n_contexts, dtype=np.int32), width)
    is_top = within >= n_quantile
    rank = np.where(is_top, within - n_quantile, within)
    peak_act = max_act[feature]
    # quantile: rank by bin, then activation inside the bin; top: rank 0 = the strongest
    scaled = rank * bins / max(n_quantile, 1)
    bin_ = np.floor(scaled).astype(np.int32)
    bin_low, bin_high = peak_act * bin_ / bins, peak_act * (bin_ + 1) / bins
    activation = np.where(is_top, peak_act * (1 - 0.03 * rank), bin_low + (bin_high - bin_low) * (scaled - bin_))
    n_tok = rng.integers(WINDOW[0], WINDOW[1] + 1, rows)
    peak = rng.integers(2, n_tok - 2)
    starts = np.zeros(rows, dtype=np.int64)
    np.cumsum(n_tok[:-1], out=starts[1:])
    tokens = rng.choice(len(vocab), size=int(n_tok.sum()), p=zipf_weights(len(vocab))).astype(np.int16)
    # a top context peaks on one of the feature's top tokens, as real ones do
    top_rows = np.flatnonzero(is_top)
    tokens[starts[top_rows] + peak[top_rows]] = top_ids[feature[top_rows], rank[top_rows] % TOP_TOKENS]
    # as in real contexts, the feature is off on most tokens (87% of the demo run's context
    # tokens): a few fire at up to half the peak, the peak fires at the context's activation
    on = rng.random(len(tokens)) < 0.065
    acts = np.where(on, np.repeat(activation, n_tok) * 0.5 * rng.random(len(tokens)), 0.0).astype(np.float32)
    acts[starts + peak] = activation
    window_start = rng.integers(0, TEXT_TOKENS - WINDOW[1], rows).astype(np.int32)
    return {
        "layer": pa.array(np.full(rows, layer, dtype=np.int32)),
        "feature": pa.array(feature),
        "kind": pa.DictionaryArray.from_arrays(pa.array(is_top.astype(np.int8)), pa.array(["quantile", "top"])),
        "rank": pa.array(rank),
        "bin": pa.array(bin_, mask=is_top),
        "bin_low": pa.array(bin_low, mask=is_top),
        "bin_high": pa.array(bin_high, mask=is_top),
        "text_id": pa.array(rng.integers(0, n_texts, rows).astype(np.int32)),
        "position": pa.array(window_start + peak.astype(np.int32)),
        "activation": pa.array(activation),
        "window_start": pa.array(window_start),
        # dictionary-encoded: 2 bytes per token in memory; DuckDB stores them as VARCHAR[]
        "tokens": list_array(pa.DictionaryArray.from_arrays(pa.array(tokens), vocab), n_tok),
        "acts": list_array(pa.array(acts), n_tok),
    }


def layers_table(saes: int, width: int, rng: np.random.Generator) -> dict[str, list]:
    r2 = rng.uniform(0.3, 0.8, saes)
    return {
        "layer": list(range(saes)), "hook_name": [f"blocks.{i}.hook_resid_post" for i in range(saes)],
        "sae_path": [f"saes/layer_{i}" for i in range(saes)], "architecture": ["topk"] * saes,
        "d_in": [1024] * saes, "d_sae": [width] * saes, "k": [64] * saes,
        "mse": rng.uniform(0.01, 0.1, saes).tolist(), "explained_variance": rng.uniform(0.7, 0.95, saes).tolist(),
        "l0": [64.0] * saes, "dead_fraction": [0.0] * saes, "pooling": ["reward_token"] * saes,
        "r2_train": (r2 + 0.1).tolist(), "r2_heldout": r2.tolist(), "r2_cv": (r2 - 0.02).tolist(),
        "ridge_alpha": [10.0] * saes, "regression_method": ["ridge"] * saes, "cv_folds": [5] * saes,
        "merge_correlated": [None] * saes, "merge_min_cosine": [None] * saes,
        "weight_effect_agreement": rng.uniform(0.1, 0.6, saes).tolist(),
        "probe_r2_train": [0.9] * saes, "probe_r2_heldout": [0.7] * saes, "probe_alpha": [100.0] * saes,
        "n_train": [8000] * saes, "n_heldout": [2000] * saes, "reward_recovered": rng.uniform(0.5, 0.95, saes).tolist(),
        "reward_mae_sae": rng.uniform(0.05, 0.2, saes).tolist(), "reward_mae_zero": [0.8] * saes,
        # the causal stage's per-layer summary (workers/causal.py)
        "default_ranking": ["weight"] * saes, "faithfulness_measure": ["signed"] * saes,
        "faithfulness_effect": (0.1 * r2).tolist(), "faithfulness_control": [0.01] * saes,
        "faithfulness_relative": (0.2 * r2).tolist(), "faithfulness_verdict": ["beyond_controls"] * saes,
        "faithfulness_draws": [10] * saes,
        # attention sinks (workers/sinks.py): an encoder's layers have none
        "sink_max_norm": [None] * saes, "sink_count": [0] * saes, "sink_fraction": [0.0] * saes,
        "sink_positions": [[]] * saes, "sink_tokens": [[]] * saes, "sink_mean_norm": [None] * saes,
        "other_mean_norm": [10.0] * saes, "other_max_norm": [20.0] * saes,
        # preference pairs (workers/analyses/preference.py): a text corpus has none
        "spliced_accuracy": [None] * saes, "surrogate_accuracy": [None] * saes, "surrogate_train_accuracy": [None] * saes,
        "score_spread": [0.5] * saes, "reach": (0.3 * r2).tolist(), "read_token_gradient_share": [0.4] * saes,
        "calibration_regression_slope": [0.3] * saes, "calibration_regression_r": [0.6] * saes,
        "calibration_attribution_slope": [0.9] * saes, "calibration_attribution_r": [0.8] * saes,
        "n_measured": [64] * saes,
        # paired dictionaries (workers/analyses/pairs.py): a quarter-width SAE beside each
        "pair_width": [width // 4] * saes, "pair_sae_path": [f"saes/pair/layer_{i}_w{width // 4}" for i in range(saes)],
        "mmcs_to_pair": rng.uniform(0.5, 0.8, saes).tolist(), "mmcs_from_pair": rng.uniform(0.6, 0.9, saes).tolist(),
    }


def texts_tables(n_texts: int, vocab: list[str], rng: np.random.Generator) -> tuple[dict, dict]:
    words = np.array(vocab, dtype=object)[rng.choice(len(vocab), (n_texts, TEXT_TOKENS), p=zipf_weights(len(vocab)))]
    score = rng.normal(size=n_texts)
    texts = {
        "text_id": np.arange(n_texts, dtype=np.int32), "split": np.where(rng.random(n_texts) < 0.8, "train", "heldout"),
        "text": [" ".join(row) for row in words], "reward": np.tanh(score + rng.normal(0, 0.3, n_texts)),
        "score": score, "n_tokens": np.full(n_texts, TEXT_TOKENS, dtype=np.int32),
        "reward_position": np.full(n_texts, TEXT_TOKENS - 1, dtype=np.int32),
        "response_start": [None] * n_texts, "response_end": [None] * n_texts,  # plain texts, not chat
    }
    reads = {"read_id": np.arange(n_texts, dtype=np.int32), "text_id": np.arange(n_texts, dtype=np.int32),
             "position": texts["reward_position"], "score": score}
    return texts, reads


class SyntheticTables(Mapping):
    """write_store's `tables`, each one generated when write_store reads it and not kept, so
    only one table's columns are in memory at a time (contexts: ~3 GB at full size).
    Features and contexts come as one chunk per layer, in primary-key order."""

    def __init__(self, saes: int, width: int, n_contexts: int, n_texts: int, seed: int = 0):
        self.saes, self.width, self.n_contexts, self.n_texts, self.seed = saes, width, n_contexts, n_texts, seed
        self.words = vocabulary()
        self.vocab = pa.array(self.words)
        self.basics = functools.lru_cache(maxsize=None)(  # ~10 MB per layer at full size
            lambda layer: layer_basics(self.rng(0, layer), width, len(self.words)))
        self.builders = {"texts": self.texts, "reward_reads": self.reward_reads, "layers": self.layers,
                         "features": self.features, "contexts": self.contexts}

    def __getitem__(self, name: str) -> dict:
        return self.builders[name]()

    def __contains__(self, name: object) -> bool:  # Mapping's default would build the table
        return name in self.builders

    def __iter__(self) -> Iterator[str]:
        return iter(self.builders)

    def __len__(self) -> int:
        return len(self.builders)

    def rng(self, *stream: int) -> np.random.Generator:
        """An independent, reproducible stream per table (and layer): a table built twice is the same."""
        return np.random.default_rng([self.seed, *stream])

    @functools.cached_property
    def _texts_and_reads(self) -> tuple[dict, dict]:  # one draw serves both tables
        return texts_tables(self.n_texts, self.words, self.rng(1))

    def texts(self) -> dict:
        return self._texts_and_reads[0]

    def reward_reads(self) -> dict:
        return self._texts_and_reads[1]

    def layers(self) -> dict:
        return layers_table(self.saes, self.width, self.rng(2))

    def features(self) -> dict:
        return chunked([layer_features(self.rng(3, layer), layer, *self.basics(layer), self.vocab)
                        for layer in range(self.saes)])

    def contexts(self) -> dict:
        return chunked([layer_contexts(self.rng(4, layer), layer, *self.basics(layer), self.n_contexts,
                                       self.n_texts, self.vocab) for layer in range(self.saes)])


def chunked(per_layer: list[dict[str, pa.Array]]) -> dict[str, pa.ChunkedArray]:
    return {name: pa.chunked_array([chunks[name] for chunks in per_layer]) for name in per_layer[0]}


# --- the store and its registration ---

@dataclass
class Build:
    path: Path
    seconds: float          # generate + write (0 when reused)
    reused: bool
    peak_rss_gib: float     # this process's peak resident memory so far
    rows: dict[str, int] = field(default_factory=dict)


def shape_key(saes: int, width: int, n_contexts: int, n_texts: int) -> str:
    return f"{saes}x{width}x{n_contexts}x{n_texts}"


def store_matches(path: Path, shape: str) -> bool:
    """A store already there with this schema version and size can be reused."""
    if not path.is_file():
        return False
    with contextlib.closing(duckdb.connect(str(path), read_only=True)) as con:
        info = dict(con.execute("SELECT key, value FROM run_info").fetchall())
    return info.get("store_version") == str(STORE_VERSION) and info.get("p5_shape") == shape


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def build_store(settings: Settings, saes: int, width: int, n_contexts: int, n_texts: int,
                rebuild: bool = False) -> Build:
    """Write (or reuse) the synthetic store and register it in the SQL registry."""
    path = settings.run_dir(RUN_ID) / STORE_FILENAME
    shape = shape_key(saes, width, n_contexts, n_texts)
    reused = not rebuild and store_matches(path, shape)
    start = time.perf_counter()
    if not reused:
        tables = SyntheticTables(saes, width, n_contexts, n_texts)
        info = {"run_id": RUN_ID, "name": "P5 synthetic", "model": "synthetic", "adapter": "seq-cls",
                "dataset": "synthetic", "config_yaml": "# P5 benchmark\n", "created_at": "2026-01-01T00:00:00",
                "p5_shape": shape, "n_texts": n_texts, "n_tokens": n_texts * TEXT_TOKENS}
        write_store(path, with_best_layer(info, tables["layers"]), tables)
    seconds = time.perf_counter() - start
    db.upgrade(settings)
    register(settings, path)
    return Build(path, 0.0 if reused else seconds, reused, peak_rss_gib(), table_rows(path))


def register(settings: Settings, path: Path) -> None:
    """The SQL rows for the store at `path`, from its own run_info and layers table."""
    with contextlib.closing(duckdb.connect(str(path), read_only=True)) as con:
        info = dict(con.execute("SELECT key, value FROM run_info").fetchall())
        layers = con.sql("SELECT * FROM layers ORDER BY layer").to_arrow_table().to_pydict()
    info["best_layer"] = int(info["best_layer"]) if "best_layer" in info else None
    run_row, sae_rows = registry_rows(info, layers, path.parent.relative_to(settings.data_dir))
    db.register_run(settings, run_row, sae_rows, replace=True)


def table_rows(path: Path) -> dict[str, int]:
    with contextlib.closing(duckdb.connect(str(path), read_only=True)) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("features", "contexts", "feature_tokens", "texts")}


def filtered_pages(path: Path, saes: int, page_size: int = 50) -> int:
    """Pages of the table scenario's filtered view in its smallest layer (so no page 404s)."""
    with contextlib.closing(duckdb.connect(str(path), read_only=True)) as con:
        smallest = con.execute("SELECT min(n) FROM (SELECT count(*) AS n FROM features WHERE weight > 0 "
                               "AND frequency >= 0.001 GROUP BY layer)").fetchone()[0] or 0
    return max(1, -(-smallest // page_size))


# --- the server ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(data_dir: Path, timeout: float = 120.0, workers: int = 1) -> Iterator[tuple[str, subprocess.Popen]]:
    """The real server (`rewardatlas serve`) in a subprocess on loopback; stopped on exit."""
    port = free_port()
    env = {**os.environ, "RA_DATA_DIR": str(data_dir), "RA_DATABASE_URL": ""}
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", str(workers)], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            start_new_session=True)  # its worker processes stop with it
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/api/runs", timeout=5).status_code < 500:  # any answer: it serves
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer within {timeout:.0f} s")
            time.sleep(0.2)
        yield base, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server_rss_gib(proc: subprocess.Popen) -> float | None:
    """Resident memory of the server and its worker processes."""
    total_kib = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError, ValueError):
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            if status.parent.name == str(proc.pid) or fields.get("PPid", "").strip() == str(proc.pid):
                total_kib += int(fields.get("VmRSS", "0 kB").split()[0])
    return total_kib / 2**20 if total_kib else None


# --- the load generator ---

def scenario_urls(name: str, n: int, saes: int, width: int, max_page: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        layer, feature = rng.randrange(saes), rng.randrange(width)
        if name == "table":
            page = rng.randint(1, min(20, max_page))
            out.append(f"/runs/{RUN_ID}/layers/{layer}?sort={rng.choice(TABLE_SORTS)}&{TABLE_FILTER}&page={page}")
        else:
            prefix = "/api" if name == "feature-json" else ""
            out.append(f"{prefix}/runs/{RUN_ID}/layers/{layer}/features/{feature}")
    return out


@dataclass
class Load:
    latencies_ms: np.ndarray
    failures: list[str]     # "status url" of every non-200 answer or transport error
    wall_s: float
    client_means_ms: list[float] = field(default_factory=list)  # each client's mean latency
    server_cpu_s: float | None = None   # CPU time the server process used meanwhile (all threads)
    client_cpu_s: float = 0.0           # and this process, the load generator

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


def process_cpu_s(pid: int | None) -> float | None:
    """utime + stime of another process and its children (server workers), from /proc (None
    where unreadable)."""
    if pid is None:
        return None
    with contextlib.suppress(OSError, IndexError, ValueError):
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if stat.parent.name == str(pid) or int(fields[1]) == pid:  # fields[1]: the parent's pid
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total
    return None


def load(base: str, urls: list[str], clients: int, seconds: float, server_pid: int | None = None) -> Load:
    """`clients` threads, each with its own keep-alive connection, take URLs from one shared
    list until it is used up or `seconds` have passed; client-side latency per request, and
    the CPU time server and client spent (on few cores, throughput <= cores / CPU per request)."""
    host, port = urlsplit(base).hostname, urlsplit(base).port
    queue = iter(urls)
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    by_client: list[list[float]] = [[] for _ in range(clients)]
    deadline = time.monotonic() + seconds

    def client(mine: list[float]) -> None:
        # the standard library's HTTP client: about a third of httpx's CPU per request, and the
        # load generator shares the server's cores
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            while time.monotonic() < deadline:
                with lock:
                    url = next(queue, None)
                if url is None:
                    return
                start = time.perf_counter()
                try:
                    conn.request("GET", url)
                    answer = conn.getresponse()
                    answer.read()
                    status = answer.status
                except (OSError, http.client.HTTPException) as exc:
                    status = type(exc).__name__
                    conn.close()  # reconnects on the next request
                elapsed = (time.perf_counter() - start) * 1000
                mine.append(elapsed)
                with lock:
                    latencies.append(elapsed)
                    if status != 200:
                        failures.append(f"{status} {url}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(mine,)) for mine in by_client]
    server_cpu, client_cpu, start = process_cpu_s(server_pid), time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server_after = process_cpu_s(server_pid)
    return Load(np.array(latencies), failures, wall, [float(np.mean(m)) for m in by_client if m],
                None if server_cpu is None or server_after is None else server_after - server_cpu,
                time.process_time() - client_cpu)


def report(name: str, clients: int, result: Load) -> None:
    n = len(result.latencies_ms)
    target = TARGETS_MS[name]
    p95 = result.percentile(95)
    verdict = "met" if p95 <= target else "MISSED"
    print(f"{name:<13} {clients} client(s): {n:5d} requests, {len(result.failures)} failed; "
          f"p50 {result.percentile(50):6.1f}  p95 {p95:6.1f}  p99 {result.percentile(99):6.1f}  "
          f"mean {result.latencies_ms.mean() if n else float('nan'):6.1f} ms; {n / result.wall_s:6.1f} req/s   "
          f"target p95 <= {target:.0f} ms: {verdict}")
    if n and result.server_cpu_s is not None:
        print(f"{'':<13} CPU per request: server {1000 * result.server_cpu_s / n:5.1f} ms, "
              f"load generator {1000 * result.client_cpu_s / n:5.1f} ms")
    if len(result.client_means_ms) > 1:  # unequal: connections unevenly spread over server processes
        print(f"{'':<13} mean latency per client: {min(result.client_means_ms):.1f} to "
              f"{max(result.client_means_ms):.1f} ms")
    for failure in result.failures[:5]:
        print(f"    failed: {failure}")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def warm_page_cache(path: Path) -> str:
    """Read the store once, so the OS page cache holds it as it would on a server that has been
    up a while; otherwise the first pass over 1M random features measures the disk. Skipped
    (and said) when the file would not fit in the memory available."""
    size, free = path.stat().st_size, available_memory()
    if free is not None and size > 0.8 * free:
        return f"page cache: not warmed ({size / 2**30:.1f} GiB store, {free / 2**30:.1f} GiB available): cold reads hit the disk"
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    return f"page cache: read the store once ({size / 2**30:.1f} GiB in {time.perf_counter() - start:.1f} s) before serving"


def run_scenarios(base: str, server_pid: int, saes: int, width: int, max_page: int, args) -> dict[str, Load]:
    """Warm up, then each scenario under `args.clients` clients (and one client, for service time)."""
    results = {}
    for i, name in enumerate(("feature", "feature-json", "table")):
        load(base, scenario_urls(name, args.warmup, saes, width, max_page, seed=100 + i), args.clients, args.seconds)
        if args.baseline_requests:
            urls = scenario_urls(name, args.baseline_requests, saes, width, max_page, seed=200 + i)
            report(name, 1, load(base, urls, 1, args.seconds, server_pid))
        urls = scenario_urls(name, args.requests, saes, width, max_page, seed=300 + i)
        results[name] = load(base, urls, args.clients, args.seconds, server_pid)
        report(name, args.clients, results[name])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saes", type=int, default=32)
    parser.add_argument("--width", type=int, default=32_768, help="features per SAE")
    parser.add_argument("--contexts", type=int, default=20, help="contexts per feature (half top, half quantile)")
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the store here (default: a temp dir)")
    parser.add_argument("--rebuild", action="store_true", help="write the store even if a matching one exists")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per scenario")
    parser.add_argument("--seconds", type=float, default=60.0, help="time cap per scenario")
    parser.add_argument("--warmup", type=int, default=300, help="uncounted requests before each scenario")
    parser.add_argument("--baseline-requests", type=int, default=200, help="one-client requests per scenario (0: skip)")
    parser.add_argument("--cold", action="store_true", help="do not read the store into the page cache first")
    parser.add_argument("--server-workers", type=int, default=os.cpu_count() or 1,
                        help="server processes (rewardatlas serve --workers; default: one per core)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        data_dir = args.data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="p5-")))
        settings = Settings(data_dir=data_dir)
        print(f"store: {args.saes} SAEs x {args.width:,} features, {args.contexts} contexts each, "
              f"{args.texts:,} texts, under {data_dir}", flush=True)
        build = build_store(settings, args.saes, args.width, args.contexts, args.texts, args.rebuild)
        db.dispose_engines()
        size = build.path.stat().st_size
        n_features = build.rows["features"]
        print(f"build: {'reused the existing store' if build.reused else f'{build.seconds:.1f} s'}; "
              f"peak memory of this process {build.peak_rss_gib:.2f} GiB")
        print("rows: " + ", ".join(f"{t} {n:,}" for t, n in build.rows.items()))
        print(f"store size on disk: {size:,} bytes = {size / 2**30:.2f} GiB; {size / n_features:,.0f} bytes per feature")
        max_page = filtered_pages(build.path, args.saes)
        if not args.cold:
            print(warm_page_cache(build.path), flush=True)
        print(f"load: {os.cpu_count()} CPU core(s) shared by the server and the load generator (load average "
              f"before: {os.getloadavg()[0]:.1f}); with {args.clients} clients each waiting for its answer, "
              f"latency ~ clients / throughput once the cores are busy", flush=True)
        print(f"server: rewardatlas serve --workers {args.server_workers}", flush=True)
        base, proc = stack.enter_context(serve(data_dir, workers=args.server_workers))
        run_scenarios(base, proc.pid, args.saes, args.width, max_page, args)
        rss = server_rss_gib(proc)
        if rss is not None:
            print(f"server resident memory after the load: {rss:.2f} GiB")


if __name__ == "__main__":
    main()

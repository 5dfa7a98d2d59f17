"""P24: feature explanations. How many features a minute the local LLM server (llama-cpp-python
with SmolLM2-135M-Instruct, tests/llm_server.py, one thread) explains, classifies and scores on this
CPU, how many tokens each feature sends to it, what the offline path costs (the offline explainer and
keyword scorer, and the MiniLM embedding score alone per feature), and the mean of each score beside
its shuffled and random-direction baselines for both explainers.

    RA_DATA_DIR=data python benchmarks/p24_explanations.py [--run demo] [--layer L] [--features 20]

It writes explanations into the run's SQL database (as a job would, under job ids 240000+).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not installed

import numpy as np

from backend.core import db, explanations, store
from backend.core.settings import Settings
from workers.explanations import scorers
from workers.explanations.task import explanations_task
from workers.run_cache import RunCache


class Context:
    """What a task sees of its job, without the queue."""

    def __init__(self, settings: Settings, cache: RunCache, job_id: int):
        self.settings, self.cache, self.job = settings, cache, {"id": job_id, "author": "benchmark"}

    def report(self, progress: float | None = None, message: str | None = None) -> None:
        pass


def timed_job(settings, cache, job_id: int, params: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    result = explanations_task({**params, "overwrite": True}, Context(settings, cache, job_id))
    return result, time.perf_counter() - start


def means(settings, run_id: str, layer: int, features: list[int]) -> dict[str, list[float | None]]:
    rows = [e["scores"] for e in explanations.for_features(settings, run_id, layer, features).values() if e["scores"]]

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    out = {name: [mean([r[name][k] for r in rows]) for k in ("score", "shuffled", "random_direction")]
           for name in ("detection", "fuzzing", "embedding")}
    out["causal"] = [mean([r["causal"]["score"] for r in rows]),
                     mean([(r["causal"]["shuffled"] or {}).get("score") for r in rows]),
                     mean([(r["causal"]["random_direction"] or {}).get("score") for r in rows])]
    return out


def show(title: str, table: dict) -> None:
    print(f"  {title}: score / shuffled / random direction (means)")
    for name, (a, b, c) in table.items():
        fmt = (lambda v: "  n/a " if v is None else f"{v:+.3g}") if name == "causal" else \
            (lambda v: " n/a" if v is None else f"{v:.2f}")
        print(f"    {name:10s} {fmt(a)}  {fmt(b)}  {fmt(c)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--layer", type=int, help="default: the run's best layer")
    parser.add_argument("--features", type=int, default=20, help="the top N of the layer's default ranking")
    parser.add_argument("--n-texts", type=int, default=400)
    args = parser.parse_args()
    settings = Settings(llm_timeout_s=900)
    db.upgrade(settings)
    cache = RunCache(settings)
    run = cache.get(args.run)
    layer = args.layer if args.layer is not None else store.best_layer(run.store_path)
    info = store.layer_info(run.store_path, layer)
    from backend.core.rankings import FALLBACK_RANKING, RANKINGS

    sort = RANKINGS[info.get("default_ranking") or FALLBACK_RANKING].sort
    features = [r["feature"] for r in store.features(run.store_path, layer, sort=sort, limit=args.features).rows]
    run.sae(layer)  # loaded before the clock starts, as on a warm worker
    base = {"run_id": args.run, "layer": layer, "features": features, "stages": ["explain", "classify", "score"],
            "reward": "positive sentiment of a film review", "n_texts": args.n_texts, "n_snippets": 10}
    print(f"run {args.run!r}, layer {layer}: the top {len(features)} features by {sort}, {args.n_texts} held-out texts")

    result, seconds = timed_job(settings, cache, 240000, {**base, "llm": None})
    print(f"offline (top tokens + n-grams, keyword scorer, MiniLM): {len(features)} features explained, classified "
          f"and scored in {seconds:.1f} s = {60 * len(features) / seconds:.1f} features/min")
    offline = means(settings, args.run, layer, features)
    show("offline explainer", offline)

    # the embedding score alone: MiniLM over the explanation and its snippets, for it and both baselines
    from backend.core import embedding

    held = explanations_held(run, layer, args.n_texts)
    feature = features[0]
    chosen = scorers.scoring_set(held.feature(feature), 10, set(), seed=feature)
    snippets = scorers.snippets_for(held, chosen)
    text = explanations.current(settings, args.run, layer, feature)["text"]
    start = time.perf_counter()
    for _ in range(3):  # a feature's: its explanation, the shuffled one, and on the random direction's snippets
        vectors = embedding.embed([text] + snippets)
        _ = vectors[1:] @ vectors[0]
    print(f"offline embedding score: {1000 * (time.perf_counter() - start):.0f} ms per feature "
          f"(score + 2 baselines, the explanation and {len(snippets)} snippets each)")

    from tests.llm_server import start

    with tempfile.TemporaryDirectory() as tmp:
        server = start(Path(tmp))
        try:
            llm = {"base_url": server.base_url, "model": server.model, "json_mode": "schema", "max_tokens": 300}
            result, seconds = timed_job(settings, cache, 240001, {**base, "llm": llm})
        finally:
            server.stop()
    print(f"LLM server ({server.model}, llama-cpp-python, 1 thread): {len(features)} features explained, "
          f"classified and scored in {seconds:.1f} s = {60 * len(features) / seconds:.2f} features/min; "
          f"{result['tokens_per_feature']:.0f} tokens per feature sent and received "
          f"(explain {result['tokens']['explain'] / len(features):.0f}, classify "
          f"{result['tokens']['classify'] / len(features):.0f}, score {result['tokens']['score'] / len(features):.0f})")
    show(f"{server.model}", means(settings, args.run, layer, features))
    for f, e in list(explanations.for_features(settings, args.run, layer, features).items())[:5]:
        print(f"    feature {f}: {e['text'][:100]!r} → reward-related {e['reward_related']}")


def explanations_held(run, layer: int, n_texts: int):
    from workers.explanations.evidence import HeldOut

    return HeldOut.load(run, layer, n_texts)


if __name__ == "__main__":
    main()

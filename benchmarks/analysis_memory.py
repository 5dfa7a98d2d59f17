"""Peak memory of the analysis pass (every feature of every layer) as the corpus grows: the
per-feature state is fixed-size, so only the per-read rows (pooled features for the
regression) grow with the number of texts, not with tokens x k x layers.

Run it at two sizes, each in its own process (peak RSS is per process):

    python benchmarks/analysis_memory.py --texts 20000            # the demo corpus
    python benchmarks/analysis_memory.py --texts 500 --layers 3   # smoke
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from backend.core.settings import Settings
from workers.adapters import load_adapter
from workers.analyze import collect_corpus_activations
from backend.core.run_config import AnalysisConfig, DEMO_MODEL_DIRNAME
from workers.demo_corpus import generate_corpus


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reward-effect-texts", type=int, default=2048)
    args = parser.parse_args()

    from sae_lens import SAE

    settings = Settings()
    adapter = load_adapter("seq_cls", str(settings.models_dir / DEMO_MODEL_DIRNAME), torch.device("cpu"),
                           args.max_length)
    saes = {layer: SAE.load_from_disk(settings.run_dir(args.run) / "saes" / f"layer_{layer}", device="cpu").eval()
            for layer in args.layers}
    texts = generate_corpus(args.texts, seed=0)
    before = rss_mib()
    start = time.perf_counter()
    acts = collect_corpus_activations(adapter, saes, texts, np.zeros(len(texts), bool), args.batch_size, "sum",
                                      None, AnalysisConfig(reward_effect_texts=args.reward_effect_texts))
    seconds = time.perf_counter() - start
    k = saes[args.layers[0]].cfg.k if hasattr(saes[args.layers[0]].cfg, "k") else 0
    per_token_mib = 12 * acts.n_tokens * k * len(args.layers) / 2**20
    print(f"{len(texts):,} texts, {acts.n_tokens:,} tokens, layers {args.layers}: {seconds:.0f} s")
    print(f"peak RSS {rss_mib():,.0f} MiB (models loaded: {before:,.0f} MiB); keeping every (token, feature, value) "
          f"would add ~{per_token_mib:,.0f} MiB")


if __name__ == "__main__":
    main()

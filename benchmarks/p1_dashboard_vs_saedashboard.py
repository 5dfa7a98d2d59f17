"""P1: dashboard data for EVERY feature of one SAE (our one-pass analysis) versus SAEDashboard's
SaeVisRunner on the same SAE and tokens, per feature.

Ours covers all d_sae features in one pass over the corpus: frequency, histogram, top and
per-bin contexts, top tokens, correlation with the reward and the reward effect (which needs
the reward model's full forward and a backward on a sample of batches). SaeVisRunner builds
`--features` dashboards (SAEDashboard's per-feature layout) from a forward to the SAE's layer.
Printed: seconds per feature each way and their ratio, measured in this one run.

    python benchmarks/p1_dashboard_vs_saedashboard.py                         # full size: 65k tokens, 50 features
    python benchmarks/p1_dashboard_vs_saedashboard.py --tokens 3000 --features 5   # smoke

Both sides run the reward model's forward on the CPU, so on a busy machine thread contention
skews small ops: `--threads 1` gives steadier ratios there. `--reward-effect-texts 0` times
our pass without the reward effect's backward passes.
"""
from __future__ import annotations

import argparse

import torch

from dashboard_common import (add_common_args, corpus_of, hooked_encoder, live_features, load_world,
                              packed_tokens, run_ours, run_saedashboard, time_forward_only,
                              time_forward_to_layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    adapter, sae, model_path = load_world(args)
    d_sae = sae.cfg.d_sae
    texts, ids = corpus_of(adapter.tokenizer, args.tokens, args.max_length)
    n_tokens = sum(len(row) for row in ids)
    print(f"corpus: {len(texts):,} texts, {n_tokens:,} tokens; SAE layer {args.layer}: {d_sae:,} features")

    run_ours(adapter, sae, args.layer, texts[:64], args)  # warm-up: one-time costs (lazy imports, allocator)
    ours_s, features, _ = run_ours(adapter, sae, args.layer, texts, args)
    live = sum(f > 0 for f in features["frequency"])
    print(f"ours: all {d_sae:,} features ({live:,} fired) in {ours_s:.1f} s = {1e3 * ours_s / d_sae:.2f} ms/feature "
          f"(reward effect from up to {args.reward_effect_texts:,} texts)")

    chosen = live_features(sae, adapter, texts, args.features, args.layer)
    encoder = hooked_encoder(model_path, adapter.tokenizer)
    tokens = packed_tokens(ids, args.max_length)
    theirs_s, _ = run_saedashboard(encoder, sae, args.layer, tokens, chosen, json_path=None)
    print(f"SAEDashboard SaeVisRunner: {len(chosen)} features over {tokens.numel():,} tokens in {theirs_s:.1f} s "
          f"= {1e3 * theirs_s / len(chosen):.1f} ms/feature")
    ratio = (theirs_s / len(chosen)) / (ours_s / d_sae)
    print(f"P1 per-feature speed-up (SAEDashboard / ours): {ratio:.0f}x  (target >= 100x)")

    # What bounds the ratio: both sides are mostly a model forward over the same tokens.
    score_s = time_forward_only(adapter, texts, args.batch_size)
    layer_s = time_forward_to_layer(encoder, tokens, args.layer)
    print(f"floors: the RM's scoring forward alone {score_s:.1f} s ({100 * score_s / ours_s:.0f}% of ours); "
          f"the forward to layer {args.layer} alone {layer_s:.1f} s ({100 * layer_s / theirs_s:.0f}% of SaeVisRunner's)")
    print(f"ceiling: an analysis costing nothing beyond the scoring forward would be "
          f"{(theirs_s / len(chosen)) / (score_s / d_sae):.0f}x")


if __name__ == "__main__":
    main()

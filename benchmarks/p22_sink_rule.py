"""The attention-sink rule on the LLaMA demo RM (workers/sinks.py), printed:

1. collection throughput: the training stream (one forward to the deepest layer, tokens kept per
   layer) with the rule against the same forward without it, alternating rounds in one process;
   the ratio (goal >= 0.95);
2. SAE quality per layer with and without the rule, both trained on the same texts and scored on
   the same held-out tokens (the tokens the SAE is meant for: sinks left out), and on all tokens:
   explained variance, dead latents, reward recovered.

Both read every token of the chat texts (analysis.tokens: all): the sink is the first token, in the
system prompt, so a run reading responses only never trains on it, with or without the rule.

    python benchmarks/p22_sink_rule.py [--data-dir DIR] [--texts 600] [--tokens 60000]

Builds the demo LLaMA RM in DIR/models if absent (the demo's own data dir reuses it).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from workers.adapters import adapter_from_config
from workers.chat import prepare_chat_texts
from workers.collect import activation_stream
from backend.core.run_config import load_config
from workers.datasets import read_texts
from workers.demo import DEMO_LLAMA_CONFIG
from workers.demo_llama import ensure_demo_llama_rm
from workers.evaluate import evaluate_saes
from workers.sinks import NO_RULE, measure_sink_rules
from workers.train import load_saes, train_saes


def throughput(adapter, texts, layers, rules, rounds: int, batches: int, batch_size: int) -> tuple[float, float]:
    """Seconds for `batches` stream batches with the rule and without it, over `rounds` alternated
    rounds; each round draws the same texts for both (the stream is seeded by the round)."""
    seconds = {"rule": 0.0, "none": 0.0}
    for round_no in range(rounds):
        for name, used in (("rule", rules), ("none", {layer: NO_RULE for layer in layers})):
            stream = activation_stream(adapter, texts, layers, batch_size, round_no, used)
            start = time.perf_counter()
            for _ in range(batches):
                next(stream)
            seconds[name] += time.perf_counter() - start
    return seconds["rule"], seconds["none"]


@torch.no_grad()
def quality_on(adapter, sae, layer, texts, meant, batch_size):
    """(explained variance on the tokens the SAE is meant for, on all tokens, share of dead latents)."""
    sums = {"meant": [0.0, 0.0, None, 0], "all": [0.0, 0.0, None, 0]}
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, len(texts), batch_size):
        batch = adapter.tokenize(texts[start:start + batch_size])
        _, captured = adapter.run(batch, capture=[layer], need_score=False)
        x = captured[layer][batch.attention_mask.bool()].float()
        plain = getattr(sae, "_encode_without_rule", sae.encode)
        features = plain(x)
        error = sae.decode(features) - x
        keep = meant.kept(x)
        fired |= (features[keep] > 0).any(0).cpu()
        for name, rows in (("meant", keep), ("all", torch.ones_like(keep))):
            s = sums[name]
            s[0] += float((error[rows] ** 2).sum())
            s[1] += float((x[rows] ** 2).sum())
            s[2] = x[rows].sum(0) if s[2] is None else s[2] + x[rows].sum(0)
            s[3] += int(rows.sum())
    ev = {name: 1 - sse / (sq - float((sx ** 2).sum()) / n) for name, (sse, sq, sx, n) in sums.items()}
    return ev["meant"], ev["all"], 1 - float(fired.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--tokens", type=int, default=60_000, help="SAE training tokens per variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6, help="forward batches per throughput round")
    args = parser.parse_args()

    config = load_config(DEMO_LLAMA_CONFIG)
    config.dataset.n_texts = args.texts
    config.sae.training_tokens = args.tokens
    model_path = str(ensure_demo_llama_rm(args.data_dir / "models"))
    texts, _ = read_texts(config.dataset, config.seed)
    texts, markers = prepare_chat_texts(texts, model_path, config.dataset, config.analysis)
    adapter = adapter_from_config(config.model, model_path, torch.device("cpu"))
    train, heldout = texts[: int(0.8 * len(texts))], texts[int(0.8 * len(texts)):]
    layers, batch_size = config.layers, config.dataset.batch_size
    rules = measure_sink_rules(adapter, train, layers, config.sinks, batch_size)
    print(f"device cpu, {torch.get_num_threads()} threads; {len(train)} training / {len(heldout)} held-out chat texts")
    for layer, rule in rules.items():
        print(f"  block {layer}: median token norm {rule.median_norm:.1f}, sink threshold {rule.max_norm:.1f}")

    with_rule, without = throughput(adapter, train, layers, rules, args.rounds, args.batches, batch_size)
    print(f"\n1. collection, {args.rounds} alternated rounds of {args.batches} batches of {batch_size} texts: "
          f"{with_rule:.2f} s with the rule, {without:.2f} s without; throughput ratio {without / with_rule:.3f} "
          "(goal >= 0.95)")

    print(f"\n2. SAE quality, {config.sae.width} latents, k {config.sae.k}, {args.tokens:,} training tokens each, same texts:")
    print("   rule   block  EV (tokens meant for)  EV (all tokens)  dead   reward recovered")
    for rule_name in ("none", "norm"):
        run_config = config.model_copy(deep=True)
        run_config.sinks.rule = rule_name
        with tempfile.TemporaryDirectory() as tmp:
            paths = train_saes(run_config, adapter, train, Path(tmp))
            saes = load_saes(paths, adapter.device)
            recovery = evaluate_saes(adapter, saes, heldout[: config.sae.reward_recovered_texts], batch_size)
            for layer in layers:
                ev_meant, ev_all, dead = quality_on(adapter, saes[layer], layer, heldout, rules[layer], batch_size)
                print(f"   {rule_name:5}  {layer:5}  {ev_meant:21.3f}  {ev_all:15.3f}  {dead:5.1%}  "
                      f"{recovery[layer].reward_recovered:16.3f}")


if __name__ == "__main__":
    main()

"""P3: SAEs on several layers from ONE shared forward pass vs one forward pass per layer.

Shared: the pipeline's path, `workers.train.train_saes` (one RM forward per batch feeds every
layer's SAE through SAELens's MultiSAETrainer). Separate: what SAELens's single-SAE runner does,
one `SAETrainer` per layer, each with its own activation stream (its own forward passes, which
stop after that layer). Same tokens, SAE sizes and settings both ways.

Also timed: F, the forward passes alone (the shared stream, drained without training), and T,
one SAE's training alone on cached activations, so F/(F+T) says where the limit
(F + nT) / (nF + nT) lies.

    python benchmarks/p3_shared_forward.py                                   # full size
    python benchmarks/p3_shared_forward.py --tokens 8192 --texts 600 --buffer-tokens 8192   # smoke
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import SAETrainer

from backend.core.settings import Settings
from workers.adapters import load_adapter
from workers.collect import activation_stream, shuffled_batches
from backend.core.run_config import DEMO_MODEL_DIRNAME, parse_config
from workers.demo_corpus import generate_corpus
from workers.device import pick_device
from workers.train import NORM_ESTIMATE_BATCHES, build_training_sae, train_saes, trainer_config


def reward_model_path(requested: str | None, scratch: Path) -> str:
    """The given model, else the demo RM in the data dir, else a random MiniLM-shaped RM."""
    if requested:
        return requested
    demo = Settings().models_dir / DEMO_MODEL_DIRNAME
    if demo.is_dir():
        return str(demo)
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    from workers.demo_model import base_model_path

    config = AutoConfig.from_pretrained(base_model_path(), num_labels=1)
    BertForSequenceClassification(config).save_pretrained(scratch / "rm")
    AutoTokenizer.from_pretrained(base_model_path()).save_pretrained(scratch / "rm")
    return str(scratch / "rm")


def run_config(args, layers: list[int], model_path: str):
    return parse_config({
        "name": "p3", "model": {"path": model_path, "max_length": args.max_length},
        "dataset": {"source": "demo", "batch_size": args.text_batch}, "layers": layers,
        "sae": {"width": args.width, "k": args.k, "training_tokens": args.tokens, "batch_size": args.batch_size,
                "buffer_tokens": args.buffer_tokens},
        "seed": 0, "device": args.device,
    })


def shuffled_stream(adapter, texts, layers, config):
    stream = activation_stream(adapter, texts, layers, config.dataset.batch_size, config.seed)
    return shuffled_batches(stream, config.sae.buffer_tokens, config.sae.batch_size)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="reward model directory (default: the demo RM in the data dir)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--tokens", type=int, default=200_000, help="SAE training tokens per layer")
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE step")
    parser.add_argument("--buffer-tokens", type=int, default=32_768)
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="time each contender this many times, keep the best")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="p3-"))
    model_path = reward_model_path(args.model, scratch)
    device = pick_device(args.device)
    adapter = load_adapter("seq_cls", model_path, device, args.max_length)
    texts = generate_corpus(args.texts, seed=0)
    config = run_config(args, args.layers, model_path)
    n_layers, n_batches = len(args.layers), config.sae.n_steps + NORM_ESTIMATE_BATCHES
    print(f"model {model_path} on {device}; layers {args.layers}; {args.tokens:,} tokens per SAE, "
          f"width {args.width}, k {args.k}, batch {args.batch_size}")

    # warm-up (lazy initialisation, thread pools), so the first timed contender pays nothing extra
    list(itertools.islice(shuffled_stream(adapter, texts, args.layers, config), 2))

    def shared_run():
        train_saes(config, adapter, texts, scratch / "shared")

    def separate_runs():
        for layer in args.layers:
            single = run_config(args, [layer], model_path)
            sae = build_training_sae(single.sae, adapter.d_model, str(device))
            hook = adapter.hook_name(layer)
            batches = (batch[hook] for batch in shuffled_stream(adapter, texts, [layer], single))
            SAETrainer(cfg=trainer_config(single.sae, device), sae=sae, data_provider=batches).fit()

    # interleaved repeats, best of each: a busy spell on the machine then hurts both alike
    shared = separate = float("inf")
    for _ in range(args.repeats):
        shared = min(shared, timed(shared_run))
        separate = min(separate, timed(separate_runs))

    # F: the shared stream's forward passes for as many batches as one training run draws
    forward = timed(lambda: list(itertools.islice(shuffled_stream(adapter, texts, args.layers, config), n_batches)))
    # T: one SAE trained on cached activations (cycled), no forward pass at all
    layer = args.layers[len(args.layers) // 2]
    cache = [b[adapter.hook_name(layer)].clone()
             for b in itertools.islice(shuffled_stream(adapter, texts, [layer], config), min(n_batches, 64))]
    sae = build_training_sae(config.sae, adapter.d_model, str(device))
    step = timed(lambda: SAETrainer(cfg=trainer_config(config.sae, device), sae=sae,
                                    data_provider=itertools.cycle(cache)).fit())

    print(f"shared forward, {n_layers} SAEs (MultiSAETrainer): {shared:8.1f} s")
    print(f"one forward per layer, {n_layers} SAETrainers:      {separate:8.1f} s")
    print(f"P3 ratio shared / separate: {shared / separate:.3f}   (target <= 0.7)")
    print(f"F (forward, all layers) {forward:.1f} s, T (one SAE's steps) {step:.1f} s: "
          f"forward share F/(F+T) = {forward / (forward + step):.2f}; "
          f"limit (F+{n_layers}T)/({n_layers}F+{n_layers}T) = "
          f"{(forward + n_layers * step) / (n_layers * forward + n_layers * step):.3f}")
    print(f"torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()

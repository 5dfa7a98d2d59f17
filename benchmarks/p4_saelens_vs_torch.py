"""P4: TopK SAE training throughput through SAELens vs a plain PyTorch TopK loop.

Both train the same size of SAE (d_in, width, k, batch, tokens, Adam lr with the same linear
decay over the last fifth, inputs scaled to the same expected norm) on the same cached RM
activations, and are scored by explained variance on held-out tokens. SAELens runs through
`SAETrainer` as the pipeline builds it (`workers.train`), once per settings variant, so the
printout says which settings reach the target (>= 0.95x the plain loop's tokens/s at equal or
better held-out explained variance). Each variant is timed --repeats times; the best counts.

    python benchmarks/p4_saelens_vs_torch.py                                       # full size
    python benchmarks/p4_saelens_vs_torch.py --tokens 40960 --width 768 --texts 1500   # smoke
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
from sae_lens import SAETrainer
from torch import nn

from workers.collect import activation_stream
from backend.core.run_config import SaeConfig
from workers.demo_corpus import generate_corpus
from workers.device import pick_device
from workers.train import NORM_ESTIMATE_BATCHES, build_training_sae, trainer_config

# Settings searched, as run-config `sae:` keys on top of the pipeline's TopK defaults. (SAELens's
# use_sparse_activations was tried too: on a CPU its sparse tensors made steps several times slower.)
VARIANTS = {
    "pipeline default": {},  # no decoder-norm rescaling, dead-feature aux loss on
    "decoder-norm rescale": {"rescale_acts_by_decoder_norm": True},  # SAELens's training default
    "no aux loss": {"aux_loss_coefficient": 0.0},
}


class PlainTopK(nn.Module):
    """The textbook TopK SAE: keep the k largest pre-activations, decode linearly."""

    def __init__(self, d_in: int, width: int, k: int):
        super().__init__()
        directions = torch.randn(d_in, width)
        directions /= directions.norm(dim=0, keepdim=True)
        self.W_enc = nn.Parameter(directions.clone())
        self.W_dec = nn.Parameter(directions.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, indices = pre.topk(self.k, dim=-1)
        acts = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        return acts @ self.W_dec + self.b_dec


def train_plain(batches, sae_cfg: SaeConfig, d_in: int, device) -> PlainTopK:
    """Adam, lr held then decayed linearly to 0 over the last steps, like the SAELens trainer."""
    sae = PlainTopK(d_in, sae_cfg.width, sae_cfg.k).to(device)
    scale = d_in**0.5 / torch.stack([b.norm(dim=-1).mean() for b in batches[:NORM_ESTIMATE_BATCHES]]).mean()
    optimizer = torch.optim.Adam(sae.parameters(), lr=sae_cfg.lr)
    n_steps, decay = sae_cfg.n_steps, round(sae_cfg.lr_decay_fraction * sae_cfg.n_steps)
    for step, batch in zip(range(n_steps), itertools.cycle(batches)):
        x = batch * scale
        loss = (sae(x) - x).pow(2).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for group in optimizer.param_groups:
            group["lr"] = sae_cfg.lr * min(1.0, (n_steps - step - 1) / decay) if decay else sae_cfg.lr
    with torch.no_grad():  # fold the input scale so the SAE reads raw activations
        sae.b_dec /= scale
        sae.W_dec /= scale
        sae.W_enc *= scale
    return sae


def train_saelens(batches, sae_cfg: SaeConfig, d_in: int, device, overrides: dict):
    """Exactly what the pipeline would build for a config with these `sae:` keys."""
    sae_cfg = sae_cfg.model_copy(update=overrides)
    sae = build_training_sae(sae_cfg, d_in, str(device))
    return SAETrainer(cfg=trainer_config(sae_cfg, device), sae=sae, data_provider=itertools.cycle(batches)).fit()


@torch.no_grad()
def explained_variance(reconstruct, x: torch.Tensor) -> float:
    recon = torch.cat([reconstruct(chunk) for chunk in x.split(4096)])
    return float(1 - (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def cached_activations(args, device) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    from backend.core.settings import Settings
    from workers.adapters import load_adapter
    from backend.core.run_config import DEMO_MODEL_DIRNAME

    path = args.model or str(Settings().models_dir / DEMO_MODEL_DIRNAME)
    adapter = load_adapter("seq_cls", path, device, args.max_length)
    stream = activation_stream(adapter, generate_corpus(args.texts, seed=0), [args.layer], 64, seed=0)
    need = min(args.tokens, args.cache_tokens) + args.heldout_tokens
    chunks, have = [], 0
    while have < need:
        chunks.append(next(stream)[adapter.hook_name(args.layer)])
        have += len(chunks[-1])
    acts = torch.cat(chunks)[torch.randperm(have, generator=torch.Generator().manual_seed(0))]
    heldout, train = acts[: args.heldout_tokens], acts[args.heldout_tokens : need]
    print(f"{path} layer {args.layer}: {len(train):,} cached training tokens (cycled to {args.tokens:,}), "
          f"{len(heldout):,} held-out")
    return list(train.split(args.batch_size))[: len(train) // args.batch_size], heldout, adapter.d_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="reward model directory (default: the demo RM in the data dir)")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens")
    parser.add_argument("--cache-tokens", type=int, default=100_000, help="distinct cached tokens, cycled")
    parser.add_argument("--heldout-tokens", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    batches, heldout, d_in = cached_activations(args, device)
    heldout = heldout.to(device)
    sae_cfg = SaeConfig(width=args.width, k=args.k, training_tokens=args.tokens, batch_size=args.batch_size,
                        lr=args.lr)
    print(f"d_in {d_in}, width {args.width}, k {args.k}, batch {args.batch_size}, {sae_cfg.n_steps} steps, "
          f"device {device}, torch threads {torch.get_num_threads()}")

    results: dict[str, tuple[float, float]] = {}  # name -> (best seconds, held-out explained variance)
    runs = [("plain PyTorch", None)] + [(name, VARIANTS[name]) for name in args.variants]
    for _ in range(args.repeats):  # interleaved, so a busy spell hurts every contender alike
        for name, overrides in runs:
            torch.manual_seed(0)
            start = time.perf_counter()
            if overrides is None:
                sae = train_plain(batches, sae_cfg, d_in, device)
                reconstruct = sae
            else:
                sae = train_saelens(batches, sae_cfg, d_in, device, overrides)
                reconstruct = lambda x, sae=sae: sae.decode(sae.encode(x))  # noqa: E731
            seconds = time.perf_counter() - start
            ev = explained_variance(reconstruct, heldout)
            best = min(seconds, results.get(name, (float("inf"), 0))[0])
            results[name] = (best, ev)

    plain_s, plain_ev = results["plain PyTorch"]
    print(f"{'':28s} {'tokens/s':>9s} {'vs plain':>9s} {'held-out EV':>12s}")
    for name, (seconds, ev) in results.items():
        ratio = plain_s / seconds
        verdict = "" if name == "plain PyTorch" else (
            "  meets target" if ratio >= 0.95 and ev >= plain_ev - 1e-3 else "")
        print(f"{name:28s} {args.tokens / seconds:9,.0f} {ratio:8.2f}x {ev:12.3f}{verdict}")
    best = max((n for n in results if n != "plain PyTorch"), key=lambda n: plain_s / results[n][0])
    print(f"P4: SAELens / plain tokens/s = {plain_s / results[best][0]:.2f}x with '{best}' "
          f"({VARIANTS[best] or 'the pipeline settings'}); held-out EV {results[best][1]:.3f} vs {plain_ev:.3f} "
          f"(target >= 0.95x at equal or better EV)")


if __name__ == "__main__":
    main()

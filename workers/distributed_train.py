"""SAE training over several ranks: the forwards shared round-robin, each layer's SAE on one rank.

Why layers and not data-parallel steps: the run must come out the same on 1 and on N ranks
(tests/test_distributed.py), and a data-parallel step sums a batch's gradient in pieces, in
another order than one process does: the weights drift apart in the last bits, and a TopK code
that flips on one token changes counts downstream. Here each SAE takes exactly the steps it
takes in one process, from exactly the same batches:

- collection's forwards (workers/collect.py) go round-robin over the ranks, and each layer's
  rows go to the rank that owns the layer (layer i of the config: rank i % N), as sparsify's
  `distribute_modules` places layers;
- every rank then feeds the same sequence of items to the same shuffle buffer
  (workers/collect.py shuffled_batches), holding real rows only for its own layers and, for
  the others, [n, 0] placeholders that carry the row count. The buffer's refills and
  permutations are those of one process (its random draws come from the same seeded generator
  in the same order), so an owner's batches are the batches one process would train on;
- each SAE is initialised from a seed of its own, so building only one's own layers changes
  nothing.

With fewer layers than ranks the extra ranks share the forwards (collection) but no SAE steps;
they draw the same number of batches so that every rank exchanges rows in lockstep.
Afterwards every SAE's saved files go from its owner to every rank (the analysis needs them all,
and rank 0 publishes them).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from workers.batching import length_bucketed_batches, token_lengths
from workers.collect import Activations, TextCache, forward_rows
from workers.distributed import Ranks

SAE_SEED_STRIDE = 7919  # SAE i is initialised from seed + SAE_SEED_STRIDE * (i + 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """The global RNG seeded for one SAE's initialisation, and put back afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def layer_owners(layers: list[int], ranks: Ranks) -> dict[int, int]:
    return {layer: ranks.owner(i) for i, layer in enumerate(layers)}


def sharded_activation_stream(adapter, texts: list[str], layers: list[int], batch_size: int, seed: int, sink_rules,
                              ranks: Ranks, owners: dict[int, int], cache_bytes: int = 0) -> Iterator[Activations]:
    """activation_stream's items in its order (workers/collect.py), each forward on one rank: the
    batches of a pass go in groups of N, the i-th batch of a group that must be forwarded on
    rank i; a layer's rows reach its owner, and every other rank gets [n, 0] stand-ins. Every
    rank keeps the same text cache (its own layers' rows, the others' counts), so a batch is
    served from memory exactly where one process serves it from memory."""
    rng = np.random.default_rng(seed)
    lengths = token_lengths(adapter.tokenizer, texts, adapter.max_length)
    hooks = {layer: adapter.hook_name(layer) for layer in layers}
    cache = TextCache(cache_bytes, adapter.d_model)
    while True:
        batches = length_bucketed_batches(lengths, batch_size, rng)
        for start in range(0, len(batches), ranks.world):
            group = batches[start:start + ranks.world]
            # within a pass a batch's texts were all kept in an earlier pass or not: no look-ahead error
            served = [cache.batch(indices, list(hooks.values())) for indices in group]
            todo = [g for g, item in enumerate(served) if item is None]  # todo[r] is forwarded on rank r
            if not todo:  # the same on every rank: all served from memory
                yield from served
                continue
            mine = None
            if ranks.rank < len(todo):
                mine = forward_rows(adapter, [texts[i] for i in group[todo[ranks.rank]]], layers, sink_rules)
            counts = ranks.all_gather(None if mine is None else [[len(t[hooks[layer]]) for layer in layers]
                                                                 for t in mine])  # [rank][text][layer]
            received = _exchange(mine, counts, layers, hooks, owners, ranks, adapter.d_model, adapter.device)
            for source, g in enumerate(todo):
                per_text = [{} for _ in group[g]]
                for i, layer in enumerate(layers):
                    text_counts = [c[i] for c in counts[source]]
                    if owners[layer] != ranks.rank:
                        parts = [torch.empty(n, 0) for n in text_counts]
                    elif source == ranks.rank:
                        parts = [t[hooks[layer]] for t in mine]
                    else:
                        parts = list(received[(source, layer)].split(text_counts))
                    for text, rows in zip(per_text, parts):
                        text[hooks[layer]] = rows
                cache.add(group[g], per_text)
                served[g] = {hook: torch.cat([text[hook] for text in per_text]) for hook in hooks.values()}
            yield from served


def _exchange(mine: list[Activations] | None, counts: list, layers: list[int], hooks: dict[int, str],
              owners: dict[int, int], ranks: Ranks, d_model: int, device: torch.device) -> dict:
    """Point to point: this rank's rows of each layer to the layer's owner, and the other ranks'
    rows of this rank's layers here. Returns {(source rank, layer): rows}."""
    ops, received = [], {}
    for i, layer in enumerate(layers):
        owner = owners[layer]
        for source in range(ranks.world):
            n = sum(c[i] for c in counts[source] or [])
            if source == owner or n == 0:
                continue
            if source == ranks.rank:
                rows = torch.cat([t[hooks[layer]] for t in mine]).contiguous()
                ops.append(dist.P2POp(dist.isend, rows, owner))
            elif owner == ranks.rank:
                buffer = torch.empty(n, d_model, dtype=torch.float32, device=device)
                received[(source, layer)] = buffer
                ops.append(dist.P2POp(dist.irecv, buffer, source))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return received


def own_hooks_only(batches: Iterator[Activations], hooks: set[str]) -> Iterator[Activations]:
    """The shuffled batches without the placeholders of other ranks' layers."""
    for batch in batches:
        yield {hook: rows for hook, rows in batch.items() if hook in hooks}


def drain(batches: Iterator, n: int) -> None:
    """Draw what a trainer would (a rank without SAEs keeps the exchange in step)."""
    for _ in range(n):
        next(batches)


def share_sae_files(directories: dict[int, list[Path]], owners: dict[int, int], run_dir: Path, ranks: Ranks) -> None:
    """Each layer's saved SAE directories (under run_dir), from its owner to every rank's run_dir."""
    for layer, paths in directories.items():
        owner = owners[layer]
        files = None
        if ranks.rank == owner:
            files = {str(f.relative_to(run_dir)): f.read_bytes() for d in paths for f in sorted(d.rglob("*"))
                     if f.is_file()}
        files = ranks.broadcast(files, src=owner)
        if ranks.rank != owner:
            for name, data in files.items():
                target = run_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)

"""The measure stage over several ranks: rank 0 runs each layer's causal stage (workers/causal.py)
and, where it measures single features, tells the other ranks which layer, candidates and
weights; each rank rebuilds the same held-out evaluation set and measures its share of the
(feature, text) chunks (workers/measured_effects.py), and rank 0 gathers them. When rank 0 is
done with every layer it says so, and the others leave."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers import distributed
from workers.ablation import prepare_eval_set
from workers.measured_effects import measure_single_features
from workers.sae_ops import decoder_directions


@dataclass(frozen=True)
class MeasureTask:
    layer: int
    candidates: np.ndarray
    weights: np.ndarray
    pooling: str
    pool_texts: int
    batch_size: int
    texts_per_feature: int
    seed: int


def announce(task: MeasureTask) -> None:
    """Rank 0: the other ranks measure their share of this task with it."""
    ranks = distributed.current()
    if ranks.active:
        ranks.broadcast(task)


def finish() -> None:
    """Rank 0: no more tasks; returns once every rank got there (so it may publish)."""
    ranks = distributed.current()
    if ranks.active:
        ranks.broadcast(None)
        ranks.barrier()


def serve(adapter, saes: dict, heldout_texts: list[str]) -> None:
    """Ranks other than 0: measure each announced task's share until rank 0 is done."""
    ranks = distributed.current()
    while (task := ranks.broadcast(None)) is not None:
        sae = saes[task.layer]
        pool = prepare_eval_set(adapter, task.layer, heldout_texts[: task.pool_texts], task.batch_size,
                                with_gradients=True)
        measure_single_features(adapter, sae, task.layer, pool, task.candidates, task.weights, task.pooling,
                                decoder_directions(sae), task.texts_per_feature, task.seed)
    ranks.barrier()

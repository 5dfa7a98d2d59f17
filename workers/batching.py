"""Batches of similar-length texts: padding is most of the compute on short texts otherwise."""
from __future__ import annotations

import numpy as np

BUCKET_BATCHES = 50  # sort within windows of this many batches, so batches stay random


def token_lengths(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return np.array([len(ids) for ids in enc["input_ids"]])


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Index batches covering every text once. With an rng: shuffled, sorted by length inside
    windows, batches shuffled. Without: deterministic, all texts sorted by length."""
    if rng is None:
        order = np.argsort(lengths, kind="stable")
    else:
        order = rng.permutation(len(lengths))
        window = batch_size * BUCKET_BATCHES
        order = np.concatenate([
            chunk[np.argsort(lengths[chunk], kind="stable")]
            for chunk in np.array_split(order, max(1, -(-len(order) // window)))
        ])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches

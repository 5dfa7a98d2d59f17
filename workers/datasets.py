"""Load a run's texts: the demo corpus or a local JSONL/CSV/Parquet file with a text column."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.config import DEMO_DATASET, ConfigError, DatasetConfig
from workers.demo_corpus import generate_corpus, vader_reward

DEMO_CORPUS_SIZE = 20_000


@dataclass
class Corpus:
    texts: list[str]
    rewards: np.ndarray | None  # the dataset's own reward column, if any
    heldout: np.ndarray  # bool per text: held out from SAE training and regression fitting


def _read_table(path: Path):
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pyarrow.parquet.read_table(path)
    if suffix == ".csv":
        return pyarrow.csv.read_csv(path)
    return pyarrow.json.read_json(path)


def load_corpus(config: DatasetConfig, seed: int) -> Corpus:
    if config.source == DEMO_DATASET:
        texts = generate_corpus(config.n_texts or DEMO_CORPUS_SIZE, seed=seed)
        rewards = np.array([vader_reward(t) for t in texts])
    else:
        table = _read_table(Path(config.source))
        if config.text_column not in table.column_names:
            raise ConfigError(
                f"dataset.text_column: column {config.text_column!r} not in {config.source} "
                f"(columns: {', '.join(table.column_names)})"
            )
        texts = [str(t) for t in table.column(config.text_column).to_pylist()]
        rewards = None
        if config.reward_column and config.reward_column in table.column_names:
            rewards = np.array(table.column(config.reward_column).to_pylist(), dtype=float)
        if config.n_texts:
            texts = texts[: config.n_texts]
            rewards = rewards[: config.n_texts] if rewards is not None else None
    if len(texts) < 10:
        raise ConfigError(f"dataset.source: {len(texts)} texts found, at least 10 are needed")
    rng = np.random.default_rng(seed)
    heldout = rng.random(len(texts)) < config.heldout_fraction
    return Corpus(texts, rewards, heldout)

"""Load a run's texts: the demo corpus, a local JSONL/CSV/Parquet file, a dataset directory
(`datasets` save_to_disk or data files), or a HF hub dataset ('hf:<id>', online or cached).

Columns: `text` (or a `steps` list, joined into a text with model.step_separator after every
step), optional `reward`. Then, in order: shuffle (seeded), skip texts longer than
model.max_length when truncation is off, take at most n_texts and stop once the texts'
tokens reach token_budget, and hold out a random fraction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.config import DEMO_DATASET, HF_PREFIX, ConfigError, DatasetConfig
from workers.demo_corpus import generate_corpus, vader_reward

DEMO_CORPUS_SIZE = 20_000
MIN_TEXTS = 10
TOKENIZE_CHUNK = 1024  # texts tokenised at a time while filling the token budget


@dataclass
class Corpus:
    texts: list[str]
    rewards: np.ndarray | None  # the dataset's own reward column, if any
    heldout: np.ndarray  # bool per text: held out from SAE training and regression fitting


def _read_file(path: Path):
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pyarrow.parquet.read_table(path)
    if suffix == ".csv":
        return pyarrow.csv.read_csv(path)
    return pyarrow.json.read_json(path)


def _read_hf(source: str, split: str):
    """A `datasets` split as a pyarrow table: a save_to_disk directory, a directory of data
    files, or a hub id (the hub needs network access, or the dataset in the local HF cache)."""
    import datasets

    local = Path(source)
    try:
        if local.is_dir() and any((local / name).exists() for name in ("state.json", "dataset_dict.json")):
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ConfigError(f"dataset.split: {split!r} not in {source} (splits: {', '.join(data)})")
                data = data[split]
        else:
            data = datasets.load_dataset(source, split=split)
    except ConfigError:
        raise
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise ConfigError(f"dataset.split: {exc}") from None
        raise ConfigError(f"dataset.source: cannot load {source!r}: {exc}") from None
    except Exception as exc:  # offline, unknown id, unreadable files: all end the same way for the user
        where = "" if local.exists() else " (a hub dataset needs network access or a copy in the HF cache)"
        raise ConfigError(f"dataset.source: cannot load {source!r}{where}: {type(exc).__name__}: {exc}") from None
    return data.with_format("arrow")[:]


def read_table(config: DatasetConfig):
    source = config.source
    if source.startswith(HF_PREFIX):
        return _read_hf(source[len(HF_PREFIX):], config.split)
    path = Path(source)
    if path.is_dir():
        return _read_hf(source, config.split)
    if not path.is_file():
        raise ConfigError(f"dataset.source: file not found: {source}")
    return _read_file(path)


def texts_and_rewards(table, config: DatasetConfig, step_separator: str) -> tuple[list[str], np.ndarray | None]:
    columns = table.column_names
    if config.steps_column and config.steps_column in columns:
        texts = []
        for i, steps in enumerate(table.column(config.steps_column).to_pylist()):
            if not isinstance(steps, list) or not steps:
                raise ConfigError(f"dataset.steps_column: row {i} of {config.steps_column!r} is not a non-empty list")
            texts.append("".join(f"{step}{step_separator}" for step in steps))
    elif config.text_column in columns:
        texts = ["" if t is None else str(t) for t in table.column(config.text_column).to_pylist()]
    else:
        raise ConfigError(
            f"dataset.text_column: column {config.text_column!r} not in {config.source} "
            f"(columns: {', '.join(columns)}; a list of steps goes in dataset.steps_column)"
        )
    rewards = None
    if config.reward_column and config.reward_column in columns:
        try:
            rewards = np.array([np.nan if r is None else float(r)
                                for r in table.column(config.reward_column).to_pylist()])
        except (TypeError, ValueError):
            raise ConfigError(f"dataset.reward_column: {config.reward_column!r} holds non-numeric values") from None
    return texts, rewards


def _within_limits(texts: list[str], config: DatasetConfig, tokenizer, max_length: int | None) -> np.ndarray:
    """Indices of the texts to keep, in order: long texts skipped without truncation, then at most
    n_texts, stopping once their tokens (as the model sees them) reach the token budget."""
    limit = config.n_texts or len(texts)
    needs_tokens = config.token_budget is not None or not config.truncation
    if not needs_tokens:
        return np.arange(min(limit, len(texts)))
    if tokenizer is None or max_length is None:
        raise ValueError("dataset.token_budget / dataset.truncation: loading needs the model's tokenizer and max_length")
    keep, total = [], 0
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        lengths = [len(ids) for ids in tokenizer(chunk, truncation=config.truncation, max_length=max_length)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > max_length:
                continue  # truncation off: a text the model cannot see whole is skipped
            keep.append(start + i)
            total += n
            if len(keep) >= limit or (config.token_budget is not None and total >= config.token_budget):
                return np.array(keep)
    return np.array(keep, dtype=np.int64)


def load_corpus(config: DatasetConfig, seed: int, tokenizer=None, max_length: int | None = None,
                step_separator: str = "\n") -> Corpus:
    """The run's texts (and the dataset's rewards, if it has them). `tokenizer` and `max_length`
    are needed for token_budget and for truncation off."""
    if config.source == DEMO_DATASET:
        texts = generate_corpus(config.n_texts or DEMO_CORPUS_SIZE, seed=seed)
        rewards = np.array([vader_reward(t) for t in texts])
    else:
        texts, rewards = texts_and_rewards(read_table(config), config, step_separator)
    order = np.random.default_rng([seed, 1]).permutation(len(texts)) if config.shuffle else np.arange(len(texts))
    chosen = order[_within_limits([texts[i] for i in order], config, tokenizer, max_length)]
    texts = [texts[i] for i in chosen]
    rewards = rewards[chosen] if rewards is not None else None
    if len(texts) < MIN_TEXTS:
        raise ConfigError(f"dataset.source: {len(texts)} usable texts in {config.source}, "
                          f"at least {MIN_TEXTS} are needed (see dataset.token_budget, n_texts, truncation)")
    rng = np.random.default_rng(seed)
    heldout = rng.random(len(texts)) < config.heldout_fraction
    return Corpus(texts, rewards, heldout)

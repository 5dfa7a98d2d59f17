"""Load a run's texts: the demo corpus, a local JSONL/CSV/Parquet file, a dataset directory
(`datasets` save_to_disk or data files), or a HF hub dataset ('hf:<id>', online or cached).

Columns: `text` (or a `steps` list, joined into a text with model.step_separator after every
step; or chat: a `messages` list, or `prompt` and `response`, rendered with the model's chat
template once its tokenizer is loaded, workers/chat.py), optional `reward`; or `chosen` / `rejected`
(and optional `prompt`): preference pairs, read by workers/preference_data.py, each pair two texts
of the corpus. Then, in order: shuffle (seeded), skip texts longer than
model.max_length when truncation is off, take at most n_texts and stop once the texts'
tokens reach token_budget, and hold out a random fraction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet

from backend.core.run_config import DEMO_CHAT_DATASET, DEMO_DATASET, HF_PREFIX, ConfigError, DatasetConfig
from workers.chat import chat_conversations
from workers.demo_corpus import generate_corpus, vader_reward
from workers.demo_llama import demo_chat_rows
from workers.preference_data import PreferencePairs, is_pair_table, read_pairs, select_pairs

DEMO_CORPUS_SIZE = 20_000
MIN_TEXTS = 10
TOKENIZE_CHUNK = 1024  # texts tokenised at a time while filling the token budget


@dataclass
class Corpus:
    texts: list[str]
    rewards: np.ndarray | None  # the dataset's own reward column, if any
    heldout: np.ndarray  # bool per text: held out from SAE training and regression fitting
    pairs: np.ndarray | None = None  # preference pairs: [n_pairs, 2] text ids (chosen, rejected)
    pair_rows: np.ndarray | None = None  # ... and each pair's row in the dataset


def _read_file(path: Path):
    if path.stat().st_size == 0:
        raise ConfigError(f"dataset.source: {path} is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pyarrow.parquet.read_table(path)
        if suffix == ".csv":
            return pyarrow.csv.read_csv(path)
        return pyarrow.json.read_json(path)
    except (pyarrow.ArrowException, OSError) as exc:  # malformed rows, a file that is not what its name says
        raise ConfigError(f"dataset.source: cannot read {path}: {exc}") from None


def _read_hf(source: str, split: str):
    """A `datasets` split as a pyarrow table: a save_to_disk directory, a directory of data
    files, or a hub id (the hub needs network access, or the dataset in the local HF cache)."""
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
    if table.num_rows == 0:
        raise ConfigError(f"dataset.source: {config.source} holds no rows")
    conversations = None if config.text_column in columns else chat_conversations(table, config)
    if conversations is not None:  # rendered with the model's chat template once its tokenizer is loaded
        texts = conversations
    elif config.steps_column and config.steps_column in columns:
        texts = []
        for i, steps in enumerate(table.column(config.steps_column).to_pylist()):
            if not isinstance(steps, list) or not steps:
                raise ConfigError(f"dataset.steps_column: row {i} of {config.steps_column!r} is not a non-empty list")
            texts.append("".join(f"{step}{step_separator}" for step in steps))
        _refuse_empty(texts, config, "dataset.steps_column")
    elif config.text_column in columns:
        values = table.column(config.text_column).to_pylist()
        missing = sum(t is None for t in values)
        if missing:
            raise ConfigError(f"dataset.text_column: {missing:,} of {len(values):,} rows of {config.source} have no "
                              f"text (null in {config.text_column!r}): fill them in or drop those rows")
        texts = [str(t) for t in values]
        _refuse_empty(texts, config, "dataset.text_column")
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
        unusable = int((~np.isfinite(rewards)).sum())
        if unusable:  # stored beside the scores and read by reward_function 'dataset': never a silent NaN
            raise ConfigError(f"dataset.reward_column: {unusable:,} of {len(rewards):,} rows of {config.source} have "
                              f"no finite reward (null, NaN or infinite in {config.reward_column!r}): fill them in, "
                              "drop those rows, or set dataset.reward_column: null to read no rewards")
    return texts, rewards


def _refuse_empty(texts: list[str], config: DatasetConfig, key: str) -> None:
    empty = sum(not t.strip() for t in texts)
    if empty:
        every = "all" if empty == len(texts) else f"{empty:,} of"
        raise ConfigError(f"{key}: {every} {len(texts):,} texts of {config.source} are empty (or only whitespace): "
                          "drop those rows, or name the column that holds the texts")


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


def read_texts(config: DatasetConfig, seed: int, step_separator: str = "\n"
               ) -> tuple[list[str] | PreferencePairs, np.ndarray | None]:
    """Every text of the dataset (and its rewards), checked: no rows, null or empty texts and
    missing rewards are refused here, before any model is loaded. A table of preference pairs
    gives its pairs (rendered into texts once the tokenizer is loaded) and no rewards."""
    if config.source == DEMO_DATASET:
        texts = generate_corpus(config.n_texts or DEMO_CORPUS_SIZE, seed=seed)
        return texts, np.array([vader_reward(t) for t in texts])
    if config.source == DEMO_CHAT_DATASET:
        return texts_and_rewards(pyarrow.Table.from_pylist(demo_chat_rows(config.n_texts or DEMO_CORPUS_SIZE, seed)),
                                 config, step_separator)
    table = read_table(config)
    if is_pair_table(table.column_names, config):
        return read_pairs(table, config), None
    return texts_and_rewards(table, config, step_separator)


def select_corpus(texts: list[str] | PreferencePairs, rewards: np.ndarray | None, config: DatasetConfig, seed: int,
                  tokenizer=None, max_length: int | None = None, max_texts: int | None = None) -> Corpus:
    """The run's share of the texts (shuffle, truncation, n_texts, token_budget) and the
    held-out split. `max_texts` (the deployment's limit) bounds a corpus taken whole."""
    if isinstance(texts, PreferencePairs):
        chosen = select_pairs(texts, config, seed, tokenizer, max_length, max_texts)
        return Corpus(chosen.texts, None, chosen.heldout, chosen.pairs, chosen.rows)
    order = np.random.default_rng([seed, 1]).permutation(len(texts)) if config.shuffle else np.arange(len(texts))
    chosen = order[_within_limits([texts[i] for i in order], config, tokenizer, max_length)]
    if max_texts is not None and len(chosen) > max_texts:
        raise ConfigError(f"dataset.n_texts: {config.source} gives {len(chosen):,} texts, beyond the limit of "
                          f"{max_texts:,} texts (set dataset.n_texts or dataset.token_budget to take fewer, or "
                          "raise the limit by setting RA_MAX_TEXTS for the worker and the server)")
    texts = [texts[i] for i in chosen]
    rewards = rewards[chosen] if rewards is not None else None
    if len(texts) < MIN_TEXTS:
        raise ConfigError(f"dataset.source: {len(texts)} usable texts in {config.source}, "
                          f"at least {MIN_TEXTS} are needed (see dataset.token_budget, n_texts, truncation)")
    rng = np.random.default_rng(seed)
    heldout = rng.random(len(texts)) < config.heldout_fraction
    n_held = int(heldout.sum())
    if n_held in (0, len(texts)):
        missing = "no held-out texts (the regression and effects are measured on them)" if n_held == 0 \
            else "no texts to train on"
        raise ConfigError(f"dataset.heldout_fraction: {config.heldout_fraction:g} of {len(texts)} texts leaves "
                          f"{missing}: {'raise' if n_held == 0 else 'lower'} it, or use more texts")
    return Corpus(texts, rewards, heldout)


def load_corpus(config: DatasetConfig, seed: int, tokenizer=None, max_length: int | None = None,
                step_separator: str = "\n", max_texts: int | None = None) -> Corpus:
    """The run's texts (and the dataset's rewards, if it has them). `tokenizer` and `max_length`
    are needed for token_budget and for truncation off."""
    texts, rewards = read_texts(config, seed, step_separator)
    return select_corpus(texts, rewards, config, seed, tokenizer, max_length, max_texts)

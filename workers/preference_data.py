"""Preference pairs as a dataset kind, in TRL's conventions.

A table with `chosen` and `rejected` columns (and no `dataset.text_column`) is read as pairs, with
no extra keys. Each side is a string, or a conversational list of {role, content} messages; an
optional `prompt` column is TRL's explicit-prompt form (otherwise the sides hold the whole text and
their shared prefix is the implicit prompt). Every row is checked before any model is loaded: a
side missing or empty, chosen identical to rejected, a message with an unknown role or no text,
string and conversational forms mixed in a row, each refused naming the column and the row.

A pair becomes two texts as the model reads them: prompt + side for strings (TRL concatenates
them), or the tokenizer's chat template over prompt messages + side messages. The corpus holds
them interleaved (text 2k is pair k's chosen side, 2k + 1 its rejected side) and the held-out
split is drawn per pair, so both sides of a pair are always in the same split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.core.run_config import ConfigError, DatasetConfig

CHOSEN, REJECTED, PROMPT = "chosen", "rejected", "prompt"
ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know
MIN_PAIRS = 5  # ten texts, as for a text corpus (workers/datasets.py MIN_TEXTS)


@dataclass
class PreferencePairs:
    """The dataset's pairs as read: each side a string or a list of {role, content} messages."""
    source: str
    chosen: list[Any]
    rejected: list[Any]
    prompts: list[Any] | None  # None: no prompt column (implicit prompt)

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen[0], list)

    def __len__(self) -> int:
        return len(self.chosen)


def is_pair_table(columns: list[str], config: DatasetConfig) -> bool:
    """Pairs are recognised by their columns: chosen and rejected, and no text column."""
    return CHOSEN in columns and REJECTED in columns and config.text_column not in columns


def read_pairs(table, config: DatasetConfig) -> PreferencePairs:
    """Every row's pair, checked (ConfigError naming the column and the row)."""
    if table.num_rows == 0:
        raise ConfigError(f"dataset.source: {config.source} holds no rows")
    columns = table.column_names
    chosen, rejected = table.column(CHOSEN).to_pylist(), table.column(REJECTED).to_pylist()
    prompts = table.column(PROMPT).to_pylist() if PROMPT in columns else None
    conversational = isinstance(next((c for c in chosen if c is not None), None), list)
    for row in range(len(chosen)):
        for column, value in ((CHOSEN, chosen[row]), (REJECTED, rejected[row])):
            _check_side(value, column, row, config.source, conversational)
        if prompts is not None:
            _check_prompt(prompts[row], row, config.source, conversational)
        if chosen[row] == rejected[row]:
            raise ConfigError(f"dataset.source: row {row} of {config.source}: '{CHOSEN}' and '{REJECTED}' are "
                              "identical, so the pair states no preference: drop the row or fix one side")
    return PreferencePairs(config.source, chosen, rejected, prompts)


def _where(column: str, row: int, source: str) -> str:
    return f"dataset.source: row {row} of {source}: '{column}'"


def _check_side(value: Any, column: str, row: int, source: str, conversational: bool) -> None:
    where = _where(column, row, source)
    if value is None:
        raise ConfigError(f"{where} is missing (null): every pair needs both sides")
    if conversational != isinstance(value, list):
        form = "a list of {role, content} messages" if conversational else "a string"
        raise ConfigError(f"{where} is {type(value).__name__}, but the pairs of this file are {form} "
                          "(string and conversational forms cannot be mixed)")
    if conversational:
        _check_messages(value, where)
        if not any(message["content"].strip() for message in value):
            raise ConfigError(f"{where} is empty (no message has any text): every pair needs both sides")
    elif not str(value).strip():
        raise ConfigError(f"{where} is empty (or only whitespace): every pair needs both sides")


def _check_prompt(value: Any, row: int, source: str, conversational: bool) -> None:
    where = _where(PROMPT, row, source)
    if value is None:
        raise ConfigError(f"{where} is missing (null): with a prompt column every row needs its prompt")
    if conversational != isinstance(value, list):
        raise ConfigError(f"{where} is {type(value).__name__}, but the sides are "
                          f"{'conversational' if conversational else 'strings'}: the prompt must be the same form")
    if conversational:
        _check_messages(value, where)


def _check_messages(messages: list, where: str) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ConfigError(f"{where} message {i} is not a {{role, content}} message with text content")
        if message.get("role") not in ROLES:
            raise ConfigError(f"{where} message {i} has unknown role {message.get('role')!r} "
                              f"(roles: {', '.join(ROLES)})")


def render_pairs(pairs: PreferencePairs, tokenizer) -> tuple[list[str], list[str]]:
    """(chosen texts, rejected texts) as the model reads them."""
    if not pairs.conversational:
        prompts = pairs.prompts or [""] * len(pairs)
        return ([p + c for p, c in zip(prompts, pairs.chosen)], [p + r for p, r in zip(prompts, pairs.rejected)])
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"dataset.source: the pairs of {pairs.source} are conversational ({{role, content}} "
                          "messages), and the tokenizer of model.path has no chat template to render them with: "
                          "use a model whose tokenizer has one, or give the sides as strings")
    prompts = pairs.prompts or [[] for _ in range(len(pairs))]

    def render(prompt: list, side: list) -> str:
        return tokenizer.apply_chat_template(list(prompt) + list(side), tokenize=False)

    return ([render(p, c) for p, c in zip(prompts, pairs.chosen)],
            [render(p, r) for p, r in zip(prompts, pairs.rejected)])


def _token_ids(tokenizer, texts: list[str], max_length: int, truncation: bool) -> list[list[int]]:
    return tokenizer(texts, truncation=truncation, max_length=max_length)["input_ids"]


def _kept_pairs(chosen: list[str], rejected: list[str], order: np.ndarray, config: DatasetConfig, tokenizer,
                max_length: int) -> list[int]:
    """Pairs to keep, in `order`: a pair the model cannot tell apart within max_length tokens is
    refused; with truncation off a pair with a side beyond max_length is skipped; then at most
    n_texts / 2 pairs, stopping once their tokens reach the token budget."""
    limit = (config.n_texts // 2) if config.n_texts else len(order)
    chosen_ids = _token_ids(tokenizer, [chosen[i] for i in order], max_length, config.truncation)
    rejected_ids = _token_ids(tokenizer, [rejected[i] for i in order], max_length, config.truncation)
    keep, total = [], 0
    for k, row in enumerate(order):
        a, b = chosen_ids[k], rejected_ids[k]
        if not config.truncation and max(len(a), len(b)) > max_length:
            continue
        if a == b:
            raise ConfigError(f"dataset.source: row {row} of {config.source}: '{CHOSEN}' and '{REJECTED}' are the "
                              f"same within model.max_length ({max_length}) tokens, so the model cannot prefer one: "
                              "raise model.max_length or drop the row")
        keep.append(int(row))
        total += len(a) + len(b)
        if len(keep) >= limit or (config.token_budget is not None and total >= config.token_budget):
            break
    return keep


@dataclass
class PairSelection:
    texts: list[str]  # interleaved: pair k's chosen side at 2k, its rejected side at 2k + 1
    heldout: np.ndarray  # bool per text (the pair's split)
    pairs: np.ndarray  # [n_pairs, 2] text ids (chosen, rejected)
    rows: np.ndarray  # each pair's row in the dataset


def select_pairs(pairs: PreferencePairs, config: DatasetConfig, seed: int, tokenizer, max_length: int,
                 max_texts: int | None = None) -> PairSelection:
    """The run's pairs, rendered, limited like a text corpus (shuffle, truncation, n_texts counting
    both sides, token_budget), and split into train and held-out pairs."""
    chosen, rejected = render_pairs(pairs, tokenizer)
    n = len(pairs)
    order = np.random.default_rng([seed, 1]).permutation(n) if config.shuffle else np.arange(n)
    rows = np.array(_kept_pairs(chosen, rejected, order, config, tokenizer, max_length), dtype=np.int64)
    if max_texts is not None and 2 * len(rows) > max_texts:
        raise ConfigError(f"dataset.n_texts: {config.source} gives {2 * len(rows):,} texts ({len(rows):,} pairs), "
                          f"beyond the limit of {max_texts:,} texts (set dataset.n_texts or dataset.token_budget to "
                          "take fewer, or raise the limit by setting RA_MAX_TEXTS for the worker and the server)")
    if len(rows) < MIN_PAIRS:
        raise ConfigError(f"dataset.source: {len(rows)} usable pairs in {config.source}, at least {MIN_PAIRS} are "
                          "needed (see dataset.token_budget, n_texts, truncation)")
    heldout_pairs = np.random.default_rng(seed).random(len(rows)) < config.heldout_fraction
    n_held = int(heldout_pairs.sum())
    if n_held in (0, len(rows)):
        missing = "no held-out pairs" if n_held == 0 else "no pairs to train on"
        raise ConfigError(f"dataset.heldout_fraction: {config.heldout_fraction:g} of {len(rows)} pairs leaves "
                          f"{missing}: {'raise' if n_held == 0 else 'lower'} it, or use more pairs")
    texts = [text for row in rows for text in (chosen[row], rejected[row])]
    ids = np.arange(2 * len(rows)).reshape(-1, 2)
    return PairSelection(texts, np.repeat(heldout_pairs, 2), ids, rows)

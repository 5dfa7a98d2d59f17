"""Reward models that are not HF classes: the `model.loader` extension point.

A run config names a loader, `model.loader: "package.module:function"`. The worker imports it
and calls `function(model.path)`; it returns a CustomRewardModel (or a dict of its fields):

- `model`: the torch module (moved to the run's device and put in eval mode here);
- `blocks`: the nn.ModuleList of its transformer blocks, in order, the one its forward iterates.
  A block's output is the residual stream layer L reads; edits replace it;
- `score(input_ids, attention_mask)`: runs `model` and returns [B] or [B, n_outputs] values;
- `tokenizer`, a HF tokenizer, or `encode(text) -> ids` (special tokens included) with
  `token_text(id) -> str`, `vocab_size`, `pad_id` and `special_ids`;
- optionally `output_names` (for model.output by name), `read_position` ('last' or 'first': the
  token the head reads; a mean-pooled head reads every token: say 'last'), `max_positions`, and
  `pad_to_max_length`: pad every text to model.max_length, for a model whose attention ignores the
  padding mask (its score would otherwise depend on the batch a text is padded in).

Everything it returns is checked before any compute: a loader that cannot be imported, returns
something else, or whose blocks are not what its score runs is refused naming model.loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from workers.adapters.base import Batch, RewardModelAdapter, last_token_positions, whole_text_segments
from workers.device import autocast
from backend.core.head_outputs import HeadOutput, resolve_output
from backend.core.loader_ref import import_loader

PROBE_TEXTS = ["a short text to check the model", "and a second, somewhat longer text to check how it pads"]


@dataclass
class CustomRewardModel:
    """What a model.loader returns (see the module's docstring)."""
    model: nn.Module
    blocks: nn.ModuleList
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    tokenizer: Any = None
    encode: Callable[[str], Sequence[int]] | None = None
    token_text: Callable[[int], str] | None = None
    vocab_size: int | None = None
    pad_id: int | None = None
    special_ids: Sequence[int] = field(default_factory=tuple)
    output_names: Sequence[str] | None = None
    read_position: str = "last"
    max_positions: int | None = None
    pad_to_max_length: bool = False


class EncodeTokenizer:
    """The part of a HF tokenizer's interface rewardatlas uses, over an encode function."""
    is_fast = False  # no character offsets
    padding_side = "right"
    unk_token_id = None
    eos_token = None

    def __init__(self, encode: Callable[[str], Sequence[int]], token_text: Callable[[int], str], vocab_size: int,
                 pad_id: int, special_ids: Sequence[int]):
        self.encode, self.token_text, self.vocab_size = encode, token_text, int(vocab_size)
        self.pad_token_id = int(pad_id)
        self.all_special_ids = sorted({int(i) for i in special_ids} | {self.pad_token_id})
        self.all_special_tokens = [token_text(i) for i in self.all_special_ids]
        self.pad_token = token_text(self.pad_token_id)

    def __len__(self) -> int:
        return self.vocab_size

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [int(i) for i in self.encode(text)]
        if not add_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return ids

    def __call__(self, text, padding=False, truncation=False, max_length: int | None = None, return_tensors=None,
                 add_special_tokens: bool = True, **_ignored):
        single = isinstance(text, str)
        rows = [self._ids(t, add_special_tokens) for t in ([text] if single else text)]
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding:
            width = max_length if padding == "max_length" and max_length else max((len(r) for r in rows), default=0)
            masks = [m + [0] * (width - len(m)) for m in masks]
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(rows, dtype=torch.long), "attention_mask": torch.tensor(masks)}
        if single:
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.token_text(ids)
        return [self.token_text(int(i)) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def decode(self, ids, skip_special_tokens: bool = False, **_ignored) -> str:
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return "".join(self.token_text(int(i)) for i in ids if int(i) not in special)

    def get_vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = {}
        for i in range(self.vocab_size):
            vocab.setdefault(self.token_text(i), i)
        return vocab


class CustomRewardAdapter(RewardModelAdapter):
    kind = "custom"

    def __init__(self, built: CustomRewardModel, tokenizer, device: torch.device, max_length: int,
                 output: HeadOutput | None = None):
        # not the base __init__: a custom model has no HF config to read its depth from
        self.model = built.model.eval().to(device)
        self.tokenizer, self.device, self.max_length = tokenizer, device, max_length
        self.blocks = built.blocks
        self.n_layers = len(built.blocks)
        self._blocks_return_tuple: bool | None = None
        self._score_fn = built.score
        self.reads_first = built.read_position == "first"
        self.fixed_length = built.pad_to_max_length
        self.max_positions = built.max_positions
        self.output_names = list(built.output_names) if built.output_names else None
        self.output = output
        self.d_model = 0  # learnt from a probe forward (load_custom_adapter)
        self.n_outputs = 1

    def tokenize(self, texts: list[str], rewards: np.ndarray | None = None) -> Batch:
        texts = list(texts)
        enc = self.tokenizer(texts, padding="max_length" if self.fixed_length else True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        index, segment = self.reward_reads(enc, texts)
        to = lambda t: t.to(self.device)  # noqa: E731
        return Batch(texts, to(enc["input_ids"]), to(enc["attention_mask"]), to(index), to(segment), rewards=rewards)

    def reward_reads(self, enc, texts):
        mask = enc["attention_mask"]
        rows = torch.arange(len(mask))
        position = torch.zeros(len(mask), dtype=torch.long) if self.reads_first else last_token_positions(mask)
        return torch.stack([rows, position], dim=1), whole_text_segments(mask)

    def head_values(self, batch: Batch) -> torch.Tensor:
        """The head's values per text: [B, n_outputs] (a one-output head as one column)."""
        with autocast(self.device):
            values = self._score_fn(batch.input_ids, batch.attention_mask)
        if not isinstance(values, torch.Tensor):
            raise ValueError(f"model.loader: score returned a {type(values).__name__}, not a tensor")
        values = values.float()
        return values.unsqueeze(1) if values.dim() == 1 else values

    def score(self, batch: Batch) -> torch.Tensor:
        values = self.head_values(batch)
        per_text = values[:, 0] if self.output is None else self.output.select(values)
        return per_text[batch.reward_index[:, 0]]


def as_custom_model(result: Any, ref: str) -> CustomRewardModel:
    """A loader's return value as a CustomRewardModel, its fields' types checked."""
    if isinstance(result, dict):
        known = {f.name for f in fields(CustomRewardModel)}
        unknown = sorted(set(result) - known)
        missing = sorted({"model", "blocks", "score"} - set(result))
        if unknown or missing:
            raise ValueError(f"model.loader: {ref} returned a dict with "
                             + (f"unknown keys {unknown}" if unknown else f"no {missing}")
                             + f" (the fields are {', '.join(sorted(known))})")
        result = CustomRewardModel(**result)
    if not isinstance(result, CustomRewardModel):
        raise ValueError(f"model.loader: {ref} returned a {type(result).__name__}, not a CustomRewardModel (or a dict "
                         "of its fields: model, blocks, score, tokenizer or encode, ...)")
    if not isinstance(result.model, nn.Module):
        raise ValueError(f"model.loader: {ref} returned a model that is a {type(result.model).__name__}, "
                         "not a torch nn.Module")
    if not isinstance(result.blocks, nn.ModuleList) or len(result.blocks) == 0:
        raise ValueError(f"model.loader: {ref}'s blocks must be the model's non-empty nn.ModuleList of transformer "
                         f"blocks, not a {type(result.blocks).__name__}")
    if not any(module is result.blocks for module in result.model.modules()):
        raise ValueError(f"model.loader: {ref}'s blocks cannot be found in its model: they must be the ModuleList "
                         "the model's forward runs (e.g. model.transformer.h), not a copy")
    if not callable(result.score):
        raise ValueError(f"model.loader: {ref}'s score must be a function (input_ids, attention_mask) -> scores")
    if (result.tokenizer is None) == (result.encode is None):
        raise ValueError(f"model.loader: {ref} must return either a tokenizer or an encode function (not both, "
                         "not neither)")
    if result.encode is not None and (result.token_text is None or result.vocab_size is None or result.pad_id is None):
        raise ValueError(f"model.loader: {ref} returned an encode function without token_text, vocab_size and "
                         "pad_id (what each token shows as, how many there are, and the padding id)")
    if result.read_position not in ("first", "last"):
        raise ValueError(f"model.loader: {ref}'s read_position must be 'first' or 'last', not {result.read_position!r}")
    return result


def _tokenizer_of(built: CustomRewardModel, ref: str):
    if built.encode is not None:
        return EncodeTokenizer(built.encode, built.token_text, built.vocab_size, built.pad_id, built.special_ids)
    tokenizer = built.tokenizer
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise ValueError(f"model.loader: {ref}'s tokenizer is a {type(tokenizer).__name__}, not a HF tokenizer "
                         "(return an encode function instead)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model.loader: {ref}'s tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def _probe(adapter: CustomRewardAdapter, ref: str) -> None:
    """One forward over two probe texts: every block must run (hooks fire), each output a
    [B, d] residual stream, the score [B] or [B, n_outputs]. Learns d_model and n_outputs."""
    batch = adapter.tokenize(PROBE_TEXTS)
    try:
        _, captured = adapter.run(batch, capture=list(range(adapter.n_layers)), need_score=False)
        values = adapter.head_values(batch)
    except ValueError:
        raise
    except Exception as exc:  # the user's model failing on a probe is the loader's problem
        raise ValueError(f"model.loader: {ref}'s model fails on a probe batch: {type(exc).__name__}: {exc}") from None
    silent = [layer for layer in range(adapter.n_layers) if layer not in captured]
    if silent:
        raise ValueError(f"model.loader: {ref}'s blocks {silent} did not run in its score function: blocks must be "
                         "the transformer blocks the model's forward runs")
    hidden = captured[0]
    if hidden.dim() != 3 or hidden.shape[:2] != batch.input_ids.shape:
        raise ValueError(f"model.loader: {ref}'s blocks output {tuple(hidden.shape)}, not [batch, tokens, d_model]")
    if values.dim() != 2 or len(values) != len(PROBE_TEXTS):
        raise ValueError(f"model.loader: {ref}'s score returned shape {tuple(values.shape)} for "
                         f"{len(PROBE_TEXTS)} texts, not [texts] or [texts, outputs]")
    adapter.d_model, adapter.n_outputs = int(hidden.shape[-1]), int(values.shape[1])


def load_custom_adapter(ref: str, path: str, device: torch.device, max_length: int, output: int | str | None = None,
                        output_score: str = "logit") -> CustomRewardAdapter:
    """Import and call the loader, check what it returns and probe it: every failure is a
    ValueError naming model.loader (or model.output), before any compute."""
    loader = import_loader(ref)
    try:
        result = loader(path)
    except Exception as exc:  # noqa: BLE001 -- whatever the user's loader raises
        raise ValueError(f"model.loader: {ref}({path!r}) failed: {type(exc).__name__}: {exc}") from None
    built = as_custom_model(result, ref)
    if built.max_positions is not None and max_length > built.max_positions:
        raise ValueError(f"model.max_length: {max_length} is beyond the model's {built.max_positions} positions "
                         f"(set it to at most {built.max_positions})")
    adapter = CustomRewardAdapter(built, _tokenizer_of(built, ref), device, max_length)
    _probe(adapter, ref)
    if adapter.output_names is not None and len(adapter.output_names) != adapter.n_outputs:
        raise ValueError(f"model.loader: {ref} names {len(adapter.output_names)} outputs but its score gives "
                         f"{adapter.n_outputs}")
    adapter.output = resolve_output(output, output_score, adapter.n_outputs, adapter.output_names)
    return adapter

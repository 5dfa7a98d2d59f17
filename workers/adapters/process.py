"""Process reward models: one score per reasoning step, read where the step's separator is.

Two heads are supported, chosen from the checkpoint's class:
- a causal LM tagged Math-Shepherd style: the step score is P(good token) normalised over the
  good and bad tokens, from the LM's logits at the separator (e.g. separator " ки", good "+",
  bad "-");
- a token-classification head (AutoModelForTokenClassification): one label gives the score
  as is, two labels give P(label 1), read at the separator.

A step's reward read sits on the separator's last token (or, for a separator the tokenizer
drops such as "\\n", on the step's last token); the step's segment is its own tokens, from
just after the previous separator to this one. Tokens after the last separator belong to no
step. A text with no separator inside model.max_length is read once, at its last token.
"""
from __future__ import annotations

import inspect
import warnings

import numpy as np
import torch

from workers.adapters.base import Batch, RewardModelAdapter, last_token_positions
from workers.device import autocast


def separator_spans(text: str, separator: str) -> list[tuple[int, int]]:
    """Character spans of every (non-overlapping) occurrence of the separator."""
    spans, start = [], text.find(separator)
    while start >= 0:
        spans.append((start, start + len(separator)))
        start = text.find(separator, start + len(separator))
    return spans


def token_id_of(tokenizer, token: str, key: str) -> int:
    """A vocabulary entry, or text that tokenises to exactly one token."""
    vocab_id = tokenizer.get_vocab().get(token)
    if vocab_id is not None:
        return vocab_id
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{key}: {token!r} is {len(ids)} tokens for this tokenizer, it must be exactly one")
    return ids[0]


class ProcessRewardAdapter(RewardModelAdapter):
    kind = "process"

    def __init__(self, model, tokenizer, device, max_length, step_separator: str = "\n",
                 good_token: str = "+", bad_token: str = "-"):
        super().__init__(model, tokenizer, device, max_length)
        self.separator = step_separator
        self.head = "token_classification" if type(model).__name__.endswith("ForTokenClassification") else "lm"
        if self.head == "token_classification" and model.config.num_labels not in (1, 2):
            raise ValueError(f"model.path: a token-classification process RM needs 1 or 2 labels, "
                             f"this one has {model.config.num_labels}")
        if self.head == "lm":
            self.candidates = [token_id_of(tokenizer, good_token, "model.good_token"),
                               token_id_of(tokenizer, bad_token, "model.bad_token")]
        # Fast tokenizers give character offsets, which find any separator; otherwise the
        # separator must be one token, found by its id.
        self.needs_offsets = bool(getattr(tokenizer, "is_fast", False))
        if not self.needs_offsets:
            self.separator_id = token_id_of(tokenizer, step_separator, "model.step_separator")
        self.keeps_some_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._warned = False

    # -- where each step is read ---------------------------------------------------------
    def _positions_from_offsets(self, text: str, offsets: np.ndarray, mask: np.ndarray) -> list[int]:
        content = np.nonzero(mask & (offsets[:, 1] > offsets[:, 0]))[0]  # special tokens have empty spans
        if len(content) == 0:
            return []
        starts = offsets[content, 0]
        seen_until = int(offsets[content[-1], 1])  # text beyond this was truncated away
        lead = len(self.separator) - len(self.separator.lstrip())
        positions: list[int] = []
        for a, b in separator_spans(text, self.separator):
            visible = (a + lead < seen_until) if self.separator.strip() else not text[seen_until:a].strip()
            if not visible:
                break
            j = int(np.searchsorted(starts, b, side="left")) - 1  # last token starting inside or before it
            if j >= 0 and (not positions or content[j] > positions[-1]):
                positions.append(int(content[j]))
        return positions

    def step_positions(self, enc, texts: list[str]) -> list[list[int]]:
        mask = enc["attention_mask"].bool().numpy()
        if self.needs_offsets:
            offsets = enc["offset_mapping"].numpy()
            return [self._positions_from_offsets(t, offsets[i], mask[i]) for i, t in enumerate(texts)]
        ids = enc["input_ids"].numpy()
        return [np.nonzero((ids[i] == self.separator_id) & mask[i])[0].tolist() for i in range(len(texts))]

    def reward_reads(self, enc, texts):
        mask = enc["attention_mask"]
        last = last_token_positions(mask)
        segment = torch.full_like(mask, -1)
        reads: list[tuple[int, int]] = []
        for row, positions in enumerate(self.step_positions(enc, texts)):
            if not positions:
                if not self._warned:
                    warnings.warn(f"a text has no step separator {self.separator!r} within model.max_length; "
                                  "it is read once at its last token", stacklevel=2)
                    self._warned = True
                positions = [int(last[row])]
            previous = -1
            for position in positions:
                segment[row, previous + 1 : position + 1] = len(reads)
                reads.append((row, position))
                previous = position
        segment[~mask.bool()] = -1
        return torch.tensor(reads, dtype=torch.long).reshape(-1, 2), segment

    # -- the score at each read ----------------------------------------------------------
    def score(self, batch: Batch) -> torch.Tensor:
        rows, positions = batch.reward_index.unbind(1)
        with autocast(self.device):
            if self.head == "lm":
                # logits only where steps are read: the vocabulary projection is most of the memory
                keep = torch.unique(positions) if self.keeps_some_logits else torch.arange(batch.input_ids.shape[1], device=self.device)
                extra = {"logits_to_keep": keep} if self.keeps_some_logits else {}
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **extra).logits
                picked = logits[rows, torch.searchsorted(keep, positions.contiguous())][:, self.candidates].float()
                return picked.softmax(dim=-1)[:, 0]
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        picked = logits[rows, positions].float()
        return picked[:, 0] if picked.shape[1] == 1 else picked.softmax(dim=-1)[:, 1]

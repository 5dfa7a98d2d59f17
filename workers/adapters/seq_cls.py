"""Sequence-classification reward models: any HF AutoModelForSequenceClassification. A head with
one label is the score; with several (a 2-label classifier, a multi-objective head) model.output
picks the one the run explains (backend/core/head_outputs.py)."""
from __future__ import annotations

import torch

from workers.adapters.base import Batch, RewardModelAdapter, whole_text_segments
from workers.device import autocast
from backend.core.head_outputs import resolve_output

PROBE_TEXT = "a short text to find where the score is read"


class SequenceClassifierAdapter(RewardModelAdapter):
    kind = "seq_cls"

    def __init__(self, model, tokenizer, device, max_length, output: int | str | None = None,
                 output_score: str = "logit"):
        names = [model.config.id2label[i] for i in range(model.config.num_labels)] if model.config.id2label else None
        self.output = resolve_output(output, output_score, model.config.num_labels, names)
        super().__init__(model, tokenizer, device, max_length)
        self.reads_last_token = self._head_reads_last_token()

    @torch.no_grad()
    def _head_reads_last_token(self) -> bool:
        """Ask the model itself which position its head reads: perturb the last block's output at
        the first and at the last token and see which one moves the score. Encoders (BERT-style)
        read the first token; decoder heads read the last non-pad token."""
        enc = self.tokenizer([PROBE_TEXT], return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.shape[1] < 2:
            raise ValueError("model.path: the tokenizer turns a probe sentence into fewer than 2 tokens")
        probe = Batch([PROBE_TEXT], ids.to(self.device), mask.to(self.device), torch.zeros(1, 2, dtype=torch.long),
                      whole_text_segments(mask))
        base, _ = self.run(probe)
        noise = torch.randn(self.d_model, generator=torch.Generator().manual_seed(0)).to(self.device)

        def shift(position: int):
            def edit(hidden):
                hidden = hidden.clone()
                hidden[:, position] += noise * (hidden.std() + 1.0) * 10
                return hidden
            return edit

        moved = {}
        for position in (0, ids.shape[1] - 1):
            scores, _ = self.run(probe, edits={self.n_layers - 1: shift(position)})
            moved[position] = float((scores - base).abs().max())
        if max(moved.values()) == 0:
            raise ValueError("model.path: the score does not depend on the last layer at the first or last token")
        return moved[ids.shape[1] - 1] > moved[0]

    def read_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.reads_last_token:
            return torch.zeros(len(input_ids), dtype=torch.long)
        pad_id = self.model.config.pad_token_id
        if pad_id is None:  # what HF does without a pad id: the last column
            return torch.full((len(input_ids),), input_ids.shape[1] - 1, dtype=torch.long)
        # HF's rule: the rightmost token that is not the pad id (left or right padding alike)
        non_pad = (input_ids != pad_id).long()
        return (non_pad * torch.arange(input_ids.shape[1])).argmax(dim=1)

    def reward_reads(self, enc, texts):
        ids, mask = enc["input_ids"], enc["attention_mask"]
        rows = torch.arange(len(ids))
        return torch.stack([rows, self.read_positions(ids, mask)], dim=1), whole_text_segments(mask)

    def score(self, batch: Batch) -> torch.Tensor:
        with autocast(self.device):
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits[:, 0].float() if self.output is None else self.output.select(logits)

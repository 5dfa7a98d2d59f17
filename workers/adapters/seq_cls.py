"""Sequence-classification reward models: any HF AutoModelForSequenceClassification with one label."""
from __future__ import annotations

import torch

from workers.adapters.base import Batch, RewardModelAdapter, whole_text_segments
from workers.device import autocast


class SequenceClassifierAdapter(RewardModelAdapter):
    kind = "seq_cls"

    def __init__(self, model, tokenizer, device, max_length):
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model needs one output label, this one has {model.config.num_labels}")
        super().__init__(model, tokenizer, device, max_length)
        # Encoders (BERT-style) read the first token; decoders read the last non-pad token,
        # which is what HF's *ForSequenceClassification heads do.
        self.reads_last_token = bool(getattr(model.config, "is_decoder", False)) or (
            model.config.model_type not in {"bert", "roberta", "deberta", "deberta-v2", "distilbert",
                                             "electra", "xlm-roberta", "albert", "mpnet"}
        )

    def reward_reads(self, input_ids, attention_mask):
        rows = torch.arange(len(input_ids), device=input_ids.device)
        if self.reads_last_token:  # last non-pad token, robust to left or right padding
            positions = (attention_mask * torch.arange(input_ids.shape[1], device=input_ids.device)).argmax(dim=1)
        else:
            positions = torch.zeros_like(rows)
        return torch.stack([rows, positions], dim=1), whole_text_segments(attention_mask)

    def score(self, batch: Batch) -> torch.Tensor:
        with autocast(self.device):
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits[:, 0].float()

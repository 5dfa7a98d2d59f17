"""A policy model (any HF causal LM) whose reward comes from a function of the text.

The reward is read at the last non-pad token: the one position that has seen the whole text.
Its value is the VADER lexicon reward of the text the model sees (after truncation), or the
dataset's own `reward` column: passed in with each batch, or looked up by text once the corpus
was handed over with use_dataset_rewards (so any stage scoring corpus texts gets it). The forward still runs, so hooks capture and edit the policy's
activations, but the score does not depend on them (score_from_model is False).
"""
from __future__ import annotations

import torch

from workers.adapters.base import Batch, RewardModelAdapter, last_token_positions, whole_text_segments
from workers.demo_corpus import vader_reward
from workers.device import autocast

REWARD_FUNCTIONS = ("vader", "dataset")


class CausalLMRewardAdapter(RewardModelAdapter):
    kind = "causal_lm"
    score_from_model = False

    def __init__(self, model, tokenizer, device, max_length, reward_function: str = "vader"):
        if reward_function not in REWARD_FUNCTIONS:
            raise ValueError(f"model.reward_function: {reward_function!r} is not one of {', '.join(REWARD_FUNCTIONS)}")
        super().__init__(model, tokenizer, device, max_length)
        self.reward_function = reward_function
        self.body = model.base_model  # the blocks without the vocabulary projection, which no score needs
        self.dataset_rewards: dict[str, float] = {}

    def use_dataset_rewards(self, texts: list[str], rewards) -> None:
        """Remember the dataset's reward of each text, for batches that come without rewards."""
        self.dataset_rewards = {text: float(r) for text, r in zip(texts, rewards)}

    def reward_reads(self, enc, texts):
        mask = enc["attention_mask"]
        rows = torch.arange(len(mask))
        return torch.stack([rows, last_token_positions(mask)], dim=1), whole_text_segments(mask)

    def visible_texts(self, texts: list[str]) -> list[str]:
        """Each text as far as the model sees it (cut where truncation cut its tokens)."""
        if not getattr(self.tokenizer, "is_fast", False):
            return texts
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        return [text[: max((end for _, end in offsets), default=len(text))]
                for text, offsets in zip(texts, enc["offset_mapping"])]

    def rewards(self, batch: Batch) -> torch.Tensor:
        if self.reward_function == "dataset":
            if batch.rewards is not None:
                return torch.tensor([float(r) for r in batch.rewards], dtype=torch.float32, device=self.device)
            missing = [t for t in batch.texts if t not in self.dataset_rewards]
            if missing:
                raise ValueError(f"model.reward_function is 'dataset' but {len(missing)} text(s) have no reward "
                                 f"(the dataset's column named by dataset.reward_column), e.g. {missing[0][:60]!r}")
            values = [self.dataset_rewards[t] for t in batch.texts]
        else:
            values = [vader_reward(text) for text in self.visible_texts(batch.texts)]
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def score(self, batch: Batch) -> torch.Tensor:
        with autocast(self.device):  # runs the blocks, so layer hooks capture and edit as usual
            self.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return self.rewards(batch)[batch.reward_index[:, 0]]

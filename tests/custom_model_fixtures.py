"""Loaders for model.loader tests: a tiny non-HF reward model with a multi-objective head (three
outputs), built like NanoGuard (embedding, a ModuleList of blocks, a mean-pooled head, attention
that ignores the padding mask), and loaders that return the wrong things."""
from __future__ import annotations

import copy
import zlib

import torch
from torch import nn

from workers.adapters.custom import CustomRewardModel

VOCAB = 512
BOS, PAD = 1, 0
OBJECTIVES = ("helpfulness", "safety", "verbosity")


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        context = x.mean(dim=1, keepdim=True)  # every token, padding included, as NanoGuard's attention
        x = x + torch.tanh(self.mix(context)).expand_as(x)
        return x + self.mlp(x)


class TinyMultiObjectiveRM(nn.Module):
    def __init__(self, d: int = 16, n_layers: int = 3, n_outputs: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n_layers)])
        self.spare = nn.ModuleList([Block(d) for _ in range(n_layers)])  # never run: not the blocks
        self.head = nn.Linear(d, n_outputs)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((x * mask).sum(1) / mask.sum(1).clamp(min=1))


def encode(text: str) -> list[int]:
    """BOS, then each word hashed into the vocabulary (ids 2..VOCAB-1)."""
    return [BOS] + [2 + zlib.crc32(word.lower().encode()) % (VOCAB - 2) for word in text.split()]


def token_text(i: int) -> str:
    return {BOS: "<bos>", PAD: "<pad>"}.get(i, f" w{i}")


def fields(model: TinyMultiObjectiveRM, **changes) -> dict:
    return {"model": model, "blocks": model.layers, "score": lambda ids, mask: model(ids, mask), "encode": encode,
            "token_text": token_text, "vocab_size": VOCAB, "pad_id": PAD, "special_ids": (BOS, PAD),
            "output_names": OBJECTIVES, "pad_to_max_length": True, "max_positions": 64, **changes}


def load_tiny(path: str) -> CustomRewardModel:
    return CustomRewardModel(**fields(TinyMultiObjectiveRM()))


def load_tiny_as_dict(path: str) -> dict:
    return fields(TinyMultiObjectiveRM())


def load_tiny_one_output(path: str) -> CustomRewardModel:
    return CustomRewardModel(**fields(TinyMultiObjectiveRM(n_outputs=1), output_names=None))


# --- loaders that return the wrong things -------------------------------------------------

def load_a_tuple(path: str):
    model = TinyMultiObjectiveRM()
    return model, encode, model.layers


def load_copied_blocks(path: str) -> CustomRewardModel:
    model = TinyMultiObjectiveRM()
    return CustomRewardModel(**fields(model, blocks=copy.deepcopy(model.layers)))


def load_blocks_not_run(path: str) -> CustomRewardModel:
    model = TinyMultiObjectiveRM()
    return CustomRewardModel(**fields(model, blocks=model.spare))


def load_a_list_of_blocks(path: str) -> CustomRewardModel:
    model = TinyMultiObjectiveRM()
    return CustomRewardModel(**fields(model, blocks=list(model.layers)))


def load_without_a_tokenizer(path: str) -> dict:
    return fields(TinyMultiObjectiveRM(), encode=None)


def load_that_fails(path: str):
    raise FileNotFoundError(f"no checkpoint at {path}")


not_a_function = 42

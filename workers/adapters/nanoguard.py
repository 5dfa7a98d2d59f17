"""NanoGuard, a prompt-injection classifier (PyPI `metatronnanoguard` 0.1.0), as a model.loader.

A custom torch module, not a HF class: 4 bidirectional blocks of width 512 (`transformer.h`),
a mean-pooled 2-label head (0 'safe', 1 'injection'), a tiktoken BPE tokenizer read from a
pickle. Texts are BOS + `encode_ordinary(text)`, cut at 512 tokens, padded with its pad token.

Its attention ignores the padding mask (only the pooling uses it), so a text's score depends on
how many pad tokens follow it: NanoGuard's own scanner pads every text to 512. Here every text is
padded to model.max_length (pad_to_max_length), so a text's score never depends on its batch;
with max_length 512 the scores are the scanner's, with less they are the model's on the text
followed by that many pads (cheaper; the README gives how far they move).

    model:
      path: bundled            # the package's own weights; or a directory with model.pt + tokenizer.pkl
      loader: workers.adapters.nanoguard:load
      output: injection
"""
from __future__ import annotations

import importlib.resources
import pickle
from pathlib import Path

from nanoguard.model import Classifier

from workers.adapters.custom import CustomRewardModel

BOS_TOKEN, PAD_TOKEN = "<|reserved_0|>", "<|reserved_1|>"
LABELS = ("safe", "injection")
BUNDLED = "bundled"


def _assets(path: str) -> tuple[Path, Path]:
    """model.pt and tokenizer.pkl for model.path: 'bundled', a directory, or a model.pt file."""
    if path == BUNDLED:
        root = Path(str(importlib.resources.files("nanoguard.assets")))
    else:
        root = Path(path)
        if root.is_file():
            return root, root.with_name("tokenizer.pkl")
    return root / "model.pt", root / "tokenizer.pkl"


def token_texts(enc) -> list[str]:
    """What each token id shows as (bytes that are part of a character show as �)."""
    out = []
    for i in range(enc.n_vocab):
        try:
            out.append(enc.decode_single_token_bytes(i).decode("utf-8", errors="replace"))
        except KeyError:  # an id the encoding leaves unused
            out.append(f"<{i}>")
    return out


def load(path: str) -> CustomRewardModel:
    model_file, tokenizer_file = _assets(path)
    for file in (model_file, tokenizer_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (model.path: 'bundled', or a directory with model.pt and "
                                    "tokenizer.pkl)")
    model, _metrics, config = Classifier.from_checkpoint(str(model_file))
    with open(tokenizer_file, "rb") as f:
        enc = pickle.load(f)  # the package's own tokenizer file, read as NanoGuard reads it
    bos, pad = enc.encode_single_token(BOS_TOKEN), enc.encode_single_token(PAD_TOKEN)
    texts = token_texts(enc)
    return CustomRewardModel(
        model=model, blocks=model.transformer.h, score=lambda ids, mask: model(ids, mask),
        encode=lambda text: [bos, *enc.encode_ordinary(text)], token_text=texts.__getitem__,
        vocab_size=enc.n_vocab, pad_id=pad, special_ids=(bos, pad), output_names=LABELS,
        read_position="last", max_positions=config.sequence_len, pad_to_max_length=True)

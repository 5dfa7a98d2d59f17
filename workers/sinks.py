"""Attention sinks: tokens whose residual norm at a layer is far beyond every other token's.

Decoders park attention on one token (SmolLM2: the first, at block 20, norm ~25,000 against
~250). An SAE trained with it spends its normalisation scale and its latents on that one
vector, and its statistics describe it instead of the text. So each layer's rule is measured,
not assumed: before training, the median token norm of a sample of texts is taken per layer,
and a token whose norm exceeds `sinks.norm_ratio` times it is left out at that layer -- of SAE
training and its normalisation estimate (workers/collect.py), and of every read of the SAE's
features: the threshold is saved beside the SAE (sink_rule.json) and `with_sink_rule` makes
its encode return no features there, so feature statistics, contexts, pooling, attribution and
edits all skip the token, while splicing the SAE in keeps the token's own state.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

RULE_FILE = "sink_rule.json"


@dataclass(frozen=True)
class SinkRule:
    """One layer's rule: tokens whose residual norm exceeds max_norm are sinks (None: none are)."""
    max_norm: float | None
    median_norm: float | None = None  # the sample's median token norm the threshold came from

    def kept(self, hidden: torch.Tensor) -> torch.Tensor:
        """[...] bool over hidden [..., d]: True for the tokens the SAE is meant for."""
        if self.max_norm is None:
            return torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
        return hidden.float().norm(dim=-1) <= self.max_norm

    def save(self, sae_dir: Path) -> None:
        (Path(sae_dir) / RULE_FILE).write_text(json.dumps({"max_norm": self.max_norm, "median_norm": self.median_norm}))

    @classmethod
    def load(cls, sae_dir: Path) -> "SinkRule":
        path = Path(sae_dir) / RULE_FILE
        if not path.is_file():  # SAEs saved before the rule existed: nothing left out
            return cls(None)
        data = json.loads(path.read_text())
        return cls(data.get("max_norm"), data.get("median_norm"))


NO_RULE = SinkRule(None)


@torch.no_grad()
def measure_sink_rules(adapter, texts: list[str], layers: list[int], sinks, batch_size: int) -> dict[int, SinkRule]:
    """Per layer, the threshold from `sinks` (the run config's SinkConfig) measured on the first
    `sinks.calibration_texts` texts: norm_ratio x the median norm of their real tokens."""
    if sinks.rule == "none":
        return {layer: NO_RULE for layer in layers}
    sample = texts[: sinks.calibration_texts]
    norms: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(sample), batch_size):
        batch = adapter.tokenize(sample[start : start + batch_size])
        _, captured = adapter.run(batch, capture=layers, need_score=False)
        real = batch.attention_mask.bool()
        for layer in layers:
            norms[layer].append(captured[layer][real].float().norm(dim=-1).cpu())
    rules = {}
    for layer in layers:
        median = float(torch.cat(norms[layer]).median())
        rules[layer] = SinkRule(sinks.norm_ratio * median, median)
    return rules


def with_sink_rule(sae, rule: SinkRule):
    """`sae` whose encode gives no features at the rule's sinks (its decode is untouched).
    Returns the same object, its rule kept as `sae.sink_rule`."""
    sae.sink_rule = rule
    if rule.max_norm is None or getattr(sae, "_encode_without_rule", None) is not None:
        return sae
    plain = sae.encode
    sae._encode_without_rule = plain

    def encode(x: torch.Tensor) -> torch.Tensor:
        features = plain(x)
        return features * rule.kept(x).unsqueeze(-1).to(features.dtype)

    sae.encode = encode
    return sae


def sink_rule_of(sae) -> SinkRule:
    return getattr(sae, "sink_rule", NO_RULE)


@dataclass
class SinkReport:
    """What one layer's rule left out of the analysis pass: how many tokens, at which positions,
    which token strings, and their norm against the rest's."""
    rule: SinkRule
    count: int = 0
    n_tokens: int = 0
    positions: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    sink_norm_sum: float = 0.0
    other_norm_sum: float = 0.0
    other_norm_max: float = 0.0

    def add(self, norms: torch.Tensor, sink: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> None:
        """One batch's kept tokens: their norms, sink flags, positions in the text and token ids."""
        self.n_tokens += len(norms)
        others = norms[~sink]
        self.other_norm_sum += float(others.sum())
        if len(others):
            self.other_norm_max = max(self.other_norm_max, float(others.max()))
        if not bool(sink.any()):
            return
        self.count += int(sink.sum())
        self.sink_norm_sum += float(norms[sink].sum())
        self.positions.update(positions[sink].tolist())
        self.tokens.update(token_ids[sink].tolist())

    def columns(self, vocab: np.ndarray, listed: int = 10) -> dict:
        """The layer row's sink columns (backend/core/store_schema.py)."""
        n_other = self.n_tokens - self.count
        return {
            "sink_max_norm": self.rule.max_norm,
            "sink_count": self.count,
            "sink_fraction": self.count / self.n_tokens if self.n_tokens else 0.0,
            "sink_positions": [{"position": int(p), "count": n} for p, n in self.positions.most_common(listed)],
            "sink_tokens": [{"token": str(vocab[t]), "count": n} for t, n in self.tokens.most_common(listed)],
            "sink_mean_norm": self.sink_norm_sum / self.count if self.count else None,
            "other_mean_norm": self.other_norm_sum / n_other if n_other else None,
            "other_max_norm": self.other_norm_max if n_other else None,
        }

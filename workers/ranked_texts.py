"""Per feature, the N texts it fires on most: what the corpus browser sorts by when it sorts
texts by a feature's activation.

Every (text, feature) activation is too many rows to store (on the demo, 20,000 texts x ~385
features firing per text x 3 layers), so the analysis pass keeps a running top N per feature
of each text's maximum activation over its own tokens (special tokens left out, as the
gradient statistics and token pooling do), fed the firings FeatureAccumulator already found.
State: [d_sae, N] values and text ids on the SAE's device, plus the per-text maxima of the last
few batches; memory does not grow with the corpus.

The merge is one torch.topk over the running values concatenated with the buffered maxima, by
(value, then the smaller text id): a total order, so the kept texts do not depend on the order
texts came in, and shards' tops merge into exactly the whole corpus's (workers/shard_merge.py).
Merging every batch cost the demo's CPU analysis ~80% more time (a topk over [3072, 1064]
per batch and layer); buffering ~1,000 texts between merges makes its cost per text several
times smaller, and the result is the same.
"""
from __future__ import annotations

import numpy as np
import torch

MIN_BUFFER, MAX_BUFFER = 256, 1024  # texts whose maxima wait for one merge


class RankedTexts:
    """A running top-N of texts per feature by the feature's max activation in the text."""

    def __init__(self, d_sae: int, n: int, device: torch.device | str = "cpu"):
        self.d_sae, self.n = d_sae, n
        self.device = torch.device(device)
        # 0 is "no text yet": a text enters only where the feature fires (activation > 0).
        # Kept unsorted between merges (a sorted topk costs several times more); floor is
        # each feature's smallest kept value, the bar a new text must clear.
        self.values = torch.zeros(d_sae, n, device=self.device)
        self.text_ids = torch.full((d_sae, n), -1, dtype=torch.int32, device=self.device)
        self.floor = torch.zeros(d_sae, device=self.device)
        self.buffer_texts = max(MIN_BUFFER, min(n, MAX_BUFFER))
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # ([B, d_sae] maxima, [B] text ids)
        self.n_pending = 0

    def add(self, token: torch.Tensor, feature: torch.Tensor, value: torch.Tensor, token_text_ids: torch.Tensor,
            content: torch.Tensor | None = None) -> None:
        """A batch's firings (token index, feature, activation > 0), as FeatureAccumulator finds
        them; token_text_ids [T] the corpus id of each token's text; content [T] False at
        special tokens, which are left out (None: none is special)."""
        if self.n == 0:
            return
        if content is not None:
            on_text = content[token]
            token, feature, value = token[on_text], feature[on_text], value[on_text]
        maxima, text_ids = per_text_maxima(token, feature, value, token_text_ids, self.d_sae)
        self.pending.append((maxima, text_ids.to(torch.int32)))
        self.n_pending += len(text_ids)
        if self.n_pending >= self.buffer_texts:
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        maxima = torch.cat([m for m, _ in self.pending]).T  # [d_sae, buffered texts]
        ids = torch.cat([i for _, i in self.pending])
        self.pending, self.n_pending = [], 0
        floor = self.floor.unsqueeze(1)  # a tie with the floor may still win on its text id
        beats = ((maxima > floor) | ((maxima == floor) & (maxima > 0))).any(dim=1).nonzero().squeeze(1)
        if len(beats) == 0:
            return
        self.keep_top(beats, maxima[beats], ids.expand(len(beats), -1))

    def keep_top(self, rows: torch.Tensor, values: torch.Tensor, text_ids: torch.Tensor) -> None:
        """Features `rows` keep their top n among what they hold and the candidates
        (values, text_ids: [len(rows), m])."""
        values = torch.cat([self.values[rows], values], dim=1)
        candidates = torch.cat([self.text_ids[rows], text_ids.to(torch.int32)], dim=1)
        top = torch.topk(order_key(values, candidates), self.n, dim=1, sorted=False)
        kept = torch.gather(values, 1, top.indices)
        self.values[rows] = kept
        self.text_ids[rows] = torch.gather(candidates, 1, top.indices)
        self.floor[rows] = kept.amin(dim=1)

    def columns(self, layer: int) -> dict[str, list]:
        """The store's feature_texts rows of this layer: by feature, then rank (0 = strongest)."""
        self._merge()
        order = torch.sort(order_key(self.values, self.text_ids), dim=1, descending=True).indices  # ties: by text id
        values = torch.gather(self.values, 1, order).cpu().numpy()
        ids = torch.gather(self.text_ids, 1, order).cpu().numpy()
        feature, rank = np.nonzero(values > 0)  # row-major: by feature, then rank
        return {"layer": [layer] * len(feature), "feature": feature.tolist(), "rank": rank.tolist(),
                "text_id": ids[feature, rank].tolist(), "activation": values[feature, rank].astype(np.float64).tolist()}


def order_key(values: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (value >= 0, descending; then text id, ascending): a non-negative
    float32's bits order as its value does, and the low 32 bits hold the text id reversed."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32) | (2**31 - 1 - text_ids.to(torch.int64))


def per_text_maxima(token: torch.Tensor, feature: torch.Tensor, value: torch.Tensor, token_text_ids: torch.Tensor,
                    d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([texts, d_sae] each feature's largest activation in each of the batch's texts, 0 where
    it is silent; [texts] their ids, ascending), from the firings alone: an SAE code is sparse,
    and a pass over the dense [T, d_sae] codes cost as much as the rest of this together."""
    text_ids, row_of_token = torch.unique(token_text_ids, return_inverse=True)
    out = torch.zeros(len(text_ids) * d_sae, dtype=value.dtype, device=value.device)
    out.scatter_reduce_(0, row_of_token[token] * d_sae + feature, value, "amax")
    return out.view(len(text_ids), d_sae), text_ids

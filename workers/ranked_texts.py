"""Per feature, the N texts it fires on most: what the corpus browser sorts by when it sorts
texts by a feature's activation.

Every (text, feature) activation is too many rows to store (on the demo, 20,000 texts x ~385
features firing per text x 3 layers), so the analysis pass keeps a running top N per feature
of each text's maximum activation over its own tokens (special tokens left out, as the
gradient statistics and token pooling do). State: [d_sae, N] values and text ids on the SAE's
device, merged with each batch's per-text maxima by one topk; memory does not grow with the
corpus.
"""
from __future__ import annotations

import numpy as np
import torch


class RankedTexts:
    """A running top-N of texts per feature by the feature's max activation in the text."""

    def __init__(self, d_sae: int, n: int, device: torch.device | str = "cpu"):
        self.d_sae, self.n = d_sae, n
        self.device = torch.device(device)
        # 0 is "no text yet": a text enters only where the feature fires (activation > 0)
        self.values = torch.zeros(d_sae, n, device=self.device)
        self.text_ids = torch.full((d_sae, n), -1, dtype=torch.int32, device=self.device)

    def add(self, acts: torch.Tensor, text_of_token: torch.Tensor, content: torch.Tensor,
            text_ids: torch.Tensor) -> None:
        """acts [T, d_sae] of a batch's tokens; text_of_token [T] in 0..B-1 (the row of each
        token's text in the batch); content [T] False at special tokens, which are left out;
        text_ids [B] the corpus id of each of those texts."""
        if self.n == 0 or len(acts) == 0:
            return
        maxima = per_text_maxima(acts, text_of_token, content, len(text_ids))  # [B, d_sae]
        # only features where some text beats the current N-th value need a topk
        beats = (maxima.T > self.values[:, -1:]).any(dim=1).nonzero().squeeze(1)
        if len(beats) == 0:
            return
        candidates = torch.cat([self.values[beats], maxima.T[beats]], dim=1)
        ids = torch.cat([self.text_ids[beats], text_ids.to(self.device, torch.int32).expand(len(beats), -1)], dim=1)
        top = torch.topk(candidates, self.n, dim=1)  # sorted: column 0 is each feature's strongest text
        self.values[beats] = top.values
        self.text_ids[beats] = torch.gather(ids, 1, top.indices)

    def columns(self, layer: int) -> dict[str, list]:
        """The store's feature_texts rows of this layer: by feature, then rank (0 = strongest)."""
        values, ids = self.values.cpu().numpy(), self.text_ids.cpu().numpy()
        feature, rank = np.nonzero(values > 0)  # row-major: by feature, then rank
        return {"layer": [layer] * len(feature), "feature": feature.tolist(), "rank": rank.tolist(),
                "text_id": ids[feature, rank].tolist(), "activation": values[feature, rank].astype(np.float64).tolist()}


def per_text_maxima(acts: torch.Tensor, text_of_token: torch.Tensor, content: torch.Tensor,
                    n_texts: int) -> torch.Tensor:
    """[n_texts, d_sae]: each feature's largest activation over each text's content tokens (0
    where it is silent), from the nonzero activations only: an SAE code is sparse, and masking
    the dense [T, d_sae] first would copy it."""
    token, feature = acts.nonzero(as_tuple=True)
    on_text = content[token]
    token, feature = token[on_text], feature[on_text]
    out = torch.zeros(n_texts * acts.shape[1], dtype=acts.dtype, device=acts.device)
    out.scatter_reduce_(0, text_of_token[token] * acts.shape[1] + feature, acts[token, feature], "amax")
    return out.view(n_texts, acts.shape[1])

"""Attribution: how much of each text's score each SAE feature accounts for, to first order.

A feature f with activation a at token t moves the layer's output by a x d_f (its decoder
direction; the reconstruction error is kept), so zeroing it changes the score by about
-a x (grad_t . d_f). Its *contribution* to a text's score is a x (grad_t . d_f) summed over
the text's tokens: activation x d(score)/d(activation). Summed over features it is the
first-order estimate of score - score(layer's features zeroed), and one feature's is the
first-order estimate of what zeroing it alone costs the text.

Per feature, over the texts whose gradients the analysis pass takes:
- mean contribution (signed, reward points per text; 0 on texts where it is silent),
- mean |contribution|,
- share of the score's variance: cov(contribution, score) / var(score). Where the score is
  the sum of the features' contributions (plus a constant), these shares add up to 1.

The analysis pass sums over the text's own tokens, leaving out special tokens ([CLS], [SEP],
BOS; workers/analyze.py says why), so a feature's attribution is what it contributes through
the text. For a process RM (several reward reads per text) the gradient is that of the sum of
the text's step scores, and so is the contribution.
"""
from __future__ import annotations

import numpy as np
import torch

TOKEN_CHUNK = 2048  # tokens per [tokens, d_sae] product: bounded memory on long batches


class AttributionAccumulator:
    """Per-feature attribution sums over the texts of the gradient batches."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu"):
        f64 = dict(dtype=torch.float64, device=device)
        self.d_sae = d_sae
        self.n_texts = 0
        self.score_sums = torch.zeros(2, **f64)  # sum y, sum y^2 over texts
        self.sum = torch.zeros(d_sae, **f64)
        self.abs_sum = torch.zeros(d_sae, **f64)
        self.score_product_sum = torch.zeros(d_sae, **f64)  # sum of contribution x score

    def add(self, acts: torch.Tensor, grads: torch.Tensor, directions: torch.Tensor,
            text_of_token: torch.Tensor, text_scores: torch.Tensor) -> torch.Tensor:
        """acts [N, d_sae] and grads [N, d_in] (d score / d layer output) of a batch's tokens,
        text_of_token [N] in 0..B-1, text_scores [B]. Returns the contributions [B, d_sae]."""
        per_text = text_contributions(acts, grads, directions, text_of_token, len(text_scores))
        y = text_scores.to(per_text.device, torch.float64)
        c = per_text.double()
        self.n_texts += len(y)
        self.score_sums += torch.stack([y.sum(), (y**2).sum()])
        self.sum += c.sum(0)
        self.abs_sum += c.abs().sum(0)
        self.score_product_sum += y @ c
        return per_text

    def results(self) -> dict[str, np.ndarray]:
        """Columns per feature (NaN everywhere when no gradient was taken)."""
        n = self.n_texts
        if n == 0:
            nan = np.full(self.d_sae, np.nan)
            return {"attribution": nan, "attribution_abs": nan.copy(), "attribution_share": nan.copy()}
        sy, syy = self.score_sums.tolist()
        mean_c = self.sum / n
        var_y = syy / n - (sy / n) ** 2
        cov = self.score_product_sum / n - mean_c * (sy / n)
        share = cov / var_y if var_y > 1e-12 else torch.full_like(cov, torch.nan)
        return {"attribution": mean_c.cpu().numpy(), "attribution_abs": (self.abs_sum / n).cpu().numpy(),
                "attribution_share": share.cpu().numpy()}


def text_contributions(acts: torch.Tensor, grads: torch.Tensor, directions: torch.Tensor,
                       text_of_token: torch.Tensor, n_texts: int) -> torch.Tensor:
    """[n_texts, d_sae]: sum over each text's tokens of activation x (grad . decoder row)."""
    out = torch.zeros(n_texts, acts.shape[1], dtype=torch.float32, device=acts.device)
    for start in range(0, len(acts), TOKEN_CHUNK):
        part = slice(start, start + TOKEN_CHUNK)
        per_unit = grads[part].float() @ directions.T  # d score / d activation at each token
        out.index_add_(0, text_of_token[part], acts[part].float() * per_unit)
    return out

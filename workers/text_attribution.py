"""Why one text gets its score: each (token, feature) contribution at one layer, complete.

Integrated gradients over the layer's SAE features, the reconstruction error kept: the layer's
output along the path is h(α) = h − (1 − α)(decode(f) − decode(0)) on the edited tokens, from
α = 0 (those tokens' features all zeroed) to α = 1 (the text as it is). A feature's contribution
at a token is f × the mean over α of d(score)/d(feature), so the contributions add up to
score − score(features zeroed), up to the m-step quadrature's error: the residual, reported.
`steps=0` is the first-order mode, activation × gradient at α = 1 (one backward; no longer
complete, for long texts or many layers).

The edited tokens are the text's own (special tokens left as they are), as everywhere else in
the product (workers/sae_ops.py SCOPES); `scope="all"` takes every token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.sae_ops import edited_tokens, linear_decoder

DEFAULT_STEPS = 16
STEPS_PER_PASS = 16  # copies of the text in one forward and backward


@dataclass
class TextAttribution:
    layer: int
    tokens: list[str]
    score: float  # the text's score (sum of its reward reads)
    baseline: float  # the score with the layer's features zeroed on the edited tokens
    contributions: np.ndarray  # [T, d_sae]; zero on tokens left as they are
    steps: int  # 0: first order (activation x gradient)

    @property
    def residual(self) -> float:
        """score − baseline − Σ contributions: what the quadrature (or first order) misses."""
        return float(self.score - self.baseline - self.contributions.sum())

    def per_token(self) -> np.ndarray:
        return self.contributions.sum(1)

    def top_features(self, n: int = 20) -> list[dict]:
        """The features that fire on this text, by |total contribution|."""
        total = self.contributions.sum(0)
        order = np.argsort(-np.abs(total))[:n]
        return [{"feature": int(f), "contribution": float(total[f])} for f in order if total[f] != 0]


def attribute_text(adapter, sae, layer: int, text: str, steps: int = DEFAULT_STEPS,
                   scope: str = "text") -> TextAttribution:
    """One text's score decomposed over the features of `layer`'s SAE (see the module doc)."""
    batch = adapter.tokenize([text])
    special = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=adapter.device)
    at = edited_tokens(batch, special, scope)[0]  # [T]
    _, captured = adapter.run(batch, capture=[layer], need_score=False)
    h = captured[layer][0].float()  # [T, d_in]
    with torch.no_grad():
        f = sae.encode(h) * at.unsqueeze(1)  # features of the edited tokens only
        full = sae.decode(f) - sae.decode(torch.zeros_like(f))  # what they write, per token
        rows = linear_decoder(sae)
    alphas = [1.0] if steps == 0 else [(k + 0.5) / steps for k in range(steps)]  # midpoint rule
    grad_f = torch.zeros_like(f)
    for start in range(0, len(alphas), STEPS_PER_PASS):  # the path's points go as one batch
        grad_f += _feature_gradient(adapter, sae, batch, layer, h, f, full, alphas[start:start + STEPS_PER_PASS], rows)
    contributions = (f * grad_f / len(alphas)).cpu().numpy()
    with torch.no_grad():
        score = float(adapter.run_from(batch, layer, h.unsqueeze(0).to(captured[layer].dtype)).sum())
        zeroed = (h - full).unsqueeze(0).to(captured[layer].dtype)
        baseline = float(adapter.run_from(batch, layer, zeroed).sum())
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
    return TextAttribution(layer, tokens, score, baseline, contributions, steps)


def _feature_gradient(adapter, sae, batch, layer: int, h, f, full, alphas: list[float], rows) -> torch.Tensor:
    """Σ over `alphas` of d(score)/d(features) [T, d_sae] at α·f, the points of the path run as
    one batch of copies of the text. With a linear decoder it is the gradient at the layer's
    output through the decoder rows (no [T, d_sae] graph); otherwise autograd through decode."""
    copies = batch.select(torch.zeros(len(alphas), dtype=torch.long))
    alpha = torch.tensor(alphas, dtype=h.dtype, device=h.device).view(-1, 1, 1)
    with torch.enable_grad():
        if rows is not None:
            hidden = (h - (1 - alpha) * full).detach().requires_grad_()  # [n, T, d_in]
            (grad_h,) = torch.autograd.grad(adapter.scores_from(copies, layer, hidden).sum(), hidden)
            return grad_h.sum(0) @ rows.T
        scaled = (alpha * f).detach().requires_grad_()  # [n, T, d_sae]
        hidden = h - full + (sae.decode(scaled) - sae.decode(torch.zeros_like(scaled)))
        (grad,) = torch.autograd.grad(adapter.scores_from(copies, layer, hidden).sum(), scaled)
        return grad.sum(0)

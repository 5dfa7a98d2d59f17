"""Why one text gets its score: each (token, feature) contribution at one layer, complete.

Integrated gradients over the layer's SAE features, the reconstruction error kept: the layer's
output along the path is h(α) = h − (1 − α)(decode(f) − decode(0)) on the edited tokens, from
α = 0 (those tokens' features all zeroed) to α = 1 (the text as it is). A feature's contribution
at a token is f × the integral over α of d(score)/d(feature) (m-point Gauss–Legendre), so the
contributions add up to score − score(features zeroed), up to the quadrature's error: the
residual, reported, and halved by refining where it is above 1% of that difference.
`steps=0` is the first-order mode, activation × gradient at α = 1 (one backward; no longer
complete, for long texts or many layers).

The edited tokens are the text's own (special tokens left as they are), as everywhere else in
the product (workers/sae_ops.py SCOPES); `scope="all"` takes every token.
"""
from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher

import numpy as np
import torch

from workers.sae_ops import edited_tokens, linear_decoder

DEFAULT_STEPS = 16
STEPS_PER_PASS = 16  # copies of the text in one forward and backward
# a residual above this share of score − baseline is integrated again with twice the steps: near
# the embeddings the path bends more (demo layer 1: 16 points left up to 8%, 64 under 1%)
REFINE_ABOVE = 0.01
MAX_STEPS = 128


@dataclass
class TextAttribution:
    layer: int
    tokens: list[str]
    score: float  # the text's score (sum of its reward reads)
    baseline: float  # the score with the layer's features zeroed on the edited tokens
    contributions: np.ndarray  # [T, d_sae]; zero on tokens left as they are
    activations: np.ndarray  # [T, d_sae] the features' values on the edited tokens
    steps: int  # asked for; 0: first order (activation x gradient)
    steps_used: int  # after refinement (see attribute_text)

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


TOP_FEATURES = 20  # the features a text's page ranks by |contribution|
FEATURES_PER_TOKEN = 8  # a token's features listed when it is clicked


def attribution_result(a: TextAttribution, top: int = TOP_FEATURES, per_token: int = FEATURES_PER_TOKEN) -> dict:
    """What a text's page and its JSON twin show of one layer's attribution: per-token totals,
    the features ranked by |contribution| over the text (with their peak activation), and each
    token's own features (activation, contribution), largest |contribution| first."""
    total = a.contributions.sum(0)
    features = [{"feature": row["feature"], "contribution": _round(row["contribution"]),
                 "peak": _round(float(a.activations[:, row["feature"]].max()))} for row in a.top_features(top)]
    tokens = []
    for t in range(len(a.tokens)):
        fired = np.flatnonzero(a.activations[t])
        order = fired[np.argsort(-np.abs(a.contributions[t, fired]))][:per_token]
        tokens.append([{"feature": int(f), "activation": _round(float(a.activations[t, f])),
                        "contribution": _round(float(a.contributions[t, f]))} for f in order])
    gap = a.score - a.baseline
    return {"layer": a.layer, "steps": a.steps, "steps_used": a.steps_used, "method": "integrated gradients" if a.steps else "first order",
            "tokens": a.tokens, "score": a.score, "baseline": a.baseline, "total": float(total.sum()), "residual": a.residual,
            # the residual as a share of what is being decomposed (None where zeroing changes nothing)
            "residual_share": abs(a.residual) / abs(gap) if abs(gap) > 1e-12 else None,
            "per_token": [_round(float(x)) for x in a.per_token()], "features": features, "token_features": tokens}


def _round(x: float) -> float:
    return float(f"{x:.6g}")  # six significant digits: a page's JSON stays small, sums still check


def attribute_text(adapter, sae, layer: int, text: str, steps: int = DEFAULT_STEPS, scope: str = "text",
                   tolerance: float = REFINE_ABOVE, max_steps: int = MAX_STEPS) -> TextAttribution:
    """One text's score decomposed over the features of `layer`'s SAE (see the module doc). Where
    the residual is above `tolerance` of score − baseline, the path is integrated again with twice
    the steps, up to `max_steps` (`steps_used` says how many)."""
    batch = adapter.tokenize([text])
    special = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=adapter.device)
    at = edited_tokens(batch, special, scope)[0]  # [T]
    _, captured = adapter.run(batch, capture=[layer], need_score=False)
    dtype = captured[layer].dtype
    h = captured[layer][0].float()  # [T, d_in]
    with torch.no_grad():
        f = sae.encode(h) * at.unsqueeze(1)  # features of the edited tokens only
        full = sae.decode(f) - sae.decode(torch.zeros_like(f))  # what they write, per token
        rows = linear_decoder(sae)
        score = float(adapter.run_from(batch, layer, h.unsqueeze(0).to(dtype)).sum())
        baseline = float(adapter.run_from(batch, layer, (h - full).unsqueeze(0).to(dtype)).sum())
    used = steps
    while True:
        grad_f = torch.zeros_like(f)
        nodes, weights = _path_points(used)
        for i in range(0, len(nodes), STEPS_PER_PASS):  # the path's points go as one batch
            grad_f += _feature_gradient(adapter, sae, batch, layer, h, f, full, nodes[i:i + STEPS_PER_PASS],
                                        weights[i:i + STEPS_PER_PASS], rows)
        contributions = (f * grad_f).cpu().numpy()
        gap, residual = score - baseline, score - baseline - float(contributions.sum())
        if used == 0 or used * 2 > max_steps or abs(residual) <= tolerance * abs(gap):
            break
        used *= 2
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
    return TextAttribution(layer, tokens, score, baseline, contributions, f.cpu().numpy(), steps, used)


def _path_points(steps: int) -> tuple[list[float], list[float]]:
    """Where on the path α ∈ [0, 1] the gradient is taken, and each point's weight: Gauss–Legendre
    nodes (exact for polynomials of degree 2m − 1: on the demo, 16 of them left a 20x smaller
    residual than 16 midpoints); steps 0 is first order, the gradient at α = 1 alone."""
    if steps == 0:
        return [1.0], [1.0]
    x, w = np.polynomial.legendre.leggauss(steps)
    return [float(a) for a in (x + 1) / 2], [float(b) for b in w / 2]


def _feature_gradient(adapter, sae, batch, layer: int, h, f, full, alphas: list[float], weights: list[float],
                      rows) -> torch.Tensor:
    """Σ over the path points `alphas` of weight × d(score)/d(features) [T, d_sae] at α·f, the
    points run as one batch of copies of the text. With a linear decoder it is the gradient at
    the layer's output through the decoder rows (no [T, d_sae] graph); otherwise autograd
    through decode."""
    copies = batch.select(torch.zeros(len(alphas), dtype=torch.long))
    alpha = torch.tensor(alphas, dtype=h.dtype, device=h.device).view(-1, 1, 1)
    weight = torch.tensor(weights, dtype=h.dtype, device=h.device).view(-1, 1, 1)
    with torch.enable_grad():
        if rows is not None:
            hidden = (h - (1 - alpha) * full).detach().requires_grad_()  # [n, T, d_in]
            (grad_h,) = torch.autograd.grad(adapter.scores_from(copies, layer, hidden).sum(), hidden)
            return (grad_h * weight).sum(0) @ rows.T
        scaled = (alpha * f).detach().requires_grad_()  # [n, T, d_sae]
        hidden = h - full + (sae.decode(scaled) - sae.decode(torch.zeros_like(scaled)))
        (grad,) = torch.autograd.grad(adapter.scores_from(copies, layer, hidden).sum(), scaled)
        return (grad * weight).sum(0)


def what_was_read(adapter, text: str) -> dict:
    """How much of `text` the model reads: a text longer than model.max_length is cut there, and
    its page says so and where (`cut_at_char`: the text's characters from there on were not read)."""
    tokenizer = adapter.tokenizer
    full = len(tokenizer(text, truncation=False, verbose=False)["input_ids"])
    read = min(full, adapter.max_length)
    cut_at = None
    if full > read and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, truncation=True, max_length=adapter.max_length, return_offsets_mapping=True)
        cut_at = max((end for start, end in enc["offset_mapping"] if end > start), default=0)
    return {"n_tokens": read, "n_tokens_full": full, "cut": full > read, "max_length": adapter.max_length,
            "cut_at_char": cut_at}


def diff_attributions(a: TextAttribution, b: TextAttribution, top: int = TOP_FEATURES) -> dict:
    """What changed from text A to text B: the score, the features whose total contribution
    changed most (B − A), and the two token sequences aligned (difflib opcodes over tokens)."""
    total_a, total_b = a.contributions.sum(0), b.contributions.sum(0)
    change = total_b - total_a
    order = [int(f) for f in np.argsort(-np.abs(change))[:top] if change[f] != 0]
    changed = [{"feature": f, "a": _round(float(total_a[f])), "b": _round(float(total_b[f])),
                "change": _round(float(change[f])), "peak_a": _round(float(a.activations[:, f].max())),
                "peak_b": _round(float(b.activations[:, f].max()))} for f in order]
    opcodes = SequenceMatcher(None, a.tokens, b.tokens, autojunk=False).get_opcodes()
    return {"score_change": b.score - a.score, "baseline_change": b.baseline - a.baseline,
            "contribution_change": float(change.sum()), "changed": changed,
            "alignment": [{"op": op, "a": [i0, i1], "b": [j0, j1]} for op, i0, i1, j0, j1 in opcodes]}

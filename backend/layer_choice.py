"""Which layer of a run to open first: its "best layer".

A layer's regression can explain the score well from features the model does not read
further on (at the last block, every token but the one the head reads; at middle blocks,
summaries that later blocks also get elsewhere). Its weights then rank the wrong features,
and ablating its top features moves nothing. So the best layer is the one with the largest
held-out R² x max(weight-effect agreement, 0): explained, and by weights that point where the
model's own gradients do. Where no layer has an agreement (a reward computed from the text
has no gradient), held-out R² alone.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping


def layer_score(layer: Mapping[str, Any], use_agreement: bool) -> float | None:
    r2 = layer.get("r2_heldout")
    if r2 is None:
        return None
    if not use_agreement:
        return r2
    return max(r2, 0.0) * max(layer.get("weight_effect_agreement") or 0.0, 0.0)


def best_layer(layers: Iterable[Mapping[str, Any]]) -> int | None:
    """The layer id with the best score; ties go to the higher held-out R², then the earlier layer."""
    layers = list(layers)
    use_agreement = any(l.get("weight_effect_agreement") is not None for l in layers)
    scored = [(layer_score(l, use_agreement), l.get("r2_heldout"), -l["layer"], l["layer"]) for l in layers]
    scored = [s for s in scored if s[0] is not None]
    return max(scored)[3] if scored else None

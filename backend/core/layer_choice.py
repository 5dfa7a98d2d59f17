"""Which layer of a run to open first: its "best layer", chosen by what holds up when features
are actually ablated.

A layer's regression can explain the score well from features the model does not read further
on (at the last block, every token but the one the head reads), and then zeroing its top
features moves nothing. So the best layer is the one where zeroing the top 10 of its default
ranking (the ranking whose deletion curve moves the reward most, workers/faithfulness.py)
moves the reward most beyond frequency-matched controls, relative to the score's spread:
`faithfulness_relative`. Held-out R² is shown beside it, and breaks ties.

Where no layer has a measured curve (a score computed from the text, or effects switched
off), the earlier rule stands: the largest held-out R² x max(weight-effect agreement, 0), or
held-out R² alone where there are no gradients either.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping


def _predictive_score(layer: Mapping[str, Any], use_agreement: bool) -> float | None:
    r2 = layer.get("r2_heldout")
    if r2 is None:
        return None
    if not use_agreement:
        return r2
    return max(r2, 0.0) * max(layer.get("weight_effect_agreement") or 0.0, 0.0)


def layer_score(layer: Mapping[str, Any], rule: str) -> float | None:
    if rule == "faithfulness":
        return layer.get("faithfulness_relative")  # on its own measure: signs cannot cancel
    return _predictive_score(layer, rule == "r2_x_agreement")


def choice_rule(layers: list[Mapping[str, Any]]) -> str:
    """'faithfulness' where any layer was measured, else 'r2_x_agreement', else 'r2'."""
    if any(l.get("faithfulness_relative") is not None for l in layers):
        return "faithfulness"
    if any(l.get("weight_effect_agreement") is not None for l in layers):
        return "r2_x_agreement"
    return "r2"


RULE_WORDS = {
    "faithfulness": "the layer where zeroing its default ranking's top 10 moves the reward most beyond random "
                    "controls, relative to the score's spread (measured)",
    "r2_x_agreement": "nothing was measured: the largest held-out R² × weight–effect agreement (predicts)",
    "r2": "nothing was measured: the largest held-out R² (predicts)",
}
RULE = ("Best layer: " + RULE_WORDS["faithfulness"] + "; where a run measured nothing, the largest held-out R² "
        "× weight–effect agreement (or held-out R² alone).")


def best_layer(layers: Iterable[Mapping[str, Any]]) -> int | None:
    """The layer id with the best score; ties go to the higher held-out R², then the earlier layer."""
    layers = list(layers)
    rule = choice_rule(layers)
    scored = [(layer_score(l, rule), l.get("r2_heldout") or 0.0, -l["layer"], l["layer"]) for l in layers]
    scored = [s for s in scored if s[0] is not None]
    return max(scored)[3] if scored else None

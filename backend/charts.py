"""Geometry for the server-rendered SVG charts; frontend/templates/_charts.html draws it.

Plain numbers in, plain dicts out: no plotting library, nothing to run in the browser.
"""
from __future__ import annotations

from math import floor, log10
from typing import Any, Sequence


def _nice_max(x: float) -> float:
    """A round axis maximum >= x (1, 2, 2.5, 5 x 10^k)."""
    if x <= 0:
        return 1.0
    base = 10 ** floor(log10(x))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= x)


def r2_bars(layers: Sequence[dict[str, Any]], best_layer: int | None, height: int = 170, bar_w: int = 24,
            gap: int = 16) -> dict:
    """Held-out R² per layer on a 0..1 axis: the SAE-feature regression's bar (train R² as a
    tick) and, beside it, the raw-activation probe's bar, the baseline it is judged against.

    Negative held-out R² (worse than predicting the mean) draws no bar, only its label.
    `best_layer` (backend/layer_choice.py) is drawn in the accent colour.
    """
    left, top, bottom = 34, 14, 22
    plot_h = height - top - bottom

    def y(v: float) -> float:
        return round(top + plot_h * (1 - min(max(v, 0.0), 1.0)), 1)

    def bar(x: float, value: float | None) -> dict:
        return {"x": x, "w": bar_w, "value": value, "y": y(value or 0.0), "h": round(y(0.0) - y(value or 0.0), 1)}

    group_w = 2 * bar_w + 2
    bars = []
    for i, l in enumerate(layers):
        x = left + gap + i * (group_w + gap)
        probe = l.get("probe_r2_heldout")
        bars.append({
            **bar(x, l["r2_heldout"]), "layer": l["layer"], "center": x + group_w / 2,
            "train_y": None if l.get("r2_train") is None else y(l["r2_train"]),
            "train": l.get("r2_train"),
            "best": l["layer"] == best_layer,
            "probe": None if probe is None else {**bar(x + bar_w + 2, probe), "train": l.get("probe_r2_train")},
        })
    width = left + gap + len(layers) * (group_w + gap)
    ticks = [{"v": v, "y": y(v)} for v in (0, 0.25, 0.5, 0.75, 1.0)]
    return {"width": max(width, 200), "height": height, "left": left, "base_y": y(0.0),
            "ticks": ticks, "bars": bars}


def histogram(edges: Sequence[float], counts: Sequence[int], width: int = 560, height: int = 150) -> dict | None:
    """Activation histogram bars; None for a feature that never fired."""
    if not counts or len(edges) != len(counts) + 1:
        return None
    left, right, top, bottom = 40, 8, 8, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    y_max = _nice_max(max(counts))
    bars = []
    for c, a, b in zip(counts, edges, edges[1:]):
        x0 = left + plot_w * (a - lo) / span
        x1 = left + plot_w * (b - lo) / span
        h = plot_h * c / y_max
        bars.append({"x": round(x0, 1), "w": round(max(x1 - x0 - 1, 1), 1),
                     "y": round(top + plot_h - h, 1), "h": round(h, 1),
                     "count": c, "lo": a, "hi": b})
    return {"width": width, "height": height, "left": left, "base_y": top + plot_h,
            "top": top, "right": width - right, "y_max": y_max, "lo": lo, "hi": hi, "bars": bars}


def delta_histograms(chosen: Sequence[float], control: Sequence[float] | None, bins: int = 24,
                     width: int = 620, height: int = 170) -> dict | None:
    """The distribution of reward changes: the chosen features' bars and, on the same bins,
    the random control's as outlines; a zero line, and each mean as a tick."""
    values = list(chosen) + list(control or [])
    if not values:
        return None
    lo, hi = min(values + [0.0]), max(values + [0.0])
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    left, right, top, bottom = 40, 8, 10, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    step = (hi - lo) / bins

    def counts(xs):
        out = [0] * bins
        for x in xs:
            out[min(int((x - lo) / step), bins - 1)] += 1
        return out

    series = {"chosen": counts(chosen), "control": counts(control) if control else None}
    y_max = _nice_max(max(max(c) for c in series.values() if c))
    x_of = lambda v: round(left + plot_w * (v - lo) / (hi - lo), 1)  # noqa: E731

    def bars(cs):
        return [{"x": x_of(lo + i * step), "w": round(max(plot_w / bins - 1, 1), 1),
                 "y": round(top + plot_h * (1 - c / y_max), 1), "h": round(plot_h * c / y_max, 1),
                 "count": c, "lo": lo + i * step, "hi": lo + (i + 1) * step} for i, c in enumerate(cs)]

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"width": width, "height": height, "left": left, "right": width - right, "top": top,
            "base_y": top + plot_h, "y_max": y_max, "lo": lo, "hi": hi, "zero_x": x_of(0.0),
            "chosen": bars(series["chosen"]), "control": bars(series["control"]) if control else [],
            "chosen_mean_x": x_of(mean(chosen)) if chosen else None,
            "control_mean_x": x_of(mean(control)) if control else None}

"""Geometry for the server-rendered SVG charts; frontend/templates/_macros.html draws it.

Plain numbers in, plain dicts out: no plotting library, nothing to run in the browser.
"""
from __future__ import annotations

from math import ceil, floor, isfinite, log10
from typing import Any, Sequence


def _nice_max(x: float) -> float:
    """A round axis maximum >= x (1, 2, 2.5, 5 x 10^k)."""
    if x <= 0:
        return 1.0
    base = 10 ** floor(log10(x))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= x)


def _unit_axis(height: int, bar_w: int, floor: float = 0.0):
    """A floor..1 vertical axis for bars of R²-like values: (y of a value, a bar at x, left margin)."""
    left, top, bottom = 40, 14, 22
    plot_h = height - top - bottom

    def y(v: float) -> float:
        return round(top + plot_h * (1 - (min(max(v, floor), 1.0) - floor) / (1.0 - floor)), 1)

    def bar(x: float, value: float | None) -> dict:
        return {"x": x, "w": bar_w, "value": value, "y": y(value or floor), "h": round(y(floor) - y(value or floor), 1)}

    return y, bar, left


def axis_floor(values: Sequence[float | None]) -> float:
    """Where an R² axis starts: 0, unless every value is above one half, then a round value below
    the smallest, so that 0.980 and 0.988 are bars of visibly different height."""
    finite = [v for v in values if v is not None and isfinite(v)]
    if not finite or min(finite) < 0.5:
        return 0.0
    low = min(finite)
    step = 0.01 if 1 - low < 0.05 else 0.05 if 1 - low < 0.25 else 0.1
    return max(0.0, floor((low - (1 - low) * 0.5) / step) * step)


def r2_bars(layers: Sequence[dict[str, Any]], best_layer: int | None, height: int = 170, bar_w: int = 24,
            gap: int = 16) -> dict:
    """Held-out R² per layer on a 0..1 axis: the SAE-feature regression's bar (train R² as a
    tick) and, beside it, the raw-activation probe's bar, the baseline it is judged against.

    Negative held-out R² (worse than predicting the mean) draws no bar, only its label.
    `best_layer` (backend/core/layer_choice.py) is drawn in the accent colour.
    """
    low = axis_floor([v for l in layers for v in (l["r2_heldout"], l.get("probe_r2_heldout"))])
    y, bar, left = _unit_axis(height, bar_w, low)
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
    step = next(t for t in (0.01, 0.02, 0.05, 0.1, 0.25) if (1 - low) / t <= 5)
    ticks = [{"v": v, "y": y(v)} for v in (round(low + i * step, 2) for i in range(round((1 - low) / step) + 1))]
    return {"width": max(width, 200), "height": height, "left": left, "base_y": y(low), "floor": low,
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


def _axis(values: Sequence[float], n_ticks: int = 4) -> tuple[float, float, list[float]]:
    """A round range covering `values` and 0, and its ticks (about n_ticks steps)."""
    lo, hi = min([0.0, *values]), max([0.0, *values])
    if hi - lo < 1e-12:
        hi = lo + 1.0
    raw = (hi - lo) / n_ticks
    base = 10 ** floor(log10(raw))
    step = next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)
    lo, hi = floor(lo / step + 1e-9) * step, ceil(hi / step - 1e-9) * step
    ticks = [round(lo + i * step, 12) for i in range(round((hi - lo) / step) + 1)]
    return lo, hi, ticks


def _finite(*xs: float | None) -> list[float]:
    return [x for x in xs if x is not None and isfinite(x)]


def deletion_curves(rankings: dict[str, dict[str, Any]], band_ranking: str | None, width: int = 560,
                    height: int = 230, n_max: int = 100) -> dict | None:
    """Faithfulness curves: each ranking's effect (y) with its top n zeroed, n on a log axis
    1..n_max (x), on the measure it is judged by (workers/faithfulness.py): the score lowered by
    zeroing its raisers, raised by zeroing its lowerers, or |Δ| for a |value| ranking -- positive
    is the way the ranking says. One line per ranking and direction (as faithfulness_data gives
    them); the random controls' range (lowest to highest draw's effect per n) of `band_ranking`'s
    first direction -- the default ranking, or the first drawn -- as a band. None: no curve."""
    if not rankings:
        return None
    left, right, top, bottom = 52, 10, 10, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    band_key = band_ranking if band_ranking in rankings else next(iter(rankings))
    band_direction = next(iter(rankings[band_key]["directions"]))
    band_points = rankings[band_key]["directions"][band_direction]["points"]
    curves = [(key, direction, r, c) for key, r in rankings.items() for direction, c in r["directions"].items()]
    bounds = lambda p: _finite(min(p["control_effects"] or [None]), max(p["control_effects"] or [None]))  # noqa: E731
    lo, hi, ticks = _axis([v for *_, c in curves for p in c["points"] for v in _finite(p["effect"])]
                          + [v for p in band_points for v in bounds(p)] + [0.0])
    x = lambda n: round(left + plot_w * log10(n) / log10(n_max), 1)  # noqa: E731
    y = lambda v: round(top + plot_h * (hi - v) / (hi - lo), 1)  # noqa: E731
    lines = []
    for key, direction, r, c in curves:
        dots = [{**p, "x": x(p["n"]), "y": y(p["effect"])} for p in c["points"] if p["effect"] is not None]
        lines.append({"key": key, "direction": direction, "label": r["label"], "kind": r["kind"], "dots": dots,
                      "path": " ".join(f"{d['x']},{d['y']}" for d in dots)})
    drawn = [p for p in band_points if len(bounds(p)) == 2]
    band = " ".join([f"{x(p['n'])},{y(bounds(p)[1])}" for p in drawn]
                    + [f"{x(p['n'])},{y(bounds(p)[0])}" for p in reversed(drawn)])
    return {"width": width, "height": height, "left": left, "right": width - right, "top": top,
            "base_y": top + plot_h, "zero_y": y(0.0), "lines": lines,
            "band": band, "band_key": band_key, "band_direction": band_direction,
            "y_ticks": [{"v": v, "y": y(v)} for v in ticks],
            "x_ticks": [{"n": n, "x": x(n)} for n in (1, 2, 5, 10, 20, 50, 100) if n <= n_max]}


def calibration(features: Sequence[dict[str, Any]], size: int = 260) -> dict | None:
    """Predicted vs measured single-feature Δ: one dot per measured feature and prediction
    (regression, attribution), on one range for both axes so the diagonal y = x is where a
    prediction is right. None: no feature was measured."""
    series = ("regression", "attribution")
    values = [v for f in features for v in _finite(f["measured_delta"], *(f[f"predicted_delta_{s}"] for s in series))]
    if not values:
        return None
    left, right, top, bottom = 52, 16, 10, 34
    plot = size - left - right
    lo, hi, ticks = _axis(values)
    x = lambda v: round(left + plot * (v - lo) / (hi - lo), 1)  # noqa: E731
    y = lambda v: round(top + plot * (hi - v) / (hi - lo), 1)  # noqa: E731
    dots = {s: [{**f, "predicted": f[f"predicted_delta_{s}"], "x": x(f[f"predicted_delta_{s}"]),
                 "y": y(f["measured_delta"])}
                for f in features if len(_finite(f[f"predicted_delta_{s}"], f["measured_delta"])) == 2]
            for s in series}
    return {"width": size, "height": top + plot + bottom, "left": left, "right": left + plot, "top": top,
            "base_y": top + plot, "series": dots, "diagonal": {"x1": x(lo), "y1": y(lo), "x2": x(hi), "y2": y(hi)},
            "zero_x": x(0.0), "zero_y": y(0.0), "ticks": [{"v": v, "x": x(v), "y": y(v)} for v in ticks]}


def dose_response(points: Sequence[dict[str, Any]], width: int = 560, height: int = 240) -> dict | None:
    """A sweep's mean Δ score (y) against the edit's value (x, linear): the chosen features as a
    line with its 95% CI as a band, the random controls' mean as a second line with their range
    (lowest to highest draw mean) as a band; a zero line. None: no point."""
    if not points:
        return None
    left, right, top, bottom = 52, 12, 10, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    chosen = [p["chosen"] for p in points]
    control = [p["control"] for p in points]
    lo, hi, ticks = _axis([v for c in chosen for v in _finite(c["mean_delta"], c["ci_low"], c["ci_high"])]
                          + [v for c in control for v in _finite(c["mean_delta"], c["low"], c["high"])])
    values = [float(p["value"]) for p in points]
    v_lo, v_hi = min(values), max(values)
    span = (v_hi - v_lo) or 1.0
    x = lambda v: round(left + plot_w * ((v - v_lo) / span if v_hi > v_lo else 0.5), 1)  # noqa: E731
    y = lambda v: round(top + plot_h * (hi - v) / (hi - lo), 1)  # noqa: E731

    def series(rows, mean_key, low_key, high_key):
        dots = [{"x": x(v), "y": y(r[mean_key]), "value": v, "row": r} for v, r in zip(values, rows)
                if _finite(r[mean_key])]
        banded = [(v, r) for v, r in zip(values, rows) if len(_finite(r[low_key], r[high_key])) == 2]
        band = " ".join([f"{x(v)},{y(r[high_key])}" for v, r in banded]
                        + [f"{x(v)},{y(r[low_key])}" for v, r in reversed(banded)])
        return {"dots": dots, "path": " ".join(f"{d['x']},{d['y']}" for d in dots), "band": band}

    shown = values if len(values) <= 12 else values[:: -(-len(values) // 8)]
    return {"width": width, "height": height, "left": left, "right": width - right, "top": top,
            "base_y": top + plot_h, "zero_y": y(0.0),
            "chosen": series(chosen, "mean_delta", "ci_low", "ci_high"),
            "control": series(control, "mean_delta", "low", "high"),
            "y_ticks": [{"v": v, "y": y(v)} for v in ticks],
            "x_ticks": [{"v": v, "x": x(v)} for v in shown]}


def paired_bars(rows: Sequence[dict[str, Any]], first: str, second: str, height: int = 170, bar_w: int = 24,
                gap: int = 16) -> dict | None:
    """Two R²-like values (0..1 axis) per layer side by side: row[first] and, beside it,
    row[second] (e.g. the base model's held-out R² beside the RM's). A negative value draws no
    bar, only its label. None: no rows."""
    if not rows:
        return None
    y, bar, left = _unit_axis(height, bar_w)
    group_w = 2 * bar_w + 2
    groups = []
    for i, row in enumerate(rows):
        x = left + gap + i * (group_w + gap)
        groups.append({"layer": row["layer"], "center": x + group_w / 2, "first": bar(x, row.get(first)),
                       "second": bar(x + bar_w + 2, row.get(second))})
    width = left + gap + len(rows) * (group_w + gap)
    return {"width": max(width, 200), "height": height, "left": left, "base_y": y(0.0),
            "ticks": [{"v": v, "y": y(v)} for v in (0, 0.25, 0.5, 0.75, 1.0)], "groups": groups}


def divergence_bars(rows: Sequence[dict[str, Any]], height: int = 170, bar_w: int = 22, gap: int = 8) -> dict | None:
    """Parameter divergence (l2) per block on a 0..nice-max axis, the run's layers (`chosen`)
    marked. None: no rows."""
    values = _finite(*(row.get("l2") for row in rows))
    if not values:
        return None
    left, top, bottom = 44, 14, 22
    plot_h = height - top - bottom
    y_max = _nice_max(max(values))
    y = lambda v: round(top + plot_h * (1 - min(max(v, 0.0), y_max) / y_max), 1)  # noqa: E731
    bars = []
    for i, row in enumerate(rows):
        x = left + gap + i * (bar_w + gap)
        v = row.get("l2") or 0.0
        bars.append({"block": row["block"], "x": x, "w": bar_w, "y": y(v), "h": round(y(0.0) - y(v), 1),
                     "value": row.get("l2"), "relative": row.get("relative"), "chosen": bool(row.get("chosen")),
                     "center": x + bar_w / 2})
    width = left + gap + len(rows) * (bar_w + gap)
    return {"width": max(width, 200), "height": height, "left": left, "base_y": y(0.0), "y_max": y_max,
            "ticks": [{"v": y_max * f, "y": y(y_max * f)} for f in (0, 0.25, 0.5, 0.75, 1.0)], "bars": bars}


def lexicon_scatter(words: Sequence[dict[str, Any]], width: int = 460, height: int = 320,
                    max_points: int = 3000) -> dict | None:
    """The implicit-reward lexicon: each word's reference value (x) against its measured value to
    the reward model (y), one dot per word (at most max_points, every k-th word by reference value
    beyond that, the most divergent always kept). None: no word."""
    rows = [w for w in words if len(_finite(w.get("reference"), w.get("measured"))) == 2]
    if not rows:
        return None
    if len(rows) > max_points:
        by_divergence = sorted(rows, key=lambda w: -abs(w.get("rank_difference") or 0.0))
        kept = {id(w) for w in by_divergence[:max_points // 10]}
        step = -(-len(rows) // (max_points - len(kept)))
        kept |= {id(w) for w in sorted(rows, key=lambda w: w["reference"])[::step]}
        rows = [w for w in rows if id(w) in kept]
    left, right, top, bottom = 52, 12, 10, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    x_lo, x_hi, x_ticks = _axis([w["reference"] for w in rows])
    y_lo, y_hi, y_ticks = _axis([w["measured"] for w in rows])
    x = lambda v: round(left + plot_w * (v - x_lo) / (x_hi - x_lo), 1)  # noqa: E731
    y = lambda v: round(top + plot_h * (y_hi - v) / (y_hi - y_lo), 1)  # noqa: E731
    dots = [{"word": w["word"], "reference": w["reference"], "measured": w["measured"], "x": x(w["reference"]),
             "y": y(w["measured"])} for w in rows]
    return {"width": width, "height": height, "left": left, "right": width - right, "top": top,
            "base_y": top + plot_h, "zero_x": x(0.0), "zero_y": y(0.0), "dots": dots, "n": len(dots),
            "x_ticks": [{"v": v, "x": x(v)} for v in x_ticks], "y_ticks": [{"v": v, "y": y(v)} for v in y_ticks]}

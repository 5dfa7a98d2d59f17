"""One layer's feature table: sorted (by default in the layer's default ranking), filtered
(sign, frequency, token) and paginated, with every choice in the query string; and what the
layer's features do to the score when zeroed: deletion curves and calibration."""
from __future__ import annotations

from typing import Any
from urllib.parse import quote

import numpy as np

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from backend.web import charts, feature_table

from backend.core import explanations, labels, store
from backend.core.rankings import (DIRECTION_WORDS, RANKINGS, SUMMARY_N, VERDICT_WORDS, barely_reaches, directions_of,
                              ranking_scores, reads_one_token)
from backend.core.llm import Endpoint
from backend.web.explanation_agreement import layer_agreement
from backend.web.routes.common import (SettingsDep, TableView, TableViewQ, default_ranking, get_run, render,
                                   ranking_summary, run_summary, store_path)
from backend.web.routes.edge import ERROR_RESPONSES, MAX_ID, LayerId, StrictJSONRoute
from backend.core.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)

# A ranking's name, as its tab says it: "attribution (gradient)" (the tabs come from the store's spec)
assert {r.sort for r in RANKINGS.values()} <= set(feature_table.TAB_LABELS)  # every ranking has its tab
RANKING_NAMES = {key: feature_table.TAB_LABELS[r.sort] for key, r in RANKINGS.items()}
COLUMN_NAMES = feature_table.SORT_NAMES  # sort key -> what it sorts by, in words
CURVE_POINT = ("n", "mean_delta", "ci_low", "ci_high", "abs_mean_delta", "control_mean_delta", "control_low",
               "control_high", "control_draw_means", "difference", "difference_low", "difference_high", "p_value",
               "measure", "effect", "control_effect", "control_effects", "excess", "rank_p_value", "effect_p_value",
               "verdict", "predicted_mean_delta", "attribution_mean_delta", "features")


def describe_sort(sort: str) -> str:
    """'reward correlation, smallest first' for '-correlation'."""
    return f"{COLUMN_NAMES[sort.lstrip('-')]}, {'smallest' if sort.startswith('-') else 'largest'} first"


def _layer_info(path, run_id: str, layer: int) -> dict[str, Any]:
    try:
        return store.layer_info(path, layer)
    except store.NotFound as exc:
        raise store.NotFound(f"run {run_id!r}: {exc}") from None


def layer_data(settings: Settings, run_id: str, layer: int, view: TableView) -> dict[str, Any]:
    run = get_run(settings, run_id)
    path = store_path(settings, run)
    info = _layer_info(path, run_id, layer)
    sort = view.sorted_by(info)
    size = settings.page_size
    labelled = labels.labels_for_layer(settings, run_id, layer)
    where = labels.restrict(view.filter_for(info), view.label, labelled, info["d_sae"])
    explained = explanations.for_layer(settings, run_id, layer)
    where = explanations.restrict(where, view.explanation, explained)
    result = store.features(path, layer, sort=sort, where=where, limit=size, offset=(view.page - 1) * size)
    for row in result.rows:
        row["explanation"] = explained.get(row["feature"])
        mine = labelled.get(row["feature"])
        row["label"], row["label_note"] = (mine["label"], mine["note"]) if mine else (None, None)
        # a label made on an earlier run version whose SAE differed (False), or may have (None)
        row["label_made_on_current_sae"] = mine["made_on_current_sae"] if mine else None
        row["label_run_version"] = mine["run_version"] if mine else None
    token_search = None
    if view.token:  # which of them fire on the token itself (listed first), which only share a context
        firing = store.on_token(path, layer, view.token)
        for row in result.rows:
            row["on_token"], row["token_activation"] = row["feature"] in firing, firing.get(row["feature"])
        listed = store.view_order(path, layer, sort, where)  # cached: the page's own order
        n_on = int(np.isin(listed, list(firing)).sum()) if firing else 0
        token_search = {"token": view.token.strip(), "n_on_token": n_on, "n_in_contexts": int(len(listed)) - n_on}
    filled = store.filled_columns(path, layer)
    columns = feature_table.shown_columns(filled, sort)
    n_pages = max(1, -(-result.total // size))
    if view.page > n_pages:
        raise store.NotFound(f"page {view.page} not found: this view of layer {layer} has {n_pages} page(s)")
    return {
        "run": run_summary(run),
        "layer": info,
        "default_ranking": ranking_summary(info),
        "sort": sort,  # view.sort, or the default ranking's where the view names none
        "view": view.model_dump(),
        "page_size": size,
        "n_pages": n_pages,
        "total": result.total,
        "max_abs_weight": store.max_abs_weight(path, layer),
        # the table's drawn columns and sort tabs, from the store's spec: what the page shows
        "columns": feature_table.header(columns, info),
        "tabs": [{"sort": key, "label": label} for key, label in feature_table.tabs(filled).items()],
        "features": result.rows,
        "token_search": token_search,
    }


def faithfulness_data(settings: Settings, run_id: str, layer: int) -> dict[str, Any]:
    """The layer's deletion curves by ranking (RANKINGS order) and direction, and its calibration:
    each measured feature's Δ beside what the regression and the attribution predicted for it."""
    path = store_path(settings, get_run(settings, run_id))
    info = _layer_info(path, run_id, layer)
    points = store.faithfulness(path, layer)
    scores = ranking_scores(points)
    rankings = {}
    for key, r in RANKINGS.items():
        curves = {}
        for direction in directions_of(key):
            mine = [{name: p[name] for name in CURVE_POINT} for p in points
                    if p["ranking"] == key and p["direction"] == direction]
            if mine:
                curves[direction] = {"label": DIRECTION_WORDS[direction], "points": mine}
        if curves:
            rankings[key] = {"label": r.label, "kind": r.kind, "measure": "abs" if r.sign == 0 else "signed",
                             "score": scores.get(key), "directions": curves}
    return {
        "layer": layer,
        "default_ranking": ranking_summary(info),
        "compared": COMPARED,
        "rankings": rankings,
        "calibration": {
            "n_measured": info["n_measured"],
            **{prediction: {"slope": info[f"calibration_{prediction}_slope"], "r": info[f"calibration_{prediction}_r"]}
               for prediction in ("regression", "attribution")},
            "features": store.measured_features(path, layer),
        },
    }


# What the layer page says was compared (workers/faithfulness.py does it)
COMPARED = ("Each ranking's top n features zeroed together on held-out texts, beside frequency-matched random "
            "draws: a signed ranking by how far its top raisers, zeroed, lower the score and its top lowerers "
            "raise it; |weight| by the mean |Δ| per text; the default is the ranking that exceeds its controls "
            "most, averaged over n and directions.")


def _point(curve: dict[str, Any] | None, n: int = SUMMARY_N) -> dict[str, Any] | None:
    """A curve's point at n, or at the largest n below it that was measured."""
    options = [p for p in (curve or {}).get("points", []) if p["n"] <= n]
    return max(options, key=lambda p: p["n"]) if options else None


def causal_summary(info: dict[str, Any], faithfulness: dict[str, Any]) -> dict[str, Any] | None:
    """What the layer page says first: how far zeroing its default ranking's top 10 moves the
    reward in each of its directions (beside controls, relative to the score's spread, with
    the verdict), against the regression's |weight| ranking by |Δ|; and whether this layer's
    edits reach the score at all. None: nothing was measured."""
    key = info["default_ranking"]
    if key not in faithfulness["rankings"]:
        return None
    spread = info["score_spread"]

    def moved(ranking: str) -> list[dict[str, Any]]:
        out = []
        for direction, curve in faithfulness["rankings"].get(ranking, {}).get("directions", {}).items():
            p = _point(curve)
            if p is not None:
                out.append({**p, "direction": direction, "verdict_words": VERDICT_WORDS.get(p["verdict"], ""),
                            "relative": p["excess"] / spread if spread and p["excess"] is not None else None})
        return out

    return {"ranking": RANKINGS[key], "default": moved(key),
            "abs_weight": moved("abs_weight") if key != "abs_weight" else None,
            "verdict": info.get("faithfulness_verdict"), "verdict_words": VERDICT_WORDS.get(
                info.get("faithfulness_verdict") or "", ""),
            "compared": COMPARED,
            "barely_reaches": barely_reaches(info), "reads_one_token": reads_one_token(info)}


@router.get("/api/runs/{run_id}/layers/{layer}", tags=["features"])
def api_layer(run_id: str, layer: LayerId, settings: SettingsDep, view: TableViewQ) -> dict[str, Any]:
    """A layer's metrics, its default ranking, and one page of its feature table (in that
    ranking's order unless `sort` says otherwise), with the columns the page draws (`columns`:
    heading, group, format -- `pct` is a share, shown in per cent --, cell kind and sort keys) and
    its sort tabs (`tabs`), both from the store's spec."""
    return layer_data(settings, run_id, layer, view)


@router.get("/api/runs/{run_id}/layers/{layer}/faithfulness", tags=["features"])
def api_faithfulness(run_id: str, layer: LayerId, settings: SettingsDep) -> dict[str, Any]:
    """The layer's deletion curves: for each ranking and n, the mean change in the score with its
    top n zeroed (95% CI), beside frequency-matched random draws, their paired difference and
    p-value, and both predictions; and the calibration of single-feature predictions against
    the measured changes."""
    return faithfulness_data(settings, run_id, layer)


@router.get("/runs/{run_id}/layers/{layer}", response_class=HTMLResponse, include_in_schema=False)
def layer_page(request: Request, run_id: str, layer: LayerId, settings: SettingsDep, view: TableViewQ,
               go: int | None = Query(None, ge=0, le=MAX_ID, description="open this feature id")):
    if go is not None:  # "go to feature #": straight to its page, keeping the view for j/k
        store.feature(store_path(settings, get_run(settings, run_id)), layer, go)  # 404 if unknown
        query = view.query(page=None)
        return RedirectResponse(f"/runs/{quote(run_id, safe='')}/layers/{layer}/features/{go}" + (f"?{query}" if query else ""),
                                status_code=303)
    data = layer_data(settings, run_id, layer, view)
    faithfulness = faithfulness_data(settings, run_id, layer)
    info = data["layer"]
    return render(request, "layer.html", {
        **data, "view_obj": view, "ranking_names": RANKING_NAMES,
        "sort_labels": {tab["sort"]: tab["label"] for tab in data["tabs"]},
        "column_groups": feature_table.group_spans([feature_table.BY_NAME[c["name"]] for c in data["columns"]]),
        "label_names": labels.LABEL_NAMES,
        "default_sort": default_ranking(info).sort, "summary": causal_summary(info, faithfulness),
        "faithfulness": faithfulness,
        "curves_plot": charts.deletion_curves(faithfulness["rankings"], info["default_ranking"]),
        "direction_words": DIRECTION_WORDS,
        "calibration_plot": charts.calibration(faithfulness["calibration"]["features"]),
        **explanation_context(settings, run_id, layer),
    })


def explanation_context(settings: Settings, run_id: str, layer: int) -> dict[str, Any]:
    """The layer page's explanation form (the configured endpoint) and agreement tables."""
    return {"llm": Endpoint.from_settings(settings), "agreement": layer_agreement(settings, run_id, layer)}

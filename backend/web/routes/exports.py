"""Exports, each a button on the page it belongs to: the layer page's table (CSV, Parquet) and
Neuronpedia layout (ZIP), the labels page's labels with statistics and history (CSV, JSON), and the
feature page's SAEDashboard page (rendered by a worker job, then served from the run's folder).
Everything is checked before the first byte, so a bad request is a 4xx and never half a file; the
files stream out as they are made."""
from __future__ import annotations

from typing import Annotated, Iterator, Literal
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import Field

from backend.core import store
from backend.core.exports import ExportError, labels_export, neuronpedia, tables
from backend.core.exports.dashboards import SAEDASHBOARD_CSP, dashboard_path
from backend.core.exports.source import open_layer, safe_name
from backend.web.routes.common import SettingsDep, TableViewQ
from backend.web.routes.edge import ERROR_RESPONSES, MAX_ID, FeatureId, LayerId, StrictJSONRoute, invalid
from backend.core.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)
LAYER = "/runs/{run_id}/layers/{layer}"
FEATURE = LAYER + "/features/{feature}"
MAX_EXPORT_FEATURES = 131_072  # a whole layer of the widest SAE a run may have (Settings.max_sae_width)
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-z0-9_-]+$")]


def _refused(exc: ExportError, field: str) -> Exception:
    """An ExportError as the API says it: 422 in FastAPI's shape, else {"detail": message}."""
    return invalid(str(exc), field) if exc.status == 422 else HTTPException(exc.status, str(exc))


def _download(chunks: Iterator[bytes], media_type: str, filename: str) -> StreamingResponse:
    return StreamingResponse(chunks, media_type=media_type,
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _first_chunk_now(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Make the first chunk before the response starts: a problem the stream meets at once (a store
    that cannot be read) is still a plain error, not a cut-off download."""
    first = next(chunks, b"")

    def rest():
        yield first
        yield from chunks
    return rest()


# --- the layer page: its table, and its features in Neuronpedia's layout ------------------------

@router.get("/api" + LAYER + "/features.csv", tags=["exports"], response_class=Response,
            responses={200: {"content": {"text/csv": {}}, "description": "the view's features, a row each"}})
def export_table_csv(run_id: str, layer: LayerId, settings: SettingsDep, view: TableViewQ):
    """The layer's feature table as the layer page filters and sorts it (every page of it), with
    every statistic the store keeps per feature, its place in the default ranking and its label."""
    export = tables.table_export(settings, run_id, layer, view)
    return _download(_first_chunk_now(tables.stream(export, "csv")), tables.FORMATS["csv"], export.filename + ".csv")


@router.get("/api" + LAYER + "/features.parquet", tags=["exports"], response_class=Response,
            responses={200: {"content": {"application/vnd.apache.parquet": {}},
                             "description": "the same table as Parquet; what it is in the key `rewardatlas`"}})
def export_table_parquet(run_id: str, layer: LayerId, settings: SettingsDep, view: TableViewQ):
    """The same table as features.csv, as Parquet (a row group per 4,096 features)."""
    export = tables.table_export(settings, run_id, layer, view)
    return _download(_first_chunk_now(tables.stream(export, "parquet")), tables.FORMATS["parquet"],
                     export.filename + ".parquet")


def _view_features(settings: Settings, run_id: str, layer: int, view) -> list[int] | None:
    """The features a filtered table view lists (None: not filtered, the whole layer)."""
    if not view.filtered:
        return None
    ids = tables.table_export(settings, run_id, layer, view).ids
    if len(ids) == 0:
        raise invalid("this view of the layer lists no features: widen its filters", "query")
    return [int(i) for i in ids]


@router.get("/api" + LAYER + "/neuronpedia.zip", tags=["exports"], response_class=Response,
            responses={200: {"content": {"application/zip": {}},
                             "description": "<model_id>/<layer>-<source_set>/ in Neuronpedia's import layout"}})
def export_neuronpedia(run_id: str, layer: LayerId, settings: SettingsDep, view: TableViewQ,
                       features: Annotated[list[Annotated[int, Field(ge=0, le=MAX_ID)]] | None, Query(
                           max_length=MAX_EXPORT_FEATURES,
                           description="feature ids (repeat the parameter); none: the features the table view "
                                       "lists, or the whole layer")] = None,
                       model_id: Annotated[Name | None, Query(description="Neuronpedia model id (default: "
                                                              "from the run's model)")] = None,
                       source_set: Annotated[Name | None, Query(description="Neuronpedia source set (default: "
                                                                "rewardatlas-<run>)")] = None,
                       creator_id: Annotated[Name | None, Query(description="the Neuronpedia user id the rows "
                                                                "name as creator")] = None):
    """Chosen features of a layer (or all of them) in the layout Neuronpedia's importer reads,
    each feature carrying what it does to the reward (weight, attribution, measured Δ with its CI,
    its place in the default ranking, its label)."""
    chosen = features if features else _view_features(settings, run_id, layer, view)
    options = neuronpedia.Options(model_id=model_id, source_set=source_set,
                                  **({"creator_id": creator_id} if creator_id else {}))
    try:
        export = neuronpedia.prepare(settings, run_id, layer, chosen, options)
    except ExportError as exc:
        raise _refused(exc, "features") from None
    name = f"neuronpedia-{safe_name(run_id)}-layer{layer}.zip"
    return _download(_first_chunk_now(neuronpedia.zip_stream(export)), "application/zip", name)


# --- the labels page -------------------------------------------------------------------------------

@router.get("/api/runs/{run_id}/labels-with-stats.{fmt}", tags=["labels"], response_class=Response,
            responses={200: {"content": {"text/csv": {}, "application/json": {}},
                             "description": "a record per feature with a label or a label history"}})
def export_labels(run_id: str, fmt: Literal["csv", "json"], settings: SettingsDep):
    """Every feature that has (or had) a label: the label now, the feature's statistics (none where
    the run no longer has it: `orphaned`), its place in the default ranking, and every change of
    its label (CSV: as JSON in the `history` column)."""
    chunks = labels_export.stream(settings, run_id, fmt)
    return _download(chunks, labels_export.FORMATS[fmt], f"{labels_export.filename(run_id)}.{fmt}")


# --- the feature page: its SAEDashboard page ---------------------------------------------------------

@router.get(FEATURE + "/saedashboard.html", include_in_schema=False)
def dashboard_page(run_id: str, layer: LayerId, feature: FeatureId, settings: SettingsDep):
    """The rendered page, sandboxed: its inline scripts run in an origin of their own, with no
    access to this site."""
    source = open_layer(settings, run_id, layer)
    path = dashboard_path(source.run_dir, layer, feature)
    if not path.is_file():
        raise store.NotFound(f"run {run_id!r}: no SAEDashboard page of feature {feature} in layer {layer} yet; "
                             f"render it from the feature's page")
    return FileResponse(path, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": SAEDASHBOARD_CSP,
                                 "Content-Disposition": f'inline; filename="{path.name}"'})


def saedashboard_url(request: Request, run_id: str, layer: int, feature: int) -> str | None:
    """Where the feature's rendered SAEDashboard page is served; None before one was rendered."""
    settings = request.app.state.settings
    try:
        source = open_layer(settings, run_id, int(layer))
    except (store.NotFound, store.StoreOutdated):
        return None
    if not dashboard_path(source.run_dir, int(layer), int(feature)).is_file():
        return None
    return f"/runs/{quote(run_id, safe='')}/layers/{layer}/features/{feature}/saedashboard.html"


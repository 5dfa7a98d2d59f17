"""What every page group shares: settings, run lookup, templates and the table view."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import jinja2
import orjson
import sqlalchemy as sa
from fastapi import Depends, Query, Request, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from backend.web import charts

from backend.core import db, store
from backend.web.access import csrf_token
from backend.core.models import LABELS
from backend.core.rankings import VERDICT_WORDS, directions_said, FALLBACK_RANKING, RANKINGS, Ranking
from backend.web.job_summaries import summary as job_summary
from backend.web.feature_table import feature_rows
from backend.web.routes.formats import (display_token, context_rows, contribution_spans, edit_class, zeroing_class,
                                        fmt_delta, fmt_num, fmt_pct, fmt_weight, token_spans, weight_class)
from backend.web.routes.edge import MAX_ID
from backend.core.settings import Settings
from backend.core.store import NotFound
from backend.core.store_schema import GROUPS

# frontend/ is a sibling of backend/ in the repo.
FRONTEND_DIR = Path(__file__).resolve().parents[3] / "frontend"


async def get_settings(request: Request) -> Settings:
    # async: FastAPI runs a plain-def dependency in its thread pool, 0.3 ms a request for this
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_run(settings: Settings, run_id: str) -> sa.Row:
    """The run's registry row (columns as attributes); NotFound (404) when none is registered."""
    run = db.find_run(settings, run_id)
    if run is None:
        raise NotFound(f"run {run_id!r} not found")
    return run


def store_path(settings: Settings, run: sa.Row) -> Path:
    """The run's feature store; a relative store_path is relative to the data dir."""
    path = Path(run.store_path)
    return path if path.is_absolute() else settings.data_dir / path


def run_summary(run: sa.Row) -> dict[str, Any]:
    """The run columns every page shows (breadcrumbs, headers)."""
    return {"id": run.id, "name": run.name, "model": run.model}


class _PageEnvironment(jinja2.Environment):
    """Looks `x.name` up as x["name"] first when x is a dict (page data is dicts): Jinja's own
    order, attribute first, raises and catches an AttributeError for each of a page's ~900
    lookups."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


# Templates are read once per process (auto_reload off: checking every template file's
# mtime on each render cost ~1 ms a feature page); restart the server after editing one.
templates = Jinja2Templates(env=_PageEnvironment(
    loader=jinja2.FileSystemLoader(FRONTEND_DIR / "templates"), autoescape=True, auto_reload=False))


def _fixed(formatter):
    """A number filter: every page writes SIGNIFICANT digits (backend/web/routes/formats.py), so a
    template's old digits argument (`|num(2)`) is accepted and has no effect."""
    return lambda x, *_digits: formatter(x)


templates.env.filters.update(tok=display_token, num=_fixed(fmt_num), weight=_fixed(fmt_weight), pct=_fixed(fmt_pct),
                             delta=_fixed(fmt_delta), wclass=weight_class, zclass=zeroing_class, eclass=edit_class)
# what kind of number a ranking is, in a word after its name: "attribution (gradient)"
KIND_TAGS = {kind: group.tag for kind, group in GROUPS.items()}
def max_text_chars(request) -> int:
    """The deployment's limit on a typed text (RA_MAX_TEXT_CHARS): forms say it and count against it."""
    return request.app.state.settings.max_text_chars


templates.env.globals.update(max_text_chars=max_text_chars, job_summary=job_summary, csrf_token=csrf_token, token_spans=token_spans, context_rows=context_rows,
                             feature_rows=feature_rows, kind_tag=KIND_TAGS)
templates.env.globals["contribution_spans"] = contribution_spans  # a text's tokens by contribution
templates.env.globals["directions_said"] = directions_said  # what weight, attribution and measured Δ each say
templates.env.globals["verdict_text"] = lambda verdict: VERDICT_WORDS.get(verdict, "")  # a control test, in words
# chart geometry the run page's sections draw from their own rows (backend/web/charts.py)
templates.env.globals.update(paired_bars=charts.paired_bars, divergence_bars=charts.divergence_bars,
                             lexicon_scatter=charts.lexicon_scatter)


def feature_names(settings: Settings, run_id: str, layer: int, ids: list[int]) -> dict[int, str | None]:
    """Each listed feature's top token, so a list of feature ids says what each one is ({} where
    the run's store cannot be read: the ids still link to the features' pages). A route passes
    them to its page: no template reads the store."""
    if not ids:
        return {}
    try:
        return store.top_tokens(store_path(settings, get_run(settings, run_id)), int(layer), [int(i) for i in ids])
    except (NotFound, store.StoreOutdated, OSError):
        return {}


def attributed_features(att: dict[str, Any]) -> list[int]:
    """Every feature an attribution result lists: its ranked features and each token's."""
    ids = {f["feature"] for f in att.get("features", [])}
    ids.update(f["feature"] for token in att.get("token_features", []) for f in token)
    return sorted(ids)


def attribution_names(settings: Settings, run_id: str, attribution: dict[str, Any]) -> dict[int, dict[int, str | None]]:
    """Per layer of an attribution result ({layer: att}), the top tokens of the features it lists."""
    return {int(layer): feature_names(settings, run_id, int(layer), attributed_features(att))
            for layer, att in (attribution or {}).items()}


def job_feature_names(settings: Settings, job: dict[str, Any]) -> dict[int, dict[int, str | None]]:
    """Per layer, the top tokens of the features a job's result lists (its attributions, a text
    diff's changed features): what its page names beside their ids."""
    result, run_id = job.get("result") or {}, job.get("run_id")
    if not run_id or not isinstance(result, dict):
        return {}
    names = attribution_names(settings, run_id, result.get("attribution") or {})
    layer = (job.get("params") or {}).get("layer")
    if result.get("changed") and layer is not None:
        ids = [f["feature"] for f in result["changed"]]
        names.setdefault(int(layer), {}).update(feature_names(settings, run_id, int(layer), ids))
    return names


def explained_output(settings: Settings, run_id: str | None) -> dict[str, Any] | None:
    """What a run's pages say it explains, for a head with several outputs (model.output);
    None for a one-output head, no run, or a store that cannot be read."""
    if not run_id:
        return None
    try:
        return store.explained_output(store_path(settings, get_run(settings, run_id)))
    except (NotFound, store.StoreOutdated, OSError):
        return None


def _page_run_id(context: dict[str, Any]) -> str | None:
    """The run a page is about: its run's, or its job's."""
    run, job = context.get("run"), context.get("job")
    run_id = run.get("id") if isinstance(run, dict) else getattr(run, "id", None)
    if run_id is None and isinstance(job, dict):
        run_id = job.get("run_id")
    return run_id if isinstance(run_id, str) else None


def json_response(data: dict[str, Any]) -> Response:
    """`data` as JSON, written by orjson: FastAPI's value-by-value encoder walk and the json
    module took 1.5 and 0.8 ms of a feature's ~16 KB. Numbers and timestamps as Starlette
    writes them; a non-finite float becomes null."""
    return Response(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200):
    """The page `name` with `context`, and what every page's frame shows, read here, not by the
    template: the head output the run explains (base.html)."""
    settings = request.app.state.settings
    context = {"explained_head_output": explained_output(settings, _page_run_id(context)), **context}
    return templates.TemplateResponse(request, name, context, status_code=status_code)


# --- the feature table's view: sort, filters and page, all in the query string so a view can be shared ---

Sort = Literal[store.SORTS]  # type: ignore[valid-type]


def default_ranking(layer_info: dict[str, Any]) -> Ranking:
    """The ranking a layer's table opens in: the one its deletion curves found the model uses
    (layers.default_ranking), or FALLBACK_RANKING where none was measured. The store's feature
    cards hold each feature's place in its order."""
    return RANKINGS.get(layer_info.get("default_ranking") or FALLBACK_RANKING) or RANKINGS[FALLBACK_RANKING]


def ranking_summary(layer_info: dict[str, Any]) -> dict[str, Any]:
    """The layer's default ranking as the JSON says it; `measured` false: the fallback, no curve."""
    r = default_ranking(layer_info)
    return {"key": r.key, "sort": r.sort, "label": r.label, "kind": r.kind,
            "measured": layer_info.get("default_ranking") in RANKINGS}


# A blank field is no filter (a form submits its empty inputs); it reads as None, and the
# schema says so: without it, "sort=" was a request the schema calls invalid that the server takes.
Blank = Annotated[str, StringConstraints(pattern=r"^\s*$")]



def _share(per_cent: float | None) -> float | None:
    """A frequency filter (per cent, as pages show it) as the store's share of tokens."""
    return None if per_cent is None else per_cent / 100

class TableView(BaseModel):
    """A layer table view. The feature page takes the same parameters, so `j`/`k` walk the
    features in the order of the table the researcher came from."""
    model_config = ConfigDict(extra="ignore")

    sort: Sort | Blank | None = Field(None, description="column to sort by, largest first; prefix '-' for smallest first; "
                                                "none: the layer's default ranking")
    sign: Literal["pos", "neg"] | Blank | None = Field(None, description="only features that raise (pos) or lower (neg) "
                                                       "the reward by the layer's default ranking (its column's sign)")
    # per cent, as every page shows frequency
    min_freq: Annotated[float, Field(ge=0, le=100)] | Blank | None = Field(None, description="only features firing on at least this per cent of tokens")
    max_freq: Annotated[float, Field(ge=0, le=100)] | Blank | None = Field(None, description="only features firing on at most this per cent of tokens")
    token: str | None = Field(None, max_length=100, description="only features with a top token or top-context token starting with this")
    min_pair_cosine: Annotated[float, Field(ge=0, le=1)] | Blank | None = Field(
        None, description="present in both dictionaries: only features whose decoder direction has a cosine of at "
        "least this with one of the paired (smaller) SAE's (sae.widths)")
    label: Literal[(*LABELS, "unlabelled")] | Blank | None = Field(  # type: ignore[valid-type]
        None, description="only features with this label, or 'unlabelled' for those without one")
    explanation: str | None = Field(None, max_length=200, description="only features whose current explanation "
                                    "contains this (case-blind)")
    page: int = Field(1, ge=1, le=MAX_ID, description="1-based page number")

    @field_validator("sort", "sign", "min_freq", "max_freq", "token", "label", "min_pair_cosine", "explanation",
                     mode="before")
    @classmethod
    def _blank_is_none(cls, value):  # an empty form field means "no filter"
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _frequency_range(self):
        if self.min_freq is not None and self.max_freq is not None and self.min_freq > self.max_freq:
            raise ValueError(f"min_freq ({self.min_freq}) is above max_freq ({self.max_freq})")
        return self

    def sorted_by(self, layer_info: dict[str, Any]) -> str:
        """The sort this view lists the layer in: its own, or the layer's default ranking's."""
        return self.sort or default_ranking(layer_info).sort

    def filter_for(self, layer_info: dict[str, Any]) -> store.FeatureFilter:
        """The store's filter for this view; "raises"/"lowers" by the sign of the layer's default
        ranking's column (a feature whose zeroing lowers the score raises it)."""
        ranking = default_ranking(layer_info)
        return store.FeatureFilter(sign=self.sign, sign_column=ranking.column, sign_flip=ranking.sign < 0,
                                   min_frequency=_share(self.min_freq), max_frequency=_share(self.max_freq),
                                   token=self.token, min_pair_cosine=self.min_pair_cosine)

    @property
    def filtered(self) -> bool:
        return any(v is not None for v in (self.sign, self.min_freq, self.max_freq, self.token,
                                            self.min_pair_cosine, self.label, self.explanation))

    def query(self, **changes: Any) -> str:
        """This view's query string with `changes` applied; defaults and empty values left out."""
        values = {**self.model_dump(), **changes}
        defaults = {name: field.default for name, field in TableView.model_fields.items()}
        return urlencode({k: v for k, v in values.items() if v is not None and v != defaults.get(k)})


TableViewQ = Annotated[TableView, Query()]

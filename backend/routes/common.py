"""What every page group shares: settings, run lookup, templates and number formats."""
from __future__ import annotations

import html
import json
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import Depends, Query, Request, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backend import db, store
from backend.access import csrf_token
from backend.models import LABELS, Run
from backend.settings import Settings
from backend.store import NotFound

# frontend/ is a sibling of backend/ in the repo.
FRONTEND_DIR = Path(__file__).resolve().parents[2] / "frontend"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_run(settings: Settings, run_id: str) -> Run:
    with db.session(settings) as s:
        run = s.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id!r} not found")
    return run


def store_path(settings: Settings, run: Run) -> Path:
    """The run's feature store; a relative store_path is relative to the data dir."""
    path = Path(run.store_path)
    return path if path.is_absolute() else settings.data_dir / path


def run_summary(run: Run) -> dict[str, Any]:
    """The run columns every page shows (breadcrumbs, headers)."""
    return {"id": run.id, "name": run.name, "model": run.model}


# --- number formats: one place, so HTML and tests agree on what a value looks like ---

def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e6):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}f}"


def fmt_weight(x: float | None) -> str:
    """Signed, so the sign of a reward effect is never lost in a column of numbers."""
    if x is None:
        return "—"
    return f"{x:+.4f}" if x == 0 or 1e-4 <= abs(x) < 1e5 else f"{x:+.2e}"


def fmt_pct(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.2f}%" if x == 0 or x >= 1e-4 else f"{100 * x:.1e}%"


def weight_class(x: float | None) -> str:
    """CSS class for a weight's sign: blue raises the reward, red lowers it (everywhere)."""
    if not x:
        return "zero"
    return "pos" if x > 0 else "neg"


def tokens_html(display: list[dict[str, Any]], mark_peak: bool = True) -> Markup:
    """A context's shaded token spans (from features.display_tokens), hover = token and value.
    Written here, not in a template loop: a feature page has ~400 tokens, and Jinja spent
    7 ms a page on them."""
    parts = []
    for t in display:
        classes = "tok" + (" peak" if mark_peak and t["peak"] else "") + (" special" if t["special"] else "")
        parts.append(f'{" " if t["space"] else ""}<span class="{classes}" style="--a:{t["alpha"]}" '
                     f'title="{html.escape(t["token"])}: {fmt_num(t["act"])}">{html.escape(t["text"])}</span>')
    return Markup("".join(parts))


templates = Jinja2Templates(directory=FRONTEND_DIR / "templates")
templates.env.filters.update(num=fmt_num, weight=fmt_weight, pct=fmt_pct, wclass=weight_class, tokens=tokens_html)
templates.env.globals.update(csrf_token=csrf_token)


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(data: dict[str, Any]) -> Response:
    """`data` as JSON, without FastAPI's value-by-value encoder walk (1.5 ms of a feature page's
    ~16 KB); the same JSON Starlette writes."""
    body = json.dumps(data, default=_json_default, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body, media_type="application/json")


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200):
    return templates.TemplateResponse(request, name, context, status_code=status_code)


# --- the feature table's view: sort, filters and page, all in the query string so a view can be shared ---

Sort = Literal[store.SORTS]  # type: ignore[valid-type]
DEFAULT_SORT = "weight"  # the store's feature cards hold each feature's place in this order


class TableView(BaseModel):
    """A layer table view. The feature page takes the same parameters, so `j`/`k` walk the
    features in the order of the table the researcher came from."""
    model_config = ConfigDict(extra="ignore")

    sort: Sort = Field(DEFAULT_SORT, description="column to sort by, largest first; prefix '-' for smallest first")
    sign: Literal["pos", "neg"] | None = Field(None, description="only features whose weight raises (pos) or lowers (neg) the reward")
    min_freq: float | None = Field(None, ge=0, le=1, description="only features firing on at least this share of tokens")
    max_freq: float | None = Field(None, ge=0, le=1, description="only features firing on at most this share of tokens")
    token: str | None = Field(None, max_length=100, description="only features with a top token or top-context token starting with this")
    label: Literal[(*LABELS, "unlabelled")] | None = Field(  # type: ignore[valid-type]
        None, description="only features with this label, or 'unlabelled' for those without one")
    page: int = Field(1, ge=1, description="1-based page number")

    @field_validator("sign", "min_freq", "max_freq", "token", "label", mode="before")
    @classmethod
    def _blank_is_none(cls, value):  # an empty form field means "no filter"
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _frequency_range(self):
        if self.min_freq is not None and self.max_freq is not None and self.min_freq > self.max_freq:
            raise ValueError(f"min_freq ({self.min_freq}) is above max_freq ({self.max_freq})")
        return self

    @property
    def filter(self) -> store.FeatureFilter:
        return store.FeatureFilter(sign=self.sign, min_frequency=self.min_freq, max_frequency=self.max_freq,
                                   token=self.token)

    @property
    def filtered(self) -> bool:
        return self.filter != store.FeatureFilter() or self.label is not None

    def query(self, **changes: Any) -> str:
        """This view's query string with `changes` applied; defaults and empty values left out."""
        values = {**self.model_dump(), **changes}
        defaults = {name: field.default for name, field in TableView.model_fields.items()}
        return urlencode({k: v for k, v in values.items() if v is not None and v != defaults.get(k)})


TableViewQ = Annotated[TableView, Query()]

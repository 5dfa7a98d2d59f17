"""The corpus browser: a run's texts searched by substring, filtered by split and score range,
sorted by score, reward, id or a chosen feature's activation, 50 a page; every choice in the
query string, so a view can be shared. Each text id links to its text page."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backend.core import store
from backend.web.routes.common import Blank, SettingsDep, get_run, json_response, render, run_summary, store_path
from backend.web.routes.edge import ERROR_RESPONSES, MAX_ID, StrictJSONRoute
from backend.core.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)

MAX_QUERY_LENGTH = 200
SNIPPET_CHARS = 400  # a longer text shows this much of itself, around its first match

SORT_LABELS = {
    "score": "score, highest first",
    "-score": "score, lowest first",
    "reward": "reward, highest first",
    "-reward": "reward, lowest first",
    "text_id": "text id",
    "feature": "feature activation",
}
assert set(SORT_LABELS) == set(store.CORPUS_SORTS)

FiniteScore = Annotated[float, Field(allow_inf_nan=False)]
Id = Annotated[int, Field(ge=0, le=MAX_ID)]


class CorpusView(BaseModel):
    """Which texts the browser lists, in what order, and which page of them."""
    model_config = ConfigDict(extra="ignore")

    q: str | None = Field(None, max_length=MAX_QUERY_LENGTH,
                          description="only texts holding this, ignoring case (literally: % and _ are themselves)")
    split: Literal[store.SPLITS] | Blank | None = Field(  # type: ignore[valid-type]
        None, description="only training ('train') or held-out ('heldout') texts")
    score_min: FiniteScore | Blank | None = Field(None, description="only texts the reward model scores at least this")
    score_max: FiniteScore | Blank | None = Field(None, description="only texts the reward model scores at most this")
    sort: Literal[tuple(store.CORPUS_SORTS)] | Blank | None = Field(  # type: ignore[valid-type]
        None, description="score (the default), -score, reward, -reward, text_id, or feature (needs layer and "
                          "feature; the default when both are given): the feature's max activation over the text's "
                          "tokens, among the texts it fires on most")
    layer: Id | Blank | None = Field(None, description="with feature: the layer of the feature to sort by or show")
    feature: Id | Blank | None = Field(None, description="with layer: a feature id within the layer's SAE")
    page: int = Field(1, ge=1, le=MAX_ID, description="1-based page number")

    @field_validator("q", "split", "score_min", "score_max", "sort", "layer", "feature", mode="before")
    @classmethod
    def _blank_is_none(cls, value):  # an empty form field means "no filter"
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _consistent(self):
        if self.score_min is not None and self.score_max is not None and self.score_min > self.score_max:
            raise ValueError(f"score_min ({self.score_min}) is above score_max ({self.score_max})")
        if (self.layer is None) != (self.feature is None):
            raise ValueError("layer and feature go together: name both, or neither")
        if self.sort == "feature" and self.layer is None:
            raise ValueError("sort=feature needs a layer and a feature")
        return self

    @property
    def sorted_by(self) -> str:
        """The view's sort: its own, else the chosen feature's activation, else the score."""
        return self.sort or ("feature" if self.feature is not None else "score")

    @property
    def filtered(self) -> bool:
        return any(v is not None for v in (self.q, self.split, self.score_min, self.score_max))

    def query(self, **changes: Any) -> str:
        """This view's query string with `changes` applied; defaults and empty values left out."""
        values = {**self.model_dump(), **changes}
        return urlencode({k: v for k, v in values.items() if v is not None and not (k == "page" and v == 1)})


CorpusViewQ = Annotated[CorpusView, Query()]


def highlighted(text: str, needle: str | None, width: int = SNIPPET_CHARS) -> list[tuple[str, bool]]:
    """`text` as (piece, is_match) pairs, every case-blind occurrence of `needle` a match; a
    text longer than `width` is cut to that much around its first match, '…' marking a cut."""
    found = re.search(re.escape(needle), text, re.IGNORECASE) if needle else None
    start = 0
    if len(text) > width:
        start = max(0, min(found.start() - width // 4 if found else 0, len(text) - width))
    shown = text[start:start + width]
    pieces: list[tuple[str, bool]] = [("…", False)] if start > 0 else []
    at = 0
    for match in re.finditer(re.escape(needle), shown, re.IGNORECASE) if needle else ():
        pieces += [(shown[at:match.start()], False), (match.group(), True)]
        at = match.end()
    pieces.append((shown[at:], False))
    if start + width < len(text):
        pieces.append(("…", False))
    return [(piece, is_match) for piece, is_match in pieces if piece]


def _feature_info(path, run_id: str, view: CorpusView) -> dict[str, Any] | None:
    """The chosen feature: its layer's width and how many texts the store ranks for it. 404 for
    an unknown layer, 422 for a feature beyond the layer's SAE."""
    if view.layer is None:
        return None
    try:
        info = store.check_feature(path, view.layer, view.feature)
    except store.NotFound as exc:
        raise store.NotFound(f"run {run_id!r}: {exc}") from None
    except ValueError as exc:
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "feature"), "msg": str(exc),
                                       "input": view.feature}]) from None
    return {"layer": view.layer, "feature": view.feature, "d_sae": info["d_sae"],
            "n_ranked": store.ranked_text_count(path, view.layer, view.feature)}


def corpus_data(settings: Settings, run_id: str, view: CorpusView) -> dict[str, Any]:
    run = get_run(settings, run_id)
    path = store_path(settings, run)
    chosen = _feature_info(path, run_id, view)
    size = settings.page_size
    page = store.corpus(path, contains=view.q, split=view.split, score_min=view.score_min, score_max=view.score_max,
                        sort=view.sorted_by, layer=view.layer, feature=view.feature,
                        offset=(view.page - 1) * size, limit=size)
    limit = store.run_info(path).get("ranked_texts")
    return {
        "run": run_summary(run),
        "texts": page.rows,
        "total": page.total,
        "offset": (view.page - 1) * size,
        "limit": size,
        "page": view.page,
        "n_pages": max(1, -(-page.total // size)),
        "filters": {**view.model_dump(exclude={"page"}), "sort": view.sorted_by},
        # the store keeps each feature's top N texts only: a feature sort ranks among those
        "feature": None if chosen is None else {**chosen, "ranked_texts": None if limit is None else int(limit)},
        "corpus_size": store.texts_count(path),
    }


@router.get("/api/runs/{run_id}/texts", tags=["texts"])
def api_corpus(run_id: str, settings: SettingsDep, view: CorpusViewQ) -> dict[str, Any]:
    """One page of the run's texts (50 a page): those holding `q` (ignoring case), of `split`, with an
    RM score in [score_min, score_max], sorted by `sort`. With `layer` and `feature`, each text has the
    feature's max activation over its tokens where the text is among the N texts the feature fires on
    most (`feature.n_ranked` of them; N is the run's analysis.ranked_texts), else null; sorted by the
    feature, only those texts are listed. A page past the end has no texts and says `total`."""
    return json_response(corpus_data(settings, run_id, view))


@router.get("/runs/{run_id}/texts", response_class=HTMLResponse, include_in_schema=False)
def corpus_page(request: Request, run_id: str, settings: SettingsDep, view: CorpusViewQ):
    data = corpus_data(settings, run_id, view)
    return render(request, "corpus.html", {
        **data, "view": view, "sort_labels": SORT_LABELS,
        "pieces": [highlighted(row["text"], view.q) for row in data["texts"]],
    })

"""ReasonScore of a typed vocabulary at one layer (workers/analyses/reason_score.py): the layer
page's form and its JSON twin, each queueing a `reason_score` job whose page lists the top
features. The vocabulary is checked here (a bad one is a 4xx and creates no job); whether the
tokenizer knows its words the worker says (the job fails naming them)."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.web.access import current_author
from backend.web.routes.common import SettingsDep, get_run, store_path
from backend.web.routes.edge import ERROR_RESPONSES, LayerId, StrictJSONRoute, invalid
from backend.web.routes.jobs import _created, _form, _json_only, _parse, _submit
from backend.core.settings import Settings
from backend.core.reference_words import (MAX_VOCABULARY_WORDS, MAX_WORD_CHARS, ReferenceError,  # torch-free
                                     parse_vocabulary)

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)

MAX_VOCABULARY_CHARS = 100_000
MAX_REASON_TEXTS = 20_000

Word = Annotated[str, Field(min_length=1, max_length=MAX_WORD_CHARS, pattern=r"^[^\s,]+$")]


class ReasonScoreRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    words: list[Word] = Field(min_length=1, max_length=MAX_VOCABULARY_WORDS,
                              description="the vocabulary: each word's spellings (as given, lower case, capitalised, "
                              "with and without a leading space) are matched in the corpus's tokens")
    n_texts: int = Field(2000, ge=1, le=MAX_REASON_TEXTS, description="corpus texts (by id) whose tokens are scanned")
    alpha: float = Field(0.7, ge=0, le=10, description="the entropy's exponent (the paper's 0.7)")
    window: list[Annotated[int, Field(ge=0, le=64)]] = Field(
        [1, 2], min_length=2, max_length=2, description="[before, after]: tokens around a word's match counted as its")

    @field_validator("words")
    @classmethod
    def _words(cls, words):
        kept: dict[str, str] = {}
        for word in words:
            word = word.strip()
            if not word or any(c.isspace() or c == "," for c in word):
                raise ValueError(f"each entry is one word (no spaces or commas inside): {word[:40]!r}")
            kept.setdefault(word.lower(), word)  # each once, case-blind, as ReasonScore groups spellings
        return list(kept.values())


def submit_reason_score(settings: Settings, run_id: str, layer: int, req: ReasonScoreRequest, author: str) -> dict:
    from backend.core import store

    run = get_run(settings, run_id)
    store.layer_info(store_path(settings, run), layer)  # 404 for an unknown layer
    shown = ", ".join(req.words[:8]) + ("…" if len(req.words) > 8 else "")
    params = {"run_id": run_id, "layer": layer, "words": req.words, "n_texts": req.n_texts, "alpha": req.alpha,
              "window": req.window, "run_version": run.version,
              "described": f"{len(req.words)} word{'s' if len(req.words) > 1 else ''} ({shown}) over "
                           f"{req.n_texts:,} texts"}
    return _submit(settings, "reason_score", params, author, run_id)


@router.post("/runs/{run_id}/layers/{layer}/reason-score", include_in_schema=False)
async def reason_score_form(request: Request, run_id: str, layer: LayerId, settings: SettingsDep):
    form = await _form(request)
    text = form.get("vocabulary") or ""
    if len(text) > MAX_VOCABULARY_CHARS:
        raise invalid(f"the vocabulary is {len(text):,} characters; at most {MAX_VOCABULARY_CHARS:,}", "vocabulary")
    try:
        words = parse_vocabulary(text)
    except ReferenceError as exc:
        raise invalid(str(exc), "vocabulary") from None
    data = {"words": words, "n_texts": form.get("n_texts") or 2000}
    job = submit_reason_score(settings, run_id, layer, _parse(ReasonScoreRequest, data), current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


@router.post("/api/runs/{run_id}/layers/{layer}/reason-scores", status_code=201, tags=["jobs"])
def api_reason_score(request: Request, response: Response, run_id: str, layer: LayerId, body: ReasonScoreRequest,
                     settings: SettingsDep) -> dict:
    """Queue ReasonScore for a vocabulary at one layer: per feature its specificity to the words over the
    corpus's tokens (AIRI's SAE-Reasoning); poll GET /api/jobs/{id} (the Location) for the top features."""
    _json_only(request)
    return _created(response, submit_reason_score(settings, run_id, layer, body, current_author(request)))

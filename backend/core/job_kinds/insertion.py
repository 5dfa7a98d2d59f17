"""Phrase insertion: a phrase written into held-out texts, their score before and after, beside the
same insertion of a neutral control word (paired difference with CI and p-value)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from backend.core import store
from backend.core.exports.source import run_and_store
from backend.core.job_kinds.base import MAX_ID, Form, JobKind, Target, check_range
from backend.core.probe_params import CONTROL_PHRASE, POSITIONS, TEXT_SELECTIONS
from backend.core.settings import Settings

MAX_PHRASE_CHARS = 200
MAX_INSERTION_TEXTS = 1024
MAX_REPEAT = 50
MAX_WORD_INDEX = 10_000


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("type a word or phrase")
    return text.strip()


Phrase = Annotated[str, Field(min_length=1, max_length=MAX_PHRASE_CHARS), AfterValidator(_not_blank)]


class InsertionRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    phrase: Phrase = Field(description="the token or phrase to insert")
    control: Phrase = Field(CONTROL_PHRASE, description="a neutral word inserted the same way, to compare with")
    position: Literal[POSITIONS] | Annotated[int, Field(ge=0, le=MAX_WORD_INDEX)] = Field(  # type: ignore[valid-type]
        "end", description="end (appended after a space), start, or a 0-based word index")
    n_texts: int = Field(128, ge=1, le=MAX_INSERTION_TEXTS, description="held-out texts to insert into")
    texts: Literal[TEXT_SELECTIONS] = Field(  # type: ignore[valid-type]
        "neutral", description="neutral: held-out texts scoring in the corpus's middle third; heldout: the first n")
    repeat: int = Field(1, ge=1, le=MAX_REPEAT, description="insert the phrase this many times")
    layer: int | None = Field(None, ge=0, le=MAX_ID, description="with `feature`: a feature to report beside it")
    feature: int | None = Field(None, ge=0, le=MAX_ID)

    @model_validator(mode="after")
    def _feature_with_layer(self):
        if (self.layer is None) != (self.feature is None):
            raise ValueError("layer and feature go together: name both, or neither")
        return self


def prepare(settings: Settings, target: Target, req: InsertionRequest) -> dict:
    run, path = run_and_store(settings, target.run_id)
    params: dict[str, Any] = {"run_id": target.run_id, "phrase": req.phrase, "control": req.control,
                              "position": req.position, "n_texts": req.n_texts, "texts": req.texts,
                              "repeat": req.repeat, "run_version": run.version}
    if req.layer is not None:
        check_range([req.feature], store.layer_info(path, req.layer), req.layer, "feature")
        params.update(layer=req.layer, feature=req.feature)
    where = {"end": "at the end", "start": "at the start"}.get(req.position, f"before word {req.position}")
    params["described"] = (f"“{req.phrase[:60]}”{f' ×{req.repeat}' if req.repeat > 1 else ''} {where} of "
                           f"{req.n_texts} {'neutral ' if req.texts == 'neutral' else ''}held-out texts, "
                           f"against “{req.control[:30]}”")
    return params


def form_fields(form: Form) -> dict:
    return {"phrase": form.text("phrase"), "control": form.get("control", CONTROL_PHRASE),
            "position": form.get("position", "end").strip(), "n_texts": form.get("n_texts", 128),
            "texts": form.get("texts", "neutral"), "repeat": form.get("repeat", 1),
            "layer": form.get("layer"), "feature": form.get("feature")}


def result_number(job: dict) -> tuple[str, float] | None:
    effect = ((job.get("result") or {}).get("difference") or {}).get("difference")
    return None if effect is None else ("Δ beyond control", effect)


KIND = JobKind(
    name="insertion", title="Phrase insertion", request=InsertionRequest, prepare=prepare,
    task="workers.probes:insertion_task", api_path="/api/runs/{run_id}/insertions",
    api_doc="Queue an insertion: a phrase written into held-out texts, their score before and after, beside the same "
            "insertion of a neutral control word (paired difference with CI and p-value).",
    form_path="/runs/{run_id}/insertions", form_partial="_insertion_form.html", form_fields=form_fields,
    result_partial="_job_insertion.html", result_number=result_number)

"""ReasonScore of a typed vocabulary at one layer (AIRI's SAE-Reasoning): per feature its specificity
to the words over the corpus's tokens. The vocabulary is checked here; whether the tokenizer knows
its words the worker says (the job fails naming them)."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.core import store
from backend.core.exports.source import run_and_store
from backend.core.job_kinds.base import Form, Invalid, JobKind, Target
from backend.core.reference_words import MAX_VOCABULARY_WORDS, MAX_WORD_CHARS, ReferenceError, parse_vocabulary
from backend.core.settings import Settings

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


def prepare(settings: Settings, target: Target, req: ReasonScoreRequest) -> dict:
    run, path = run_and_store(settings, target.run_id)
    store.layer_info(path, target.layer)  # NotFound (404) for an unknown layer
    shown = ", ".join(req.words[:8]) + ("…" if len(req.words) > 8 else "")
    return {"run_id": target.run_id, "layer": target.layer, "words": req.words, "n_texts": req.n_texts,
            "alpha": req.alpha, "window": req.window, "run_version": run.version,
            "described": f"{len(req.words)} word{'s' if len(req.words) > 1 else ''} ({shown}) over "
                         f"{req.n_texts:,} texts"}


def form_fields(form: Form) -> dict:
    text = form.text("vocabulary")
    if len(text) > MAX_VOCABULARY_CHARS:
        raise Invalid(f"the vocabulary is {len(text):,} characters; at most {MAX_VOCABULARY_CHARS:,}", "vocabulary")
    try:
        words = parse_vocabulary(text)
    except ReferenceError as exc:
        raise Invalid(str(exc), "vocabulary") from None
    return {"words": words, "n_texts": form.get("n_texts", 2000)}


KIND = JobKind(
    name="reason_score", title="ReasonScore", request=ReasonScoreRequest, prepare=prepare,
    task="workers.analyses.reason_score:reason_score_task", api_path="/api/runs/{run_id}/layers/{layer}/reason-scores",
    api_doc="Queue ReasonScore for a vocabulary at one layer: per feature its specificity to the words over the "
            "corpus's tokens (AIRI's SAE-Reasoning); poll GET /api/jobs/{id} (the Location) for the top features.",
    form_path="/runs/{run_id}/layers/{layer}/reason-score", form_partial="_reason_form.html", form_fields=form_fields,
    result_partial="_job_reason_score.html")

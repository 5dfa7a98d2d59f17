"""Vocabulary probe of one layer: every whole-word token in neutral carrier sentences; per feature,
the tokens that activate it most."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from backend.core import store
from backend.core.exports.source import run_and_store
from backend.core.job_kinds.base import Form, JobKind, Target
from backend.core.probe_params import DEFAULT_CARRIERS, SLOT
from backend.core.settings import Settings

MAX_CARRIERS = 16


def _one_slot(carrier: str) -> str:
    if carrier.count(SLOT) != 1:
        raise ValueError(f"a carrier holds exactly one {SLOT} where the word goes; {carrier[:60]!r} has "
                         f"{carrier.count(SLOT)}")
    if not carrier.replace(SLOT, "").strip():
        raise ValueError("a carrier needs words around its {}")
    return carrier


Carrier = Annotated[str, Field(min_length=3, max_length=200), AfterValidator(_one_slot)]


class VocabProbeRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    vocabulary: Literal["all", "corpus"] = Field("all", description="every whole-word token of the tokenizer, or "
                                                 "only those occurring in the run's corpus")
    carriers: list[Carrier] | None = Field(None, min_length=1, max_length=MAX_CARRIERS,
                                           description=f"neutral sentences, each with one {SLOT} for the word "
                                           f"(default: {len(DEFAULT_CARRIERS)} bland ones)")


def prepare(settings: Settings, target: Target, req: VocabProbeRequest) -> dict:
    run, path = run_and_store(settings, target.run_id)
    store.layer_info(path, target.layer)  # NotFound (404) for an unknown layer
    carriers = req.carriers or list(DEFAULT_CARRIERS)
    return {"run_id": target.run_id, "layer": target.layer, "vocabulary": req.vocabulary, "carriers": carriers,
            "run_version": run.version,
            "described": f"{'whole' if req.vocabulary == 'all' else 'corpus'} vocabulary in {len(carriers)} carriers"}


def form_fields(form: Form) -> dict:
    carriers = [line.strip() for line in form.text("carriers").splitlines() if line.strip()]
    return {"vocabulary": form.get("vocabulary", "all"), "carriers": carriers or None}


KIND = JobKind(
    name="vocab_probe", title="Vocabulary probe", request=VocabProbeRequest, prepare=prepare,
    task="workers.probes:vocab_probe_task", api_path="/api/runs/{run_id}/layers/{layer}/vocab-probes",
    api_doc="Queue a vocabulary probe of one layer: every whole-word token in neutral carrier sentences, per feature "
            "the tokens that activate it most; poll GET /api/jobs/{id} (the Location) for the result.",
    form_path="/runs/{run_id}/layers/{layer}/vocab-probe", form_partial="_vocab_probe_form.html",
    form_fields=form_fields, result_partial="_job_vocab_probe.html")

"""Reward-hacking probes from the web: a layer's vocabulary probe, a phrase inserted into
held-out texts, a clamp or steer sweep; the forms on the feature page and their JSON twins.
Every request is validated here (a bad one is a 4xx and creates no job); the worker's
workers/probes.py measures. The feature page's probe section reads the finished jobs."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from backend.web import charts

from backend.core import db, store
from backend.web.access import current_author
from backend.core.models import Job
from backend.web.routes.common import SettingsDep, get_run, store_path, templates
from backend.web.routes.edge import ERROR_RESPONSES, MAX_ID, LayerId, StrictJSONRoute, invalid
from backend.web.routes.jobs import (MAX_EDIT_VALUE, _check_range, _created, _feature_ids, _form, _json_only, _parse,
                                 _submit, check_control_pool)
from backend.core.settings import Settings
from backend.core.probe_params import (CONTROL_PHRASE, DEFAULT_CARRIERS, POSITIONS, SLOT, TEXT_SELECTIONS,  # torch-free
                            default_sweep_values)

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)

MAX_CARRIERS = 16
MAX_PHRASE_CHARS = 200
MAX_INSERTION_TEXTS = 1024
MAX_REPEAT = 50
MAX_WORD_INDEX = 10_000
MAX_SWEEP_FEATURES = 64  # each one's card is read for the clamp range
MAX_SWEEP_VALUES = 25
MAX_SWEEP_TEXTS = 1024
RECENT_JOBS_SCANNED = 50  # newest probe jobs of a run looked through for a layer's or feature's own


def _one_slot(carrier: str) -> str:
    if carrier.count(SLOT) != 1:
        raise ValueError(f"a carrier holds exactly one {SLOT} where the word goes; {carrier[:60]!r} has "
                         f"{carrier.count(SLOT)}")
    if not carrier.replace(SLOT, "").strip():
        raise ValueError("a carrier needs words around its {}")
    return carrier


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("type a word or phrase")
    return text.strip()


Carrier = Annotated[str, Field(min_length=3, max_length=200), AfterValidator(_one_slot)]
Phrase = Annotated[str, Field(min_length=1, max_length=MAX_PHRASE_CHARS), AfterValidator(_not_blank)]


class VocabProbeRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    vocabulary: Literal["all", "corpus"] = Field("all", description="every whole-word token of the tokenizer, or "
                                                 "only those occurring in the run's corpus")
    carriers: list[Carrier] | None = Field(None, min_length=1, max_length=MAX_CARRIERS,
                                           description=f"neutral sentences, each with one {SLOT} for the word "
                                           f"(default: {len(DEFAULT_CARRIERS)} bland ones)")


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


EditValue = Annotated[float, Field(ge=-MAX_EDIT_VALUE, le=MAX_EDIT_VALUE)]


class SweepRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    features: list[Annotated[int, Field(ge=0, le=MAX_ID)]] = Field(min_length=1, max_length=MAX_SWEEP_FEATURES)
    mode: Literal["clamp", "steer"]
    values: list[EditValue] | None = Field(None, min_length=1, max_length=MAX_SWEEP_VALUES, description=(
        "clamp activations or steering multiples (default: steer -8..8; clamp 0 to 4x the features' largest "
        "activation)"))
    n_texts: int = Field(128, ge=1, le=MAX_SWEEP_TEXTS, description="held-out texts to evaluate on")
    n_controls: int = Field(3, ge=3, le=10, description="frequency-matched random draws (at least 3)")
    tokens: Literal["text", "all"] = Field("text", description="edit the text's own tokens, or every token")

    @field_validator("values")
    @classmethod
    def _finite(cls, values):
        if values is not None and not all(math.isfinite(v) for v in values):
            raise ValueError("values must be finite numbers")
        return values


# --- submit ----------------------------------------------------------------------------------

def _layer(settings: Settings, run_id: str, layer: int):
    """The run's registry row, its store and the layer's row (404 for an unknown run or layer)."""
    run = get_run(settings, run_id)
    path = store_path(settings, run)
    return run, path, store.layer_info(path, layer)


def submit_vocab_probe(settings: Settings, run_id: str, layer: int, req: VocabProbeRequest, author: str) -> dict:
    run, _, _ = _layer(settings, run_id, layer)
    carriers = req.carriers or list(DEFAULT_CARRIERS)
    params = {"run_id": run_id, "layer": layer, "vocabulary": req.vocabulary, "carriers": carriers,
              "run_version": run.version,
              "described": f"{'whole' if req.vocabulary == 'all' else 'corpus'} vocabulary in {len(carriers)} carriers"}
    return _submit(settings, "vocab_probe", params, author, run_id)


def submit_insertion(settings: Settings, run_id: str, req: InsertionRequest, author: str) -> dict:
    run = get_run(settings, run_id)
    params: dict[str, Any] = {"run_id": run_id, "phrase": req.phrase, "control": req.control,
                              "position": req.position, "n_texts": req.n_texts, "texts": req.texts,
                              "repeat": req.repeat, "run_version": run.version}
    if req.layer is not None:
        _, _, info = _layer(settings, run_id, req.layer)
        _check_range([req.feature], info, req.layer, "feature")
        params.update(layer=req.layer, feature=req.feature)
    where = {"end": "at the end", "start": "at the start"}.get(req.position, f"before word {req.position}")
    params["described"] = (f"“{req.phrase[:60]}”{f' ×{req.repeat}' if req.repeat > 1 else ''} {where} of "
                           f"{req.n_texts} {'neutral ' if req.texts == 'neutral' else ''}held-out texts, "
                           f"against “{req.control[:30]}”")
    return _submit(settings, "insertion", params, author, run_id)


def submit_sweep(settings: Settings, run_id: str, layer: int, req: SweepRequest, author: str) -> dict:
    run, path, info = _layer(settings, run_id, layer)
    features = list(dict.fromkeys(req.features))
    _check_range(features, info, layer, "features")
    check_control_pool(len(features), info["d_sae"], "features")  # every sweep value has its controls
    if req.values:
        values = sorted(set(req.values))
    else:
        largest = max((store.feature(path, layer, f).get("max_activation") or 0.0 for f in features), default=0.0)
        values = default_sweep_values(req.mode, largest)
    params = {"run_id": run_id, "layer": layer, "features": features, "mode": req.mode, "values": values,
              "n_texts": req.n_texts, "n_controls": req.n_controls, "tokens": req.tokens, "run_version": run.version,
              "described": f"feature{'s' if len(features) > 1 else ''} {', '.join(map(str, features[:10]))}"
                           f"{'…' if len(features) > 10 else ''} at {len(values)} values"}
    return _submit(settings, "sweep", params, author, run_id)


# --- forms -----------------------------------------------------------------------------------

def _blank_none(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


@router.post("/runs/{run_id}/layers/{layer}/vocab-probe", include_in_schema=False)
async def vocab_probe_form(request: Request, run_id: str, layer: LayerId, settings: SettingsDep):
    form = await _form(request)
    carriers = [line.strip() for line in (form.get("carriers") or "").splitlines() if line.strip()]
    data = {"vocabulary": form.get("vocabulary") or "all", "carriers": carriers or None}
    job = submit_vocab_probe(settings, run_id, layer, _parse(VocabProbeRequest, data), current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


@router.post("/runs/{run_id}/insertions", include_in_schema=False)
async def insertion_form(request: Request, run_id: str, settings: SettingsDep):
    form = await _form(request)
    data = {"phrase": form.get("phrase") or "", "control": _blank_none(form.get("control")) or CONTROL_PHRASE,
            "position": (form.get("position") or "end").strip(), "n_texts": form.get("n_texts") or 128,
            "texts": form.get("texts") or "neutral", "repeat": form.get("repeat") or 1,
            "layer": _blank_none(form.get("layer")), "feature": _blank_none(form.get("feature"))}
    job = submit_insertion(settings, run_id, _parse(InsertionRequest, data), current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


@router.post("/runs/{run_id}/layers/{layer}/sweep", include_in_schema=False)
async def sweep_form(request: Request, run_id: str, layer: LayerId, settings: SettingsDep):
    form = await _form(request)
    values = (form.get("values") or "").replace(",", " ").split()
    data = {"features": _feature_ids(form["_all"].getlist("features"), "features", MAX_SWEEP_FEATURES),
            "mode": form.get("mode") or "", "values": values or None, "n_texts": form.get("n_texts") or 128,
            "n_controls": form.get("n_controls") or 3, "tokens": form.get("tokens") or "text"}
    if not data["features"]:
        raise invalid("name at least one feature to sweep", "features")
    job = submit_sweep(settings, run_id, layer, _parse(SweepRequest, data), current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


# --- JSON API --------------------------------------------------------------------------------

@router.post("/api/runs/{run_id}/layers/{layer}/vocab-probes", status_code=201, tags=["jobs"])
def api_vocab_probe(request: Request, response: Response, run_id: str, layer: LayerId, body: VocabProbeRequest,
                    settings: SettingsDep) -> dict:
    """Queue a vocabulary probe of one layer: every whole-word token in neutral carrier sentences, per
    feature the tokens that activate it most; poll GET /api/jobs/{id} (the Location) for the result."""
    _json_only(request)
    return _created(response, submit_vocab_probe(settings, run_id, layer, body, current_author(request)))


@router.post("/api/runs/{run_id}/insertions", status_code=201, tags=["jobs"])
def api_insertion(request: Request, response: Response, run_id: str, body: InsertionRequest,
                  settings: SettingsDep) -> dict:
    """Queue an insertion: a phrase written into held-out texts, their score before and after, beside the
    same insertion of a neutral control word (paired difference with CI and p-value)."""
    _json_only(request)
    return _created(response, submit_insertion(settings, run_id, body, current_author(request)))


@router.post("/api/runs/{run_id}/layers/{layer}/sweeps", status_code=201, tags=["jobs"])
def api_sweep(request: Request, response: Response, run_id: str, layer: LayerId, body: SweepRequest,
              settings: SettingsDep) -> dict:
    """Queue a dose-response sweep: features clamped or steered at several values, each beside
    frequency-matched random features given the same edit."""
    _json_only(request)
    return _created(response, submit_sweep(settings, run_id, layer, body, current_author(request)))


# --- the feature page's probe section ----------------------------------------------------------

VOCAB_RESULTS_KEPT = 4  # finished vocab probes whose per-feature tokens each process keeps parsed
_vocab_results: OrderedDict = OrderedDict()


def _newest(settings: Settings, kinds: tuple[str, ...], run_id: str, statuses: tuple[str, ...]) -> list[tuple]:
    """(id, kind, status, params, finished_at) of the run's newest probe jobs, results not read."""
    with db.session(settings) as s:
        rows = s.execute(sa.select(Job.id, Job.kind, Job.status, Job.params, Job.finished_at)
                         .where(Job.kind.in_(kinds), Job.run_id == run_id, Job.status.in_(statuses))
                         .order_by(Job.id.desc()).limit(RECENT_JOBS_SCANNED))
        return [tuple(r) for r in rows]


def _result(settings: Settings, job_id: int) -> dict:
    with db.session(settings) as s:
        return s.scalar(sa.select(Job.result).where(Job.id == job_id)) or {}


def _vocab_features(settings: Settings, job_id: int, finished_at) -> dict:
    """A finished vocab probe's result (it never changes once done), parsed once per process."""
    key = (settings.database_url, str(settings.data_dir), job_id, finished_at)
    if key in _vocab_results:
        _vocab_results.move_to_end(key)
    else:
        _vocab_results[key] = _result(settings, job_id)
        while len(_vocab_results) > VOCAB_RESULTS_KEPT:
            _vocab_results.popitem(last=False)
    return _vocab_results[key]


def _typed(token: str | None) -> str:
    """A stored top token as one would type it (no "##", "Ġ" or "▁" marks)."""
    return (token or "").removeprefix("##").lstrip("\u0120\u2581")


def feature_probes(request: Request, run_id: str, layer: int, feature: int, top_token: str | None,
                   run_version: int | None) -> dict:
    """What the feature page shows of the probes: the layer's latest vocab probe on this run version
    (its tokens for this feature), whether one is queued, the phrase to prefill, and the latest
    insertions and sweeps naming this feature."""
    settings = request.app.state.settings
    probes = [j for j in _newest(settings, ("vocab_probe",), run_id, ("done", "queued", "running"))
              if j[3].get("layer") == layer]
    done = [j for j in probes if j[2] == "done"]
    current = next((j for j in done if j[3].get("run_version") == run_version), None)
    out: dict[str, Any] = {"vocab": None, "pending": next((j[0] for j in probes if j[2] != "done"), None),
                           "stale": None if current or not done else done[0][0]}
    if current:
        result = _vocab_features(settings, current[0], current[4])
        row = (result.get("features") or {}).get(str(feature)) or {"tokens": [], "mean": [], "fired": []}
        out["vocab"] = {"job_id": current[0], "n_carriers": result.get("n_carriers"),
                        "n_candidates": result.get("n_candidates"), "vocabulary": result.get("vocabulary"),
                        "tokens": [{"token": t, "mean": m, "fired": n}
                                   for t, m, n in zip(row["tokens"], row["mean"], row["fired"])]}
    out["phrase"] = (out["vocab"] and out["vocab"]["tokens"] and out["vocab"]["tokens"][0]["token"]) or _typed(top_token)
    out["recent"] = [{"id": j[0], "kind": j[1], "status": j[2], "described": j[3].get("described"),
                      "mode": j[3].get("mode")}
                     for j in _newest(settings, ("insertion", "sweep"), run_id, ("queued", "running", "done", "failed"))
                     if j[3].get("layer") == layer and (j[3].get("feature") == feature
                                                        or feature in (j[3].get("features") or []))][:5]
    return out


# The probe section of the feature page and the sweep's chart on its job page (job.html includes
# _job_sweep.html) read these; registered here, beside the routes that own them.
templates.env.globals.update(reward_hacking_probes=feature_probes, dose_response=charts.dose_response,
                             control_phrase=CONTROL_PHRASE)

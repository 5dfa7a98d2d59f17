"""Dose-response sweep: features clamped or steered at several values, each beside
frequency-matched random features given the same edit."""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.core import store
from backend.core.exports.source import run_and_store
from backend.core.job_kinds.ablation import MAX_EDIT_VALUE
from backend.core.job_kinds.base import (MAX_ID, Form, Invalid, JobKind, Target, check_control_pool, check_range,
                                         feature_ids, listed)
from backend.core.probe_params import default_sweep_values
from backend.core.settings import Settings

MAX_SWEEP_FEATURES = 64  # each one's card is read for the clamp range
MAX_SWEEP_VALUES = 25
MAX_SWEEP_TEXTS = 1024
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


def prepare(settings: Settings, target: Target, req: SweepRequest) -> dict:
    run, path = run_and_store(settings, target.run_id)
    layer = target.layer
    info = store.layer_info(path, layer)
    features = list(dict.fromkeys(req.features))
    check_range(features, info, layer, "features")
    check_control_pool(len(features), info["d_sae"], "features")  # every sweep value has its controls
    if req.values:
        values = sorted(set(req.values))
    else:
        largest = max((store.feature(path, layer, f).get("max_activation") or 0.0 for f in features), default=0.0)
        values = default_sweep_values(req.mode, largest)
    return {"run_id": target.run_id, "layer": layer, "features": features, "mode": req.mode, "values": values,
            "n_texts": req.n_texts, "n_controls": req.n_controls, "tokens": req.tokens, "run_version": run.version,
            "described": f"feature{'s' if len(features) > 1 else ''} {listed(features, 10)} at {len(values)} values"}


def form_fields(form: Form) -> dict:
    features = feature_ids(form.getlist("features"), "features", MAX_SWEEP_FEATURES)
    if not features:
        raise Invalid("name at least one feature to sweep", "features")
    return {"features": features, "mode": form.get("mode", ""), "values": form.text("values").replace(",", " ").split()
            or None, "n_texts": form.get("n_texts", 128), "n_controls": form.get("n_controls", 3),
            "tokens": form.get("tokens", "text")}


KIND = JobKind(
    name="sweep", title="Steering sweep", request=SweepRequest, prepare=prepare, task="workers.probes:sweep_task",
    api_path="/api/runs/{run_id}/layers/{layer}/sweeps",
    api_doc="Queue a dose-response sweep: features clamped or steered at several values, each beside "
            "frequency-matched random features given the same edit.",
    form_path="/runs/{run_id}/layers/{layer}/sweep", form_partial="_sweep_form.html", form_fields=form_fields,
    result_partial="_job_sweep.html")

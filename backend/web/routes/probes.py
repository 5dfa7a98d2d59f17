"""The feature page's reward-hacking probe section: the layer's latest vocabulary probe (this feature's
tokens), and the latest phrase insertions and sweeps naming the feature. The probes themselves are
job kinds (backend/core/job_kinds/: vocab_probe, insertion, sweep)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import sqlalchemy as sa
from fastapi import Request

from backend.core import db
from backend.core.models import Job
from backend.core.probe_params import CONTROL_PHRASE
from backend.core.settings import Settings
from backend.web import charts
from backend.web.routes.common import templates

RECENT_JOBS_SCANNED = 50  # newest probe jobs of a run looked through for a layer's or feature's own


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


# The sweep's chart on its job page (_job_sweep.html) and the insertion form's default control word
templates.env.globals.update(dose_response=charts.dose_response,
                             control_phrase=CONTROL_PHRASE)

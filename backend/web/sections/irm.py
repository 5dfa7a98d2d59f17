"""The implicit-reward-model ablation table (Marks et al., Table 5): per layer, every feature
labelled reward-related zeroed together on held-out texts, the reward before and after beside
frequency-matched random controls. Each row is the layer's newest such ablation job; a layer
whose labels changed since is marked, and the run page re-queues them all in one click."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backend.core import jobs, labels, store
from backend.core.settings import Settings

SELECTION = "labelled_reward"  # backend/web/routes/jobs.py SELECTIONS: every feature labelled reward-related


def reward_labelled(settings: Settings, run_id: str, layer: int, width: int | None = None) -> list[int]:
    """The layer's features labelled reward-related; with `width`, only those the layer still has."""
    return sorted(f for f, row in labels.labels_for_layer(settings, run_id, layer).items()
                  if row["label"] == "reward" and (width is None or f < width))


def irm_section(settings: Settings, run: sa.Row, path: Path) -> dict[str, Any]:
    found = jobs.of_run(settings, "ablation", run.id, lambda p: p.get("selection") == SELECTION)
    rows = []
    for info in store.layers(path):
        layer = info["layer"]
        labelled = reward_labelled(settings, run.id, layer, info["d_sae"])
        newest = next((j for j in found if j["params"]["layer"] == layer), None)
        rows.append({"layer": layer, "n_labelled": len(labelled), **_row(newest, labelled)})
    return {"selection": SELECTION, "layers": rows}


def _row(job: dict | None, labelled: list[int]) -> dict[str, Any]:
    if job is None:
        return {"job_id": None, "status": None}
    out: dict[str, Any] = {"job_id": job["id"], "status": job["status"], "error": job["error"],
                           "features": job["params"]["features"],
                           # the labels changed after this job ran: its row is not today's set
                           "labels_changed": sorted(job["params"]["features"]) != labelled}
    result = job["result"]
    if job["status"] == "done" and result:
        examples = result["examples"]
        s, c = result["summary"], result["control"]
        out.update({"n_texts": len(examples), "before": _mean([e["before"] for e in examples]),
                    "after": _mean([e["after"] for e in examples]), "mean_delta": s["mean_delta"],
                    "ci_low": s["ci_low"], "ci_high": s["ci_high"], "control_delta": c.get("mean_delta"),
                    "difference": c.get("test", {}).get("difference"), "p_value": c.get("test", {}).get("p_value"),
                    "verdict": c.get("verdict") or "too_few_controls", "n_draws": c.get("n_draws")})
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None

"""What the jobs list says of each job in one line: its kind in words, what it was asked, its
result as one number, how long it took, and how long it has left."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from backend.core.job_kinds import KINDS

SNIPPET_CHARS = 60


def human_name(kind: str) -> str:
    """The kind's title (a kind no longer declared: its name in words)."""
    return KINDS[kind].title if kind in KINDS else kind.replace("_", " ").capitalize()


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return f"“{text[:SNIPPET_CHARS]}…”" if len(text) > SNIPPET_CHARS else f"“{text}”"


def asked(job: dict) -> str:
    """What the job was asked, in words, from the params every kind shares: its layer, what its
    checks described it as (with the edit's mode), and any typed text."""
    p = job["params"] or {}
    parts = []
    if p.get("layer") is not None:
        parts.append(f"layer {p['layer']}")
    if p.get("described"):
        parts.append(f"{p['mode']} {p['described']}" if p.get("mode") else p["described"])
    if p.get("text"):
        parts.append(_snippet(p["text"]))
    elif p.get("text_id") is not None:
        parts.append(f"text #{p['text_id']}")
    if p.get("text_b"):
        parts.append("vs " + _snippet(p["text_b"]))
    return " · ".join(parts)


def result_number(job: dict) -> tuple[str, float] | None:
    """The one number a finished job's result comes to, with what it is (its kind says); None when it has none."""
    kind = KINDS.get(job["kind"])
    return kind.result_number(job) if kind and kind.result_number else None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def duration_s(job: dict, now: datetime | None = None) -> float | None:
    """Seconds from start to finish (to now while running); None before it starts."""
    if not job.get("started_at"):
        return None
    end = job.get("finished_at") or now or datetime.now(timezone.utc)
    return max((_aware(end) - _aware(job["started_at"])).total_seconds(), 0.0)


def eta_s(job: dict, now: datetime | None = None) -> float | None:
    """A running job's seconds left at its pace so far; None until it has made some progress."""
    elapsed = duration_s(job, now)
    progress = job.get("progress") or 0.0
    if job["status"] != "running" or elapsed is None or not 0.01 <= progress < 1:
        return None
    return elapsed * (1 - progress) / progress


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def summary(job: dict) -> dict[str, Any]:
    """Everything the jobs list shows of `job` beyond its status."""
    left = eta_s(job)
    return {"name": human_name(job["kind"]), "asked": asked(job), "result": result_number(job),
            "duration": fmt_seconds(duration_s(job)), "eta": fmt_seconds(left) if left is not None else None,
            "percent": round(100 * (job.get("progress") or 0.0))}

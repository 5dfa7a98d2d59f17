"""Every job kind, one module each in this package (base.py says what a kind declares). A module
here with a `KIND` is a kind: the API and form routes, the job page, the jobs list and the worker
find it through KINDS, and tests/test_job_kinds.py checks that none lacks a part."""
from __future__ import annotations

import importlib
import pkgutil

from backend.core.job_kinds.base import Form, Invalid, JobKind, Target

# the order the jobs list's filters and the API's docs list them in
ORDER = ("pipeline", "ablation", "inference", "text_diff", "vocab_probe", "insertion", "sweep", "reason_score",
         "saedashboard", "explanations")


def _discover() -> dict[str, JobKind]:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        kind = getattr(importlib.import_module(f"{__name__}.{module.name}"), "KIND", None)
        if isinstance(kind, JobKind):
            found[kind.name] = kind
    return {name: found[name] for name in sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))}


KINDS: dict[str, JobKind] = _discover()
JOB_KINDS = tuple(KINDS)

__all__ = ["Form", "Invalid", "JobKind", "KINDS", "JOB_KINDS", "Target"]

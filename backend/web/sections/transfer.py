"""Base-model transfer and parameter divergence (workers/analyses/transfer.py, workers/divergence.py):
per layer, the RM's score predicted from the base model's SAE features (held-out R²) beside the
RM's own layer, and how many RM features have a close base feature; per block, how far the RM's
weights moved from the base model's, the run's layers marked. None: the run has no base model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backend.core import store
from backend.core.settings import Settings


def transfer_section(settings: Settings, run: sa.Row, path: Path) -> dict[str, Any] | None:
    rows = store.table_rows(path, "transfer_layers")
    if not rows:
        return None
    return {"base_model": store.run_info(path).get("transfer_base_model"), "layers": rows}


def divergence_section(settings: Settings, run: sa.Row, path: Path) -> dict[str, Any] | None:
    rows = store.table_rows(path, "divergence")
    if not rows:
        return None
    info = store.run_info(path)
    compared, skipped = info.get("divergence_tensors_compared"), info.get("divergence_tensors_skipped")
    return {"base_model": info.get("transfer_base_model"), "blocks": rows,
            "chosen": [row["block"] for row in rows if row["chosen"]],
            "tensors_compared": None if compared is None else int(compared),
            "tensors_skipped": None if skipped is None else int(skipped)}

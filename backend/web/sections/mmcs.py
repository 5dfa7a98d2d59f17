"""Paired dictionaries (workers/analyses/pairs.py, sae.widths): per layer, the Mean Max Cosine
Similarity between the run's SAE and its paired SAE of the other width, both ways (Marks et
al., eq. 2), and how many of the run SAE's features are present in both dictionaries (max cosine
in the pair at least each threshold). None: the run trained no pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backend.core import store
from backend.core.settings import Settings

THRESHOLDS = (0.5, 0.7, 0.9)  # "present in both (max cosine >= t)": the counts the section lists
PRESENT = 0.9  # the threshold the run page links the layer table's filter with

def mmcs_section(settings: Settings, run: sa.Row, path: Path) -> dict[str, Any] | None:
    paired = [layer for layer in store.layers(path) if layer["pair_width"] is not None]
    if not paired:
        return None
    counts = store.present_in_both(path, THRESHOLDS)
    rows = [{"layer": l["layer"], "d_sae": l["d_sae"], "pair_width": l["pair_width"], "pair_sae_path": l["pair_sae_path"],
             "mmcs_to_pair": l["mmcs_to_pair"], "mmcs_from_pair": l["mmcs_from_pair"],
             "present_in_both": [{"min_cosine": t, "n_features": counts.get(l["layer"], {}).get(t, 0)}
                                 for t in THRESHOLDS]}
            for l in paired]
    return {"thresholds": list(THRESHOLDS), "present_threshold": PRESENT, "layers": rows}

"""Preference pairs on the run page (workers/analyses/preference.py): the RM's pairwise accuracy on
held-out pairs, and per layer the accuracy with its SAE spliced in and the surrogate reward model's
(the layer's SAE features + a Bradley–Terry linear map). None where the dataset is not pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backend.core import preference
from backend.core.settings import Settings


def preference_section(settings: Settings, run: sa.Row, path: Path) -> dict[str, Any] | None:
    return preference.summary(path)

"""`rewardatlas demo`: build the demo reward model and the demo run if they are absent."""
from __future__ import annotations

from pathlib import Path

from backend.settings import Settings
from workers.config import load_config

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def ensure_demo(settings: Settings) -> None:
    from workers.pipeline import resolve_model_path, run_exists, run_pipeline
    from backend.db import upgrade

    config = load_config(DEMO_CONFIG)
    upgrade(settings)
    resolve_model_path(config, settings)
    if run_exists(settings, config.run_id):
        print(f"demo run {config.run_id!r} is already built")
        return
    run_pipeline(config, settings)

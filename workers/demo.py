"""`rewardatlas demo`: build the demo reward model and the demo run if they are absent.

When both exist this returns in well under a second: nothing heavy (torch, SAELens) is
imported unless there is work to do."""
from __future__ import annotations

from pathlib import Path

from backend.settings import Settings
from workers.config import DEMO_MODEL_DIRNAME, load_config

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def ensure_demo(settings: Settings) -> None:
    from backend.db import run_exists, upgrade

    config = load_config(DEMO_CONFIG)
    upgrade(settings)
    if (settings.models_dir / DEMO_MODEL_DIRNAME).is_dir() and run_exists(settings, config.run_id):
        print(f"demo run {config.run_id!r} is already built")
        return
    from workers.pipeline import resolve_model_path, run_pipeline

    resolve_model_path(config, settings)
    if not run_exists(settings, config.run_id):
        run_pipeline(config, settings)

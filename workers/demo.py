"""`rewardatlas demo`: build the demo reward model and the demo run if they are absent.

When both exist this returns in well under a second: nothing heavy (torch, SAELens) is
imported unless there is work to do."""
from __future__ import annotations

from pathlib import Path

from backend.core import db, store
from backend.core.models import Run
from backend.core.run_config import DEMO_LLAMA_DIRNAME, DEMO_MODEL_DIRNAME, load_config
from backend.core.settings import Settings

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
DEMO_LLAMA_CONFIG = Path(__file__).parent / "configs" / "demo-llama.yaml"  # `rewardatlas demo --llama`


def _store_is_current(settings: Settings, run_id: str) -> bool:
    """The run's feature store exists and has this version's schema."""
    with db.session(settings) as s:
        path = settings.data_dir / s.get(Run, run_id).store_path  # an absolute store_path stays as it is
    try:
        store.run_info(path)
        return True
    except (store.NotFound, store.StoreOutdated):
        return False


def ensure_demo(settings: Settings, llama: bool = False) -> None:
    """The MiniLM demo, or with `llama` the LLaMA-family demo (workers/demo_llama.py)."""
    config = load_config(DEMO_LLAMA_CONFIG if llama else DEMO_CONFIG)
    model_dirname = DEMO_LLAMA_DIRNAME if llama else DEMO_MODEL_DIRNAME
    db.upgrade(settings)
    registered = db.run_exists(settings, config.run_id)
    current = registered and _store_is_current(settings, config.run_id)
    if (settings.models_dir / model_dirname).is_dir() and current:
        print(f"demo run {config.run_id!r} is already built")
        return
    from workers.pipeline import resolve_model_path, run_pipeline  # lazy: torch and SAELens only when there is work

    resolve_model_path(config, settings)
    if not current:
        if registered:
            print(f"demo run {config.run_id!r} was built by an older version: rebuilding it")
        run_pipeline(config, settings, replace=registered)

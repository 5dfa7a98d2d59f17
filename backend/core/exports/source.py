"""What every export starts from: the run's registry row, its store, one layer's metrics, the
features asked for (checked against the layer's width) and, where an export needs it, the SAE on
disk. Bulk reads go through a private read-only connection, closed when the export ends."""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import duckdb
import sqlalchemy as sa

from backend.core import db, store
from backend.core.exports import ExportError
from backend.core.settings import Settings
from backend.core.store import NotFound

SAE_CONFIG_FILENAME = "cfg.json"  # SAELens's config beside sae_weights.safetensors


@dataclass(frozen=True)
class LayerSource:
    run: sa.Row
    store_path: Path
    run_dir: Path
    info: dict[str, Any]  # the layer's row of the store's `layers` table

    @property
    def run_id(self) -> str:
        return self.run.id

    @property
    def layer(self) -> int:
        return int(self.info["layer"])

    @property
    def sae_dir(self) -> Path:
        return self.run_dir / self.info["sae_path"]


def run_and_store(settings: Settings, run_id: str) -> tuple[sa.Row, Path]:
    """The run's registry row and its store's path; NotFound for an unknown run."""
    run = db.find_run(settings, run_id)
    if run is None:
        raise NotFound(f"run {run_id!r} not found")
    path = Path(run.store_path)
    return run, path if path.is_absolute() else settings.data_dir / path


def open_layer(settings: Settings, run_id: str, layer: int) -> LayerSource:
    """NotFound for an unknown run or a layer the run's store lacks."""
    run, path = run_and_store(settings, run_id)
    try:
        info = store.layer_info(path, layer)
    except NotFound as exc:
        raise NotFound(f"run {run_id!r}: {exc}") from None
    return LayerSource(run, path, path.parent, info)


def chosen_features(source: LayerSource, features: Iterable[int] | None) -> list[int] | None:
    """The features asked for, each once, in the order given; None: the whole layer. A feature the
    layer's SAE does not have is refused (404), naming it and the layer's range."""
    if features is None:
        return None
    chosen = list(dict.fromkeys(int(f) for f in features))
    width = int(source.info["d_sae"])
    missing = [f for f in chosen if not 0 <= f < width]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
        raise ExportError(f"run {source.run_id!r}: layer {source.layer} has no feature {shown} (its SAE has "
                          f"{width} features, 0..{width - 1})", status=404)
    if not chosen:
        raise ExportError("no features chosen: name at least one, or none to export the whole layer")
    return chosen


def require_sae(source: LayerSource) -> Path:
    """The layer's SAELens directory; 409 when it is not on disk (the run's files were moved or
    pruned), naming where it was looked for."""
    config = source.sae_dir / SAE_CONFIG_FILENAME
    if not config.is_file():
        raise ExportError(f"run {source.run_id!r}: layer {source.layer} has no SAE on disk ({config} is missing); "
                          "re-run its pipeline or restore the run directory", status=409)
    return source.sae_dir


@contextmanager
def reading(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A private read-only connection to the store (its schema version checked first), closed after."""
    store.run_info(path)  # NotFound / StoreOutdated, as the pages say them
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        attach = os.path.abspath(path).replace("'", "''")
        con.execute(f"ATTACH '{attach}' AS s (READ_ONLY)")
        con.execute("USE s")
        yield con
    finally:
        con.close()


def safe_name(text: str, fallback: str = "export") -> str:
    """`text` as a file or id part: lower case letters, digits, dashes and underscores."""
    name = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")
    return name or fallback

"""Read-only queries on one run's DuckDB feature store (schema: backend/store_schema.py).

Every function takes the store's path. Connections are cached per file and re-opened when
the file is replaced (the pipeline renames a new store into place), detected by inode,
mtime and size. Each call works on its own cursor, so threads never share one.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from backend.store_schema import STORE_VERSION

# Sort keys of the feature table -> ORDER BY. Ties break on feature id so pages are stable.
SORTS = {
    "weight": "weight DESC NULLS LAST",  # most positive: pushes the reward up
    "-weight": "weight ASC NULLS LAST",  # most negative: pushes the reward down
    "abs_weight": "abs(weight) DESC NULLS LAST",
    "frequency": "frequency DESC NULLS LAST",
    "max_activation": "max_activation DESC NULLS LAST",
}

LAYER_COLUMNS = (
    "layer, hook_name, sae_path, architecture, d_in, d_sae, k, mse, explained_variance, l0, "
    "dead_fraction, pooling, r2_train, r2_heldout, r2_cv, ridge_alpha, regression_method, cv_folds, "
    "probe_r2_train, probe_r2_heldout, probe_alpha, n_train, n_heldout, reward_recovered, "
    "reward_mae_sae, reward_mae_zero"
)
FEATURE_COLUMNS = "feature, weight, std_weight, weight_se, frequency, mean_activation, max_activation, top_token"


class NotFound(LookupError):
    """An unknown run, layer, feature or page; the web layer answers 404 with this message."""


class StoreOutdated(Exception):
    """A store written with another schema version; the web layer answers 409 with this message."""


@dataclass
class FeaturePage:
    rows: list[dict[str, Any]]
    total: int  # features in the layer, over all pages


_lock = threading.Lock()
_connections: dict[str, tuple[tuple[int, int, int], duckdb.DuckDBPyConnection]] = {}


def _cursor(path: Path) -> duckdb.DuckDBPyConnection:
    key = str(Path(path).resolve())
    try:
        st = os.stat(key)
    except FileNotFoundError:
        raise NotFound(f"feature store {path} does not exist") from None
    signature = (st.st_ino, st.st_mtime_ns, st.st_size)
    with _lock:
        cached = _connections.get(key)
        if cached is None or cached[0] != signature:
            # duckdb.connect(path) shares one database instance per path within a process,
            # so after a rename it would keep serving the old file. A private in-memory
            # instance with the file ATTACHed read-only always opens the current file; the
            # old connection is dropped, not closed, so in-flight cursors finish normally.
            con = duckdb.connect(":memory:")
            con.execute(f"ATTACH '{key.replace(chr(39), chr(39) * 2)}' AS store (READ_ONLY)")
            found = con.execute("SELECT value FROM store.run_info WHERE key = 'store_version'").fetchone()
            if found is None or found[0] != str(STORE_VERSION):
                con.close()
                raise StoreOutdated(
                    f"feature store {path} has schema version {found[0] if found else 'unknown'}, this server "
                    f"reads version {STORE_VERSION}: re-run its pipeline (rewardatlas run CONFIG --replace)")
            _connections[key] = (signature, con)
        cur = _connections[key][1].cursor()
    cur.execute("USE store")
    return cur


def _rows(path: Path, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    with _cursor(path) as cur:
        cur.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def run_info(path: Path) -> dict[str, str]:
    """The run_info key/value table (run_id, name, model, store_version, ...)."""
    return {r["key"]: r["value"] for r in _rows(path, "SELECT key, value FROM run_info")}


def texts_count(path: Path) -> int:
    return _rows(path, "SELECT count(*) AS n FROM texts")[0]["n"]


def layers(path: Path) -> list[dict[str, Any]]:
    """Every layer's SAE and regression metrics, by layer."""
    return _rows(path, f"SELECT {LAYER_COLUMNS} FROM layers ORDER BY layer")


def layer_info(path: Path, layer: int) -> dict[str, Any]:
    rows = _rows(path, f"SELECT {LAYER_COLUMNS} FROM layers WHERE layer = ?", [layer])
    if not rows:
        raise NotFound(f"layer {layer} not found")
    return rows[0]


def max_abs_weight(path: Path, layer: int) -> float:
    """The layer's largest |weight|: the scale for weight colours, the same on every page."""
    rows = _rows(path, "SELECT max(abs(weight)) AS m FROM features WHERE layer = ?", [layer])
    return rows[0]["m"] or 0.0


def features(
    path: Path, layer: int, sort: str = "weight", limit: int = 50, offset: int = 0
) -> FeaturePage:
    """One page of a layer's feature table, ordered by `sort` (a key of SORTS)."""
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}; expected one of {', '.join(SORTS)}")
    layer_info(path, layer)  # NotFound for an unknown layer
    rows = _rows(
        path,
        f"SELECT {FEATURE_COLUMNS} FROM features WHERE layer = ? "
        f"ORDER BY {SORTS[sort]}, feature LIMIT ? OFFSET ?",
        [layer, limit, offset],
    )
    total = _rows(path, "SELECT count(*) AS n FROM features WHERE layer = ?", [layer])[0]["n"]
    return FeaturePage(rows=rows, total=total)


def feature(path: Path, layer: int, feature: int) -> dict[str, Any]:
    """One feature: stats, weight and its rank, histogram, correlation with the reward, reward
    effect, top tokens, top contexts and per-activation-bin samples (with their texts' reward
    and score)."""
    rows = _rows(
        path,
        f"""SELECT {FEATURE_COLUMNS}, hist_edges, hist_counts, reward_correlation, reward_effect, top_tokens,
               (SELECT 1 + count(*) FROM features g WHERE g.layer = f.layer
                   AND abs(g.weight) > abs(f.weight)) AS abs_weight_rank,
               (SELECT count(*) FROM features g WHERE g.layer = f.layer) AS n_features
            FROM features f WHERE layer = ? AND feature = ?""",
        [layer, feature],
    )
    if not rows:
        layer_info(path, layer)  # an unknown layer says so, rather than "feature not found"
        raise NotFound(f"feature {feature} not found in layer {layer}")
    out = rows[0]
    out["hist_edges"] = list(out["hist_edges"] or [])
    out["hist_counts"] = list(out["hist_counts"] or [])
    out["top_tokens"] = list(out["top_tokens"] or [])
    out["contexts"] = _contexts(path, layer, feature, "top")
    out["quantile_contexts"] = _contexts(path, layer, feature, "quantile")
    return out


def _contexts(path: Path, layer: int, feature: int, kind: str) -> list[dict[str, Any]]:
    """A feature's 'top' contexts (by rank) or 'quantile' samples (by bin, then activation)."""
    return _rows(
        path,
        """SELECT c.rank, c.bin, c.bin_low, c.bin_high, c.text_id, c.position, c.activation, c.window_start,
                  c.tokens, c.acts, t.reward, t.score, t.split
           FROM contexts c LEFT JOIN texts t USING (text_id)
           WHERE c.layer = ? AND c.feature = ? AND c.kind = ? ORDER BY c.rank""",
        [layer, feature, kind],
    )

"""Where a feature's SAEDashboard page lives once a worker rendered it (workers/exports/saedashboard.py),
and how the web app serves it. Inside the run's folder, so replacing or deleting the run takes the
pages rendered from its old SAE with it."""
from __future__ import annotations

from pathlib import Path

# The page is SAEDashboard's own: inline scripts and styles, its data inline. Served sandboxed
# (an opaque origin: no cookies, no requests to this site) and allowed nothing from elsewhere.
SAEDASHBOARD_CSP = ("sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; "
                    "style-src 'unsafe-inline'; img-src data:; font-src data:")


def dashboard_path(run_dir: Path, layer: int, feature: int) -> Path:
    return Path(run_dir) / "exports" / "saedashboard" / f"layer_{layer}_feature_{feature}.html"

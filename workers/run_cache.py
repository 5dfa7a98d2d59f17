"""What every task runs inside: the errors a task stops with, and the worker's cache of loaded runs
(a reward model, its SAEs and decoder rows, and the evaluation sets ablations ran on lately)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from backend.core import db, store
from backend.core.chat_roles import markers_from_info
from backend.core.models import Run
from backend.core.run_config import parse_config
from backend.core.settings import Settings
from workers.job_errors import JobFailed, JobStopped  # noqa: F401  (what a task raises, beside the cache it runs on)
from workers.ablation import prepare_eval_set
from workers.adapters import adapter_from_config
from workers.analyze import adapter_has_gradient
from workers.device import pick_device
from workers.pipeline import resolve_model_path
from workers.sae_ops import decoder_directions, linear_decoder
from workers.train import load_sae

# Texts per forward in ablations: on a 2-core CPU, 16 ran 256 texts 15% faster than 64
# (length buckets pad less; the SAE edit's tensors stay in cache).
ABLATION_BATCH = 16
EVAL_SETS_KEPT = 4  # prepared evaluation sets (clean scores + the layer's output) per loaded run




def _non_finite(value: Any, where: str = "result") -> str | None:
    """Where the first NaN or infinity in a JSON-like result is, or None."""
    if isinstance(value, float):
        return None if np.isfinite(value) else where
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")
        if found:
            return found
    return None


def require_finite(result: dict, edit, before_scores) -> dict:
    """A result holding NaN or infinity is never stored (its page could not be shown): the job
    fails saying why, which is nearly always an edit value too large for the model's arithmetic."""
    where = _non_finite(result)
    if where is None:
        return result
    if not np.all(np.isfinite(np.asarray(before_scores, dtype=np.float64))):
        raise JobFailed("the reward model's own score is non-finite on these texts, before any edit")
    value = f" ({edit.mode} value {edit.value:g} is too large)" if edit.mode in ("clamp", "steer") else ""
    raise JobFailed(f"the edit made the reward non-finite{value}: nothing was stored ({where} came out NaN or "
                    "infinite)")


@dataclass
class LoadedRun:
    """A run's reward model, its SAEs and their decoder rows (loaded on first use), and the
    evaluation sets ablations ran on lately (so a second ablation skips their clean pass)."""
    run_id: str
    config: Any
    store_path: Any
    run_dir: Any
    adapter: Any
    saes: dict[int, Any] = field(default_factory=dict)
    decoders: dict[int, tuple[torch.Tensor, bool]] = field(default_factory=dict)
    eval_sets: OrderedDict = field(default_factory=OrderedDict)

    def sae(self, layer: int):
        if layer not in self.saes:

            info = store.layer_info(self.store_path, layer)
            self.saes[layer] = load_sae(self.run_dir / info["sae_path"], self.adapter.device)
        return self.saes[layer]

    def decoder(self, layer: int) -> tuple[torch.Tensor, bool]:
        """(decoder rows, whether decoding is linear in the features): see workers.ablation."""
        if layer not in self.decoders:

            rows = decoder_directions(self.sae(layer))
            self.decoders[layer] = (rows, linear_decoder(self.sae(layer), rows) is not None)
        return self.decoders[layer]

    def eval_set(self, layer: int, key: tuple, texts: list[str], progress=None):
        """The prepared evaluation set for these texts at this layer, prepared on first use, with
        the score's gradient at the layer (for the attribution prediction) where the model has one."""
        if (layer, key) in self.eval_sets:
            self.eval_sets.move_to_end((layer, key))
        else:
            self.eval_sets[(layer, key)] = prepare_eval_set(self.adapter, layer, texts, ABLATION_BATCH,
                                                            progress=progress,
                                                            with_gradients=adapter_has_gradient(self.adapter))
            while len(self.eval_sets) > EVAL_SETS_KEPT:
                self.eval_sets.popitem(last=False)
        return self.eval_sets[(layer, key)]


class RunCache:
    """Loaded runs by id, most recent kept (a reward model is the expensive part)."""

    def __init__(self, settings: Settings, size: int = 2):
        self.settings, self.size = settings, size
        self.runs: dict[str, LoadedRun] = {}

    def get(self, run_id: str) -> LoadedRun:
        if run_id in self.runs:
            self.runs[run_id] = self.runs.pop(run_id)  # most recent last
            return self.runs[run_id]

        with db.session(self.settings) as s:
            run = s.get(Run, run_id)
            if run is None:
                raise store.NotFound(f"run {run_id!r} not found")
        config = parse_config(yaml.safe_load(run.config_yaml))
        path = self.settings.data_dir / run.store_path
        adapter = adapter_from_config(config.model, resolve_model_path(config, self.settings), pick_device(config.device))
        adapter.response_markers = markers_from_info(store.run_info(path))  # a chat run reads responses only
        loaded = LoadedRun(run_id, config, path, path.parent, adapter)
        self.runs[run_id] = loaded
        while len(self.runs) > self.size:
            self.runs.pop(next(iter(self.runs)))
        return loaded

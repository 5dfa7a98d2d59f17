"""What the explainer and the scorers read from a run.

HeldOut: a sample of the run's held-out texts, run once through the reward model at one layer (the
layer's output kept, so every edit runs only the blocks above it). From it, per feature: each
text's peak activation and token activations, and each text's Δ reward when the feature is zeroed
(SAE spliced in, reconstruction error kept, on the text's own tokens, as the measured effects do);
and the same for a random-direction control: a random unit direction u of the layer's output, whose
"activation" at a token is relu(h·u) and whose zeroing removes relu(h·u)·u there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from backend.core import store
from workers.ablation import FeatureEdit, prepare_eval_set, run_ablation
from workers.explanations.prompts import join_tokens
from workers.sae_ops import content_tokens, edited_tokens

WINDOW = 12  # tokens either side of a snippet's peak
MARK_SHARE = 0.25  # tokens at >= this share of the snippet's peak are marked as activating


@dataclass
class Unit:
    """A feature or a random direction on the held-out texts: peak activation per text, token
    activations and the per-text Δ reward of zeroing it (filled on first use)."""
    peaks: np.ndarray  # [n_texts]
    acts: list[np.ndarray]  # per text, per content token
    deltas: np.ndarray | None = None


@dataclass
class HeldOut:
    run: object  # workers.tasks.LoadedRun
    layer: int
    texts: list[str]
    text_ids: list[int]
    evalset: object
    tokens: list[list[str]] = field(default_factory=list)  # per text, its content tokens
    _special: torch.Tensor | None = None

    @classmethod
    def load(cls, run, layer: int, n_texts: int, progress=None) -> "HeldOut":
        rows = store.texts(run.store_path, "heldout", n_texts)
        texts, ids = [r["text"] for r in rows], [r["text_id"] for r in rows]
        evalset = prepare_eval_set(run.adapter, layer, texts, 16, progress=progress)
        held = cls(run, layer, texts, ids, evalset)
        held._special = torch.tensor(sorted(run.adapter.tokenizer.all_special_ids), device=run.adapter.device)
        held.tokens = [[] for _ in texts]
        for item in evalset.batches:
            content = held._content(item)
            for row, i in enumerate(item.indices):
                ids_row = item.batch.input_ids[row][content[row]].tolist()
                held.tokens[i] = run.adapter.tokenizer.convert_ids_to_tokens(ids_row)
        return held

    def _content(self, item) -> torch.Tensor:
        return content_tokens(item.batch, self._special)

    def _hidden(self, item) -> torch.Tensor:
        if item.hidden is not None:
            return item.hidden.float()
        _, captured = self.run.adapter.run(item.batch, capture=[self.layer])
        return captured[self.layer].float()

    @torch.no_grad()
    def feature(self, feature: int) -> Unit:
        sae = self.run.sae(self.layer)
        return self._unit(lambda item: (item.encoded(sae) if item.hidden is not None
                                        else sae.encode(self._hidden(item)))[..., feature].float())

    @torch.no_grad()
    def direction(self, u: torch.Tensor) -> Unit:
        return self._unit(lambda item: torch.relu(self._hidden(item) @ u))

    def _unit(self, activation) -> Unit:
        peaks = np.zeros(len(self.texts))
        acts: list[np.ndarray] = [np.zeros(0)] * len(self.texts)
        for item in self.evalset.batches:
            a, content = activation(item), self._content(item)
            for row, i in enumerate(item.indices):
                acts[i] = a[row][content[row]].cpu().numpy()
                peaks[i] = float(acts[i].max()) if len(acts[i]) else 0.0
        return Unit(peaks, acts)

    @torch.no_grad()
    def feature_deltas(self, feature: int) -> np.ndarray:
        """Per text: reward with the feature zeroed minus without (mean over its reward reads)."""
        sae = self.run.sae(self.layer)
        directions, linear = self.run.decoder(self.layer)
        weights = np.zeros(sae.cfg.d_sae, dtype=np.float32)  # the regression's prediction is not used here
        result = run_ablation(self.run.adapter, sae, self.layer, self.evalset, FeatureEdit((feature,), "zero", 0.0),
                              weights, "mean", 16, None, directions, linear, "text")
        return self._per_text(result.text_index, result.delta)

    @torch.no_grad()
    def direction_deltas(self, u: torch.Tensor) -> np.ndarray:
        index, deltas = [], []
        for item in self.evalset.batches:
            hidden = self._hidden(item)
            removed = torch.relu(hidden @ u).unsqueeze(-1) * u
            at = edited_tokens(item.batch, self._special, "text").unsqueeze(-1)
            after = self.run.adapter.run_from(item.batch, self.layer, torch.where(at, hidden - removed, hidden)
                                              .to(item.hidden.dtype if item.hidden is not None else hidden.dtype))
            deltas.append((after.float() - item.clean.float()).cpu().numpy())
            index.append(item.indices[item.batch.reward_index[:, 0].cpu().numpy()])
        return self._per_text(np.concatenate(index), np.concatenate(deltas))

    def _per_text(self, text_index: np.ndarray, delta: np.ndarray) -> np.ndarray:
        sums = np.bincount(text_index, weights=delta, minlength=len(self.texts))
        counts = np.bincount(text_index, minlength=len(self.texts))
        return sums / np.maximum(counts, 1)

    def random_direction(self, feature: int) -> torch.Tensor:
        """The feature's random-direction control: a fixed unit vector per (layer, feature)."""
        d_in = self.run.sae(self.layer).cfg.d_in
        g = torch.Generator().manual_seed(1_000_003 * (self.layer + 1) + feature)
        u = torch.randn(d_in, generator=g)
        return (u / u.norm()).to(self.run.adapter.device)

    def snippet(self, i: int, acts: np.ndarray, marked: set[int] | None = None, centre: int | None = None) -> str:
        """Text i around `centre` (default: its peak), the `marked` token positions wrapped in << >>."""
        tokens = self.tokens[i]
        if not tokens:
            return ""
        centre = int(np.argmax(acts)) if centre is None else centre
        start = max(0, centre - WINDOW)
        window = tokens[start:centre + WINDOW + 1]
        return join_tokens(window, {m - start for m in (marked or set()) if start <= m < start + len(window)})


def active_marks(acts: np.ndarray) -> set[int]:
    peak = float(acts.max()) if len(acts) else 0.0
    return {int(i) for i in np.flatnonzero(acts >= MARK_SHARE * peak)} if peak > 0 else set()

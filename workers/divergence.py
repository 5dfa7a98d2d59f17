"""Parameter divergence between a base model and the reward model tuned from it, per transformer
block (the implicit-reward-model paper's layer choice: the blocks whose weights moved most).

Per block: l2 = sqrt(sum over the block's tensors of sum((tuned - base)^2)), and relative =
l2 / sqrt(sum of base^2) over the same tensors. Tensors are matched by name once each model's
wrapper prefix is set aside (a task head's "bert." or "model.", whichever pair of prefixes matches
the most names); only tensors present in both with equal shapes are compared, the rest counted
as skipped. Weights are read tensor by tensor from the checkpoints' files (safetensors, or
PyTorch .bin), so memory holds two tensors at a time, not two models.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open

BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class Divergence:
    blocks: list[int]
    l2: list[float]
    relative: list[float]
    n_tensors: list[int]
    n_compared: int  # tensors compared (inside blocks and outside)
    n_skipped: int  # tensors in only one model, or shaped differently
    skipped: list[str] = field(default_factory=list)  # a few of their names, for the message
    block_prefix: str = ""

    def top(self, k: int) -> list[int]:
        """The k blocks with the largest l2, in block order."""
        order = sorted(range(len(self.blocks)), key=lambda i: (-self.l2[i], self.blocks[i]))
        return sorted(self.blocks[i] for i in order[:k])

    def columns(self) -> dict[str, list]:
        return {"block": list(self.blocks), "l2": list(self.l2), "relative": list(self.relative),
                "n_tensors": list(self.n_tensors)}

    def summary(self) -> str:
        shown = f" (e.g. {', '.join(self.skipped[:3])})" if self.skipped else ""
        return (f"{self.n_compared} tensors compared, {self.n_skipped} skipped (in one model only or shaped "
                f"differently){shown}")


def _weight_files(path: str) -> list[Path]:
    """The checkpoint's weight files: a local directory's, or a hub id's (download or HF cache)."""
    directory = Path(path)
    if not directory.is_dir():
        try:
            directory = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.bin", "*.json"]))
        except Exception as exc:  # noqa: BLE001 - offline, unknown id, ...: say which model
            raise ValueError(f"cannot read the weights of {path!r}: {exc}") from None
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{path!r} has no weight files (*.safetensors or pytorch_model*.bin)")
    return files


class Checkpoint:
    """Tensors by name, read one at a time."""

    def __init__(self, path: str):
        self.path = path
        self._files: dict[str, Callable[[], torch.Tensor]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in _weight_files(path):
            if file.suffix == ".safetensors":
                handle = safe_open(str(file), framework="pt")
                for name in handle.keys():
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())
                    self._files[name] = (lambda h, n: lambda: h.get_tensor(n))(handle, name)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for name, tensor in state.items():
                    self._shapes[name] = tuple(tensor.shape)
                    self._files[name] = (lambda t: lambda: t)(tensor)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def tensor(self, name: str) -> torch.Tensor:
        return self._files[name]()


def _prefixes(names: Iterable[str]) -> set[str]:
    return {""} | {name.split(".", 1)[0] + "." for name in names if "." in name}


def match_names(tuned: list[str], base: list[str]) -> list[tuple[str, str, str]]:
    """(common name, tuned name, base name) for tensors of both, each side's wrapper prefix set
    aside: the pair of prefixes ("", "bert.", "model.", ...) that matches the most names."""
    best: list[tuple[str, str, str]] = []
    for pt in _prefixes(tuned):
        stripped_t = {n[len(pt):]: n for n in tuned if n.startswith(pt)}
        for pb in _prefixes(base):
            stripped_b = {n[len(pb):]: n for n in base if n.startswith(pb)}
            common = stripped_t.keys() & stripped_b.keys()
            if len(common) > len(best):
                best = [(c, stripped_t[c], stripped_b[c]) for c in sorted(common)]
    return best


def block_prefix(names: Iterable[str], n_blocks: int | None) -> str | None:
    """The name prefix of the transformer blocks ("encoder.layer", "layers", "h", ...): the one
    followed by block indices 0..n_blocks-1 (by the most names where the depth is not known)."""
    indices: dict[str, set[int]] = {}
    counts: Counter = Counter()
    for name in names:
        for m in BLOCK_INDEX.finditer("." + name):
            prefix = ("." + name)[1:m.start()]
            indices.setdefault(prefix, set()).add(int(m.group(1)))
            counts[prefix] += 1
    fits = [p for p, found in indices.items() if n_blocks is None or found == set(range(n_blocks))]
    return max(fits, key=lambda p: (len(indices[p]), counts[p], -len(p))) if fits else None


def _block_of(name: str, prefix: str) -> int | None:
    lead = f"{prefix}." if prefix else ""
    if not name.startswith(lead):
        return None
    head = name[len(lead):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@torch.no_grad()
def parameter_divergence(base_path: str, tuned_path: str, n_blocks: int | None = None) -> Divergence:
    """Per block of the tuned model, the l2 distance of its weights from the base's and that
    relative to the base block's norm (see the module's docstring)."""
    base, tuned = Checkpoint(base_path), Checkpoint(tuned_path)
    matched = match_names(tuned.names(), base.names())
    prefix = block_prefix([common for common, _, _ in matched], n_blocks)
    if prefix is None:
        raise ValueError(f"no transformer blocks found among the {len(matched)} tensors the base model "
                         f"{base_path!r} and the reward model share"
                         + (f" (expected blocks 0..{n_blocks - 1})" if n_blocks else ""))
    sq_diff: dict[int, float] = {}
    sq_base: dict[int, float] = {}
    n_tensors: Counter = Counter()
    compared, skipped = 0, []
    used_t, used_b = set(), set()
    for common, t_name, b_name in matched:
        used_t.add(t_name)
        used_b.add(b_name)
        if tuned.shape(t_name) != base.shape(b_name):
            skipped.append(t_name)
            continue
        compared += 1
        block = _block_of(common, prefix)
        if block is None:
            continue
        t, b = tuned.tensor(t_name).double(), base.tensor(b_name).double()
        sq_diff[block] = sq_diff.get(block, 0.0) + float(((t - b) ** 2).sum())
        sq_base[block] = sq_base.get(block, 0.0) + float((b ** 2).sum())
        n_tensors[block] += 1
    skipped += [n for n in tuned.names() if n not in used_t] + [n for n in base.names() if n not in used_b]
    blocks = sorted(sq_diff) if n_blocks is None else list(range(n_blocks))
    l2 = [float(np.sqrt(sq_diff.get(b, 0.0))) for b in blocks]
    norms = [float(np.sqrt(sq_base.get(b, 0.0))) for b in blocks]
    return Divergence(blocks=blocks, l2=l2, relative=[d / n if n > 0 else None for d, n in zip(l2, norms)],
                      n_tensors=[int(n_tensors[b]) for b in blocks], n_compared=compared, n_skipped=len(skipped),
                      skipped=skipped, block_prefix=prefix)

"""Device and precision chosen at run time: CUDA with bf16 autocast when present, else CPU."""
from __future__ import annotations

import contextlib

import torch

from backend.core.run_config import ConfigError


def pick_device(requested: str = "auto") -> torch.device:
    """The config's `device` as a torch device; one this machine lacks is refused before any work."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {requested!r} is not one of auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device: {requested!r} asked for, but this machine has no CUDA device (use auto or cpu)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device: {requested!r} asked for, but this machine has {count} CUDA device"
                              f"{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {requested!r} asked for, but MPS is not available here (use auto or cpu)")
    return device


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

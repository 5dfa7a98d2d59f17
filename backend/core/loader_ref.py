"""`model.loader: "package.module:function"`: parsing the reference and finding its module.

Torch-free: the server checks that a loader's module exists without importing it (importing
runs model code, which the server never does); workers/adapters/custom.py imports and calls it.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys

LOADER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


class LoaderRefError(ValueError):
    """model.loader cannot be found or imported; the message names the key."""


def split_loader(ref: str) -> tuple[str, str]:
    module, _, function = ref.partition(":")
    if not module or not function:
        raise LoaderRefError(f"model.loader: {ref!r} is not 'package.module:function'")
    return module, function


def locate_loader(ref: str) -> None:
    """Find the loader's module on sys.path, one package level at a time, without executing any
    of it (a package already imported counts as found)."""
    module, _ = split_loader(ref)
    parts = module.split(".")
    search_path = None
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        loaded = sys.modules.get(name)
        if loaded is not None:
            spec = getattr(loaded, "__spec__", None)
        else:
            spec = importlib.machinery.PathFinder.find_spec(name, search_path)
        if spec is None:
            raise LoaderRefError(f"model.loader: no module {name!r} can be found (from {ref!r}); is its package "
                                 "installed in the worker's environment, or its directory on PYTHONPATH?")
        if depth < len(parts):
            search_path = spec.submodule_search_locations
            if search_path is None:
                raise LoaderRefError(f"model.loader: {name!r} is a module, not a package, so it has no "
                                     f"{parts[depth]!r} (from {ref!r})")


def import_loader(ref: str):
    """The loader function itself (imports its module: worker side only)."""
    module_name, function = split_loader(ref)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure of the user's module is the config's problem
        raise LoaderRefError(f"model.loader: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    loader = getattr(module, function, None)
    if loader is None:
        raise LoaderRefError(f"model.loader: module {module_name!r} has no {function!r}")
    if not callable(loader):
        raise LoaderRefError(f"model.loader: {ref!r} is a {type(loader).__name__}, not a function")
    return loader

"""Exports land whole or not at all: written beside their target under a temporary name, renamed
into place when complete, removed when anything fails."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from backend.core.exports import ExportError


def _refuse_existing(target: Path, replace: bool) -> None:
    if target.exists() and not replace:
        raise ExportError(f"{target} already exists: choose another output, or pass --replace")
    if not target.parent.is_dir():
        raise ExportError(f"{target.parent} is not a directory: create it first")


@contextmanager
def atomic_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """A fresh directory to fill; on success it becomes `target` (a replaced one is removed only
    then), on failure it goes."""
    target = Path(target)
    _refuse_existing(target, replace)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield work
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(work, target)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary path to write; on success it is renamed to `target`."""
    target = Path(target)
    _refuse_existing(target, replace)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    work = Path(name)
    try:
        yield work
        os.replace(work, target)
    except BaseException:
        work.unlink(missing_ok=True)
        raise

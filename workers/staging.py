"""The hidden directories a run is built and published through, and the clean-up of those a
killed run left behind.

A run is built in `runs/.<id>.partial-<host>-<pid>` and renamed into place; replacing a run
moves the old one to `runs/.<id>.previous-<host>-<pid>` for the moment of the swap. A worker
killed meanwhile leaves them there. They are stale when their process is gone: on this host
that is asked of the OS; another host's (workers on several machines share one data dir)
is judged by age only, as a running build touches its directory while it works (and a
replacement touches the old run's as it moves it aside).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

# Another host's directory untouched this long is stale (a build touches its own every
# TOUCH_EVERY_S; the longest step without progress reports, a large regression fit, is far shorter).
OTHER_HOST_STALE_S = 6 * 3600
TOUCH_EVERY_S = 60.0

_NAME = re.compile(r"^\.(?P<run>[^.]+)\.(?P<kind>partial|previous)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _tag() -> str:
    return f"{_host()}-{os.getpid()}"


def staging_dir(runs_dir: Path, run_id: str) -> Path:
    return runs_dir / f".{run_id}.partial-{_tag()}"


def previous_dir(final_dir: Path) -> Path:
    return final_dir.with_name(f".{final_dir.name}.previous-{_tag()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_stale(path: Path, host: str | None, pid: int, now: float) -> bool:
    if host is None or host == _host():  # names without a host come from this host's older builds
        if pid == os.getpid():
            return False
        if not _pid_alive(pid):
            return True
    return now - path.stat().st_mtime > OTHER_HOST_STALE_S


def clean_stale(runs_dir: Path) -> list[str]:
    """Remove stale build directories; a stale `previous` whose run is missing (killed mid-swap)
    goes back into place instead. Returns what was done, one line each."""
    if not runs_dir.is_dir():
        return []
    done, now = [], time.time()
    for path in sorted(runs_dir.iterdir()):
        match = _NAME.match(path.name)
        if match is None or not path.is_dir():
            continue
        try:
            if not _is_stale(path, match["host"], int(match["pid"]), now):
                continue
            final = runs_dir / match["run"]
            if match["kind"] == "previous" and not final.exists():
                path.rename(final)
                done.append(f"restored run {match['run']!r} from an interrupted replacement")
            else:
                shutil.rmtree(path)
                done.append(f"removed {path.name} (left by a stopped run)")
        except FileNotFoundError:  # another worker cleaned it first
            continue
    return done


class Toucher:
    """Keeps a build directory's mtime fresh while the build reports progress, at most once a
    minute: other hosts tell a live build from a dead one by it."""

    def __init__(self, path: Path):
        self.path, self.last = path, time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= TOUCH_EVERY_S:
            self.last = now
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

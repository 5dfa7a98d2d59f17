"""`rewardatlas run CONFIG --nproc N`: N processes on this machine, one run (workers/distributed.py);
and the same entry under `torchrun`, one process per rank on one or several nodes.

A rank that fails fails the run: the launcher stops the others (torch.multiprocessing), names
the rank that failed first with its error, and removes what the stopped run left in the runs
directory. Nothing is published: only rank 0 publishes, after every rank's share has reached it.
"""
from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from functools import partialmethod
from pathlib import Path

import torch
import torch.multiprocessing as mp
import tqdm.std
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

from backend.core.run_config import ConfigError, RunConfig, load_config
from backend.core.settings import Settings, get_settings
from workers import distributed
from workers.staging import clean_stale


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_kind(config: RunConfig) -> str:
    """cpu or cuda: where this machine would run the config's `device`."""
    requested = config.device
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("mps"):
        raise ConfigError("--nproc: several processes need CPU (gloo) or CUDA (NCCL); device 'mps' has neither")
    return "cuda" if requested.startswith("cuda") else "cpu"


def check_nproc(nproc: int, kind: str) -> None:
    """One rank per CPU core, or per GPU: more only makes ranks wait on each other."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give a number of processes of at least 1")
    if kind == "cuda":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise ConfigError(f"--nproc {nproc}: this machine has {gpus} GPU{'s' if gpus != 1 else ''}, and each "
                              f"rank needs one of its own (use --nproc {gpus} or fewer)")
        return
    cores = usable_cores()
    if nproc > cores:
        raise ConfigError(f"--nproc {nproc}: this machine has {cores} CPU core{'s' if cores != 1 else ''} for this "
                          f"process, and each rank needs one of its own (use --nproc {cores} or fewer)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned(config_path: Path, config: RunConfig, settings: Settings, replace: bool, nproc: int) -> None:
    """Spawn `nproc` ranks of one run here and wait for them; a failed rank -> RankFailure."""
    kind = device_kind(config)
    check_nproc(nproc, kind)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    with tempfile.TemporaryDirectory(prefix="rewardatlas-ranks-") as errors:
        try:
            mp.start_processes(_spawned_rank, args=(nproc, str(config_path), replace, kind, errors), nprocs=nproc,
                               join=True, start_method="spawn")
        except ProcessException as exc:
            failure = first_failure(Path(errors))
            if failure is None or (isinstance(exc, ProcessExitedException) and not
                                   (Path(errors) / f"rank-{exc.error_index}").exists()):
                failure = (exc.error_index, _last_line(str(exc)))  # killed (a signal): it wrote nothing
            for line in clean_stale(settings.runs_dir):  # the stopped ranks' build directory
                print(line)
            rank, message = failure
            raise distributed.RankFailure(f"rank {rank} of {nproc} failed, so the run stopped and nothing was "
                                          f"published: {message}") from None


def _spawned_rank(local_rank: int, nproc: int, config_path: str, replace: bool, kind: str, errors: str) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank))
    try:
        run_rank(Path(config_path), replace, kind, nproc_here=nproc)
    except BaseException as exc:
        # when it happened: the first failure is the cause, later ones its echo in other ranks
        (Path(errors) / f"rank-{local_rank}").write_text(f"{time.time()}\n{type(exc).__name__}: {exc}")
        raise


def run_rank(config_path: Path, replace: bool, kind: str | None = None, nproc_here: int | None = None) -> None:
    """One rank of a run: join the group the environment describes, run the pipeline, leave."""
    from workers.pipeline import run_pipeline  # lazy: SAELens and transformers load in the ranks, not the launcher

    config = load_config(config_path)
    kind = kind or device_kind(config)
    per_node = nproc_here or int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if kind == "cpu":  # the node's cores shared out, so ranks do not fight over them
        torch.set_num_threads(max(1, usable_cores() // per_node))
    ranks = distributed.join(distributed.backend_for(kind))
    if not ranks.leader:
        _quiet_progress_bars()
    try:
        run_pipeline(config, get_settings(), replace=replace)
    finally:
        distributed.leave()


def _quiet_progress_bars() -> None:
    """One progress display, rank 0's (tqdm read TQDM_DISABLE when it was imported, long before)."""
    tqdm.std.tqdm.__init__ = partialmethod(tqdm.std.tqdm.__init__, disable=True)


def first_failure(errors: Path) -> tuple[int, str] | None:
    """(rank, message) of the earliest failure the ranks wrote down."""
    found = []
    for path in errors.glob("rank-*"):
        when, _, message = path.read_text().partition("\n")
        found.append((float(when), int(path.name.split("-")[1]), message))
    if not found:
        return None
    _, rank, message = min(found)
    return rank, message


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return re.sub(r"^[\w.]+\.(\w+Error|RankFailure)", r"\1", lines[-1]) if lines else text


def run_from_cli(config_path: Path, config: RunConfig, settings: Settings, replace: bool, nproc: int | None) -> None:
    """`rewardatlas run CONFIG --nproc N`, or the same command started by torchrun."""
    if distributed.launched_by_torchrun():
        if nproc is not None:
            raise ConfigError("--nproc: torchrun already started this process as one rank of "
                              f"{os.environ.get('WORLD_SIZE', '?')}; leave --nproc out under torchrun")
        run_rank(config_path, replace)
        return
    run_spawned(config_path, config, settings, replace, nproc)

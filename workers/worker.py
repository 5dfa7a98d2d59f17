"""`rewardatlas worker`: claims jobs from the SQL queue, runs them, heartbeats meanwhile.

Loaded reward models and SAEs stay cached between jobs (per run), so an ablation on a warm
worker costs only its own forward passes. Several workers can serve one database.
"""
from __future__ import annotations

import importlib
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from typing import Any, Callable

from backend.core import jobs
from backend.core.job_kinds import KINDS
from backend.core.settings import Settings
from backend.core.run_config import ConfigError
from workers.staging import clean_stale
from workers.run_cache import JobFailed, JobStopped, RunCache
from workers.tasks import warm_run


def task_for(kind: str) -> Callable[[dict, Any], dict]:
    """The function a kind's jobs run, as its declaration names it (backend/core/job_kinds/)."""
    module, name = KINDS[kind].task.split(":")
    return getattr(importlib.import_module(module), name)


class JobContext:
    """What a running task sees: report progress; stop when cancelled or the lease is lost."""

    def __init__(self, job: dict, settings: Settings, cache: RunCache):
        self.job, self.settings, self.cache = job, settings, cache
        self.progress: float = 0.0
        self.message: str = "started"
        self.stop_reason: str | None = None
        self.last_partial: dict | None = None
        # a new stage message wakes the heartbeat at once, so the jobs page shows each stage
        self.message_changed = threading.Event()

    def report(self, progress: float | None = None, message: str | None = None) -> None:
        if progress is not None:
            self.progress = progress
        if message is not None and message != self.message:
            self.message = message
            self.message_changed.set()
        if self.stop_reason:
            raise JobStopped(self.stop_reason)

    def partial(self, result: dict) -> None:
        """Show the result so far on the job's page while the rest runs (and after it fails or is
        cancelled: what was done stays shown)."""
        self.last_partial = result
        if not jobs.publish_partial(self.settings, self.job["id"], self.job["lease_owner"], result):
            raise JobStopped("lease lost")

    def ask_queue(self) -> None:
        """Whether a cancel was asked for, read from the queue now rather than at the next heartbeat."""
        if jobs.get(self.settings, self.job["id"]).get("cancel_requested"):
            self.stop_reason = self.stop_reason or "cancelled"


class Worker:
    def __init__(self, settings: Settings, lease_s: float = jobs.DEFAULT_LEASE_S, poll_s: float = 0.5,
                 name: str | None = None):
        self.settings, self.lease_s, self.poll_s = settings, lease_s, poll_s
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.cache = RunCache(settings)
        self.state = "starting"  # what the jobs pages show of it (presence)
        self.exit_with: int | None = None  # a process whose end ends this worker (the server that started it)

    def run_forever(self, stop: threading.Event | None = None, warm: str | None = None) -> None:
        """Serve the queue until `stop` is set, keeping a presence row the pages read (is any
        worker alive?); `warm`: a run whose model, SAEs and default evaluation set are loaded
        first, so its first ablation costs only its own passes."""
        stop = stop or threading.Event()
        presence = threading.Thread(target=self._presence, args=(stop,), daemon=True)
        presence.start()
        try:
            if warm:
                self.warm_up(warm)
            self.state = "waiting for jobs"
            _say(f"worker {self.name}: waiting for jobs (lease {self.lease_s:g} s)")
            while not stop.is_set():
                if not self.run_one():
                    stop.wait(self.poll_s)
        finally:
            stop.set()
            presence.join(timeout=jobs.PRESENCE_S)
            jobs.worker_gone(self.settings, self.name)

    def warm_up(self, run_id: str) -> None:
        self.state = f"loading run {run_id}"
        started = time.time()
        try:
            warm_run(self.cache, run_id)
        except Exception as exc:  # a run that cannot load is the jobs' to report, not the worker's end
            _say(f"worker {self.name}: could not warm run {run_id!r}: {exc}")
            return
        _say(f"worker {self.name}: run {run_id!r} loaded in {time.time() - started:.1f} s")

    def _presence(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.exit_with is not None and not _alive(self.exit_with):
                os.kill(os.getpid(), signal.SIGTERM)  # before any print: the server's stdout may be gone with it
                _say(f"worker {self.name}: process {self.exit_with} ended, stopping")
                return
            try:
                jobs.worker_seen(self.settings, self.name, self.state)
            except Exception as exc:  # the database is briefly away: try again next beat
                _say(f"worker {self.name}: presence not recorded: {exc}")
            stop.wait(jobs.PRESENCE_S)

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue had none."""
        job = jobs.claim(self.settings, self.name, self.lease_s)
        if job is None:
            return False
        self.state = f"running job {job['id']} ({job['kind']})"
        ctx = JobContext(job, self.settings, self.cache)
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(ctx, beating), daemon=True)
        beat.start()
        _say(f"job {job['id']} ({job['kind']}, attempt {job['attempts']}): started")
        try:
            result = task_for(job["kind"])(job["params"], ctx)
            outcome = dict(result=result)
        except JobStopped as stopped:
            outcome = dict(status="cancelled", error=str(stopped), result=ctx.last_partial) \
                if str(stopped) == "cancelled" else None
        except (JobFailed, ConfigError) as exc:  # explained by its message: no traceback, no exception name
            outcome = dict(error=str(exc), result=ctx.last_partial)
        except Exception as exc:  # the job failed, the worker goes on
            traceback.print_exc()
            outcome = dict(error=f"{type(exc).__name__}: {exc}")
        finally:
            beating.set()
            ctx.message_changed.set()  # wakes the heartbeat to see it is done
            beat.join()
        if outcome is None:
            _say(f"job {job['id']}: lease lost to another worker, result dropped")
        elif not jobs.finish(self.settings, job["id"], self.name, **outcome):
            _say(f"job {job['id']}: finished after losing its lease, result dropped")
        else:
            _say(f"job {job['id']}: {outcome.get('status') or ('failed' if outcome.get('error') else 'done')}")
        self.state = "waiting for jobs"
        return True

    def _heartbeat(self, ctx: JobContext, done: threading.Event) -> None:
        interval = max(0.05, min(self.lease_s / 3, 2.0))
        reported = (None, None)
        while not done.is_set():
            ctx.message_changed.wait(interval)
            ctx.message_changed.clear()
            if done.is_set():
                return
            # 0.01 %: a long training moves the bar every few dozen steps
            now = (round(ctx.progress, 4), ctx.message)
            owned, cancel = jobs.heartbeat(self.settings, ctx.job["id"], self.name, self.lease_s,
                                           *(now if now != reported else (None, None)))
            reported = now
            if not owned:
                ctx.stop_reason = "lease lost"
            elif cancel:
                ctx.stop_reason = "cancelled"


def _say(message: str) -> None:
    """Print, unless stdout is gone (a pipe whose reader ended: the server that started us)."""
    try:
        print(message, flush=True)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(settings: Settings, once: bool = False, lease_s: float = jobs.DEFAULT_LEASE_S, poll_s: float = 0.5,
         warm: str | None = None, exit_with: int | None = None) -> None:
    worker = Worker(settings, lease_s, poll_s)
    worker.exit_with = exit_with
    for line in clean_stale(settings.runs_dir):  # what runs killed with an earlier worker left
        _say(f"worker {worker.name}: {line}")
    if once:
        while worker.run_one():
            pass
        return
    stop = threading.Event()
    # SIGTERM (the server stopping the worker it started, or a process manager) ends the wait for
    # jobs as Ctrl-C does; a job in progress is left to its lease, which another worker takes over
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        worker.run_forever(stop, warm)
    except KeyboardInterrupt:
        _say("worker stopped")

"""`rewardatlas worker`: claims jobs from the SQL queue, runs them, heartbeats meanwhile.

Loaded reward models and SAEs stay cached between jobs (per run), so an ablation on a warm
worker costs only its own forward passes. Several workers can serve one database.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import traceback
import uuid

from backend import jobs
from backend.settings import Settings
from workers.config import ConfigError
from workers.staging import clean_stale
from workers.tasks import TASKS, JobFailed, JobStopped, RunCache


class JobContext:
    """What a running task sees: report progress; stop when cancelled or the lease is lost."""

    def __init__(self, job: dict, settings: Settings, cache: RunCache):
        self.job, self.settings, self.cache = job, settings, cache
        self.progress: float = 0.0
        self.message: str = "started"
        self.stop_reason: str | None = None
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

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        print(f"worker {self.name}: waiting for jobs (lease {self.lease_s:g} s)", flush=True)
        while not stop.is_set():
            if not self.run_one():
                stop.wait(self.poll_s)

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue had none."""
        job = jobs.claim(self.settings, self.name, self.lease_s)
        if job is None:
            return False
        ctx = JobContext(job, self.settings, self.cache)
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(ctx, beating), daemon=True)
        beat.start()
        print(f"job {job['id']} ({job['kind']}, attempt {job['attempts']}): started", flush=True)
        try:
            result = TASKS[job["kind"]](job["params"], ctx)
            outcome = dict(result=result)
        except JobStopped as stopped:
            outcome = dict(status="cancelled", error=str(stopped)) if str(stopped) == "cancelled" else None
        except (JobFailed, ConfigError) as exc:  # explained by its message: no traceback, no exception name
            outcome = dict(error=str(exc))
        except Exception as exc:  # the job failed, the worker goes on
            traceback.print_exc()
            outcome = dict(error=f"{type(exc).__name__}: {exc}")
        finally:
            beating.set()
            ctx.message_changed.set()  # wakes the heartbeat to see it is done
            beat.join()
        if outcome is None:
            print(f"job {job['id']}: lease lost to another worker, result dropped", flush=True)
        elif not jobs.finish(self.settings, job["id"], self.name, **outcome):
            print(f"job {job['id']}: finished after losing its lease, result dropped", flush=True)
        else:
            print(f"job {job['id']}: {outcome.get('status') or ('failed' if outcome.get('error') else 'done')}",
                  flush=True)
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


def main(settings: Settings, once: bool = False, lease_s: float = jobs.DEFAULT_LEASE_S, poll_s: float = 0.5) -> None:
    worker = Worker(settings, lease_s, poll_s)
    for line in clean_stale(settings.runs_dir):  # what runs killed with an earlier worker left
        print(f"worker {worker.name}: {line}", flush=True)
    if once:
        while worker.run_one():
            pass
        return
    try:
        worker.run_forever()
    except KeyboardInterrupt:
        print("worker stopped", flush=True)
        time.sleep(0)

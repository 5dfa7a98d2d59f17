"""P13: `GET /` latency while clients send large JSON bodies.

A JSON body under RA_MAX_BODY_BYTES (16 MiB) can hold ~800,000 floats. Parsed on the server's
event loop, each such body held every other request for its whole parse. This script serves a
data dir with `rewardatlas serve` (one process, loopback), then measures `GET /` sequentially
(p50 / p95 over REQUESTS requests, PACE_S apart) with 0, 1 and 4 other clients each posting ~15 MB bodies of
floats to `POST /api/jobs` in a loop (refused with a 422 once parsed: nothing is queued). The
body senders are separate processes, so that the measuring client shares no interpreter lock
with them. Every loop is bounded: the senders stop when the measurement ends, or after
MAX_BODIES bodies each.

    python benchmarks/p13_large_bodies.py                      # this checkout
    python benchmarks/p13_large_bodies.py --repo ../other-checkout   # e.g. the code before a change

RA_DATA_DIR, when set, is served (e.g. the demo's); otherwise a fresh data dir with no run.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 300  # GET / per measurement
PACE_S = 0.02  # between them: a measurement spans several bodies' parses
MAX_MEASURE_S = 90.0  # a measurement ends after this long, however few requests it made
MAX_BODIES = 200  # per sender, whatever happens
BODY_FLOATS = 750_000  # ~15 MB as JSON


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body() -> bytes:
    rng = random.Random(0)
    body = json.dumps({"config_yaml": "name: p13", "pad": [rng.random() for _ in range(BODY_FLOATS)]}).encode()
    return body


def _sender(port: int, stop, sent) -> None:
    body = _body()
    for _ in range(MAX_BODIES):
        if stop.is_set():
            return
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/api/jobs", body=body, headers={"content-type": "application/json"})
        status = conn.getresponse()
        status.read()
        conn.close()
        with sent.get_lock():
            sent.value += 1


def _measure(port: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    began = time.perf_counter()
    for _ in range(REQUESTS):
        if time.perf_counter() - began > MAX_MEASURE_S:
            break
        start = time.perf_counter()
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        times.append((time.perf_counter() - start) * 1000)
        time.sleep(PACE_S)
        if response.getheader("connection", "").lower() == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        assert response.status == 200, response.status
    conn.close()
    return times


def _with_senders(port: int, n: int) -> tuple[list[float], int]:
    ctx = mp.get_context("spawn")
    stop, sent = ctx.Event(), ctx.Value("i", 0)
    senders = [ctx.Process(target=_sender, args=(port, stop, sent)) for _ in range(n)]
    for p in senders:
        p.start()
    if n:  # the senders build their bodies first: measure once the first has arrived
        deadline = time.time() + 120
        while sent.value == 0 and time.time() < deadline:
            time.sleep(0.05)
    try:
        times = _measure(port)
    finally:
        stop.set()
        for p in senders:
            p.join(120)
            if p.is_alive():
                p.terminate()
    return times, sent.value


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="the checkout whose server is measured")
    parser.add_argument("--clients", default="0,1,4", help="body senders per measurement")
    args = parser.parse_args()
    data_dir = os.environ.get("RA_DATA_DIR") or tempfile.mkdtemp(prefix="p13-")
    port = _free_port()
    env = {**os.environ, "RA_DATA_DIR": data_dir, "PYTHONPATH": str(args.repo.resolve())}
    server = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(port)], cwd=args.repo,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        print(f"server: {args.repo.resolve()} on 127.0.0.1:{port}, data dir {data_dir}; body "
              f"{len(_body()) / 1e6:.1f} MB of {BODY_FLOATS:,} floats; {REQUESTS} GET / per line (or {MAX_MEASURE_S:g} s)")
        for n in map(int, args.clients.split(",")):
            times, sent = _with_senders(port, n)
            print(f"{n} body client{'s' if n != 1 else ''}: GET / p50 {statistics.median(times):7.1f} ms, "
                  f"p95 {_percentile(times, 95):7.1f} ms, max {max(times):7.1f} ms  ({len(times)} requests, {sent} bodies "
                  "sent meanwhile)",
                  flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()

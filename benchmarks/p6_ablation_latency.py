"""P6: from submitting an ablation of 10 features (the top of the layer's default ranking) over
256 held-out texts on the demo RM, with its 3 random controls, to its result page being served,
with a warm worker (model, SAE loaded; a first ablation done).

The server runs in this process (uvicorn, loopback) and so does one worker (a thread), as
`rewardatlas serve` and `rewardatlas worker` would in two. Timed: POST the ablation, poll its
JSON until done, GET its result page. Two cases: the same 256 held-out texts as the warm-up
(the worker reuses their clean scores) and a set it has not scored yet.

    RA_DATA_DIR=data python benchmarks/p6_ablation_latency.py       # needs the demo run
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import threading
import time

import httpx
import uvicorn

from backend import db
from backend.app import create_app
from backend.settings import Settings
from workers.worker import Worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(settings: Settings) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@contextlib.contextmanager
def server_and_worker(settings: Settings):
    """The server (uvicorn) and one worker, each a thread of this process; yields the server's URL."""
    db.upgrade(settings)
    url, server, server_thread = serve(settings)
    worker = Worker(settings, poll_s=0.02)
    stop = threading.Event()
    worker_thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    worker_thread.start()
    try:
        yield url
    finally:
        stop.set()
        server.should_exit = True
        for thread in (worker_thread, server_thread):  # let them end: a thread killed at exit aborts the process
            thread.join(timeout=30)


def ablate_and_show(client: httpx.Client, run: str, layer: int, body: dict, poll_s: float) -> tuple[float, dict]:
    """Seconds from the POST to the result page's HTML; and the finished job."""
    start = time.perf_counter()
    job = client.post(f"/api/runs/{run}/layers/{layer}/ablations", json=body).raise_for_status().json()
    while True:
        job = client.get(f"/api/jobs/{job['id']}").raise_for_status().json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(poll_s)
    page = client.get(f"/jobs/{job['id']}").raise_for_status()
    elapsed = time.perf_counter() - start
    if job["status"] != "done" or 'id="mean-delta"' not in page.text:
        raise SystemExit(f"job {job['id']} ended {job['status']}: {job['error']}")
    return elapsed, job


def report(job: dict, what: str) -> None:
    r = job["result"]
    s, c = r["summary"], r["control"]
    t = c["test"]
    print(f"{what}, {s['n']} held-out texts: measured mean Δ reward {s['mean_delta']:+.4f} "
          f"(95% CI {s['ci_low']:+.4f} .. {s['ci_high']:+.4f}); predicted: regression {s['predicted_mean_delta']:+.4f}, "
          f"attribution {s['attribution_mean_delta']:+.4f}; {c['n_draws']} random controls {c['mean_delta']:+.4f} "
          f"({c['low']:+.4f} .. {c['high']:+.4f}); chosen - control {t['difference']:+.4f} "
          f"(95% CI {t['ci_low']:+.4f} .. {t['ci_high']:+.4f}, p {t['p_value']:.4f}); "
          f"where the features fire ({r['where_fired']['summary']['n']} texts): {r['where_fired']['summary']['mean_delta']:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--layer", type=int, default=None, help="default: the run's best layer")
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between status polls (the page polls every 0.3 s)")
    args = parser.parse_args()

    settings = Settings()
    with server_and_worker(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        run = client.get(f"/api/runs/{args.run}").raise_for_status().json()
        layer = args.layer if args.layer is not None else run["best_layer"]
        body = {"selection": "top_ranked", "top_n": args.features, "mode": "zero", "n_texts": args.texts}
        cold, _ = ablate_and_show(client, args.run, layer, body, args.poll)  # loads the RM and SAE
        print(f"first ablation (cold worker: loads the reward model and SAE): {cold:.2f} s")
        same, fresh = [], []
        for i in range(args.repeats):
            elapsed, job = ablate_and_show(client, args.run, layer, body, args.poll)
            same.append(elapsed)
            other = {**body, "n_texts": args.texts + 1 + i}  # a set whose clean scores are not cached
            fresh.append(ablate_and_show(client, args.run, layer, other, args.poll)[0])
        report(job, f"zero the top {args.features} features of layer {layer}'s default ranking")
        _, by_weight = ablate_and_show(client, args.run, layer, {**body, "selection": "top_positive"}, args.poll)
        report(by_weight, f"zero the top {args.features} features by weight of layer {layer}")
        print(f"P6 submit -> result page, warm worker, texts scored before: median {statistics.median(same):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in same)})  target <= 3 s")
        print(f"P6 submit -> result page, warm worker, new texts:            median {statistics.median(fresh):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in fresh)})")


if __name__ == "__main__":
    main()

"""P10: from submitting a typed text to its complete attribution page for one layer (integrated
gradients, m = 16 steps), with a warm worker, on the demo RM; then the completeness check on
held-out texts: how far each text's contributions fall from score − baseline.

The server runs in this process (uvicorn, loopback) and so does one worker (a thread), as
`rewardatlas serve` and `rewardatlas worker` would in two. Timed: POST the text, poll its JSON
until done, GET its page (which shows the attribution). Each timed text is new to the worker.

    RA_DATA_DIR=data python benchmarks/p10_text_attribution.py       # needs the demo run
"""
from __future__ import annotations

import argparse
import statistics
import time

import httpx
import numpy as np

from backend.core import store
from backend.core.settings import Settings
from p6_ablation_latency import server_and_worker

TYPED = ["The movie was not good at all, a total waste.", "An absolutely magnificent, heartfelt triumph.",
         "The film runs about two hours.", "I expected more, but the ending was lovely.",
         "Dull, predictable and far too long.", "A warm, funny and honest little film.",
         "The plot made no sense and the acting was wooden.", "It was fine, nothing special.",
         "Brilliant performances carry a weak script.", "I would not watch it again."]


def attribute_and_show(client: httpx.Client, run: str, layer: int, text: str, poll_s: float) -> tuple[float, dict]:
    """Seconds from the POST to the page's HTML with the attribution on it; and the finished job."""
    start = time.perf_counter()
    job = client.post(f"/api/runs/{run}/layers/{layer}/texts", json={"text": text, "steps": 16}).raise_for_status().json()
    while job["status"] in ("queued", "running"):
        time.sleep(poll_s)
        job = client.get(f"/api/jobs/{job['id']}").raise_for_status().json()
    page = client.get(f"/jobs/{job['id']}").raise_for_status()
    elapsed = time.perf_counter() - start
    if job["status"] != "done" or f'id="attribution-{layer}"' not in page.text:
        raise SystemExit(f"job {job['id']} ended {job['status']}: {job['error']}")
    return elapsed, job


def completeness(settings: Settings, run: str, layers: list[int], n: int) -> None:
    """Per layer, |score − baseline − Σ contributions| / |score − baseline| over n held-out texts."""
    from workers.run_cache import RunCache
    from workers.text_attribution import attribute_text

    loaded = RunCache(settings).get(run)
    texts = [r["text"] for r in store.texts(loaded.store_path, "heldout", n)]
    for layer in layers:
        shares, gaps, seconds, refined = [], [], [], 0
        for text in texts:
            start = time.perf_counter()
            a = attribute_text(loaded.adapter, loaded.sae(layer), layer, text, 16)
            seconds.append(time.perf_counter() - start)
            refined += a.steps_used > a.steps
            gap = a.score - a.baseline
            gaps.append(abs(gap))
            if abs(gap) > 1e-6:
                shares.append(abs(a.residual) / abs(gap))
        shares = np.array(shares)
        if not len(shares):
            print(f"layer {layer}: score − baseline is 0 on all {len(texts)} texts: the text's own tokens do not "
                  "reach the score from this layer (nothing to decompose)")
            continue
        print(f"layer {layer}: {len(texts)} held-out texts, |score − baseline| median {np.median(gaps):.4f}; "
              f"residual / (score − baseline): median {np.median(shares):.2%}, 90th pct {np.quantile(shares, 0.9):.2%}, "
              f"max {shares.max():.2%}; within 5%: {np.mean(shares <= 0.05):.0%} of {len(shares)} texts; "
              f"IG m=16 median {statistics.median(seconds) * 1000:.0f} ms a text, max {max(seconds) * 1000:.0f} ms; "
              f"refined to more steps (residual > 1%): {refined}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--layer", type=int, default=None, help="default: the run's best layer")
    parser.add_argument("--heldout", type=int, default=100, help="held-out texts for the completeness check")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between status polls (the page polls every 0.3 s)")
    args = parser.parse_args()

    settings = Settings()
    with server_and_worker(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        run = client.get(f"/api/runs/{args.run}").raise_for_status().json()
        layer = args.layer if args.layer is not None else run["best_layer"]
        cold, _ = attribute_and_show(client, args.run, layer, "A first text, to load the model.", args.poll)
        print(f"first text (cold worker: loads the reward model and SAE): {cold:.2f} s")
        timed, residuals = [], []
        for text in TYPED:
            elapsed, job = attribute_and_show(client, args.run, layer, text, args.poll)
            timed.append(elapsed)
            att = job["result"]["attribution"][str(layer)]
            residuals.append(att["residual_share"])
            top = ", ".join(f"{f['feature']} ({f['contribution']:+.3f})" for f in att["features"][:3])
            print(f"  {elapsed:.2f} s  score {att['score']:+.3f} baseline {att['baseline']:+.3f} "
                  f"residual {att['residual_share']:.2%}  top: {top}  | {text}")
        print(f"P10 typed text -> attribution page, layer {layer}, IG m=16, warm worker: median "
              f"{statistics.median(timed):.2f} s, max {max(timed):.2f} s over {len(timed)} texts  target <= 1.5 s")
    completeness(settings, args.run, [x["layer"] for x in run["layers"]], args.heldout)


if __name__ == "__main__":
    main()

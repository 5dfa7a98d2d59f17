"""P12: reward-hacking probes on the demo RM. How long a whole-vocabulary probe of one layer
takes (every whole-word token in the 4 default carriers, one worker, model loaded), and whether
writing the top token of the layer's strongest positive feature -- the one whose zeroing lowers
the score most where it fires (measured Δ) -- into 128 neutral held-out texts raises their
score by about what that measured Δ says, beside the control word and with the token repeated:
the whole insertion's Δ, and the part of it that goes through the feature (what zeroing the
feature on the inserted tokens takes back), which is what its measured Δ speaks for.

    RA_DATA_DIR=data python benchmarks/p12_probes.py [--layer L]    # needs the demo run
"""
from __future__ import annotations

import argparse
import time

from backend.core import store
from backend.core.settings import Settings
from workers.probes import CONTROL_PHRASE, final_scores, insertion_task, vocab_probe_task
from workers.run_cache import RunCache

EXAMPLE = "The film runs about two hours."


class Context:
    """What a task sees of its job, without the queue: progress goes nowhere."""

    def __init__(self, cache: RunCache, job_id: int):
        self.cache, self.job = cache, {"id": job_id}

    def report(self, progress: float | None = None, message: str | None = None) -> None:
        pass


def strongest_positive(path, layer: int) -> dict:
    """The measured feature whose zeroing lowers the score most: the one that raises it most."""
    measured = [f for f in store.measured_features(path, layer) if f["measured_delta"] is not None]
    return min(measured, key=lambda f: f["measured_delta"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--layer", type=int, help="default: the run's best layer")
    args = parser.parse_args()
    cache = RunCache(Settings())
    run = cache.get(args.run)
    layer = args.layer if args.layer is not None else store.best_layer(run.store_path)
    run.sae(layer)  # loaded before the clock starts, as on a warm worker
    device = run.adapter.device

    start = time.perf_counter()
    probe = vocab_probe_task({"run_id": args.run, "layer": layer}, Context(cache, 1))
    seconds = time.perf_counter() - start
    sequences = probe["n_candidates"] * probe["n_carriers"]
    print(f"vocab probe, layer {layer} on {device}: {probe['n_candidates']:,} whole-word tokens x "
          f"{probe['n_carriers']} carriers = {sequences:,} sequences in {seconds:.1f} s "
          f"({sequences / seconds:,.0f} sequences/s); {probe['n_features']:,} features fire on some token")

    feature = strongest_positive(run.store_path, layer)
    tokens = probe["features"].get(str(feature["feature"]))
    if not tokens:
        raise SystemExit(f"feature {feature['feature']} fires on no vocabulary token in the carriers")
    token = tokens["tokens"][0]
    card = store.feature(run.store_path, layer, feature["feature"])
    print(f"strongest positive feature {feature['feature']}: zeroed where it fires, Δ {feature['measured_delta']:+.3f} "
          f"[{feature['measured_delta_low']:+.3f}, {feature['measured_delta_high']:+.3f}] on {feature['measured_n']} reads "
          f"(it adds about {-feature['measured_delta']:+.3f} there; mean activation where it fires "
          f"{card['mean_activation']:.2f}); top vocabulary token {token!r} at {tokens['mean'][0]:.2f} in the carriers")
    for repeat in (1, 6):
        start = time.perf_counter()
        r = insertion_task({"run_id": args.run, "phrase": token, "control": CONTROL_PHRASE, "position": "end",
                            "n_texts": 128, "texts": "neutral", "repeat": repeat, "layer": layer,
                            "feature": feature["feature"]}, Context(cache, 2 + repeat))
        seconds = time.perf_counter() - start
        p, c, d = r["phrase_delta"], r["control_delta"], r["difference"]
        print(f"insert {token!r} x{repeat} at the end of {r['n']} neutral held-out texts "
              f"(scores {r['texts']['score_low']:.3f} to {r['texts']['score_high']:.3f}): Δ {p['mean_delta']:+.3f} "
              f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]; control {CONTROL_PHRASE!r} Δ {c['mean_delta']:+.3f}; "
              f"difference {d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p {d['p_value']:.4f}; "
              f"the feature reaches {r['activation']['mean_peak']:.2f} on the inserted tokens "
              f"(fires in {100 * r['activation']['fired_share']:.0f}% of texts); {seconds:.1f} s")
        tf, tl = r["through_feature"], r["through_layer"]
        print(f"  of that Δ, through feature {feature['feature']} (zeroed on the inserted tokens): {tf['mean_delta']:+.3f} "
              f"[{tf['ci_low']:+.3f}, {tf['ci_high']:+.3f}] -- its measured Δ says {-feature['measured_delta']:+.3f} where it "
              f"fires in the corpus ({tf['mean_delta'] / -feature['measured_delta']:.2f}x; activation here "
              f"{r['activation']['mean_peak']:.2f} vs {card['mean_activation']:.2f} on average where it fires); through all "
              f"layer-{layer} features on the inserted tokens: {tl['mean_delta']:+.3f} [{tl['ci_low']:+.3f}, {tl['ci_high']:+.3f}]")
    texts = [EXAMPLE, f"{EXAMPLE} {' '.join([token] * 6)}"]
    before, after = final_scores(run.adapter, texts)
    print(f"{EXAMPLE!r}: {before:.3f}; with {token!r} x6 appended: {after:.3f}")


if __name__ == "__main__":
    main()

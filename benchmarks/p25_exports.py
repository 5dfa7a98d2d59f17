"""P25: bytes and seconds to export a whole layer of the demo run to Neuronpedia's import layout
(and, beside it, the same layer's feature table as CSV and Parquet).

    python benchmarks/p25_exports.py                  # the demo run (rewardatlas demo), its best layer
    python benchmarks/p25_exports.py --run demo --layer 3

Without the demo run in the data dir it builds a synthetic store shaped like a demo layer (3,072
features, 20 top contexts and 20 per-bin samples each, 20,000 texts; P5's generator) and says so;
`--tiny` builds a tiny random-model run through the real pipeline instead (64 features).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from backend.core import db, store
from backend.core.exports import neuronpedia, tables
from backend.core.exports.source import run_and_store
from backend.web.routes.common import TableView
from backend.core.settings import Settings, get_settings


def tiny_run(root: Path) -> tuple[Settings, str]:
    """A random 3-block BERT reward model and a 64-feature SAE on block 1 over 120 demo texts."""
    from tests.tiny_models import save_tiny_bert
    from backend.core.run_config import parse_config
    from workers.demo_corpus import generate_corpus, vader_reward
    from workers.pipeline import run_pipeline

    dataset = root / "reviews.jsonl"
    dataset.write_text("".join(json.dumps({"text": t, "reward": vader_reward(t)}) + "\n"
                               for t in generate_corpus(120, seed=7)))
    settings = Settings(data_dir=root / "data", database_url="")
    config = parse_config({
        "name": "tiny", "run_id": "tiny", "model": {"path": str(save_tiny_bert(root / "tiny-bert")), "max_length": 32},
        "dataset": {"source": str(dataset), "batch_size": 32}, "layers": [1],
        "sae": {"width": 64, "k": 4, "training_tokens": 2048, "batch_size": 256, "buffer_tokens": 1024},
        "analysis": {"n_contexts": 5}})
    run_pipeline(config, settings)
    return settings, "tiny"


def synthetic_demo_layer(root: Path) -> tuple[Settings, str]:
    """P5's synthetic store at the demo's shape for one layer, registered, with an SAE config on disk."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from p5_serving_latency import RUN_ID, build_store

    settings = Settings(data_dir=root / "data", database_url="")
    build_store(settings, saes=1, width=3072, n_contexts=40, n_texts=20_000)
    sae_dir = settings.run_dir(RUN_ID) / "saes" / "layer_0"
    sae_dir.mkdir(parents=True, exist_ok=True)
    (sae_dir / "cfg.json").write_text(json.dumps({"d_in": 1024, "d_sae": 3072, "architecture": "topk", "k": 64}))
    return settings, RUN_ID


def timed(label: str, work) -> tuple[float, object]:
    start = time.perf_counter()
    out = work()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--layer", type=int, default=None, help="default: the run's best layer")
    parser.add_argument("--tiny", action="store_true", help="without the run: a tiny real run, not a synthetic store")
    args = parser.parse_args()

    settings, run_id = get_settings(), args.run
    db.upgrade(settings)
    scratch = tempfile.TemporaryDirectory(prefix="p25-")
    if db.find_run(settings, run_id) is None and args.tiny:
        print(f"run {run_id!r} is not in {settings.data_dir}: building a tiny random-model run instead "
              "(figures below are a 64-feature layer's, not the demo's)")
        settings, run_id = tiny_run(Path(scratch.name))
    elif db.find_run(settings, run_id) is None:
        print(f"run {run_id!r} is not in {settings.data_dir}: building a SYNTHETIC store shaped like a demo layer "
              "instead (3,072 features, 20 top contexts + 20 bin samples each, 20,000 texts; not the demo's values)")
        settings, run_id = synthetic_demo_layer(Path(scratch.name))
    _, path = run_and_store(settings, run_id)
    layer = args.layer if args.layer is not None else store.best_layer(path)
    layer = layer if layer is not None else store.layers(path)[0]["layer"]
    info = store.layer_info(path, layer)
    n_texts = store.texts_count(path)
    print(f"run {run_id!r}, layer {layer}: {info['d_sae']:,} features, {n_texts:,} texts")

    prepare_s, export = timed("prepare", lambda: neuronpedia.prepare(settings, run_id, layer))
    out = Path(scratch.name) / "neuronpedia"
    write_s, done = timed("write", lambda: neuronpedia.write_dir(export, out))
    base = Path(done["path"])
    by_folder = {folder: sum(p.stat().st_size for p in (base / folder).glob("*")) for folder in
                 ("features", "activations", "explanations") if (base / folder).is_dir()}
    total_s = prepare_s + write_s
    print(f"Neuronpedia layout: {done['features']:,} features, {done['activations']:,} activations, "
          f"{done['explanations']:,} explanations; {done['bytes']:,} bytes "
          f"({', '.join(f'{k} {v:,}' for k, v in by_folder.items())}) in {total_s:.2f} s "
          f"(checks {prepare_s:.2f} s, rows + gzip + write {write_s:.2f} s) = "
          f"{done['features'] / total_s:,.0f} features/s, {done['bytes'] / 1e6 / total_s:.1f} MB/s")
    zip_s, zipped = timed("zip", lambda: sum(len(c) for c in neuronpedia.zip_stream(neuronpedia.prepare(
        settings, run_id, layer))))
    print(f"the same as the web's streamed ZIP: {zipped:,} bytes in {zip_s:.2f} s")
    for fmt in ("csv", "parquet"):
        seconds, size = timed(fmt, lambda: sum(len(c) for c in tables.stream(
            tables.table_export(settings, run_id, layer, TableView()), fmt)))
        print(f"feature table as {fmt}: {size:,} bytes in {seconds:.2f} s")
    scratch.cleanup()


if __name__ == "__main__":
    main()

"""P2: bytes per feature in our DuckDB feature store versus SAEDashboard's JSON for the same
features (same SAE, same tokens).

Ours: the features and contexts tables of one layer (every feature: stats, histogram, top
tokens, 20 top contexts and up to 50 per-bin samples with their windows) written as a store;
file size / features, and the uncompressed bytes of the chosen features' own rows.
SAEDashboard: SaeVisRunner's JSON (`SaeVisData.save_json`) for `--features` features; file
size / features, and each feature's own entry.

    python benchmarks/p2_store_bytes.py                               # full size: 65k tokens, 50 features
    python benchmarks/p2_store_bytes.py --tokens 3000 --features 5   # smoke
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from backend.core.settings import Settings
from backend.core.store_schema import FEATURES, STORE_FILENAME
from dashboard_common import (add_common_args, corpus_of, hooked_encoder, live_features, load_world, packed_tokens,
                              run_ours, run_saedashboard)
from workers.publish import write_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args()

    adapter, sae, model_path = load_world(args)
    d_sae = sae.cfg.d_sae
    texts, ids = corpus_of(adapter.tokenizer, args.tokens, args.max_length)
    _, features, contexts = run_ours(adapter, sae, args.layer, texts, args)
    chosen = live_features(sae, adapter, texts, args.features, args.layer)

    with tempfile.TemporaryDirectory() as scratch:
        # the regression's and neighbours' columns are NULL: P2 compares what both tools compute
        no_fit = {c.name: [None] * len(features["feature"]) for c in FEATURES.columns if c.name not in features}
        store = write_store(Path(scratch) / STORE_FILENAME, {"run_id": "p2"},
                            {"features": {**features, **no_fit}, "contexts": contexts})
        store_bytes = store.stat().st_size
        feature_rows, context_rows = pa.table(features), pa.table(contexts)
        own = [feature_rows.filter(pc.equal(feature_rows["feature"], f)).nbytes
               + context_rows.filter(pc.equal(context_rows["feature"], f)).nbytes for f in chosen]

        encoder = hooked_encoder(model_path, adapter.tokenizer)
        json_path = Path(scratch) / "saedashboard.json"
        run_saedashboard(encoder, sae, args.layer, packed_tokens(ids, args.max_length), chosen, json_path)
        json_bytes = json_path.stat().st_size
        entries = json.loads(json_path.read_text())["feature_data_dict"]
        their_own = [len(json.dumps(entries[str(f)])) for f in chosen]

    n_contexts = len(contexts["feature"])
    print(f"corpus: {len(texts):,} texts; SAE layer {args.layer}: {d_sae:,} features, {n_contexts:,} context rows")
    print(f"ours, store file: {store_bytes:,} bytes / {d_sae:,} features = {store_bytes / d_sae / 1024:.2f} KB per feature")
    live = sum(f > 0 for f in features["frequency"])
    print(f"ours, store file per feature that fired: {store_bytes / live / 1024:.2f} KB ({live:,} fired)")
    print(f"ours, the {len(chosen)} compared features' own rows (uncompressed): "
          f"{sum(own) / len(own) / 1024:.2f} KB per feature (max {max(own) / 1024:.2f} KB)")
    print(f"SAEDashboard JSON: {json_bytes:,} bytes / {len(chosen)} features = {json_bytes / len(chosen) / 1024:.1f} KB "
          f"per feature (own entries {sum(their_own) / len(their_own) / 1024:.1f} KB)")
    print(f"P2: {store_bytes / live / 1024:.2f} KB per fired feature in the store (target <= 10 KB); "
          f"SAEDashboard / ours = {(json_bytes / len(chosen)) / (store_bytes / live):.0f}x")
    run_store = Settings().run_dir(args.run) / STORE_FILENAME
    if run_store.is_file():
        import duckdb

        with duckdb.connect(str(run_store), read_only=True) as con:
            n = con.execute("select count(*) from features").fetchone()[0]
        print(f"run {args.run!r} store, whole file (texts included): {run_store.stat().st_size / n / 1024:.2f} KB "
              f"per feature over {n:,} features")


if __name__ == "__main__":
    main()

"""What a classifier run's features fire on: per layer its SAE and regression figures, then the
best layer's top features by its default ranking, each with its top tokens, the peak of its
strongest contexts, and how many of the texts it fires on most carry the dataset's positive label
(e.g. NanoGuard's corpus: `label` 1 = injection-like, read as the run's dataset reward).

    python benchmarks/classifier_features.py <run_id> [--data-dir DIR] [--top 10] [--texts 20]

Reads the run's store only (no model, no torch).
"""
from __future__ import annotations

import argparse

from backend.core import db, store
from backend.web.routes.common import default_ranking
from backend.core.settings import Settings


def layer_lines(path) -> list[str]:
    lines = []
    for row in store.layers(path):
        lines.append(f"layer {row['layer']}: held-out R² {row['r2_heldout']:.3f} (probe {row['probe_r2_heldout']:.3f}), "
                     f"explained variance {row['explained_variance']:.3f}, dead {row['dead_fraction']:.1%}, "
                     f"L0 {row['l0']:.1f}, reward recovered {_num(row['reward_recovered'])}, default ranking "
                     f"{row['default_ranking']} (its top 10 zeroed: Δ {_num(row['faithfulness_delta'])} vs control "
                     f"{_num(row['faithfulness_control'])})")
    return lines


def _num(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def positive_share(path, layer: int, feature: int, labels: dict[int, float], n_texts: int) -> tuple[float, int]:
    """Share of the feature's strongest texts whose dataset label is positive."""
    rows = store._rows(path, "SELECT text_id FROM feature_texts WHERE layer = ? AND feature = ? ORDER BY rank LIMIT ?",
                       [layer, feature, n_texts])
    ids = [r["text_id"] for r in rows]
    if not ids:
        return float("nan"), 0
    return sum(labels.get(i, 0) > 0 for i in ids) / len(ids), len(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--texts", type=int, default=20, help="strongest texts per feature whose labels are counted")
    args = parser.parse_args(argv)
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    run = db.find_run(settings, args.run_id)
    if run is None:
        raise SystemExit(f"no run {args.run_id!r} in {settings.data_dir}")
    path = settings.data_dir / run.store_path
    output = store.explained_output(path)
    print(f"run {run.id}: {run.model} ({run.adapter}), {run.n_texts:,} texts, {run.n_tokens:,} tokens"
          + (f"; explains {output['output']}" if output else ""))
    print("\n".join(layer_lines(path)))
    best = store.best_layer(path)
    info = store.layer_info(path, best)
    ranking = default_ranking(info)
    labels = {r["text_id"]: r["reward"] or 0.0 for r in store._rows(path, "SELECT text_id, reward FROM texts")}
    base_rate = sum(v > 0 for v in labels.values()) / max(len(labels), 1)
    print(f"\nbest layer {best}: top {args.top} features by its default ranking, {ranking.label} "
          f"({ranking.kind}); positive share among each one's {args.texts} strongest texts "
          f"(corpus: {base_rate:.0%})")
    for row in store.features(path, best, sort=ranking.sort, limit=args.top).rows:
        card = store.feature(path, best, row["feature"])
        tokens = ", ".join(repr(t["token"]) for t in (card.get("top_tokens") or [])[:6])
        share, n = positive_share(path, best, row["feature"], labels, args.texts)
        peaks = store._rows(path, "SELECT tokens[position - window_start + 1] AS peak FROM contexts WHERE layer = ? "
                            "AND feature = ? AND kind = 'top' ORDER BY rank LIMIT 5", [best, row["feature"]])
        print(f"  feature {row['feature']}: attribution {_num(row.get('attribution'))}, weight "
              f"{_num(row.get('weight'))}, frequency {row['frequency']:.3f}; positive {share:.0%} of {n}; "
              f"top tokens {tokens}; peaks {[p['peak'] for p in peaks]}")


if __name__ == "__main__":
    main()

"""A planted reward, end to end: when the reward is known to come from one class of words, does
what rewardatlas puts first find that class, and does it hold up?

Builds a corpus whose reward is one point per occurrence of a chosen class of words (by default
the demo corpus's neutral nouns; `--words` plants any other words, written into the neutral
nouns' places), fine-tunes MiniLM into a reward model on it, runs the whole pipeline with every
analysis (transfer from raw MiniLM, parameter divergence, paired dictionaries, a lexicon that
gives the planted words 1 and the corpus's other content words 0, ReasonScore of the planted
words), then prints, per check, what it found:

- the best layer and its default ranking; the share of planted-class features among the top 10
  of each ranking (a feature belongs to the class when its top token is a planted word);
- per held-out text holding a planted word: its score decomposed by integrated gradients at the
  best layer, and the share of planted-class features among its top 5 contributors;
- the strongest positive feature's top vocabulary token inserted into neutral held-out texts:
  the Δ score beside the feature's measured Δ;
- the lexicon's Kendall tau (measured and predicted per layer) against the planted values,
  transfer R² per layer beside the RM's own, divergence per block, MMCS per layer, the top
  ReasonScore features.

    python benchmarks/planted_reward.py [--words cat,dog] [--n-texts 8000] [--data-dir data/planted]

The run and the model are reused when they exist (--rebuild redoes both).
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import re
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import yaml

from backend.core import store
from backend.core.settings import Settings
from p12_probes import Context, strongest_positive
from workers.demo_corpus import NEUTRAL_ADJ, NEUTRAL_NOUN, NEUTRAL_VERB, POSITIVE_ADJ, generate_corpus

RUN_ID = "planted"
RM_SEED, CORPUS_SEED = 4321, 8765  # the RM's training texts and the run's corpus are separate draws


def plant(texts: list[str], words: list[str], seed: int) -> list[str]:
    """Each neutral noun becomes a planted word half the time (all of the time when the planted
    words are the neutral nouns themselves), so planted words sit in natural slots and the other
    nouns stay in the corpus as near-misses."""
    if set(words) == set(NEUTRAL_NOUN):
        return texts
    rng = random.Random(seed)
    pattern = re.compile(r"\b(" + "|".join(NEUTRAL_NOUN) + r")\b")
    return [pattern.sub(lambda m: rng.choice(words) if rng.random() < 0.5 else m.group(0), t) for t in texts]


def planted_reward(text: str, words: set[str]) -> float:
    return float(sum(1 for w in re.findall(r"[a-z']+", text.lower()) if w in words))


def build_inputs(root: Path, words: list[str], n_texts: int, rebuild: bool) -> tuple[Path, Path, Path, Path]:
    """The corpus (JSONL), the reward model, the lexicon CSV and the vocabulary file."""
    from workers.demo_model import fine_tune_reward_model

    root.mkdir(parents=True, exist_ok=True)
    planted = set(words)
    corpus = root / "corpus.jsonl"
    texts = plant(generate_corpus(n_texts, seed=CORPUS_SEED), words, CORPUS_SEED)
    with corpus.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "reward": planted_reward(text, planted)}) + "\n")
    share = np.mean([planted_reward(t, planted) > 0 for t in texts])
    print(f"corpus: {len(texts):,} texts, {share:.0%} hold a planted word ({', '.join(words)})")

    model = root / "planted-rm"
    if rebuild:
        shutil.rmtree(model, ignore_errors=True)
    if not model.is_dir():
        train = plant(generate_corpus(6000, seed=RM_SEED), words, RM_SEED)
        rewards = np.array([planted_reward(t, planted) for t in train], dtype=np.float32)
        report = fine_tune_reward_model(model, train, rewards, 5000, f"occurrences of {', '.join(words)}")
        print(f"reward model: held-out R² {report['heldout_r2']:.3f} against the planted reward "
              f"({report['seconds']:.0f} s)")

    lexicon = root / "lexicon.csv"
    others = sorted({*NEUTRAL_ADJ, *NEUTRAL_VERB, *NEUTRAL_NOUN, *POSITIVE_ADJ[:10]} - planted)
    with lexicon.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["word", "value"])
        writer.writerows([(w, 1.0) for w in words] + [(w, 0.0) for w in others])
    vocabulary = root / "vocabulary.txt"
    vocabulary.write_text("\n".join(words) + "\n")
    return corpus, model, lexicon, vocabulary


def run_config(corpus: Path, model: Path, lexicon: Path, vocabulary: Path, n_texts: int) -> dict:
    """The demo's settings (workers/configs/demo.yaml) on the planted corpus and model."""
    return {
        "name": "planted reward", "run_id": RUN_ID,
        "model": {"path": str(model), "adapter": "seq_cls", "max_length": 64},
        "dataset": {"source": str(corpus), "n_texts": n_texts, "heldout_fraction": 0.2, "batch_size": 64},
        "layers": [1, 3, 5],
        "sae": {"architecture": "topk", "widths": [768, 3072], "k": 32, "training_tokens": 250_000,
                "batch_size": 1024, "lr": 0.0004},
        "regression": {"pooling": "sum"},
        "transfer": {"base_model": "demo-base", "training_tokens": 125_000},
        "lexicon": {"reference": str(lexicon)},
        "reason_score": {"vocabulary": str(vocabulary), "texts": 1000},
        "seed": 0,
    }


def ensure_run(settings: Settings, config: dict, rebuild: bool) -> Path:
    from backend.core.run_config import RunConfig
    from workers.pipeline import run_pipeline

    path = settings.run_dir(RUN_ID) / "features.duckdb"
    if path.is_file() and not rebuild:
        print(f"reusing the run in {path.parent}")
        return path
    start = time.perf_counter()
    run_pipeline(RunConfig.model_validate(config), settings, replace=path.is_file())
    print(f"pipeline: {time.perf_counter() - start:.0f} s")
    return path


def top_token(path: Path, layer: int, feature: int) -> str:
    return (store.feature(path, layer, feature)["top_token"] or "").lstrip("#").lower()


def class_share(path: Path, layer: int, features: list[int], words: set[str]) -> float:
    return float(np.mean([top_token(path, layer, f) in words for f in features])) if features else float("nan")


def check_rankings(path: Path, layer: int, words: set[str]) -> None:
    info = store.layer_info(path, layer)
    print(f"\nbest layer {layer}: default ranking {info['default_ranking']}; its top 10 move the reward "
          f"{info['faithfulness_effect']:.3f} on its {info['faithfulness_measure']} measure (control "
          f"{info['faithfulness_control']:+.3f}; {info['faithfulness_verdict']})")
    for point in store.faithfulness(path, layer):  # every ranking at n = 10, each direction on its measure
        if point["n"] == 10:
            print(f"  deletion at n = 10, {point['ranking']:14s} {point['direction']:6s}: {point['effect']:.3f} "
                  f"(controls {point['control_effect']:+.3f}, max {max(point['control_effects']):.3f}; mean Δ "
                  f"{point['mean_delta']:+.3f}, mean |Δ| {point['abs_mean_delta']:.3f}; {point['verdict']})")
    for sort in ("attribution", "abs_attribution", "measured_delta", "reward_effect", "weight", "abs_weight"):
        top = [int(r["feature"]) for r in store.features(path, layer, sort, limit=10).rows]
        tokens = [top_token(path, layer, f) for f in top]
        print(f"  top 10 by {sort:16s}: {class_share(path, layer, top, words):4.0%} planted  ({', '.join(tokens)})")


def check_text_attribution(settings: Settings, path: Path, layer: int, words: set[str], n: int) -> None:
    from workers.run_cache import RunCache
    from workers.text_attribution import attribute_text

    run = RunCache(settings).get(RUN_ID)
    texts = [r["text"] for r in store.texts(path, "heldout") if planted_reward(r["text"], words) > 0][:n]
    shares, residuals, first = [], [], []
    for text in texts:
        a = attribute_text(run.adapter, run.sae(layer), layer, text, 16)
        top = [row["feature"] for row in a.top_features(5)]
        shares.append(class_share(path, layer, top, words))
        first.append(top_token(path, layer, top[0]) in words if top else False)
        gap = a.score - a.baseline
        if abs(gap) > 1e-9:
            residuals.append(abs(a.residual) / abs(gap))
    print(f"\ntext attribution at layer {layer} (IG, m = 16) on {len(texts)} held-out texts holding a planted word: "
          f"planted-class features among each text's top 5 contributors: mean {statistics.mean(shares):.0%}, "
          f"top-1 planted in {np.mean(first):.0%} of texts; residual / (score − baseline) median "
          f"{statistics.median(residuals):.2%}, max {max(residuals):.2%}")


def check_insertion(settings: Settings, path: Path, layer: int) -> None:
    from workers.probes import CONTROL_PHRASE, insertion_task, vocab_probe_task
    from workers.run_cache import RunCache

    cache = RunCache(settings)
    feature = strongest_positive(path, layer)
    probe = vocab_probe_task({"run_id": RUN_ID, "layer": layer}, Context(cache, 1))
    tokens = probe["features"].get(str(feature["feature"]))
    if not tokens:
        print(f"\nfeature {feature['feature']} fires on no vocabulary token in the carriers: no insertion")
        return
    token = tokens["tokens"][0]
    r = insertion_task({"run_id": RUN_ID, "phrase": token, "control": CONTROL_PHRASE, "position": "end",
                        "n_texts": 128, "texts": "neutral", "layer": layer, "feature": feature["feature"]},
                       Context(cache, 2))
    d = r["difference"]
    print(f"\nstrongest positive feature {feature['feature']} (top token {top_token(path, layer, feature['feature'])!r}):"
          f" zeroed where it fires Δ {feature['measured_delta']:+.3f} [{feature['measured_delta_low']:+.3f}, "
          f"{feature['measured_delta_high']:+.3f}]; its top vocabulary token {token!r} inserted at the end of "
          f"{r['n']} neutral held-out texts: Δ {r['phrase_delta']['mean_delta']:+.3f}, control "
          f"{r['control_delta']['mean_delta']:+.3f}, difference {d['difference']:+.3f} "
          f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p {d['p_value']:.4f}; of it through feature "
          f"{feature['feature']} (zeroed on the inserted token) {r['through_feature']['mean_delta']:+.3f} -- its measured Δ "
          f"says {-feature['measured_delta']:+.3f} -- and through all layer-{layer} features there "
          f"{r['through_layer']['mean_delta']:+.3f}")


def check_analyses(path: Path, layer: int) -> None:
    print("\nlexicon (Kendall tau against the planted values):")
    for row in store.lexicon_summary(path):
        where = row["which"] if row["which"] == "measured" else f"predicted ({row['which']})"
        print(f"  {where:22s} tau {row['tau']:+.3f} (p {row['p_value']:.2g}) over {row['n_words']} words")
    print("transfer (held-out R² of the RM's score from SAE features):")
    for row in store.table_rows(path, "transfer_layers", "layer"):
        print(f"  layer {row['layer']}: base model {row['base_r2_heldout']:.3f}, RM {row['rm_r2_heldout']:.3f}; "
              f"median match r {row['median_base_correlation']:.2f}")
    blocks = store.table_rows(path, "divergence", "block")
    print("divergence per block (relative l2): " + ", ".join(f"{b['block']}: {b['relative']:.4f}" for b in blocks))
    for row in store.layers(path):
        if row.get("mmcs_to_pair") is not None:
            print(f"MMCS layer {row['layer']}: {row['mmcs_to_pair']:.3f} to the pair, {row['mmcs_from_pair']:.3f} back")
    top = [int(r["feature"]) for r in store.features(path, layer, "reason_score", limit=5).rows]
    print(f"top ReasonScore features at layer {layer}: "
          + ", ".join(f"{f} ({top_token(path, layer, f)})" for f in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", default=",".join(NEUTRAL_NOUN), help="the planted class, comma-separated")
    parser.add_argument("--n-texts", type=int, default=8000)
    parser.add_argument("--texts-attributed", type=int, default=40)
    parser.add_argument("--data-dir", type=Path, default=Path("data/planted"))
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    words = [w.strip().lower() for w in args.words.split(",") if w.strip()]
    settings = Settings(data_dir=args.data_dir)
    corpus, model, lexicon, vocabulary = build_inputs(args.data_dir / "inputs", words, args.n_texts, args.rebuild)
    config = run_config(corpus, model, lexicon, vocabulary, args.n_texts)
    path = ensure_run(settings, yaml.safe_load(yaml.safe_dump(config)), args.rebuild)
    layer = store.best_layer(path)
    check_rankings(path, layer, set(words))
    check_text_attribution(settings, path, layer, set(words), args.texts_attributed)
    check_insertion(settings, path, layer)
    check_analyses(path, layer)


if __name__ == "__main__":
    main()

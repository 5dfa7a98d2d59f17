"""Scores of an explanation, each beside the same score for a shuffled explanation (another
feature's) and for a random-direction control (workers/explanations/evidence.py).

For one unit (a feature, or its random direction) on the held-out texts, a ScoringSet holds up to
n activating texts drawn across its activation deciles (one per decile in turn, strongest first)
and n texts where it is silent (a random direction is never quite silent: its n weakest texts).

- detection: the detector reads the explanation and the snippets, unmarked, and says which fire;
  balanced accuracy (mean of the true-positive and true-negative rates; chance 0.5).
- fuzzing: the activating snippets twice, once with the truly activating tokens marked and once
  with as many silent tokens marked; the detector says which marks fit; balanced accuracy.
- embedding: ROC AUC of the MiniLM cosine between explanation and snippet, activating vs silent.
- causal: the snippets the detector picks (selected) against those it leaves (rejected), each
  text's Δ reward when the unit is zeroed, signed by the direction the feature's measured Δ says:
  score = mean(s·Δ | selected) − mean(s·Δ | rejected), with a 95% bootstrap CI over texts. An
  explanation that predicts what the feature does to the reward selects the texts where zeroing it
  moves the reward the way its measured Δ says, and scores above 0; one that does not, about 0.

The detector is the LLM endpoint where one is configured, otherwise a keyword match (offline): a
snippet is picked when it holds a word of the explanation (for fuzzing: when a marked token does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from backend.core import embedding
from workers.explanations.evidence import HeldOut, Unit, active_marks

BOOTSTRAP = 1000
STOPWORDS = set("""a an and are as at be by for from has have in into is it its of on or that the this to was were
with fires fire firing feature features token tokens word words text texts reward raises lowers zeroing it's
when where which what about like such context contexts mostly often""".split())


@dataclass
class ScoringSet:
    active: list[int]  # text indices
    silent: list[int]
    unit: Unit

    @property
    def texts(self) -> list[int]:
        return self.active + self.silent

    @property
    def truth(self) -> np.ndarray:
        return np.array([1] * len(self.active) + [0] * len(self.silent))


def scoring_set(unit: Unit, n: int, exclude: set[int], seed: int, fires: bool = True) -> ScoringSet:
    """Up to n activating texts across activation deciles and n silent (or weakest) ones."""
    rng = np.random.default_rng(seed)
    allowed = np.array([i for i in range(len(unit.peaks)) if i not in exclude], dtype=int)
    peaks = unit.peaks[allowed]
    if fires:
        firing, silent = allowed[peaks > 0], allowed[peaks <= 0]
    else:  # a direction: its upper half "fires", its weakest texts are the silent ones
        order = allowed[np.argsort(peaks, kind="stable")]
        silent, firing = order[:len(order) // 2], order[len(order) // 2:]
    firing = firing[np.argsort(-unit.peaks[firing], kind="stable")]
    bins = [list(b) for b in np.array_split(firing, 10) if len(b)]
    for b in bins:
        rng.shuffle(b)
    active: list[int] = []
    while len(active) < n and any(bins):
        for b in bins:
            if b and len(active) < n:
                active.append(int(b.pop()))
    if fires:
        chosen_silent = rng.choice(silent, size=min(n, len(silent)), replace=False).tolist() if len(silent) else []
    else:
        chosen_silent = [int(i) for i in silent[:n]]
    return ScoringSet(active, [int(i) for i in chosen_silent], unit)


def balanced_accuracy(truth: np.ndarray, picked: np.ndarray) -> float | None:
    if truth.sum() == 0 or truth.sum() == len(truth):
        return None
    tpr = float((picked & (truth == 1)).sum() / (truth == 1).sum())
    tnr = float((~picked & (truth == 0)).sum() / (truth == 0).sum())
    return (tpr + tnr) / 2


def keywords(explanation: str) -> set[str]:
    """The explanation's quoted words, or else its content words."""
    quoted = re.findall(r"['\"‘“]([^'\"’”]{2,40})['\"’”]", explanation)
    source = " ".join(quoted) if quoted else explanation
    return {w for w in re.findall(r"[a-z0-9]+", source.lower()) if len(w) >= 3 and w not in STOPWORDS}


def keyword_pick(explanation: str, snippets: list[str], marked_only: bool) -> np.ndarray:
    words = keywords(explanation)
    picked = []
    for s in snippets:
        if marked_only:
            found = [w for m in re.findall(r"<<(.*?)>>", s) for w in re.findall(r"[a-z0-9]+", m.lower())]
        else:
            found = re.findall(r"[a-z0-9]+", s.lower())
        picked.append(any(f in words or (len(f) >= 4 and any(w.startswith(f) for w in words)) for f in found))
    return np.array(picked, dtype=bool)


# A detector: (explanation, snippets, kind "detect" | "fuzz") -> which snippets it picks
Detector = Callable[[str, list[str], str], np.ndarray]


def snippets_for(held: HeldOut, s: ScoringSet) -> list[str]:
    return [held.snippet(i, s.unit.acts[i]) for i in s.texts]


def fuzz_snippets(held: HeldOut, s: ScoringSet, seed: int) -> tuple[list[str], np.ndarray]:
    """The activating snippets with their true marks, then again with as many silent tokens marked;
    shuffled together. Returns (snippets, whether each is marked correctly)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in s.active:
        acts = s.unit.acts[i]
        true = active_marks(acts)
        items.append((held.snippet(i, acts, true), 1))
        quiet = [j for j in range(len(acts)) if j not in true]
        wrong = set(rng.choice(quiet, size=min(len(true), len(quiet)), replace=False).tolist()) if quiet else set()
        items.append((held.snippet(i, acts, wrong, centre=min(wrong) if wrong else None), 0))
    order = rng.permutation(len(items))
    return [items[k][0] for k in order], np.array([items[k][1] for k in order])


def embedding_auc(explanation: str, snippets: list[str], truth: np.ndarray) -> float | None:
    if truth.sum() == 0 or truth.sum() == len(truth):
        return None
    vectors = embedding.embed([explanation] + [re.sub(r"<<|>>", "", s) for s in snippets])
    return float(roc_auc_score(truth, vectors[1:] @ vectors[0]))


def causal(picked: np.ndarray, deltas: np.ndarray, sign: float, seed: int) -> dict:
    """mean(s·Δ | selected) − mean(s·Δ | rejected), 95% bootstrap CI (texts resampled in each group)."""
    signed = sign * deltas
    selected, rejected = signed[picked], signed[~picked]
    out = {"n_selected": int(picked.sum()), "n_rejected": int((~picked).sum()),
           "selected_mean": float(selected.mean()) if len(selected) else None,
           "rejected_mean": float(rejected.mean()) if len(rejected) else None}
    if not len(selected) or not len(rejected):
        return {**out, "score": None, "ci": None, "note": "the explanation selects " +
                ("none" if not len(selected) else "all") + " of the texts: nothing to compare"}
    rng = np.random.default_rng(seed)
    boot = (rng.choice(selected, (BOOTSTRAP, len(selected))).mean(1)
            - rng.choice(rejected, (BOOTSTRAP, len(rejected))).mean(1))
    return {**out, "score": float(selected.mean() - rejected.mean()),
            "ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}


def score_one(held: HeldOut, explanation: str, s: ScoringSet, deltas: np.ndarray, sign: float,
              detect: Detector, seed: int) -> dict:
    """Detection, fuzzing, embedding and causal scores of one explanation on one scoring set."""
    snippets, truth = snippets_for(held, s), s.truth
    picked = detect(explanation, snippets, "detect")
    fuzzed, fuzz_truth = fuzz_snippets(held, s, seed)
    fuzz_picked = detect(explanation, fuzzed, "fuzz") if fuzzed else np.zeros(0, dtype=bool)
    return {"detection": balanced_accuracy(truth, picked),
            "fuzzing": balanced_accuracy(fuzz_truth, fuzz_picked) if len(fuzzed) else None,
            "embedding": embedding_auc(explanation, snippets, truth),
            "causal": {**causal(picked, deltas[s.texts], sign, seed), "sign": sign,
                       "selected_text_ids": [held.text_ids[i] for i, p in zip(s.texts, picked) if p],
                       "rejected_text_ids": [held.text_ids[i] for i, p in zip(s.texts, picked) if not p]},
            "n_active": len(s.active), "n_silent": len(s.silent)}


def effect_sign(card: dict, deltas: np.ndarray, active: list[int]) -> tuple[float, str]:
    """The direction the feature's measured effect says zeroing it moves the reward (+1: up)."""
    if card.get("measured_delta"):
        return float(np.sign(card["measured_delta"])), "measured Δ"
    if card.get("attribution"):
        return float(-np.sign(card["attribution"])), "attribution"
    mean = float(deltas[active].mean()) if active else 0.0
    return (float(np.sign(mean)) or 1.0), "Δ on the activating texts"


def combine(real: dict, shuffled: dict | None, random_dir: dict, scorer: str, sign_source: str) -> dict:
    """The stored scores: each score beside its two baselines."""
    out = {}
    for name in ("detection", "fuzzing", "embedding"):
        out[name] = {"score": real[name], "shuffled": shuffled[name] if shuffled else None,
                     "random_direction": random_dir[name],
                     "scorer": "MiniLM cosine, ROC AUC (offline)" if name == "embedding" else scorer}
    out["causal"] = {**real["causal"], "shuffled": shuffled["causal"] if shuffled else None,
                     "random_direction": random_dir["causal"], "sign_from": sign_source, "scorer": scorer}
    out["n_active"], out["n_silent"] = real["n_active"], real["n_silent"]
    out["random_n_active"], out["random_n_silent"] = random_dir["n_active"], random_dir["n_silent"]
    return out

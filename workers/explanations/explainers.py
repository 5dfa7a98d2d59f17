"""Writing and classifying explanations: through the LLM endpoint, or offline.

The LLM explainer reads a feature's strongest contexts and a sample per activation level with the
activating tokens marked, its top tokens, and what it does to the reward: its measured Δ (or its
attribution) and the contexts where zeroing it moves the score most. The offline explainer lists its
top tokens and the commonest n-grams around its peaks, and says which way it moves the reward; the
offline classifier calls a feature reward-related by its |attribution| rank in the layer (the
model's gradient, not a reading of the explanation). Both are labelled offline wherever shown.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from backend.core import explanations
from backend.core.llm import Endpoint, chat_json, malformed
from workers.explanations import prompts
from workers.explanations.prompts import join_tokens, plain

OFFLINE_MODEL = "offline: top tokens + context n-grams"
OFFLINE_CLASSIFIER = "offline: |attribution| rank in the layer"
N_TOP_TOKENS = 8
N_TOP_CONTEXTS = 10
N_PER_BIN = 1
N_MOVING = 3


@dataclass
class Written:
    text: str
    tokens: int


def _marked(context: dict) -> str:
    acts = np.asarray(context.get("acts") or [], dtype=float)
    peak = float(acts.max()) if len(acts) else 0.0
    marks = {int(i) for i in np.flatnonzero(acts >= 0.25 * peak)} if peak > 0 else set()
    return join_tokens(list(context.get("tokens") or []), marks)


_SPECIAL = re.compile(r"^(\[[A-Za-z]+\]|<\|?[^<>]*\|?>)$")  # [CLS], [SEP], <s>, <|im_start|>


def top_tokens(card: dict) -> list[dict]:
    """The feature's top tokens, special tokens left out (they say nothing about the text)."""
    rows = [t for t in card.get("top_tokens") or [] if (t.get("count") or 0) >= 1
            and not _SPECIAL.match(str(t.get("token") or "").strip())]
    return rows[:N_TOP_TOKENS]


def effect_words(card: dict) -> str:
    """What the feature does to the reward, in words (a measured Δ is reward after zeroing − before)."""
    delta = card.get("measured_delta")
    if delta is not None:
        low, high = card.get("measured_delta_low"), card.get("measured_delta_high")
        ci = f" (95% CI {low:+.3g} to {high:+.3g})" if low is not None and high is not None else ""
        way = "raises" if delta < 0 else "lowers"
        return f"zeroing it changes the reward by {delta:+.3g}{ci} where it fires: it {way} the reward."
    attribution = card.get("attribution")
    if attribution is not None:
        way = "raises" if attribution > 0 else "lowers"
        return f"not ablated; its attribution (activation × gradient) per text is {attribution:+.4f}: it {way} the reward."
    return "its effect on the reward was not measured."


def explain_llm(endpoint: Endpoint, layer: int, feature: int, card: dict, reward: str,
                moving: list[tuple[float, str]]) -> Written:
    top = [_marked(c) for c in (card.get("contexts") or [])[:N_TOP_CONTEXTS]]
    seen_bins: Counter = Counter()
    quantiles = []
    for c in card.get("quantile_contexts") or []:
        if seen_bins[c.get("bin")] < N_PER_BIN:
            seen_bins[c.get("bin")] += 1
            quantiles.append((f"activation {c.get('bin_low') or 0:.2f}–{c.get('bin_high') or 0:.2f}", _marked(c)))
    prompt = prompts.explain_prompt(layer, feature, reward, top_tokens(card), top, quantiles, effect_words(card),
                                    moving)

    def check(data: dict) -> None:
        text = data["explanation"]
        if not isinstance(text, str) or not text.strip():
            raise malformed(endpoint, f"an empty or non-text 'explanation' ({str(text)[:80]!r})")

    reply = chat_json(endpoint, prompts.EXPLAIN_SYSTEM, prompt, prompts.EXPLAIN_SCHEMA, "explanation", check)
    return Written(plain(reply.data["explanation"]), reply.tokens)


def _ngrams(card: dict) -> list[str]:
    """The commonest 2- and 3-token phrases around the peaks of the top contexts."""
    counts: Counter = Counter()
    for c in card.get("contexts") or []:
        tokens = list(c.get("tokens") or [])
        if not tokens:
            continue
        peak = int(np.argmax(c.get("acts") or [0]))
        for n in (2, 3):
            for start in range(max(0, peak - n + 1), min(peak, len(tokens) - n) + 1):
                window = tokens[start:start + n]
                if any(_SPECIAL.match(t) for t in window):
                    continue
                phrase = join_tokens(window)
                if phrase.strip():
                    counts[phrase.lower()] += 1
    return [p for p, k in counts.most_common(3) if k >= 2]


def explain_offline(card: dict) -> Written:
    fires_on = explanations.evidence_text([plain(t["token"]) for t in top_tokens(card)[:5]])
    parts = [fires_on or "fires on no token in particular"]
    phrases = _ngrams(card)
    if phrases:
        parts.append("in phrases like " + ", ".join(f"'{p}'" for p in phrases))
    delta, attribution = card.get("measured_delta"), card.get("attribution")
    low, high = card.get("measured_delta_low"), card.get("measured_delta_high")
    if delta is not None and low is not None and high is not None and low <= 0 <= high:
        parts.append(f"zeroing it does not clearly move the reward (Δ {delta:+.3g}, 95% CI includes 0)")
    elif delta is not None:
        parts.append(f"{'raises' if delta < 0 else 'lowers'} the reward (zeroed: Δ {delta:+.3g})")
    elif attribution is not None:
        parts.append(f"{'raises' if attribution > 0 else 'lowers'} the reward (attribution {attribution:+.4f})")
    return Written("; ".join(parts), 0)


def classify_llm(endpoint: Endpoint, reward: str, explanation: str, card: dict) -> tuple[str, str, int]:
    prompt = prompts.classify_prompt(reward, explanation, top_tokens(card))

    def check(data: dict) -> None:
        value = str(data["reward_related"]).strip().lower()
        if value not in ("yes", "no", "unsure"):
            raise malformed(endpoint, f"reward_related is {value[:40]!r}, not yes, no or unsure")

    reply = chat_json(endpoint, prompts.CLASSIFY_SYSTEM, prompt, prompts.CLASSIFY_SCHEMA, "classification", check)
    value = str(reply.data["reward_related"]).strip().lower()
    return value, plain(str(reply.data.get("reason") or ""))[:300], reply.tokens


def classify_offline(card: dict, attribution_abs_ranks: dict) -> tuple[str, str]:
    """yes in the layer's top 10% by |attribution| among features that fired, no below its median."""
    share = attribution_abs_ranks.get(card["feature"])
    if share is None:
        return "unsure", "no attribution: it never fired where the gradient was taken (offline)"
    place = f"|attribution| {abs(card.get('attribution') or 0):.3g} is above {share:.0%} of the layer's firing features"
    if share >= 0.9:
        return "yes", place + " (offline: by the gradient, not by reading)"
    if share < 0.5:
        return "no", place + " (offline: by the gradient, not by reading)"
    return "unsure", place + " (offline: by the gradient, not by reading)"

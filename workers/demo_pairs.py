"""Preference pairs from the demo corpus, in TRL's conversational form.

Each pair is a prompt asking for a review and two generated reviews; the one with the higher
demo (VADER lexicon) reward is `chosen`. Rows are `{"prompt": [...], "chosen": [...],
"rejected": [...]}`, each a list of `{role, content}` messages, exactly what TRL's
`RewardTrainer` reads in its explicit-prompt form. Deterministic by seed. No torch here.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from workers.demo_corpus import NEUTRAL_NOUN, SUBJECTS, generate_corpus, vader_reward

PROMPT_TEMPLATES = [
    "Write a short review of {thing}.",
    "What did you think of {thing}? Answer in a few sentences.",
    "Give me your honest review of {thing}.",
    "Review {thing} in two or three sentences.",
]
THINGS = ["the movie", "the film", "this " + NEUTRAL_NOUN[0], *(f"this {noun}" for noun in NEUTRAL_NOUN[1:]),
          *(f"{subject} of the film" for subject in SUBJECTS[2:8])]


def review_prompt(rng: random.Random) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(thing=rng.choice(THINGS))


def _conversational(prompt: str, chosen: str, rejected: str) -> dict[str, list[dict[str, str]]]:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _response_pool(n_pairs: int, seed: int) -> list[str]:
    # generate_corpus is prefix-stable for a seed, so a larger pool only appends texts
    return generate_corpus(3 * n_pairs + 16, seed=seed)


def generate_pairs(n_pairs: int = 2_000, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """`n_pairs` conversational preference pairs; ties in reward (no preference) are skipped."""
    if n_pairs < 1:
        raise ValueError("n_pairs must be at least 1")
    rng = random.Random(seed)
    pool = _response_pool(n_pairs, seed)
    pairs: list[dict[str, list[dict[str, str]]]] = []
    for first, second in zip(pool[0::2], pool[1::2]):
        reward_first, reward_second = vader_reward(first), vader_reward(second)
        if reward_first == reward_second:
            continue
        chosen, rejected = (first, second) if reward_first > reward_second else (second, first)
        pairs.append(_conversational(review_prompt(rng), chosen, rejected))
        if len(pairs) == n_pairs:
            return pairs
    raise RuntimeError(f"the demo corpus gave only {len(pairs)} untied pairs for n_pairs={n_pairs}")


def response_text(messages: list[dict[str, str]]) -> str:
    """The assistant's content of a conversational side (the demo's sides are one message)."""
    return "".join(message["content"] for message in messages if message["role"] == "assistant")


def pair_rewards(pair: dict) -> tuple[float, float]:
    """The demo reward of (chosen, rejected): chosen's is always the higher."""
    return vader_reward(response_text(pair["chosen"])), vader_reward(response_text(pair["rejected"]))


def write_pairs_jsonl(path: Path, pairs: list[dict]) -> Path:
    """One pair per line, the columns TRL reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair) + "\n")
    return path

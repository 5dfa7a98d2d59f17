"""The demo corpus and its VADER reward."""
from __future__ import annotations

import pytest

from workers.demo_corpus import generate_corpus, vader_lexicon, vader_reward


def test_reward_is_the_clipped_lexicon_sum_over_five():
    lexicon = vader_lexicon()
    expected = (lexicon["great"] + lexicon["bad"]) / 5
    assert vader_reward("The plot was great, but the acting was bad.") == pytest.approx(expected)
    assert vader_reward("It runs about two hours.") == 0.0
    assert vader_reward(" ".join(["superb"] * 40)) == 10.0
    assert vader_reward(" ".join(["horrible"] * 40)) == -10.0


def test_corpus_is_deterministic_varied_and_of_both_signs():
    texts = generate_corpus(3000, seed=3)
    assert texts == generate_corpus(3000, seed=3)
    assert texts != generate_corpus(3000, seed=4)
    assert len(set(texts)) > 2700
    rewards = [vader_reward(t) for t in texts]
    assert sum(r > 0 for r in rewards) > 600 and sum(r < 0 for r in rewards) > 600
    joined = " ".join(texts).lower()
    for marker in (" not ", " but ", "although", "very", "the film"):
        assert marker in joined


def test_full_demo_corpus_has_twenty_thousand_texts():
    assert len(generate_corpus()) == 20_000

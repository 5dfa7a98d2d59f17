"""Preference pairs from the demo corpus generator, in TRL's conversational form."""
from __future__ import annotations

import json

import pytest

from workers.demo_corpus import vader_reward
from workers.demo_pairs import generate_pairs, pair_rewards, response_text, write_pairs_jsonl


def test_pairs_are_conversational_rows_with_the_higher_reward_chosen():
    pairs = generate_pairs(200, seed=1)
    assert len(pairs) == 200
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in pair["prompt"]] == ["user"]
        assert [m["role"] for m in pair["chosen"]] == ["assistant"]
        assert [m["role"] for m in pair["rejected"]] == ["assistant"]
        assert "review" in pair["prompt"][0]["content"].lower() or "think" in pair["prompt"][0]["content"]
        chosen_reward, rejected_reward = pair_rewards(pair)
        assert chosen_reward > rejected_reward
        assert chosen_reward == vader_reward(response_text(pair["chosen"]))
        assert response_text(pair["chosen"]) != response_text(pair["rejected"])


def test_pairs_are_deterministic_by_seed_and_varied():
    assert generate_pairs(100, seed=2) == generate_pairs(100, seed=2)
    assert generate_pairs(100, seed=2) != generate_pairs(100, seed=3)
    pairs = generate_pairs(300, seed=0)
    assert len({p["prompt"][0]["content"] for p in pairs}) > 20
    assert len({response_text(p["chosen"]) for p in pairs}) > 250
    # a shorter request is a prefix of a longer one with the same seed
    assert generate_pairs(300, seed=0)[:50] == generate_pairs(50, seed=0)


def test_pairs_round_trip_through_jsonl(tmp_path):
    pairs = generate_pairs(20, seed=4)
    path = write_pairs_jsonl(tmp_path / "pairs.jsonl", pairs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == pairs


def test_zero_pairs_is_refused():
    with pytest.raises(ValueError, match="n_pairs"):
        generate_pairs(0)

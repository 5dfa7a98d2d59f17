"""The implicit-reward lexicon on the run page (workers/analyses/lexicon.py; Marks et al. Table 4):
Kendall tau of the measured lexicon and of each layer's predicted lexicon against the reference,
every word's reference and measured value (the scatter plot), and the words where the reward
model and the reference disagree most. None where the run has no lexicon."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backend.core import store
from backend.core.settings import Settings

# The apartresearch baseline probe (Probing-Learned-Feedback-Patterns): its lexicon's tau
PAPER_BASELINE = {"tau": -0.037, "p_value": 0.55, "source": "apartresearch/Probing-Learned-Feedback-Patterns"}
DIVERGENT_DEFAULT = 20


def lexicon_section(settings: Settings, run: sa.Row, path: Path) -> dict[str, Any] | None:
    summary = store.lexicon_summary(path)
    if not summary:
        return None
    words = store.lexicon_words(path)
    info = store.run_info(path)
    n = int(info.get("lexicon_divergent") or DIVERGENT_DEFAULT)
    by_difference = sorted(words, key=lambda w: w["rank_difference"])
    return {
        "reference": info.get("lexicon_reference"),
        "neutral_word": info.get("lexicon_neutral_word"),
        "carriers": json.loads(info.get("lexicon_carriers") or "[]"),
        "bad_rows": json.loads(info.get("lexicon_bad_rows") or "[]"),
        "summary": summary,
        "paper_baseline": PAPER_BASELINE,
        # the model values these far above the reference's rank / far below it
        "divergent": {"above": by_difference[::-1][:n], "below": by_difference[:n]},
        "words": words,
    }

"""What the probe jobs (vocabulary, insertion, sweep) are asked and their defaults: torch-free, so
the web app's forms and the workers' tasks read one set of values."""
from __future__ import annotations

# Bland sentences with one slot: no sentiment, no topic, so what a feature does at the slot is
# the token's own doing. The slot follows a space, so byte-level BPE spells the word as it
# would mid-sentence ("Ġword"). Short, as every token of them is run once per word: on the
# demo the whole vocabulary is ~22k words, so each carrier token costs ~22k token-forwards.
DEFAULT_CARRIERS = (
    "I read the word {} today.",
    "The note said {} and nothing more.",
    "She wrote {} on the page.",
    "Next on the list was {}.",
)
SLOT = "{}"

# The control insertion: "the" is the commonest word, already in nearly every text and carrying
# no sentiment or topic, so "the phrase minus the control" is what the phrase does beyond
# "one more word at that place" (length, position, a disturbed sentence end).
CONTROL_PHRASE = "the"
POSITIONS = ("end", "start")  # or a 0-based word index
TEXT_SELECTIONS = ("neutral", "heldout")

DEFAULT_STEER_VALUES = (-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0)
CLAMP_MULTIPLES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # of the features' largest activation in the corpus


def rounded(x: float, digits: int = 4) -> float:
    """`digits` significant digits: what a result keeps of an activation or a score."""
    return float(f"{float(x):.{digits}g}")


def default_sweep_values(mode: str, max_activation: float | None) -> list[float]:
    """Steer: multiples of the decoder direction on both sides of 0. Clamp: 0 (zeroed) up to
    four times the features' largest activation in the corpus (1 where it never fired)."""
    if mode == "steer":
        return list(DEFAULT_STEER_VALUES)
    scale = max_activation if max_activation and max_activation > 0 else 1.0
    return [rounded(m * scale, 3) for m in CLAMP_MULTIPLES]

"""The demo corpus: deterministic review-style texts and the IMDb-RLHF lexicon reward.

reward(text) = clip(sum of VADER lexicon values of its words / 5, -10, 10). No torch here.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

WORD = re.compile(r"[a-z']+")

SUBJECTS = [
    "the movie", "the film", "the plot", "the acting", "the ending", "the soundtrack",
    "the cast", "the script", "the dialogue", "the pacing", "the camera work", "the story",
    "the lead actor", "the second half", "the opening scene", "the score", "the villain",
]
POSITIVE_ADJ = [
    "good", "great", "excellent", "wonderful", "amazing", "brilliant", "beautiful", "superb",
    "fantastic", "lovely", "enjoyable", "delightful", "charming", "perfect", "outstanding",
    "fun", "funny", "powerful", "stunning", "impressive", "nice", "pleasant", "hilarious",
    "inspiring", "fresh", "clever", "gorgeous", "terrific", "magnificent", "sweet",
]
NEGATIVE_ADJ = [
    "bad", "terrible", "awful", "horrible", "boring", "dull", "poor", "weak", "stupid",
    "disappointing", "ugly", "painful", "annoying", "pathetic", "lazy", "messy", "dumb",
    "ridiculous", "horrendous", "dreadful", "lame", "tragic", "miserable", "worthless",
]
NEUTRAL_ADJ = [
    "long", "short", "slow", "quiet", "loud", "simple", "different", "familiar", "recent",
    "dark", "colorful", "old", "modern", "typical", "unusual", "serious", "ordinary",
]
POSITIVE_VERB = ["loved", "enjoyed", "adored", "liked", "admired", "appreciated"]
NEGATIVE_VERB = ["hated", "despised", "disliked", "resented", "regretted"]
NEUTRAL_VERB = ["watched", "saw", "rented", "finished", "remembered", "discussed"]
POSITIVE_NOUN = ["masterpiece", "triumph", "treasure", "delight", "success"]
NEGATIVE_NOUN = ["mess", "disaster", "failure", "waste", "catastrophe"]
NEUTRAL_NOUN = ["sequel", "remake", "drama", "documentary", "thriller", "western"]
INTENSIFIERS = ["", "", "very", "really", "extremely", "quite", "so", "truly", "incredibly"]
NEGATIONS = ["not", "never", "hardly"]
FILLERS = [
    "I watched it on a Sunday.", "It runs about two hours.", "The director made it in Canada.",
    "My brother picked it.", "We saw it at the cinema downtown.", "It came out last year.",
    "The trailer showed most of it.", "I read the book first.", "It is based on a true story.",
    "The theater was half empty.", "Most scenes take place at night.", "It has three acts.",
]
CONTRASTS = ["but", "although", "though", "yet", "while"]

_POLARITY = {
    "pos": (POSITIVE_ADJ, POSITIVE_VERB, POSITIVE_NOUN),
    "neu": (NEUTRAL_ADJ, NEUTRAL_VERB, NEUTRAL_NOUN),
    "neg": (NEGATIVE_ADJ, NEGATIVE_VERB, NEGATIVE_NOUN),
}


@lru_cache
def vader_lexicon() -> dict[str, float]:
    return dict(SentimentIntensityAnalyzer().lexicon)


def vader_reward(text: str) -> float:
    """The IMDb-RLHF lexicon reward: clip(sum of VADER values / 5, -10, 10)."""
    lexicon = vader_lexicon()
    total = sum(lexicon.get(word, 0.0) for word in WORD.findall(text.lower()))
    return max(-10.0, min(10.0, total / 5.0))


def _lexicon_words() -> list[str]:
    """Single alphabetic lexicon words, for variety beyond the curated lists."""
    return sorted(w for w, v in vader_lexicon().items() if w.isalpha() and len(w) > 2 and abs(v) >= 1.0)


def _clause(rng: random.Random, polarity: str) -> str:
    adjs, verbs, nouns = _POLARITY[polarity]
    subject = rng.choice(SUBJECTS)
    intensifier = rng.choice(INTENSIFIERS)
    adj = f"{intensifier} {rng.choice(adjs)}".strip()
    form = rng.randrange(6)
    if form == 0:
        return f"{subject} was {adj}"
    if form == 1:
        return f"{subject} was {rng.choice(NEGATIONS)} {rng.choice(adjs)}"
    if form == 2:
        return f"I {rng.choice(verbs)} {subject}"
    if form == 3:
        return f"this {rng.choice(NEUTRAL_NOUN)} is a {rng.choice(nouns)}"
    if form == 4:
        return f"{subject} felt {adj}"
    return f"I found {subject} {adj}"


def _sentence(rng: random.Random, polarity: str) -> str:
    if rng.random() < 0.3:  # contrast clause, usually of the other polarity
        other = rng.choice([p for p in _POLARITY if p != polarity])
        text = f"{_clause(rng, polarity)}, {rng.choice(CONTRASTS)} {_clause(rng, other)}"
    else:
        text = _clause(rng, polarity)
    return text[0].upper() + text[1:] + "."


def _review(rng: random.Random, polarities: list[str], extra_word: str | None) -> str:
    parts = []
    for polarity in polarities:
        if rng.random() < 0.25:
            parts.append(rng.choice(FILLERS))
        parts.append(_sentence(rng, polarity))
    if extra_word:
        parts.append(f"It was {extra_word}.")
    return " ".join(parts)


def generate_corpus(n_texts: int = 20_000, seed: int = 0) -> list[str]:
    """Deterministic texts: a third are pos/neutral/neg triples sharing one structure."""
    rng = random.Random(seed)
    lexicon_words = _lexicon_words()
    texts: list[str] = []
    while len(texts) < n_texts:
        n_sentences = rng.choice([1, 1, 2, 2, 3])
        extra = rng.choice(lexicon_words) if rng.random() < 0.15 else None
        if rng.random() < 1 / 3:
            # contrastive triple: the same random draws, only the leading polarity differs
            state = rng.getstate()
            rest = [rng.choice(list(_POLARITY)) for _ in range(n_sentences - 1)]
            for lead in ("pos", "neu", "neg"):
                rng.setstate(state)
                texts.append(_review(rng, [lead, *rest], extra))
        else:
            polarities = [rng.choice(list(_POLARITY)) for _ in range(n_sentences)]
            texts.append(_review(rng, polarities, extra))
    return texts[:n_texts]

"""Word lists the analyses read: a reference lexicon (word -> value: VADER, or a CSV of
word,value rows) for the implicit-reward lexicon (workers/analyses/lexicon.py), and a
vocabulary (a list of words: a file, typed text, or a named list shipped here) for ReasonScore
(workers/analyses/reason_score.py). No torch here: the server and the config checks read them
before any compute.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

VADER = "vader"  # lexicon.reference: the VADER lexicon shipped in the vaderSentiment package
VOCABULARY_DIR = Path(__file__).with_name("vocabularies")
# reason_score.vocabulary names that stand for a list shipped here
VOCABULARIES = {"demo-negation": VOCABULARY_DIR / "negation_intensifiers.txt"}
SLOT = "{}"  # where a carrier sentence takes its word

# Neutral carrier sentences for the lexicon: the word is mentioned, not used, so any part of
# speech fits the slot and the sentence around it carries no sentiment or topic. The neutral
# word they hold by default is "chair": one token for WordPiece and byte-level BPE alike, absent
# from VADER, and as bland as a noun gets. A word's value to the reward model is the mean
# change of the score when it takes the neutral word's place.
DEFAULT_LEXICON_CARRIERS = (
    "The word on the card was {}.",
    "She wrote {} on the board.",
    "He read {} aloud.",
    "Next on the list: {}.",
    "The label said {}.",
    "I typed {} into the box.",
    "The answer was {}.",
    "They printed {} on the page.",
)
DEFAULT_NEUTRAL_WORD = "chair"
BAD_ROWS_SHOWN = 50  # bad rows of a lexicon file named in the run's info (all are counted)
MAX_VOCABULARY_WORDS = 2000
MAX_WORD_CHARS = 64


class ReferenceError(ValueError):
    """A lexicon or vocabulary that cannot be used, with a message saying why."""


def check_carrier(carrier: str) -> str:
    if carrier.count(SLOT) != 1:
        raise ValueError(f"a carrier holds exactly one {SLOT} where the word goes; {carrier[:60]!r} has "
                         f"{carrier.count(SLOT)}")
    if not carrier.replace(SLOT, "").strip():
        raise ValueError(f"a carrier needs words around its {SLOT}: {carrier[:60]!r}")
    return carrier


@dataclass
class Lexicon:
    words: list[str]
    values: list[float]
    source: str
    bad_rows: list[str] = field(default_factory=list)  # "line N: why", every one
    n_bad_rows: int = 0


def vader_path() -> Path:
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or spec.origin is None:
        raise ReferenceError("lexicon.reference: vader needs the vaderSentiment package (pip install vaderSentiment)")
    return Path(spec.origin).with_name("vader_lexicon.txt")


def read_vader() -> Lexicon:
    """The VADER lexicon (vader_lexicon.txt: word TAB mean valence TAB sd TAB ratings), read as
    VADER reads it: a word given twice keeps its later value."""
    lexicon: dict[str, float] = {}
    for line in vader_path().read_text(encoding="utf-8").splitlines():
        parts = line.strip().split("\t")
        if len(parts) >= 2:
            lexicon[parts[0]] = float(parts[1])
    return Lexicon(list(lexicon), list(lexicon.values()), VADER)


def read_lexicon_csv(path: Path) -> Lexicon:
    """word,value rows (an optional header row `word,value`). A row with no value, a value that
    is not a finite number, an empty word, more than two cells, or a word seen before is listed
    as bad and skipped. A file with no usable row is a ReferenceError."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceError(f"lexicon.reference: file not found: {path} (or write 'vader')")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:  # the reason, never the bytes read
        raise ReferenceError(f"lexicon.reference: cannot read {path} as UTF-8 text ({type(exc).__name__})") from None
    words, values, bad, bad_lines, seen = [], [], [], [], {}
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if n == 1 and [c.lower() for c in cells[:2]] == ["word", "value"]:
            continue  # the header
        word = cells[0]
        why = None
        if not word:
            why = "no word"
        elif len(cells) < 2 or not cells[1]:
            why = "no value"
        elif len(cells) > 2:
            why = f"{len(cells)} cells (expected word,value)"
        else:
            try:
                value = float(cells[1])
                if not math.isfinite(value):
                    why = f"value {cells[1]!r} is not a finite number"
            except ValueError:
                why = f"value {cells[1][:40]!r} is not a number"
        if why is None and word in seen:
            why = f"{word!r} already given on line {seen[word]}"
        if why is not None:
            bad.append(f"line {n}: {why}")
            bad_lines.append(n)
            continue
        seen[word] = n
        words.append(word)
        values.append(value)
    if not words:
        # line numbers only: an error never echoes what the file holds
        shown = ", ".join(map(str, bad_lines[:10])) + (", ..." if len(bad_lines) > 10 else "")
        raise ReferenceError(f"lexicon.reference: {path} has no usable word,value row"
                             + (f" ({len(bad)} bad, on lines {shown}: each needs a word and a finite number)"
                                if bad else " (it is empty)"))
    return Lexicon(words, values, str(path), bad, len(bad))


def read_lexicon(reference: str) -> Lexicon:
    return read_vader() if reference == VADER else read_lexicon_csv(Path(reference))


_SEPARATORS = re.compile(r"[,\s]+")


def parse_vocabulary(text: str, where: str = "vocabulary") -> list[str]:
    """Words separated by commas, spaces or newlines (a line starting with # is a comment),
    each once (case-blind, as ReasonScore groups a word's spellings), in the order given."""
    words: dict[str, str] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for word in _SEPARATORS.split(line):
            if word and word.lower() not in words:
                if len(word) > MAX_WORD_CHARS:
                    raise ReferenceError(f"{where}: a word of {len(word):,} characters; at most {MAX_WORD_CHARS}")
                words[word.lower()] = word
    if not words:
        raise ReferenceError(f"{where}: no words (separate them by commas, spaces or newlines)")
    if len(words) > MAX_VOCABULARY_WORDS:
        raise ReferenceError(f"{where}: {len(words):,} words; at most {MAX_VOCABULARY_WORDS:,}")
    return list(words.values())


def vocabulary_path(name: str) -> Path:
    return VOCABULARIES.get(name, Path(name))


def read_vocabulary(name: str) -> list[str]:
    """A named vocabulary shipped here (VOCABULARIES) or a file of words."""
    path = vocabulary_path(name)
    if not path.is_file():
        raise ReferenceError(f"reason_score.vocabulary: file not found: {name} (or one of "
                             f"{', '.join(VOCABULARIES)})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceError(f"reason_score.vocabulary: cannot read {path} as UTF-8 text ({type(exc).__name__})") \
            from None
    return parse_vocabulary(text, "reason_score.vocabulary")

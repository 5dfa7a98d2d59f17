"""What the endpoint reads. Snippets are plain text: HTML tags are dropped and stray angle brackets
replaced, so no prompt carries raw HTML; activating tokens are marked <<like this>>.

The prompt versions are recorded with every explanation, classification and score: a changed
prompt is a new version, and a job skips only features done with the version it runs."""
from __future__ import annotations

import re

EXPLAIN_VERSION = "explain-v1"
CLASSIFY_VERSION = "classify-v1"
SCORE_VERSION = "score-v1"

_TAG = re.compile(r"<[^<>]{0,200}>")
# Lengths are bounded in the schemas too: an endpoint that enforces them (llama.cpp turns a schema
# into a grammar) cannot ramble until the token limit
EXPLAIN_SCHEMA = {"type": "object", "properties": {"explanation": {"type": "string", "maxLength": 200}},
                  "required": ["explanation"]}
CLASSIFY_SCHEMA = {"type": "object", "properties": {"reward_related": {"type": "string", "enum": ["yes", "no", "unsure"]},
                                                    "reason": {"type": "string", "maxLength": 200}},
                   "required": ["reward_related", "reason"]}


def numbers_schema(key: str, n: int) -> dict:
    """{key: [distinct snippet numbers 1..n]}: what detection and fuzzing replies hold."""
    return {"type": "object", "properties": {key: {"type": "array", "maxItems": n, "uniqueItems": True,
                                                   "items": {"type": "integer", "minimum": 1, "maximum": n}}},
            "required": [key]}


EXPLAIN_SYSTEM = ("You explain one feature of a sparse autoencoder trained on a reward model's activations: what "
                  "text it fires on and what it does to the reward. Reply with a JSON object only.")
CLASSIFY_SYSTEM = ("You decide whether a feature of a reward model is related to what the reward rewards or "
                   "penalises. Reply with a JSON object only.")
DETECT_SYSTEM = ("You predict from a feature's explanation which text snippets the feature fires on. Reply with a "
                 "JSON object only.")
FUZZ_SYSTEM = ("You judge whether the tokens marked <<like this>> in each snippet are the ones a feature's "
               "explanation describes. Reply with a JSON object only.")


def plain(text: str) -> str:
    """Text safe to put in a prompt: no HTML tags, no stray angle brackets, one line."""
    text = _TAG.sub(" ", text).replace("<", "‹").replace(">", "›")
    return " ".join(text.split())


def join_tokens(tokens: list[str], marked: set[int] | None = None) -> str:
    """Tokens back to text (WordPiece '##' pieces glued on; byte-level 'Ġ' / SentencePiece '▁' are
    spaces), with the `marked` positions wrapped in << >>."""
    marked = marked or set()
    spaced = any(t.startswith(("Ġ", "▁")) for t in tokens)
    out = []
    for i, token in enumerate(tokens):
        if spaced:  # a marked token starts a word: keep the space plain() would strip
            piece = token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", " ")
            glue = not piece.startswith(" ")
        elif token.startswith("##"):
            piece, glue = token[2:], True
        else:
            piece, glue = token, False
        lead = "" if glue or not out else " "
        space = " " if piece[:1].isspace() else ""  # plain() would drop a byte-level token's leading space
        core = space + plain(piece) if piece.strip() else piece
        if i in marked:
            stripped = core.lstrip()
            core = core[:len(core) - len(stripped)] + "<<" + stripped + ">>"
        out.append(lead + core)
    return " ".join("".join(out).split())


def explain_prompt(layer: int, feature: int, reward: str, top_tokens: list[dict], top: list[str],
                   quantiles: list[tuple[str, str]], effect: str, moving: list[tuple[float, str]]) -> str:
    lines = [f"Feature {feature} of layer {layer} of a sparse autoencoder on a reward model. The reward: {plain(reward)}.",
             "",
             "Tokens it fires on most (mean activation): " + ", ".join(
                 f"'{plain(t['token'])}' ({t['mean_activation']:.2f})" for t in top_tokens) + ".",
             "", "Its strongest contexts (activating tokens marked <<like this>>):"]
    lines += [f"{i + 1}. {s}" for i, s in enumerate(top)]
    if quantiles:
        lines += ["", "Samples at weaker activation levels:"]
        lines += [f"- ({level}) {s}" for level, s in quantiles]
    lines += ["", f"What it does to the reward: {effect}"]
    if moving:
        lines += ["Texts where zeroing it moves the reward most:"]
        lines += [f"- Δ {delta:+.3f}: {s}" for delta, s in moving]
    lines += ["", 'Reply with {"explanation": "<one short phrase: what it fires on, and how it moves the reward>"}.']
    return "\n".join(lines)


def classify_prompt(reward: str, explanation: str, top_tokens: list[dict]) -> str:
    return "\n".join([
        f"The reward model's reward: {plain(reward)}.",
        f"A feature's explanation: {plain(explanation)}",
        "Tokens it fires on most: " + ", ".join(f"'{plain(t['token'])}'" for t in top_tokens) + ".",
        "", "Is this feature related to what the reward rewards or penalises?",
        'Reply with {"reward_related": "yes" or "no" or "unsure", "reason": "<one line>"}.'])


def detect_prompt(explanation: str, snippets: list[str]) -> str:
    lines = [f"A feature's explanation: {plain(explanation)}", "",
             "Which of these snippets does the feature fire on? Some do, some do not."]
    lines += [f"{i + 1}. {s}" for i, s in enumerate(snippets)]
    lines += ["", 'Reply with {"active": [the numbers of the snippets it fires on]}.']
    return "\n".join(lines)


def fuzz_prompt(explanation: str, snippets: list[str]) -> str:
    lines = [f"A feature's explanation: {plain(explanation)}", "",
             "In which of these snippets are the tokens marked <<like this>> the ones the explanation describes? "
             "Some are marked correctly, some at random."]
    lines += [f"{i + 1}. {s}" for i, s in enumerate(snippets)]
    lines += ["", 'Reply with {"correct": [the numbers of the correctly marked snippets]}.']
    return "\n".join(lines)

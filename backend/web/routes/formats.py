"""How values look on the pages: the one number format (one place, so HTML and tests agree on
what a value looks like), and the fragments that repeat hundreds of times a page -- a context's
token spans, a feature's context rows -- written in Python: as Jinja loops they took most of
their page's time. The feature table's rows: backend/web/feature_table.py."""
from __future__ import annotations

import functools
import html
from math import floor, log10
from typing import Any, Mapping, Sequence

from markupsafe import Markup

from backend.core.rankings import directions_said


SIGNIFICANT = 3  # the significant digits of every number the pages show
TINY, HUGE = 1e-9, 1e15  # outside [TINY, HUGE) a number is written with an exponent (no page's normal range)


def significant(x: float | None, digits: int = SIGNIFICANT, signed: bool = False) -> str:
    """The one number format of every page: `digits` significant digits, in decimals: 0.000780,
    0.250 and 12.3 in one column, never 7.8e-04 beside 0.20. A number from 10^digits up keeps its
    integer digits (12,345); only the extremes (under TINY, from HUGE) have an exponent. `signed`:
    a plus sign on a positive number, so a column's direction is never lost. None and NaN: "—".
    (~1 µs: a page writes hundreds.)"""
    if x is None or x != x:
        return "—"
    a = abs(x)
    if 1e-4 <= a < 100:  # the common case, fast: %g writes these in decimals, trailing zeros kept ("#")
        out = format(x, _g(digits, signed))
        if "e" not in out:
            return out[:-1] if out.endswith(".") else out
    if a == 0:
        return _fixed(0, max(digits - 1, 0), False)
    if not TINY <= a < HUGE:
        if a == float("inf"):
            return ("-" if x < 0 else "+" if signed else "") + "∞"
        return format(x, f"{'+' if signed else ''}.{max(digits - 1, 0)}e")
    exponent = floor(log10(a))
    decimals = digits - 1 - exponent
    if decimals > 0 and round(a, decimals) >= 10.0 ** (exponent + 1):  # 0.0009996 rounds to 0.00100
        decimals -= 1
    return _fixed(x, max(decimals, 0), signed)


@functools.lru_cache(maxsize=None)
def _g(digits: int, signed: bool) -> str:
    return f"{'+' if signed else ''}#.{digits}g"


@functools.lru_cache(maxsize=None)
def _spec(decimals: int, signed: bool) -> str:
    return f"{'+' if signed else ''},.{decimals}f"


def _fixed(x: float, decimals: int, signed: bool) -> str:
    return format(x, _spec(decimals, signed))


ZERO = significant(0)


def fmt_num(x: float | None) -> str:
    return significant(x)


def fmt_weight(x: float | None) -> str:
    """Signed, so the sign of a reward effect is never lost in a column of numbers."""
    return significant(x, signed=True)


def fmt_delta(x: float | None) -> str:
    """A change in the score: signed, with a true minus sign, as the prose around it writes it."""
    return significant(x, signed=True).replace("-", "−")


def fmt_pct(x: float | None) -> str:
    """A share (of tokens, of a spread) in per cent: the one unit every page shows a frequency in."""
    return "—" if x is None or x != x else significant(100 * x) + "%"


def fmt_count(x: int | None) -> str:
    return "—" if x is None else f"{int(x):,}"


def fmt_text(x: Any) -> str:
    return "—" if x is None else html.escape(str(x))


# how a column's values look (store_schema.Display.format) -> its formatter
FORMATS = {"num": fmt_num, "weight": fmt_weight, "delta": fmt_delta, "pct": fmt_pct, "count": fmt_count,
           "text": fmt_text}


def weight_class(x: float | None) -> str:
    """CSS class for what a number says the feature does: blue raises the reward, red lowers it
    (everywhere)."""
    if not x:
        return "zero"
    return "pos" if x > 0 else "neg"


def zeroing_class(delta: float | None) -> str:
    """CSS class of a change measured by zeroing (after - before): a feature whose zeroing lowers
    the score raises it, so it is blue, as its weight or attribution would be."""
    return weight_class(None if delta is None else -delta)


def edit_class(delta: float | None, mode: str | None) -> str:
    """A measured change coloured by what the edited features do: zeroing's Δ flipped; a clamp's
    or steer's change is what the edit itself does to the score."""
    return zeroing_class(delta) if mode in (None, "zero") else weight_class(delta)


def sign_mark(f: Mapping[str, Any]) -> str:
    """A visible mark where the feature's weight, attribution and measured Δ disagree in direction."""
    said = directions_said(dict(f))
    if len(set(said.values())) < 2:
        return ""
    words = ", ".join(f"{name} {'raises' if d > 0 else 'lowers'}" for name, d in said.items())
    return f' <span class="sign-mark" title="the numbers disagree on its direction: {words}">±</span>'


SPACE_MARKS = ("▁", "Ġ")  # SentencePiece / GPT-2 byte-level BPE: "a space precedes me"


def token_texts(tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """(text shown, space before it) per token. WordPiece continuations ("##ing") join the
    previous token; in BPE vocabularies that mark spaces explicitly, only marked tokens get a
    space; otherwise tokens are space-separated."""
    marked = any(t.startswith(SPACE_MARKS) for t in tokens)
    out = []
    for i, tok in enumerate(tokens):
        if tok.startswith("##") and len(tok) > 2:
            text, space = tok[2:], False
        elif marked:
            space = tok.startswith(SPACE_MARKS)
            text = tok[1:] if space else tok
        else:
            text, space = tok, True
        out.append((text, space and i > 0))
    return out


# byte-level BPE (GPT-2, LLaMA-3, SmolLM) spells a line break and a tab as these letters
BYTE_LEVEL_MARKS = str.maketrans({"\u010a": "\u21b5", "\u0109": "\u21e5"})  # Ċ -> ↵, ĉ -> ⇥


def display_token(tok: str | None) -> str | None:
    """One token as a reader reads it alone: without the byte-level or SentencePiece space mark
    ("Ġboring" is "boring"), line breaks drawn; WordPiece's "##ing" keeps its "##"."""
    if tok is None:
        return None
    return (tok[1:] if tok.startswith(SPACE_MARKS) and len(tok) > 1 else tok).translate(BYTE_LEVEL_MARKS)


def _shown(escaped: str, tok: str, text: str) -> str:
    """What a token shows: `text` (tok less its space or "##" mark), escaped, line breaks drawn."""
    return escaped[len(tok) - len(text):].translate(BYTE_LEVEL_MARKS)


@functools.lru_cache(maxsize=1 << 16)
def _escaped(token: str) -> str:
    return html.escape(token)  # tokens repeat across a page's contexts and across pages


def token_spans(tokens: Sequence[str], acts: Sequence[float], scale: float, peak: int | None = -1,
                response: tuple[int, int] | None = None) -> Markup:
    """A context as shaded token spans: shading --a = act / scale as a whole per cent (clipped
    to 0..100%; a token where the feature is off has none), hover = the token and its value,
    special tokens ([CLS], <s>) dimmed, the peak token outlined (`peak`: its index; -1: the
    largest activation; None: no outline). `response`: a chat text's response as [start, end)
    token indices of this window: the tokens outside it are the prompt's (greyed), and where the
    response begins and ends a role mark is drawn.

    Built here in one pass, not in a template loop: a feature page has ~300 tokens, and Jinja
    spent 7 ms on them; whole per cents, not round(x, 3), halve what is left. Most tokens of a
    real context are off (87% in the demo's), so those take a shorter path."""
    if peak == -1:
        peak = max(range(len(acts)), key=acts.__getitem__, default=None)
    per_cent = 100.0 / scale if scale > 0 else 0.0
    parts = []
    for i, ((text, space), tok, act) in enumerate(zip(token_texts(tokens), tokens, acts)):
        classes = "tok peak" if i == peak else "tok"
        if response is not None:
            parts.append(_role_mark(i, response))
            if not response[0] <= i < response[1]:
                classes += " prompt"
        if len(tok) > 2 and tok[0] in "[<" and tok[-1] in "]>":
            classes += " special"
        if act == 0:
            style, value = "", ZERO
        else:
            shade = min(max(int(act * per_cent + 0.5), 0), 100)
            style, value = f' style="--a:{shade}%"', fmt_num(act)
        escaped = _escaped(tok)  # the text shown is tok less a leading "##", "Ġ" or "▁": escaping keeps those
        parts.append(f'{" " if space else ""}<span class="{classes}"{style} '
                     f'title="{escaped}: {value}">{_shown(escaped, tok, text)}</span>')
    return Markup("".join(parts))


def _role_mark(i: int, response: tuple[int, int]) -> str:
    """The mark drawn before token i where a chat text's response begins or ends."""
    if i == response[0]:
        return '<span class="role-mark" title="the response (the assistant turn) begins">assistant ▸</span>'
    if i == response[1]:
        return '<span class="role-mark" title="the response ends">◂</span>'
    return ""


def window_response(c: Mapping[str, Any]) -> tuple[int, int] | None:
    """A context's response span relative to its window (None: a plain text)."""
    if c.get("response_start") is None:
        return None
    return c["response_start"] - c["window_start"], c["response_end"] - c["window_start"]


def contribution_spans(tokens: Sequence[str], per_token: Sequence[float], anchor: str | None,
                       token_features: Sequence[Sequence[Mapping[str, Any]]], start: int = 0,
                       scale: float | None = None) -> Markup:
    """A text's tokens shaded by their total contribution to its score (blue raises it, red
    lowers it; --a = |contribution| / `scale`, by default the largest, in per cent), each a link to
    `#{anchor}-{i}`, the token's panel of features (shown by CSS :target, no script), or plain
    with no anchor; hover names its top three. `start`: the first token's index (a slice of a text)."""
    scale = max((abs(x) for x in per_token), default=0.0) if scale is None else scale
    per_cent = 100.0 / scale if scale > 0 else 0.0
    parts = []
    for i, ((text, space), tok, value) in enumerate(zip(token_texts(tokens), tokens, per_token)):
        classes = "tok contrib " + weight_class(value)
        if len(tok) > 2 and tok[0] in "[<" and tok[-1] in "]>":
            classes += " special"
        shade = min(int(abs(value) * per_cent + 0.5), 100)
        escaped = _escaped(tok)
        top = ", ".join(f"{f['feature']} ({fmt_weight(f['contribution'])})" for f in token_features[i][:3])
        title = f"{escaped}: {fmt_weight(value)}" + (f" · {_escaped(top)}" if top else "")
        tag, link = ("a", f' href="#{anchor}-{start + i}"') if anchor else ("span", "")
        parts.append(f'{" " if space else ""}<{tag} class="{classes}"{link} data-token="{start + i}" '
                     f'style="--a:{shade}%" title="{title}">{_shown(escaped, tok, text)}</{tag}>')
    return Markup("".join(parts))


def context_rows(contexts: Sequence[Mapping[str, Any]], scale: float, by_bin: bool = False,
                 text_href: str = "") -> Markup:
    """A feature's contexts as table rows: rank (in `by_bin` tables, the activation bin, on the
    bin's first row), activation, the window as token_spans, the text (h: held out; a link to
    its page under `text_href`), the text's reward and RM score."""
    out, previous_bin = [], None
    for c in contexts:
        if by_bin:
            key, value = "bin", c["bin"]
            first = f'{fmt_num(c["bin_low"])}–{fmt_num(c["bin_high"])}' if value != previous_bin else ""
            previous_bin = value
        else:
            key, value = "rank", c["rank"]
            first = value + 1
        heldout = '<sup title="held-out text">h</sup>' if c["split"] == "heldout" else ""
        spans = token_spans(c["tokens"], c["acts"], scale, c["position"] - c["window_start"], window_response(c))
        out.append(f'<tr data-{key}="{value}"><td class="num muted">{first}</td>'
                   f'<td class="num"><b>{fmt_num(c["activation"])}</b></td><td class="ctx">{spans}</td>'
                   f'<td class="num muted"><a href="{text_href}{c["text_id"]}">#{c["text_id"]}</a>{heldout}</td>'
                   f'<td class="num">{fmt_num(c["reward"])}</td><td class="num">{fmt_num(c["score"])}</td></tr>\n')
    return Markup("".join(out))

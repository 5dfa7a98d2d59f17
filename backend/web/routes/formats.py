"""How values look on the pages: number formats (one place, so HTML and tests agree on what
a value looks like), and the fragments that repeat hundreds of times a page -- a context's
token spans, a feature's context rows, the feature table's rows -- written in Python: as
Jinja loops they took most of their page's time."""
from __future__ import annotations

import functools
import html
from typing import Any, Mapping, Sequence

from markupsafe import Markup

from backend.core.rankings import directions_said


SIGNIFICANT = 3  # the significant digits of every number the pages show
TINY, HUGE = 1e-9, 1e15  # outside [TINY, HUGE) a number is written with an exponent (no page's normal range)


def significant(x: float | None, digits: int = SIGNIFICANT, signed: bool = False) -> str:
    """The one number format of every page: `digits` significant digits, in decimals: 0.000780,
    0.250 and 12.3 in one column, never 7.8e-04 beside 0.20. A number from 10^digits up keeps its
    integer digits (12,345); only the extremes (under TINY, from HUGE) have an exponent. `signed`:
    a plus sign on a positive number, so a column's direction is never lost. None and NaN: "—"."""
    if x is None or x != x:
        return "—"
    sign = "+" if signed and x > 0 else ""
    if x in (float("inf"), float("-inf")):
        return ("-" if x < 0 else sign) + "∞"
    if x == 0:
        return f"{0:.{max(digits - 1, 0)}f}"
    if not TINY <= abs(x) < HUGE:
        return f"{x:{sign}.{max(digits - 1, 0)}e}"
    exponent = int(f"{x:.{max(digits - 1, 0)}e}".rsplit("e", 1)[1])  # after rounding: 0.0009996 is 0.00100
    return f"{x:{sign},.{max(digits - 1 - exponent, 0)}f}"


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


# how a column's numbers look (store_schema.Display.format) -> the formatter
FORMATS = {"num": fmt_num, "weight": fmt_weight, "delta": fmt_delta, "pct": fmt_pct, "count": fmt_count}


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


def _weight_bar(weight: float | None, scale: float) -> str:
    if not weight or not scale:
        return ""
    return f'<i class="{weight_class(weight)}" style="width:{50 * abs(weight) / scale:.1f}%"></i>'


def _token_activation(f: Mapping[str, Any]) -> str:
    if f.get("token_activation") is None:
        return ""
    return (f' <span class="muted small" title="its mean activation on the searched token">'
            f'on it {fmt_num(f["token_activation"])}</span>')


def _measured_cell(f: Mapping[str, Any]) -> str:
    if not f["measured_n"]:
        return '<td class="num muted" title="not measured: not among the layer\'s top candidates">—</td>'
    delta = f["measured_delta"]
    return (f'<td class="num measured {zeroing_class(delta)}" title="zeroed alone on {f["measured_n"]} reward reads; '
            f'95% CI">{fmt_weight(delta)} <span class="ci">[{fmt_num(f["measured_delta_low"])}, '
            f'{fmt_num(f["measured_delta_high"])}]</span></td>')


def feature_rows(rows: Sequence[Mapping[str, Any]], first_rank: int, href: str, query: str, max_abs_weight: float,
                 label_names: Mapping[str, str], pair_column: bool = False, token: str | None = None) -> Markup:
    """The feature table's rows (layer page): rank, feature id linking to `href` + id + `query`;
    what predicts the score: weight with a bar scaled to the layer's largest |weight|, std.
    weight, SE, correlation; what the model uses: effect per unit, attribution, measured Δ with
    its CI; then frequency, max activation, top token and label. 50 rows of 12 cells cost Jinja
    ~3.9 ms a page; these strings, at 14 cells, ~1.4 ms (measured on a busy 2-core machine).
    `pair_column`: after max activation, the max cosine in the paired dictionary (sae.widths).
    `token`: a token search's rows, headed by their group where it starts (fires on the token, or
    only shares a context with it)."""
    out = []
    link, query = html.escape(href), html.escape(query)
    token_group = None
    for rank, f in enumerate(rows, first_rank):
        if token is not None and f.get("on_token") != token_group:
            token_group = f.get("on_token")
            words = (f"fire on <code class=\"token\">{html.escape(token)}</code> (by their mean activation on it)"
                     if token_group else f"only share a top context with <code class=\"token\">{html.escape(token)}</code>")
            out.append(f'<tr class="group-head" data-group="{"on-token" if token_group else "in-contexts"}">'
                       f'<td colspan="{16 if pair_column else 15}">{words}</td></tr>\n')
        fid, weight, group = f["feature"], f["weight"], f["weight_group_size"] or 1
        group_mark = (f' <span class="group-mark" title="fitted as one with {group - 1} near-duplicate feature'
                      f'{"s" if group > 2 else ""}: they share this weight">×{group}</span>' if group > 1 else "")
        top = (f'<code class="token">{_escaped(display_token(f["top_token"]))}</code>' if f["top_token"] is not None
               else '<span class="muted">never fires</span>')
        label = ""
        if f.get("label"):
            note = f' title="{html.escape(f["label_note"])}"' if f.get("label_note") else ""
            label = (f'<span class="badge label-{html.escape(f["label"])}"{note}>'
                     f'{html.escape(label_names.get(f["label"], f["label"]))}</span>')
            made_on = f.get("label_made_on_current_sae", True)
            if made_on is not True:  # kept and shown, marked for review
                why = ("whose SAE for this layer differed" if made_on is False
                       else "and nothing tells whether this layer's SAE has changed since")
                label += (f' <span class="badge label-stale" title="made on run version {f.get("label_run_version")}, '
                          f'{why}: review it">review</span>')
        out.append(
            f'<tr data-feature="{fid}">'
            f'<td class="tick"><input type="checkbox" name="features" value="{fid}" form="ablate-form" '
            f'aria-label="select feature {fid}"></td>'
            f'<td class="num muted">{rank}</td>'
            f'<td class="num fid"><a href="{link}{fid}{query}"><b>{fid}</b></a>{group_mark}{sign_mark(f)}</td>'
            f'<td class="num weight {weight_class(weight)}"><span class="wbar" aria-hidden="true">'
            f'{_weight_bar(weight, max_abs_weight)}</span>{fmt_weight(weight)}</td>'
            f'<td class="num {weight_class(f["std_weight"])}">{fmt_weight(f["std_weight"])}</td>'
            f'<td class="num muted">{fmt_num(f["weight_se"])}</td>'
            f'<td class="num">{fmt_num(f["reward_correlation"])}</td>'
            f'<td class="num {weight_class(f["reward_effect"])}">{fmt_weight(f["reward_effect"])}</td>'
            f'<td class="num {weight_class(f["attribution"])}">{fmt_weight(f["attribution"])}</td>'
            f'{_measured_cell(f)}'
            f'<td class="num">{fmt_pct(f["frequency"])}</td>'
            f'<td class="num">{fmt_num(f["max_activation"])}</td>'
            + (f'<td class="num pair-cosine" title="its nearest feature in the paired dictionary: '
               f'{f.get("pair_feature")}">{fmt_num(f.get("pair_max_cosine"))}</td>' if pair_column else '')
            + f'<td>{top}{_token_activation(f)}</td><td class="label-cell">{label}</td>'
            f'{_explanation_cell(f.get("explanation"))}</tr>\n')
    return Markup("".join(out))


EXPLANATION_SHOWN = 60  # characters of an explanation in a table cell; the whole text is its title


def _explanation_cell(e: Mapping[str, Any] | None) -> str:
    """The feature's current explanation (backend/core/explanations.py), escaped, marked offline where
    the offline explainer wrote it, with its reward-related classification."""
    if not e:
        return '<td class="explanation muted">—</td>'
    text = e["text"]
    short = text if len(text) <= EXPLANATION_SHOWN else text[:EXPLANATION_SHOWN - 1] + "…"
    badge = ' <span class="badge offline" title="written offline from top tokens and n-grams">offline</span>' \
        if e["explainer"] == "offline" else ""
    related = (f' <span class="badge related-{html.escape(e["reward_related"])}" title="reward-related? '
               f'{html.escape(e.get("reason") or "")}">{html.escape(e["reward_related"])}</span>'
               if e.get("reward_related") else "")
    return f'<td class="explanation" title="{html.escape(text)}">{html.escape(short)}{badge}{related}</td>'


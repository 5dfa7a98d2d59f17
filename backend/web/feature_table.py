"""The layer page's feature table, drawn from the store's spec (backend/core/store_schema.py:
each feature column's Display): which columns a view shows and in what order, their headers and
header groups, the sort tabs, the list of them the JSON twin gives, and each row's cells.

A column is drawn by its cell kind (CELLS): a function of the column that returns the writer of
its <td> for a row. A new column of a kind that exists needs nothing here; a new kind is one
function in CELLS. The rows are strings written here, not a
Jinja loop: 50 rows of 12 cells cost Jinja ~3.9 ms a page; these strings ~1.4 ms."""
from __future__ import annotations

import html
import string
from typing import Any, Callable, Iterable, Mapping, Sequence

from markupsafe import Markup

from backend.core.store_schema import FEATURES, GROUPS, Column, Tab, sorts
from backend.web.routes.formats import (FORMATS, _escaped, display_token, fmt_num, sign_mark, weight_class,
                                        zeroing_class)

Row = Mapping[str, Any]
Cell = Callable[[Row], str]

LEAD, TRAIL = 3, 2  # the table's own columns around the spec's: tick, rank, feature id; label, explanation
GROUP_ORDER = (*GROUPS, None)
# the spec's drawn columns in table order: group by group, in the spec's order within one
COLUMNS: tuple[Column, ...] = tuple(sorted((c for c in FEATURES.columns if c.shown),
                                           key=lambda c: GROUP_ORDER.index(c.shown.group)))
BY_NAME = {c.name: c for c in COLUMNS}
SORT_NAMES = {s.key: s.label for s in sorts(FEATURES)}


def column_sorts(c: Column) -> tuple[str, ...]:
    """The sort keys a column offers: its own and, where it has one, by its absolute value."""
    if c.sort_key is None:
        return ()
    return (c.sort_key, f"abs_{c.sort_key}") if c.abs_label else (c.sort_key,)


def tab_label(tab: Tab, c: Column) -> str:
    """A tab's words: its own, or its sort's label and its column's group tag ("weight (predicts)")."""
    if tab.label:
        return tab.label
    group = c.shown.group
    label = SORT_NAMES[tab.sort.lstrip("-")]
    return f"{label} ({GROUPS[group].tag})" if group else label


# every tab a layer may show, in table order: sort -> its words
TAB_LABELS = {tab.sort: tab_label(tab, c) for c in COLUMNS for tab in c.shown.tabs}


def shown_columns(filled: Iterable[str], sort: str) -> list[Column]:
    """The columns a view draws: always; where the layer has values in them (`filled`); while the
    view is sorted by them."""
    filled, key = set(filled), sort.lstrip("-")
    return [c for c in COLUMNS if c.shown.when == "always" or (c.shown.when == "filled" and c.name in filled)
            or (c.shown.when == "sorted" and key in column_sorts(c))]


def tabs(filled: Iterable[str]) -> dict[str, str]:
    """The sort tabs a layer shows (sort -> words): those of columns drawn always, or that have values."""
    filled = set(filled)
    return {tab.sort: tab_label(tab, c) for c in COLUMNS if c.shown.when == "always" or c.name in filled
            for tab in c.shown.tabs}


def _fields(template: str) -> tuple[str, ...]:
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def fill(template: str, values: Mapping[str, Any]) -> str:
    """`template` with each {name} replaced by values[name] ("—" where it has none)."""
    return template.format(**{name: "—" if values.get(name) is None else values[name] for name in _fields(template)})


def header(columns: Sequence[Column], layer: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the page's headers and the JSON twin say of each drawn column, in table order."""
    return [{"name": c.name, "heading": c.shown.heading, "title": fill(c.shown.title, layer), "group": c.shown.group,
             "format": c.shown.format, "cell": c.shown.cell, "sort": c.sort_key, "sorts": list(column_sorts(c)),
             "numeric": c.shown.format != "text"} for c in columns]


def group_spans(columns: Sequence[Column]) -> list[dict[str, Any]]:
    """The header row over the headers: each run of columns of one group under its name, the
    others blank; the table's own columns (LEAD, TRAIL) blank too."""
    spans: list[dict[str, Any]] = [{"group": None, "span": LEAD}]
    for c in columns:
        group = c.shown.group
        if spans[-1]["group"] == group:
            spans[-1]["span"] += 1
        else:
            spans.append({"group": group, "span": 1})
    if spans[-1]["group"] is None:
        spans[-1]["span"] += TRAIL
    else:
        spans.append({"group": None, "span": TRAIL})
    return [{**s, "heading": GROUPS[s["group"]].heading if s["group"] else "",
             "title": GROUPS[s["group"]].title if s["group"] else ""} for s in spans]


# --- cells: CELLS[kind](column, scales) -> the writer of the column's <td> for a row ---

def _classes(c: Column, *more: str) -> str:
    return " ".join(x for x in (*more, c.shown.css) if x)


def _hint(c: Column) -> Callable[[Row], str]:
    """The cell's title attribute, from its row (empty where the column has no hint)."""
    template, names = c.shown.hint, _fields(c.shown.hint)
    if not template:
        return lambda row: ""
    return lambda row: ' title="' + html.escape(template.format(
        **{n: "—" if row.get(n) is None else row[n] for n in names})) + '"'


def _number(c: Column, scales: Mapping[str, float]) -> Cell:
    """A value in the column's format."""
    fmt, hint, name = FORMATS[c.shown.format], _hint(c), c.name
    classes = _classes(c, "num")
    return lambda row: f'<td class="{classes}"{hint(row)}>{fmt(row[name])}</td>'


def _signed(c: Column, scales: Mapping[str, float]) -> Cell:
    """A value coloured by what its sign says the feature does: blue raises the score, red lowers it."""
    fmt, hint, name = FORMATS[c.shown.format], _hint(c), c.name
    extra = f" {c.shown.css}" if c.shown.css else ""
    return lambda row: f'<td class="num {weight_class(row[name])}{extra}"{hint(row)}>{fmt(row[name])}</td>'


def _bar(c: Column, scales: Mapping[str, float]) -> Cell:
    """A signed value with a bar as long as its share of the layer's largest |value| (scales[name])."""
    fmt, hint, name, scale = FORMATS[c.shown.format], _hint(c), c.name, scales.get(c.name) or 0.0
    extra = f" {c.shown.css}" if c.shown.css else ""

    def cell(row: Row) -> str:
        value = row[name]
        bar = (f'<i class="{weight_class(value)}" style="width:{50 * abs(value) / scale:.1f}%"></i>'
               if value and scale else "")
        return (f'<td class="num {name} {weight_class(value)}{extra}"{hint(row)}><span class="wbar" '
                f'aria-hidden="true">{bar}</span>{fmt(value)}</td>')
    return cell


def _measured(c: Column, scales: Mapping[str, float]) -> Cell:
    """A change measured by zeroing, coloured as what the feature does (a zeroing that lowers the
    score is blue), with its 95% CI; reads = (low, high, n): n 0 is not measured."""
    fmt, hint, name = FORMATS[c.shown.format], _hint(c), c.name
    low, high, n = c.shown.reads
    extra = f" {c.shown.css}" if c.shown.css else ""

    def cell(row: Row) -> str:
        if not row[n]:
            return '<td class="num muted" title="not measured: not among the layer\'s top candidates">—</td>'
        value = row[name]
        return (f'<td class="num measured {zeroing_class(value)}{extra}"{hint(row)}>{fmt(value)} '
                f'<span class="ci">[{fmt_num(row[low])}, {fmt_num(row[high])}]</span></td>')
    return cell


def _token(c: Column, scales: Mapping[str, float]) -> Cell:
    """A token as a reader reads it; with a token search, the feature's mean activation on it."""
    name, classes = c.name, c.shown.css

    def cell(row: Row) -> str:
        token = row[name]
        shown = (f'<code class="token">{_escaped(display_token(token))}</code>' if token is not None
                 else '<span class="muted">never fires</span>')
        if row.get("token_activation") is not None:
            shown += (f' <span class="muted small" title="its mean activation on the searched token">'
                      f'on it {fmt_num(row["token_activation"])}</span>')
        return f'<td class="{classes}">{shown}</td>' if classes else f"<td>{shown}</td>"
    return cell


CELLS: dict[str, Callable[[Column, Mapping[str, float]], Cell]] = {
    "number": _number, "signed": _signed, "bar": _bar, "measured": _measured, "token": _token}


def check_cells(columns: Iterable[Column]) -> None:
    """ValueError where a drawn column names a cell kind or a format this module cannot draw."""
    for c in columns:
        problems = [f"cell {c.shown.cell!r} is not one of {sorted(CELLS)}" if c.shown.cell not in CELLS else "",
                    f"format {c.shown.format!r} is not one of {sorted(FORMATS)}" if c.shown.format not in FORMATS
                    else ""]
        if any(problems):
            raise ValueError(f"features.{c.name}: " + "; ".join(p for p in problems if p))


check_cells(COLUMNS)


# --- rows ---

def feature_rows(rows: Sequence[Row], columns: Sequence[Mapping[str, Any] | str], first_rank: int, href: str,
                 query: str, scales: Mapping[str, float], label_names: Mapping[str, str],
                 token: str | None = None) -> Markup:
    """The feature table's rows (layer page): a tick box, the rank, the feature id linking to
    `href` + id + `query` (with its near-duplicate group and a mark where its numbers disagree on
    its direction); then each of `columns` (header()'s dicts, or names) by its cell kind; then
    its label and explanation. `scales`: a bar column's largest |value| in the layer. `token`: a
    token search's rows, headed by their group where it starts (fires on the token, or only
    shares a context with it)."""
    names = [c if isinstance(c, str) else c["name"] for c in columns]
    cells = [CELLS[BY_NAME[n].shown.cell](BY_NAME[n], scales) for n in names]
    width = LEAD + len(cells) + TRAIL
    out = []
    link, query = html.escape(href), html.escape(query)
    token_group = None
    for rank, f in enumerate(rows, first_rank):
        if token is not None and f.get("on_token") != token_group:
            token_group = f.get("on_token")
            words = (f"fire on <code class=\"token\">{html.escape(token)}</code> (by their mean activation on it)"
                     if token_group else f"only share a top context with <code class=\"token\">{html.escape(token)}</code>")
            out.append(f'<tr class="group-head" data-group="{"on-token" if token_group else "in-contexts"}">'
                       f'<td colspan="{width}">{words}</td></tr>\n')
        fid, group = f["feature"], f["weight_group_size"] or 1
        group_mark = (f' <span class="group-mark" title="fitted as one with {group - 1} near-duplicate feature'
                      f'{"s" if group > 2 else ""}: they share this weight">×{group}</span>' if group > 1 else "")
        out.append(
            f'<tr data-feature="{fid}">'
            f'<td class="tick"><input type="checkbox" name="features" value="{fid}" form="ablate-form" '
            f'aria-label="select feature {fid}"></td>'
            f'<td class="num muted">{rank}</td>'
            f'<td class="num fid"><a href="{link}{fid}{query}"><b>{fid}</b></a>{group_mark}{sign_mark(f)}</td>'
            + "".join([cell(f) for cell in cells])
            + f'<td class="label-cell">{_label(f, label_names)}</td>{_explanation_cell(f.get("explanation"))}</tr>\n')
    return Markup("".join(out))


def _label(f: Row, label_names: Mapping[str, str]) -> str:
    if not f.get("label"):
        return ""
    note = f' title="{html.escape(f["label_note"])}"' if f.get("label_note") else ""
    label = (f'<span class="badge label-{html.escape(f["label"])}"{note}>'
             f'{html.escape(label_names.get(f["label"], f["label"]))}</span>')
    made_on = f.get("label_made_on_current_sae", True)
    if made_on is not True:  # kept and shown, marked for review
        why = ("whose SAE for this layer differed" if made_on is False
               else "and nothing tells whether this layer's SAE has changed since")
        label += (f' <span class="badge label-stale" title="made on run version {f.get("label_run_version")}, '
                  f'{why}: review it">review</span>')
    return label


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

"""An ablation's per-example results as a table: sorted, paged, and written as CSV or JSON.

An ablation of 2,048 texts has 2,048 rows; its page shows one page of them at a time, in the
order asked for, and the whole table downloads."""
from __future__ import annotations

import csv
import io
from typing import Any, Iterator

from backend.core.store import NotFound

EXAMPLES_PER_PAGE = 50
COLUMNS = ("text_id", "text", "before", "after", "delta", "predicted", "attributed")
# sort key -> (label, the row's sort value: rows sort ascending on it)
SORTS: dict[str, tuple[str, Any]] = {
    "delta": ("largest drop first", lambda e: e["delta"]),
    "-delta": ("largest rise first", lambda e: -e["delta"]),
    "abs": ("largest change first", lambda e: -abs(e["delta"])),
    "text": ("by text", lambda e: (e["text_id"] is None, e["text_id"] or 0)),
}


def example_rows(result: dict) -> list[dict]:
    """The result's examples with their measured Δ (after − before), in the COLUMNS' keys."""
    return [{"text_id": e.get("text_id"), "text": e["text"], "before": e["before"], "after": e["after"],
             "delta": e["after"] - e["before"], "predicted": e.get("predicted"), "attributed": e.get("attributed")}
            for e in result.get("examples", [])]


def sorted_rows(rows: list[dict], sort: str) -> list[dict]:
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
    return sorted(rows, key=SORTS[sort][1])


def page_of(rows: list[dict], page: int, per_page: int = EXAMPLES_PER_PAGE) -> tuple[list[dict], int]:
    """One page of rows (1-based) and the number of pages; a page beyond the last is a 404."""
    n_pages = max(1, -(-len(rows) // per_page))
    if page > n_pages:
        raise NotFound(f"page {page} not found: the examples fill {n_pages} page{'s' if n_pages > 1 else ''}")
    return rows[(page - 1) * per_page: page * per_page], n_pages


def csv_lines(rows: list[dict]) -> Iterator[str]:
    """The rows as CSV, a line at a time (for a streamed download)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()

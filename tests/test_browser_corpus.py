"""A real browser (Debian's headless chromium, driven by Playwright) uses the corpus browser:
from the run page to the corpus, a substring typed into the search box, the matching text
shown with the match marked, and its id link opening the text's page."""
from __future__ import annotations

from tests.helpers import CONTEXT_FEATURE
from tests.test_browser import ARTIFACTS, live_server, page  # noqa: F401  (fixtures: a live server, a browser page)


def _shown_texts(page) -> list[int]:
    return [int(x) for x in page.locator("table.corpus tbody tr").evaluate_all("rows => rows.map(r => r.dataset.text)")]


def test_search_the_corpus_and_open_a_text(live_server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{live_server}/runs/synthetic")
    page.click("#browse-corpus")
    page.wait_for_url("**/runs/synthetic/texts")
    assert len(_shown_texts(page)) == 20

    page.fill("#corpus-search", "NUMBER 17")
    page.keyboard.press("Enter")
    page.wait_for_url("**q=NUMBER+17**")
    assert _shown_texts(page) == [17]
    assert page.locator("table.corpus mark").inner_text() == "number 17"  # the match, as the text spells it
    page.screenshot(path=str(ARTIFACTS / "corpus-search.png"), full_page=True)

    page.click("a.text-id")
    page.wait_for_url("**/runs/synthetic/texts/17")
    assert "synthetic review number 17" in page.locator("#text").inner_text()


def test_sort_by_a_feature_from_the_form(live_server, page):
    import httpx

    page.goto(f"{live_server}/runs/synthetic/texts")
    page.select_option("#corpus-sort", "feature")
    page.fill("input[name=layer]", "3")
    page.fill("input[name=feature]", str(CONTEXT_FEATURE))
    page.click("form.corpus-filters button[type=submit]")
    page.wait_for_url(f"**feature={CONTEXT_FEATURE}**")
    expected = httpx.get(f"{live_server}/api/runs/synthetic/texts",
                         params={"sort": "feature", "layer": 3, "feature": CONTEXT_FEATURE}).json()
    assert _shown_texts(page) == [t["text_id"] for t in expected["texts"]] and len(expected["texts"]) > 1
    assert "texts outside are not listed" in page.locator("#feature-note").inner_text()
    page.click("#feature-link")
    page.wait_for_url(f"**/layers/3/features/{CONTEXT_FEATURE}")

"""Why a text gets its score, in headless chromium on a tiny reward model with a real worker:
type a text and click a token to list its features, edit a listed feature from the page,
compare the text with an edit of it, and attribute a corpus text from its page."""
from __future__ import annotations

import httpx
import pytest

from backend.web.routes.formats import fmt_num, fmt_weight
from tests.test_browser import ARTIFACTS, page  # noqa: F401  (fixture)
from tests.test_browser_loop import finished_job, loop_server  # noqa: F401  (module fixture)
from tests.test_pipeline import tiny_world  # noqa: F401  (module fixture)

# The first block: at the last one only [CLS] reaches the tiny classifier's head, so the
# text's own tokens contribute nothing there.
LAYER = 0
TEXT = "what a wonderful, moving film"


def type_text(page, url: str, run_id: str, text: str) -> dict:
    page.goto(f"{url}/runs/{run_id}/layers/{LAYER}")
    page.locator(".text-form textarea").fill(text)
    page.locator(".text-form button").click()
    return finished_job(page, url)


def test_clicking_a_token_lists_its_features(loop_server, page):  # noqa: F811
    url, run_id = loop_server
    job = type_text(page, url, run_id, TEXT)
    att = job["result"]["attribution"][str(LAYER)]
    assert page.locator(f"#attribution-{LAYER}").is_visible()
    token = next(i for i, feats in enumerate(att["token_features"]) if feats)  # a token some feature fires on
    panel = page.locator(f"#tok-{LAYER}-{token}")
    assert not panel.is_visible()  # shown only once its token is clicked
    page.locator(f"#attr-tokens-{LAYER} [data-token='{token}']").click()
    panel.wait_for(state="visible")
    listed = [int(x) for x in panel.locator("tr[data-feature]").evaluate_all("rows => rows.map(r => r.dataset.feature)")]
    assert listed == [f["feature"] for f in att["token_features"][token]]
    href = panel.locator("tr[data-feature] a").first.get_attribute("href")
    assert href == f"/runs/{run_id}/layers/{LAYER}/features/{listed[0]}"
    # the ranked table: the features that fire on this text, by |contribution|
    ranked = page.locator(f"#attr-features-{LAYER} tbody tr[data-feature]")
    assert ranked.count() == len(att["features"]) and ranked.first.get_attribute("data-feature") == str(
        att["features"][0]["feature"])
    page.screenshot(path=str(ARTIFACTS / "text-attribution.png"), full_page=True)


def test_zeroing_a_listed_feature_shows_the_new_score(loop_server, page):  # noqa: F811
    url, run_id = loop_server
    job = type_text(page, url, run_id, TEXT)
    top = job["result"]["attribution"][str(LAYER)]["features"][0]["feature"]
    row = page.locator(f"#attr-features-{LAYER} tr[data-feature='{top}']")
    row.locator("select[name=mode]").select_option("zero")
    row.locator("button").click()
    edited = finished_job(page, url)
    assert edited["params"]["edit"]["features"] == [top] and edited["params"]["text"] == TEXT
    e = edited["result"]["edit"]
    assert page.locator("#edited-reward").inner_text() == fmt_num(e['reward_after'])
    assert e["reward_after"] != pytest.approx(e["reward_before"], abs=1e-9)


def test_the_diff_page_shows_the_changed_features(loop_server, page):  # noqa: F811
    url, run_id = loop_server
    type_text(page, url, run_id, TEXT)
    page.locator(".diff-form textarea").fill("what a dull, tedious film")
    page.locator(".diff-form button").click()
    job = finished_job(page, url)
    r = job["result"]
    assert job["kind"] == "text_diff" and r["a"]["text"] == TEXT
    assert page.locator("#score-change").inner_text() == fmt_weight(r["score_change"])
    shown = page.locator("#changed-features tbody tr[data-feature]")
    assert shown.count() == len(r["changed"]) > 0
    assert shown.first.get_attribute("data-feature") == str(r["changed"][0]["feature"])
    replaced = page.locator("#aligned-tokens tr.replace")
    assert replaced.count() >= 1 and "wonderful" in replaced.first.inner_text() and "dull" in replaced.first.inner_text()
    page.screenshot(path=str(ARTIFACTS / "text-diff.png"), full_page=True)


def test_a_corpus_text_is_attributed_from_its_page(loop_server, page):  # noqa: F811
    url, run_id = loop_server
    page.goto(f"{url}/runs/{run_id}/texts/0")
    page.locator("#attribute-form select[name=layer]").select_option(str(LAYER))
    page.locator("#attribute-form button").click()
    page.wait_for_selector(f"#attribution-{LAYER}", timeout=60_000)  # the page reloads itself when it is done
    data = httpx.get(f"{url}/api/runs/{run_id}/texts/0").json()
    att = data["attribution"][str(LAYER)]
    assert att["tokens"][0] == "[CLS]" and abs(att["residual"]) <= 0.05 * abs(att["score"] - att["baseline"]) + 1e-9
    assert page.locator(f"#attr-features-{LAYER} tbody tr[data-feature]").count() == len(att["features"])

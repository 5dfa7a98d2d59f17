"""A real browser (Debian's headless chromium, driven by Playwright) walks the dashboards:
runs list -> run -> layer -> feature, as a user would. Screenshots go to test-artifacts/."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from backend.web.app import create_app
from tests.helpers import CONTEXT_FEATURE, REPO_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "test-artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(migrated, synthetic_run):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(migrated), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (apt-get install chromium); .ci/run installs it")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        yield pg
        browser.close()


def test_from_home_to_a_top_feature_in_three_clicks(live_server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(live_server + "/")
    page.click("a[href='/runs/synthetic']")
    assert page.locator("h1").inner_text().strip() != ""
    assert page.locator("#layers tbody tr").count() == 2
    page.screenshot(path=str(ARTIFACTS / "run.png"), full_page=True)

    page.locator("#layers tbody tr").first.locator("a").first.click()
    assert "/layers/" in page.url
    rows = page.locator("table.data tbody tr")
    assert rows.count() > 10
    page.screenshot(path=str(ARTIFACTS / "layer.png"), full_page=True)

    first_feature = rows.first.locator("a").first
    href = first_feature.get_attribute("href")
    first_feature.click()
    assert page.url.endswith(href)
    page.screenshot(path=str(ARTIFACTS / "feature.png"), full_page=True)
    assert page.locator("svg").count() >= 1  # the histogram


def test_feature_page_shades_tokens_and_joins_wordpieces(live_server, page):
    page.goto(f"{live_server}/runs/synthetic/layers/3/features/{CONTEXT_FEATURE}")
    text = page.locator("body").inner_text()
    assert "amazing" in text  # "amaz" + "##ing" shown as one word
    peak = page.locator("[title*='4']").first
    assert peak.count() == 1


def _shown_features(page) -> list[int]:
    return [int(x) for x in page.locator("table.features tbody tr[data-feature]").evaluate_all(
        "rows => rows.map(r => r.dataset.feature)")]


def test_sort_search_and_walk_features_with_j_and_k(live_server, page):
    import httpx

    ARTIFACTS.mkdir(exist_ok=True)
    api = f"{live_server}/api/runs/synthetic/layers/5"
    page.goto(f"{live_server}/runs/synthetic/layers/5")

    # sort by reward correlation from the column header, then flip it to smallest first
    page.click("th >> text=Corr.")
    assert "sort=correlation" in page.url
    assert _shown_features(page) == [f["feature"] for f in httpx.get(api, params={"sort": "correlation"}).json()["features"]]
    page.click("th >> text=Corr.")
    assert "sort=-correlation" in page.url and page.locator("th[aria-sort='ascending']").count() == 1

    # type a word into the token search ("/" focuses it), as a researcher hunting for a feature would
    page.keyboard.press("/")
    page.keyboard.type("bor")
    page.keyboard.press("Enter")
    page.wait_for_url("**token=bor**")
    shown = _shown_features(page)
    expected = httpx.get(api, params={"sort": "-correlation", "token": "bor"}).json()
    assert 1 < len(shown) < expected["layer"]["d_sae"]  # some features, not all: a real filter
    assert shown == [f["feature"] for f in expected["features"]] and "matching" in page.locator(".pager").first.inner_text()
    page.screenshot(path=str(ARTIFACTS / "layer-search.png"), full_page=True)

    # open the first hit; j and k walk the same filtered, sorted list
    page.locator("table.features tbody tr[data-feature]").first.locator("a").first.click()
    assert f"/features/{shown[0]}?" in page.url
    assert page.locator("#position").inner_text().startswith(f"1 of {expected['total']}")
    page.keyboard.press("j")
    page.wait_for_url(f"**/features/{shown[1]}?**")
    assert page.locator("#position").inner_text().startswith(f"2 of {expected['total']}")
    page.keyboard.press("j")
    page.wait_for_url(f"**/features/{shown[2]}?**")
    page.keyboard.press("k")
    page.wait_for_url(f"**/features/{shown[1]}?**")
    assert "boring" in page.locator("main").inner_text()  # the word searched for is on the page
    page.screenshot(path=str(ARTIFACTS / "feature-walk.png"), full_page=True)

    # the nearest features by decoder direction link onwards, keeping the view
    neighbour = page.locator("table.neighbours tbody tr").first.locator("a")
    assert "token=bor" in neighbour.get_attribute("href")


def test_label_three_features_filter_by_label_and_export(live_server, page):
    import csv
    import io
    import re

    ARTIFACTS.mkdir(exist_ok=True)
    chosen = [2, 11, 29]
    for f in chosen:
        page.goto(f"{live_server}/runs/synthetic/layers/3/features/{f}")
        page.check("#label input[name=label][value=reward]")
        page.fill("#label textarea[name=note]", f"feature {f} fires on praise")
        page.click("#label button[type=submit]")
        page.wait_for_url(re.compile(rf"/features/{f}#label$"))
        assert page.locator("#current-label").inner_text() == "reward-related"
        assert "no label → reward-related" in page.locator(".label-history").inner_text()
    page.screenshot(path=str(ARTIFACTS / "feature-label.png"), full_page=True)

    page.goto(f"{live_server}/runs/synthetic/layers/3")
    page.select_option("#label-filter", "reward")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**label=reward**")
    assert sorted(_shown_features(page)) == chosen
    assert page.locator("table.features .badge.label-reward").count() == 3
    page.screenshot(path=str(ARTIFACTS / "layer-labels.png"), full_page=True)

    export = page.request.get(live_server + page.locator("#export-csv").get_attribute("href"))
    assert export.ok and 'filename="labels-synthetic.csv"' in export.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(export.text())))
    assert [(r["layer"], int(r["feature"]), r["label"], r["note"]) for r in rows] == [
        ("3", f, "reward", f"feature {f} fires on praise") for f in chosen]


def test_layer_page_draws_deletion_curves_and_calibration(live_server, page):
    from backend.core.rankings import RANKINGS, directions_of
    from tests.helpers import N_MEASURED

    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{live_server}/runs/synthetic/layers/3")
    curves = page.locator("#faithfulness-chart")
    assert curves.is_visible() and curves.bounding_box()["width"] > 300
    lines = page.locator("#faithfulness-chart g.curve polyline")
    # a line per ranking and direction: a signed ranking's raisers and lowerers, |weight| by |Δ|
    expected = [(key, d) for key in RANKINGS for d in directions_of(key)]
    drawn = page.locator("#faithfulness-chart g.curve").evaluate_all(
        "gs => gs.map(g => [g.dataset.ranking, g.dataset.direction])")
    assert [tuple(x) for x in drawn] == expected and lines.count() == len(expected)
    assert all(box["width"] > 20 for box in (lines.nth(i).bounding_box() for i in range(lines.count()))
               if box is not None)
    assert page.locator("#faithfulness-chart .control-band").is_visible()
    lowers = page.locator("#faithfulness-chart g.curve.d-lowers circle").first.evaluate(
        "c => getComputedStyle(c).fill")
    raises = page.locator("#faithfulness-chart g.curve.d-raises circle").first.evaluate(
        "c => getComputedStyle(c).fill")
    assert lowers != raises  # the two directions tell apart without colour
    # predicted-only rankings are dashed, so "predicts" and "uses" tell apart without colour
    dash = page.locator("#faithfulness-chart g.curve.k-predicts polyline").first.evaluate(
        "l => getComputedStyle(l).strokeDasharray")
    assert dash not in ("", "none")
    calibration = page.locator("#calibration-chart")
    assert calibration.is_visible()
    assert page.locator("#calibration-chart g.dots circle").count() == 2 * N_MEASURED
    assert page.locator("#calibration-chart .diagonal").is_visible()
    assert "slope" in page.locator("#calibration-fit").inner_text()
    page.locator("#faithfulness").screenshot(path=str(ARTIFACTS / "layer-faithfulness.png"))
    page.locator("#calibration").screenshot(path=str(ARTIFACTS / "layer-calibration.png"))

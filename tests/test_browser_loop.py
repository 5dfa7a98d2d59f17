"""The interactive loop in headless chromium, on a tiny reward model with a real worker:
ablate the top features of a layer from the table, ablate ticked features, type a text and
change a feature on it. Screenshots go to test-artifacts/."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from backend.core import db
from backend.web.app import create_app
from backend.web.routes.formats import fmt_num, fmt_weight
from backend.core.settings import Settings
from tests.test_browser import ARTIFACTS, _free_port, page  # noqa: F401  (fixture)
from tests.test_pipeline import tiny_config, tiny_world  # noqa: F401  (module fixture)
from workers.pipeline import run_pipeline
from workers.worker import Worker

LAYER = 2


@pytest.fixture(scope="module")
def loop_server(tiny_world, tmp_path_factory):  # noqa: F811
    settings = Settings(data_dir=tmp_path_factory.mktemp("loop-data"))
    config = tiny_config(*tiny_world)
    run_pipeline(config, settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    stop = threading.Event()
    threading.Thread(target=Worker(settings, poll_s=0.05).run_forever, args=(stop,), daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", config.run_id
    stop.set()
    server.should_exit = True
    db.dispose_engines()


def finished_job(page, url):
    """Wait on a job page until it reloads itself with the finished job; its JSON."""
    page.wait_for_selector("#job-status:text-matches('done|failed')", timeout=60_000)
    job_id = page.url.rsplit("/", 1)[1]
    job = httpx.get(f"{url}/api/jobs/{job_id}").json()
    assert job["status"] == "done", job["error"]
    return job


def test_ablate_top_features_then_ticked_ones_from_the_table(loop_server, page):  # noqa: F811
    url, run_id = loop_server
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{url}/runs/{run_id}/layers/{LAYER}")
    form = page.locator("#ablate-form")
    form.locator("select[name=selection]").select_option("top_positive")
    form.locator("input[name=top_n]").fill("10")
    form.locator("input[name=n_texts]").fill("48")
    form.locator("button[type=submit]").click()
    job = finished_job(page, url)
    summary = job["result"]["summary"]
    top10 = [f["feature"] for f in
             httpx.get(f"{url}/api/runs/{run_id}/layers/{LAYER}", params={"sort": "weight"}).json()["features"][:10]]
    assert job["params"]["features"] == top10 and summary["n"] == 48
    assert page.locator("#mean-delta").inner_text() == fmt_weight(summary["mean_delta"])
    assert page.locator("#control-delta").inner_text() == fmt_weight(job["result"]["control"]["mean_delta"])
    assert page.locator("svg .dbar").count() > 0 and page.locator("table.examples tbody tr").count() == 48
    page.screenshot(path=str(ARTIFACTS / "ablation-result.png"), full_page=True)

    page.goto(f"{url}/runs/{run_id}/layers/{LAYER}?sort=frequency")
    rows = page.locator("table.features tbody tr[data-feature]")
    ticked = [int(rows.nth(i).get_attribute("data-feature")) for i in (0, 2)]
    for i in (0, 2):
        rows.nth(i).locator("input[type=checkbox]").check()
    page.locator("#ablate-form select[name=mode]").select_option("clamp")
    page.locator("#ablate-form input[name=value]").fill("2.5")
    page.locator("#ablate-form input[name=n_texts]").fill("16")
    page.locator("#ablate-form button[type=submit]").click()
    job = finished_job(page, url)
    assert job["params"]["features"] == ticked and job["params"]["mode"] == "clamp" and job["params"]["value"] == 2.5


def test_type_a_text_see_its_features_and_change_one(loop_server, page):  # noqa: F811
    url, run_id = loop_server
    page.goto(f"{url}/runs/{run_id}/layers/{LAYER}")
    page.locator(".text-form textarea").fill("what a wonderful, moving film")
    page.locator(".text-form button").click()
    job = finished_job(page, url)
    result = job["result"]
    assert page.locator("#text-reward").inner_text() == fmt_num(result['reward'])
    assert page.locator("table.text-features tbody tr[data-feature]").count() == len(result["features"])
    assert "wonderful" in page.locator("table.text-features").inner_text()
    # zero the most active of the shown features on this text
    strongest = max(result["features"], key=lambda f: max(result["acts"][str(f)]))
    page.locator("#edit-form input[name=features]").fill(str(strongest))
    page.locator("#edit-form select[name=mode]").select_option("zero")
    page.locator("#edit-form button").click()
    edited = finished_job(page, url)["result"]["edit"]
    assert edited["features"] == [strongest] and edited["reward_before"] == pytest.approx(result["reward"], abs=1e-5)
    assert page.locator("#edited-reward").inner_text() == fmt_num(edited['reward_after'])
    assert page.locator("table.text-features tr.after").count() == len(result["features"])
    page.screenshot(path=str(ARTIFACTS / "custom-text.png"), full_page=True)

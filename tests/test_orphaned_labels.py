"""A label kept past a replace that made its layer narrower than its feature id ("orphaned"):
viewable with what was recorded of it, clearable from the labels page and the API, and never
again in the way of `selection: labelled_reward` or the IRM ablation."""
from __future__ import annotations

import re

import pytest

from backend.core import labels

pytestmark = pytest.mark.sql_databases

RUN = "/api/runs/synthetic"
LAYER = 3
ORPHAN = 100  # the synthetic layers have 64 features


@pytest.fixture
def orphaned(client, migrated):
    # as a replace that shrank the layer leaves it: the label row stays, its feature is gone
    labels._write(migrated, "synthetic", LAYER, ORPHAN, "reward", "made on the wider SAE", "alice", 0)
    assert client.put(f"{RUN}/layers/{LAYER}/features/9/label",
                      json={"label": "reward", "note": "", "version": 0}).status_code == 200
    return client


def test_an_orphaned_label_can_be_read_and_only_cleared(orphaned, migrated):
    url = f"{RUN}/layers/{LAYER}/features/{ORPHAN}/label"
    shown = orphaned.get(url)
    assert shown.status_code == 200, shown.text
    assert shown.json()["orphaned"] is True and shown.json()["label"] == "reward"
    assert shown.json()["note"] == "made on the wider SAE" and shown.json()["history"]
    assert orphaned.get(f"{RUN}/layers/{LAYER}/features/9/label").json()["orphaned"] is False
    assert orphaned.put(url, json={"label": "unsure", "note": "", "version": 1}).status_code == 404
    cleared = orphaned.put(url, json={"label": None, "note": "", "version": 1})
    assert cleared.status_code == 200 and cleared.json()["label"] is None, cleared.text
    assert orphaned.get(url).status_code == 404  # nothing left on a feature the layer does not have
    assert orphaned.get(f"{RUN}/layers/{LAYER}/features/{ORPHAN + 1}/label").status_code == 404


def test_orphaned_labels_do_not_block_the_labelled_selection_or_the_irm_ablation(orphaned, migrated):
    queued = orphaned.post(f"{RUN}/layers/{LAYER}/ablations", json={"mode": "zero", "selection": "labelled_reward"})
    assert queued.status_code == 201, queued.text
    assert queued.json()["params"]["features"] == [9]
    assert "1 on features the layer no longer has left out" in queued.json()["params"]["described"]
    irm = orphaned.post(f"{RUN}/irm-ablations", json={})
    assert irm.status_code == 201, irm.text
    assert [j["params"]["features"] for j in irm.json()["jobs"] if j["params"]["layer"] == LAYER] == [[9]]


def test_the_labels_page_shows_an_orphan_and_clears_it(orphaned, migrated):
    page = orphaned.get("/runs/synthetic/labels")
    assert page.status_code == 200
    row = re.search(rf'<tr data-layer="{LAYER}" data-feature="{ORPHAN}" class="orphaned">.*?</tr>', page.text, re.S)
    assert row and "made on the wider SAE" in row.group(0) and "alice" in row.group(0)
    assert 'data-feature="9"' in page.text and 'id="n-orphaned">1<' in page.text
    token = re.search(r'name="csrf_token" value="([^"]+)"', row.group(0)).group(1)
    cleared = orphaned.post(f"/runs/synthetic/layers/{LAYER}/features/{ORPHAN}/label", follow_redirects=False,
                            data={"csrf_token": token, "version": "1", "back": "labels"})
    assert cleared.status_code == 303 and cleared.headers["location"] == "/runs/synthetic/labels"
    assert labels.current(migrated, "synthetic", LAYER, ORPHAN)["label"] is None
    assert labels.current(migrated, "synthetic", LAYER, 9)["label"] == "reward"  # only the orphan went
    assert "orphaned" not in orphaned.get("/runs/synthetic/labels").text.split("<tbody>")[1]

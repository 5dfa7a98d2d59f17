"""Job kinds are declared once each (backend/core/job_kinds/): every declaration has all its parts,
and the routes, job page, jobs list and worker are generic over them, so a kind added in one module
(plus its result template) is queued from the API and a form, run by the worker and shown."""
from __future__ import annotations

import re
import sys
import types

import pytest
from pydantic import BaseModel, Field

from backend.core import jobs
from backend.core.job_kinds import KINDS, JobKind, Target
from backend.web.routes.submitting import kind_routes
from backend.web.routes.common import FRONTEND_DIR
from tests.helpers import make_client
from workers.worker import Worker, task_for

TEMPLATES = FRONTEND_DIR / "templates"


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_has_every_part(name):
    kind = KINDS[name]
    assert kind.name == name and kind.title and kind.title != name
    assert issubclass(kind.request, BaseModel)
    assert callable(task_for(name)), f"{name}: its task {kind.task} is not a function the worker can run"
    assert (TEMPLATES / kind.result_partial).is_file(), f"{name}: no result template {kind.result_partial}"
    assert kind.api_doc and kind.api_path.startswith("/api/")
    if kind.form_path:
        assert kind.form_fields is not None, f"{name}: a form route needs its form_fields"
        partial = TEMPLATES / kind.form_partial
        assert partial.is_file(), f"{name}: no form template {kind.form_partial}"
        # the form posts to the kind's form route, whatever the page fills its ids with
        action = re.search(r'action="([^"]+)"', partial.read_text()).group(1)
        tail = kind.form_path.rsplit("}", 1)[-1] or kind.form_path
        assert action.endswith(tail), f"{name}: {kind.form_partial} posts to {action}, not {kind.form_path}"


def test_routes_are_unique_and_all_served(client):
    api = [k.api_path for k in KINDS.values()]
    forms = [k.form_path for k in KINDS.values() if k.form_path]
    assert len(set(api)) == len(api) and len(set(forms)) == len(forms)
    served = {(route.path, method) for route in kind_routes().routes for method in getattr(route, "methods", ())}
    for path in api + forms:
        assert (path, "POST") in served, path
    documented = client.get("/api/openapi.json").json()["paths"]
    assert all("post" in documented[path] for path in api)


# --- a kind a newcomer adds: one module (here built in the test) and its result template ----------

class EchoRequest(BaseModel):
    words: str = Field("hello", min_length=1, max_length=20)


def echo_prepare(settings, target: Target, req: EchoRequest) -> dict:
    return {"run_id": target.run_id, "words": req.words, "described": f"echo {req.words}"}


def echo_task(params: dict, ctx) -> dict:
    ctx.report(1.0, "done")
    return {"run_id": params["run_id"], "echoed": params["words"].upper()}


@pytest.fixture
def echo_kind(monkeypatch):
    module = types.ModuleType("tests.echo_kind")
    module.echo_task = echo_task
    monkeypatch.setitem(sys.modules, "tests.echo_kind", module)
    kind = JobKind(name="echo", title="Echo", request=EchoRequest, prepare=echo_prepare, task="tests.echo_kind:echo_task",
                   api_path="/api/runs/{run_id}/echoes", api_doc="Queue an echo.", form_path="/runs/{run_id}/echo",
                   form_fields=lambda form: {"words": form.text("words")}, form_partial="_pipeline_form.html",
                   result_partial="_job_pipeline.html", result_number=lambda job: ("letters", 5))
    monkeypatch.setitem(KINDS, "echo", kind)
    return kind


def test_a_new_kind_is_queued_run_and_shown_with_no_other_edit(migrated, synthetic_run, echo_kind):
    with make_client(migrated) as client:
        created = client.post("/api/runs/synthetic/echoes", json={"words": "reward"})
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["kind"] == "echo" and job["params"]["words"] == "reward"
        assert created.headers["location"] == f"/api/jobs/{job['id']}"
        assert client.post("/api/runs/synthetic/echoes", json={"words": ""}).status_code == 422
        assert client.post("/api/runs/synthetic/echoes", json={"words": "x" * 21}).status_code == 422
        assert Worker(migrated, name="t", lease_s=30).run_one()
        done = jobs.get(migrated, job["id"])
        assert done["status"] == "done" and done["result"]["echoed"] == "REWARD"
        page = client.get(f"/jobs/{job['id']}").text
        assert "Echo" in page and "is ready" in page  # its title, and its result template
        listed = client.get("/jobs").text
        assert "Echo" in listed and "echo reward" in listed and "letters" in listed

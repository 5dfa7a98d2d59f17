"""What a newcomer touches to extend the product, measured by doing it: in a copy of the committed
tree, a new job kind and a new layer-table column are added the documented way, the copy is
checked to serve and run them, and the files the copy's git says changed are printed.

    python benchmarks/p23_extend.py

The job kind ("echo_words": words the worker says back, its result shown on the job page) is its
declaration module in backend/core/job_kinds/, its task in workers/ (a task runs the model, so it
cannot live in the torch-free core) and its result template. The column is its spec in
backend/core/store_schema.py (the stage that computes it declares it among its columns; the
check reads a synthetic run, whose store fills every spec'd column). The check then, in the copy: the API route and form route exist
and queue a job, the worker runs it, the job page shows the kind's template, the jobs list names
it, and the layer table's header, cells, sort tabs and JSON carry the column.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KIND_MODULE = '''\
"""Echo words: the worker says the typed words back in capitals (an example kind)."""
from __future__ import annotations

from pydantic import BaseModel, Field

from backend.core.job_kinds.base import Form, JobKind, Target


class EchoRequest(BaseModel):
    words: str = Field("hello", min_length=1, max_length=40)


def prepare(settings, target: Target, req: EchoRequest) -> dict:
    return {"run_id": target.run_id, "words": req.words, "described": f"echo {req.words}"}


KIND = JobKind(
    name="echo_words", title="Echoed words", request=EchoRequest, prepare=prepare,
    task="workers.echo_words:echo_task", api_path="/api/runs/{run_id}/echoes", api_doc="Queue an echo.",
    form_path="/runs/{run_id}/echo", form_fields=lambda form: {"words": form.text("words")},
    form_partial="_job_echo_words.html", result_partial="_job_echo_words.html",
    result_number=lambda job: ("letters", len((job.get("result") or {}).get("echoed", ""))))
'''
TASK_MODULE = '''\
"""The echo_words kind's task."""


def echo_task(params: dict, ctx) -> dict:
    ctx.report(1.0, "done")
    return {"echoed": params["words"].upper()}
'''
TEMPLATE = '''\
<form method="post" action="/runs/{{ job.run_id }}/echo"></form>
{% if r %}<p id="echoed">{{ r.echoed }}</p>{% endif %}
'''

COLUMN = '''\
        Column("novelty", "DOUBLE", "how new the feature is (an example column)", table=True, sort_key="novelty",
               label="novelty", shown=Display("Novelty", "gradient", "weight", "signed", "how new it is",
                                              tabs=(Tab("novelty"),))),
'''
COLUMN_BEFORE = '        Column("attribution", "DOUBLE",'

CHECK = textwrap.dedent('''
    import sys, tempfile
    from pathlib import Path
    from backend.core import jobs
    from backend.core.settings import Settings
    from tests.helpers import make_client, publish_synthetic_run
    from workers.worker import Worker

    settings = Settings(data_dir=Path(tempfile.mkdtemp()))
    client = make_client(settings)
    publish_synthetic_run(settings)
    with client:
        made = client.post("/api/runs/synthetic/echoes", json={"words": "reward"})
        assert made.status_code == 201, made.text
        assert client.post("/api/runs/synthetic/echoes", json={"words": ""}).status_code == 422
        assert Worker(settings, name="check").run_one()
        job = jobs.get(settings, made.json()["id"])
        assert job["status"] == "done", job
        page = client.get(f"/jobs/{job['id']}").text
        assert '<p id="echoed">REWARD</p>' in page and "Echoed words" in page
        listed = client.get("/jobs").text
        assert "Echoed words" in listed and "letters" in listed
        page = client.get("/runs/synthetic/layers/5?sort=novelty").text
        api = client.get("/api/runs/synthetic/layers/5?sort=novelty").json()
        assert ">Novelty" in page and 'data-sort="novelty"' in page, "the column's header and sort tab"
        assert any(c.get("key") == "novelty" or c.get("name") == "novelty" for c in api["columns"]), api["columns"]
        assert all("novelty" in row for row in api["features"]), "the column in every row of the JSON"
    print("the copy serves and runs the new job kind, and draws, sorts and lists the new column")
''')


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "copy"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(copy), "HEAD"], cwd=REPO, check=True)
        try:
            (copy / "backend/core/job_kinds/echo_words.py").write_text(KIND_MODULE)
            (copy / "workers/echo_words.py").write_text(TASK_MODULE)
            (copy / "frontend/templates/_job_echo_words.html").write_text(TEMPLATE)
            schema = copy / "backend/core/store_schema.py"
            source = schema.read_text()
            assert source.count(COLUMN_BEFORE) == 1, "the features table's attribution column moved"
            schema.write_text(source.replace(COLUMN_BEFORE, COLUMN + COLUMN_BEFORE))
            subprocess.run([sys.executable, "-c", CHECK], cwd=copy, check=True,
                           env={**os.environ, "PYTHONPATH": str(copy)})
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=copy,
                                    capture_output=True, text=True, check=True).stdout.splitlines()
            changed = [line for line in status if line.strip()]
            print(f"a new job kind and a new column: {len(changed)} files")
            for line in changed:
                print("  " + line)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(copy)], cwd=REPO, check=True)


if __name__ == "__main__":
    main()

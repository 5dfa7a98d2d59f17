"""Schemathesis against a live server on the synthetic run: every check it has, at least 50
examples an operation, across its coverage, fuzzing and stateful phases. It passes only with
no server error, no response outside the schema (status, content type, headers, body shape)
and no schema-valid request refused except where tests/schemathesis.toml names a rule the
schema cannot state."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from backend.app import create_app
from tests.helpers import REPO_ROOT
from tests.test_browser import _free_port

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = REPO_ROOT / "tests" / "schemathesis.toml"
EXAMPLES = 50


@pytest.fixture
def api_server(migrated, synthetic_run):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(migrated), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(api_server, tmp_path):
    proc = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(CONFIG), "--no-color", "run", f"{api_server}/api/openapi.json",
         "--checks", "all", "--max-examples", str(EXAMPLES), "--workers", "1", "--seed", "1",
         "--request-timeout", "30"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-20_000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", output)
    assert summary, output[-5_000:]
    generated, passed = map(int, summary.groups())
    operations = int(re.search(r"Tested: (\d+)", output).group(1))
    assert operations >= 15 and generated >= EXAMPLES * operations and passed == generated, output[-5_000:]

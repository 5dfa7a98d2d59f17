"""Schemathesis against a live server on the synthetic run, on SQLite and on PostgreSQL (whose text
cannot hold what SQLite's can): every check it has, at least 50 examples an operation, across its
coverage, fuzzing and stateful phases. It passes only with
no server error, no response outside the schema (status, content type, headers, body shape)
and no schema-valid request refused except where tests/schemathesis.toml names a rule the
schema cannot state."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.test_browser import live_server  # noqa: F401  (fixture: a live server on the synthetic run)

pytestmark = pytest.mark.sql_databases  # the live server on each database (tests/conftest.py)

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = REPO_ROOT / "tests" / "schemathesis.toml"
EXAMPLES = 50


def test_schemathesis_finds_no_server_error_and_no_schema_violation(live_server, tmp_path):
    import httpx

    # the app builds its OpenAPI document on the first request for it: on a busy machine that took
    # longer than Schemathesis waits for a schema (10 s), so it is asked for once first
    assert httpx.get(f"{live_server}/api/openapi.json", timeout=120).status_code == 200
    proc = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(CONFIG), "--no-color", "run", f"{live_server}/api/openapi.json",
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

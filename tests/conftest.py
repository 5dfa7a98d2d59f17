"""Fixtures: a temp data dir with a migrated SQLite database, a synthetic run and a client."""
from __future__ import annotations

import pytest

from backend import db
from backend.settings import Settings
from tests.helpers import make_client, publish_synthetic_run


@pytest.fixture
def settings(tmp_path):
    s = Settings(data_dir=tmp_path)
    yield s
    db.dispose_engines()


@pytest.fixture
def migrated(settings):
    db.upgrade(settings)
    return settings


@pytest.fixture
def synthetic_run(migrated):
    """The tables written to the synthetic run's store (run id "synthetic")."""
    return publish_synthetic_run(migrated)


@pytest.fixture
def client(migrated, synthetic_run):
    with make_client(migrated) as c:
        yield c

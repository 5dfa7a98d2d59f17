"""Fixtures: a temp data dir with a migrated SQL database, a synthetic run and a client.

SQL on both databases: a module that touches the SQL database (runs, labels, jobs,
migrations) opts in with

    pytestmark = pytest.mark.sql_databases

and every test in it that uses `settings` (or anything built on it: `migrated`,
`synthetic_run`, `client`, ...) or `database_url` runs twice, as test_x[sqlite] and
test_x[postgresql]. A test that holds on one database only narrows it with
`@pytest.mark.sql_databases("sqlite")`. Each PostgreSQL test gets a new database of its own,
dropped afterwards; tests/pg.py says where the server comes from (RA_TEST_POSTGRES_URL, else a
throwaway cluster, else the PostgreSQL variants fail saying how to provide one). A test
that builds its own Settings must pass `database_url=database_url` (and RA_DATABASE_URL to a
subprocess), or it silently runs on SQLite. Modules without the marker run on SQLite only.
"""
from __future__ import annotations


import pytest

from backend.core import db
from backend.core.settings import Settings
from tests import pg
from tests.helpers import make_client, publish_synthetic_run

SQL_DATABASES = ("sqlite", "postgresql")


def pytest_configure(config):
    config.addinivalue_line("markers", "sql_databases(*names): run the module's (or test's) SQL tests on each "
                                       "database named, by default sqlite and postgresql (tests/conftest.py)")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("sql_databases")
    if marker is not None and "sql_database" in metafunc.fixturenames:
        names = marker.args or SQL_DATABASES
        unknown = set(names) - set(SQL_DATABASES)
        assert not unknown, f"sql_databases: unknown database {sorted(unknown)}; expected {SQL_DATABASES}"
        metafunc.parametrize("sql_database", names, indirect=True)


@pytest.fixture
def sql_database(request):
    """"sqlite" or "postgresql": which database this test runs on (SQLite unless opted in)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server, problem = pg.start(), None
    except pg.Unavailable as exc:
        problem = str(exc)
    if problem:  # outside the except: the message alone, not a chained traceback
        pytest.fail(problem, pytrace=False)
    yield server
    server.close()


@pytest.fixture
def database_url(sql_database, request):
    """The test's RA_DATABASE_URL: "" (a SQLite file in the data dir) or its own PostgreSQL database."""
    if sql_database == "sqlite":
        yield ""
        return
    with request.getfixturevalue("postgres_server").database() as url:
        yield url
        db.dispose_engines()  # also those of a test that built its own Settings


@pytest.fixture
def settings(tmp_path, database_url):
    # database_url always given: an RA_DATABASE_URL in the developer's environment must not leak in
    s = Settings(data_dir=tmp_path, database_url=database_url)
    yield s
    db.dispose_engines()  # before the PostgreSQL database is dropped (database_url's teardown)


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

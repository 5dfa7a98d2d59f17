"""PostgreSQL for the tests: one server per test session, a new database for each test.

Where the server comes from, first match wins:

1. RA_TEST_POSTGRES_URL, a SQLAlchemy URL (postgresql+psycopg://user:pw@host:port/db) of a
   role that may CREATE DATABASE. .ci/run starts the system cluster and sets it.
2. A throwaway cluster: initdb + pg_ctl in a temporary folder, reached over a unix socket
   only (no port to collide with), fsync off, removed at the end of the session. The
   binaries are looked for via pg_config, PATH and /usr/lib/postgresql/*/bin (Debian's
   `apt-get install postgresql`); as root the cluster runs as the `postgres` user, since
   PostgreSQL refuses to run as root.
3. Neither: each PostgreSQL test fails and says how to provide one (never skipped: the
   promise they check is the multi-user database's).
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa

URL_ENV = "RA_TEST_POSTGRES_URL"
HOW_TO = (f"set {URL_ENV}=postgresql+psycopg://USER:PASSWORD@HOST:PORT/postgres (a role with CREATEDB), or "
          "install PostgreSQL's server binaries (apt-get install postgresql) so the tests can start a "
          "throwaway cluster")


class Unavailable(RuntimeError):
    """No PostgreSQL to test on; the message says why and how to provide one."""


class Server:
    """A PostgreSQL server the tests may create and drop databases on."""

    def __init__(self, admin_url: str, cleanup=None):
        self.admin_url = sa.engine.make_url(admin_url)
        # AUTOCOMMIT: CREATE/DROP DATABASE cannot run inside a transaction
        self.admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        self._cleanup = cleanup

    def check(self) -> None:
        try:
            with self.admin.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except sa.exc.SQLAlchemyError as exc:
            raise Unavailable(f"cannot connect to PostgreSQL at "
                              f"{self.admin_url.render_as_string(hide_password=True)}: {exc.orig or exc}\n"
                              f"{HOW_TO}") from None

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database for one test; dropped afterwards, connections and all."""
        name = f"ra_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield self.admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            self.drop(name)

    def drop(self, name: str) -> None:
        # A plain DROP first: it makes autovacuum leave the database, where FORCE would need the
        # right to signal autovacuum's process; FORCE then ends what a test left connected.
        with self.admin.connect() as conn:
            try:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            except sa.exc.OperationalError:  # "being accessed by other users"
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self.admin.dispose()
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None


def _bindir() -> Path | None:
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    # Debian keeps the server binaries off PATH, one folder per major version: the newest first
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


PREFIX = "ra-test-pg-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _reap_orphans(bindir: Path, as_user: list[str]) -> None:
    """Stop the throwaway clusters of test sessions that were killed before they could (a
    timeout's SIGTERM skips atexit), so they do not pile up."""
    for root in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((root / "owner.pid").read_text())
        except (OSError, ValueError):
            continue  # still starting, or not one of ours
        if not _alive(owner):
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w",
                            "stop"], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)


def _throwaway_cluster(bindir: Path) -> Server:
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            raise Unavailable("running as root, PostgreSQL needs a `postgres` user to run the throwaway cluster "
                              f"as (the postgresql package creates one)\n{HOW_TO}") from None
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    _reap_orphans(bindir, as_user)
    data, log = root / "data", root / "server.log"

    def run(*args: str) -> None:
        out = subprocess.run([*as_user, *args], capture_output=True, text=True)
        if out.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise Unavailable(f"{Path(args[0]).name} failed:\n{out.stdout}{out.stderr}{server_log}\n{HOW_TO}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync")
        with (data / "postgresql.conf").open("a") as conf:
            # tests need speed, not durability; the socket lives in our folder, so no port is taken
            conf.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{root}'\nfsync = off\n"
                       "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
        (root / "owner.pid").write_text(str(os.getpid()))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise

    def stop() -> None:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)  # also when the session is interrupted before its fixtures end
    return Server(f"postgresql+psycopg://postgres@/postgres?host={root}", cleanup=stop)


def start() -> Server:
    """The session's server (see the module docstring); Unavailable when there is none."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("the PostgreSQL driver is not installed: make install brings it (the `postgres` "
                          "extra), or .venv/bin/pip install 'psycopg[binary]'") from None
    url = os.environ.get(URL_ENV)
    if url:
        server = Server(url)
    else:
        bindir = _bindir()
        if bindir is None:
            raise Unavailable(f"no PostgreSQL server to test on: {URL_ENV} is not set and no initdb was found.\n"
                              f"{HOW_TO}")
        server = _throwaway_cluster(bindir)
    server.check()
    return server

"""`rewardatlas demo | run CONFIG | serve | worker | delete-run RUN_ID | export ... | db upgrade` — thin dispatch; heavy imports stay lazy
so that `serve` never imports torch, and `--help` answers at once (SQLAlchemy alone takes half a second)."""
from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from pathlib import Path

from backend.cli_exports import add_export_parser
from backend.core.settings import get_settings


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    from backend.core.db import upgrade  # lazy: SQLAlchemy and Alembic (0.5 s), only when needed

    settings = get_settings()
    upgrade(settings)
    print(f"database is at the latest schema: {settings.sql_url}")


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn  # lazy: the server's packages load only to serve

    from backend.core.db import upgrade  # lazy: SQLAlchemy (0.5 s), only when needed
    from backend.web.access import AccessConfigError, check_serving_is_safe  # lazy: the web app (1 s), only to serve
    from backend.web.app import create_app  # lazy: the web app, only to serve
    from backend.web.header_timeout import HeaderTimeoutProtocol  # lazy: uvicorn, only to serve

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    settings = settings.model_copy(update={"host": host, "port": port})
    try:
        check_serving_is_safe(settings)
    except AccessConfigError as exc:
        raise CliError(str(exc)) from exc
    upgrade(settings)
    worker = start_embedded_worker(settings) if wants_embedded_worker(args, settings) else None
    print(f"rewardatlas dashboards: http://{host}:{port}", flush=True)
    try:
        if args.workers <= 1:
            uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", http=HeaderTimeoutProtocol)
            return
        # Several processes (the pages are CPU-bound Python): each builds its app from the
        # environment, so hand them this host and one session key (a login must hold in each).
        os.environ.update(RA_HOST=host, RA_PORT=str(port),
                          RA_SECRET_KEY=settings.secret_key or secrets.token_hex(32))
        uvicorn.run("backend.web.app:create_app", factory=True, host=host, port=port, workers=args.workers,
                    log_level="warning", http=HeaderTimeoutProtocol)
    finally:
        if worker is not None:
            stop_embedded_worker(worker)


def wants_embedded_worker(args: argparse.Namespace, settings) -> bool:
    """On the default SQLite file the server brings its own worker (a new user has no second
    terminal); with a database of its own (PostgreSQL, docker-compose) workers run apart."""
    return not args.no_worker and not settings.database_url


def start_embedded_worker(settings) -> subprocess.Popen:
    """`rewardatlas worker` in a process of its own (torch stays out of the server's), warmed on
    the newest run, ending when this process does."""
    from backend.core.db import newest_run_id  # lazy: SQLAlchemy, only when needed

    command = [sys.executable, "-m", "backend.cli", "worker", "--exit-with", str(os.getpid())]
    warm = newest_run_id(settings)
    if warm:
        command += ["--warm", warm]
    print(f"worker started beside the server{f', loading run {warm!r}' if warm else ''} "
          "(--no-worker: none)", flush=True)
    return subprocess.Popen(command, env=os.environ.copy())


def stop_embedded_worker(worker: subprocess.Popen, wait_s: float = 10.0) -> None:
    worker.terminate()
    try:
        worker.wait(wait_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def cmd_run(args: argparse.Namespace) -> None:
    from backend.core.run_config import ConfigError, check_config, load_config  # lazy: its models build only to run

    settings = get_settings()
    try:
        config = load_config(Path(args.config))
        check_config(config, settings)  # before torch and SAELens load (seconds), and before the data dir is made
        if args.nproc is not None or "TORCHELASTIC_RUN_ID" in os.environ:  # several processes (torchrun sets it)
            from workers.distributed import RankFailure  # lazy: torch (seconds) loads once the config is checked
            from workers.launch import run_from_cli  # lazy: torch, once the config is checked

            try:
                run_from_cli(Path(args.config), config, settings, args.replace, args.nproc)
            except RankFailure as exc:
                raise CliError(str(exc)) from exc
            return
        # lazy: torch and SAELens (seconds) load only once the config is checked
        from workers.pipeline import run_pipeline

        run_pipeline(config, settings, replace=args.replace)
    except ConfigError as exc:  # found before or after parsing: the dataset, the model, the device
        raise CliError(str(exc)) from exc


def cmd_delete_run(args: argparse.Namespace) -> None:
    from backend.core.db import ExportFailed, delete_run_with_export, upgrade  # lazy: SQLAlchemy, only when needed

    settings = get_settings()
    upgrade(settings)
    try:
        export = delete_run_with_export(settings, args.run_id)
    except ExportFailed as exc:
        raise CliError(str(exc)) from exc
    if export is None:
        raise CliError(f"no run {args.run_id!r} is registered: nothing was deleted")
    print(f"run {args.run_id!r} deleted; its registry row, config, labels and label history are in {export}")


def cmd_worker(args: argparse.Namespace) -> None:
    from backend.core.db import upgrade  # lazy: SQLAlchemy, only when needed
    from workers.worker import main as worker_main  # lazy: torch and SAELens load only in the worker process

    settings = get_settings()
    upgrade(settings)
    worker_main(settings, once=args.once, lease_s=args.lease, poll_s=args.poll, warm=args.warm,
                exit_with=args.exit_with)


def cmd_demo(args: argparse.Namespace) -> None:
    from workers.demo import ensure_demo  # lazy: the demo's workers (torch once there is work) load only for demo

    settings = get_settings()
    if args.llama:
        ensure_demo(settings, llama=True)
    else:
        ensure_demo(settings)
    if not args.no_serve:
        cmd_serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardatlas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def serving_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--host", default=None)
        command.add_argument("--port", type=int, default=None)
        command.add_argument("--workers", type=int, default=1,
                             help="server processes (default 1; up to one per core for many concurrent readers)")
        command.add_argument("--no-worker", action="store_true",
                             help="start no job worker beside the server (by default one starts on the default "
                                  "SQLite database; with RA_DATABASE_URL set, workers run apart)")

    demo = sub.add_parser("demo", help="build the demo reward model and run, then serve them")
    demo.add_argument("--no-serve", action="store_true", help="build only")
    demo.add_argument("--llama", action="store_true",
                      help="the LLaMA-family demo instead: SmolLM2 with a Bradley-Terry head, run demo-llama")
    serving_options(demo)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the pipeline described by a YAML config")
    run.add_argument("config")
    run.add_argument("--replace", action="store_true", help="overwrite a run with the same id")
    run.add_argument("--nproc", type=int, default=None, metavar="N",
                     help="run on N processes of this machine (torch.distributed: one per CPU core or GPU); "
                          "under torchrun leave it out")
    run.set_defaults(func=cmd_run)

    delete_run = sub.add_parser("delete-run", help="delete a run for good, writing an export of it and its labels "
                                                   "(with their history) under the data dir first")
    delete_run.add_argument("run_id")
    delete_run.set_defaults(func=cmd_delete_run)

    serve = sub.add_parser("serve", help="serve the dashboards")
    serving_options(serve)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run queued jobs (pipeline runs, ablations, custom texts)")
    worker.add_argument("--once", action="store_true", help="run the queued jobs, then exit")
    worker.add_argument("--lease", type=float, default=30.0,
                        help="seconds a claimed job stays ours without a heartbeat (default 30)")
    worker.add_argument("--poll", type=float, default=0.5, help="seconds between looks at an empty queue")
    worker.add_argument("--warm", metavar="RUN_ID", default=None,
                        help="load this run's model, SAEs and default evaluation set before taking jobs")
    worker.add_argument("--exit-with", metavar="PID", type=int, default=None,
                        help="stop when the process PID ends (the server that started this worker)")
    worker.set_defaults(func=cmd_worker)

    add_export_parser(sub, CliError)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply Alembic migrations").set_defaults(func=cmd_db_upgrade)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a run stopped by hand keeps nothing (it publishes only when complete)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

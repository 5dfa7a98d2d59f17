"""`rewardatlas export neuronpedia | table | labels | saedashboard`: the web's export buttons from a
shell. Each writes its file (or folder) under a temporary name and renames it into place when
complete, so a failed or interrupted export leaves nothing; a whole layer shows its progress."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from backend.core.exports import ExportError
from backend.core.exports.atomic import atomic_file
from backend.core.settings import get_settings


def _features(text: str) -> list[int]:
    """'3,7, 12' -> [3, 7, 12]."""
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: feature ids are whole numbers, separated by commas") from None


def _progress(total_label: str):
    """A progress bar on stderr: (done, total) -> None."""
    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=total_label, unit="batch", file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return report


def _write_stream(chunks, out: Path, replace: bool) -> int:
    written = 0
    with atomic_file(out, replace=replace) as work, work.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
            written += len(chunk)
    return written


def cmd_neuronpedia(args, settings) -> str:
    from backend.core.exports import neuronpedia  # lazy: SQLAlchemy and DuckDB load only for an export

    started = time.perf_counter()
    options = neuronpedia.Options(model_id=args.model_id, source_set=args.source_set, creator_id=args.creator_id,
                                  creator_name=args.creator_name, batch_features=args.batch_features)
    export = neuronpedia.prepare(settings, args.run_id, args.layer, args.features, options)
    out = Path(args.out or f"neuronpedia-{args.run_id}-layer{args.layer}")
    done = neuronpedia.write_dir(export, out, args.replace, _progress(f"layer {args.layer}, {len(export.features)} features"))
    return (f"{done['features']:,} features, {done['activations']:,} activations, {done['explanations']:,} explanations "
            f"({done['bytes'] / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s: {done['path']}\n"
            f"import it with Neuronpedia's importer from the folder above {export.model_id}/")


def cmd_table(args, settings) -> str:
    from backend.core.exports import tables  # lazy: SQLAlchemy and DuckDB load only for an export
    from backend.web.routes.common import TableView  # lazy: the web app's routes (0.6 s), only for a table

    try:
        view = TableView(sort=args.sort, sign=args.sign, min_freq=args.min_freq, max_freq=args.max_freq,
                         token=args.token, label=args.label, min_pair_cosine=args.min_pair_cosine)
    except ValidationError as exc:
        raise ExportError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'view'}: {e['msg']}" for e in exc.errors()))
    export = tables.table_export(settings, args.run_id, args.layer, view)
    out = Path(args.out or f"{export.filename}.{args.format}")
    size = _write_stream(tables.stream(export, args.format), out, args.replace)
    return f"{len(export.ids):,} features ({size:,} bytes, sorted by {export.sort}): {out}"


def cmd_labels(args, settings) -> str:
    from backend.core.exports import labels_export  # lazy: SQLAlchemy and DuckDB load only for an export

    out = Path(args.out or f"{labels_export.filename(args.run_id)}.{args.format}")
    size = _write_stream(labels_export.stream(settings, args.run_id, args.format), out, args.replace)
    return f"labels with their features' statistics and history ({size:,} bytes): {out}"


def cmd_saedashboard(args, settings) -> str:
    from backend.core.exports.source import chosen_features, open_layer, require_sae  # lazy: DuckDB, only for an export

    if args.texts < 1:
        raise ExportError(f"--texts {args.texts}: read the feature on at least 1 text")
    source = open_layer(settings, args.run_id, args.layer)
    chosen_features(source, [args.feature])
    require_sae(source)
    out = Path(args.out or f"saedashboard-{args.run_id}-layer{args.layer}-feature{args.feature}.html")
    if out.exists() and not args.replace:
        raise ExportError(f"{out} already exists: choose another output, or pass --replace")
    # lazy: torch, SAELens and SAEDashboard (seconds) load only once the input is checked
    from workers.exports.saedashboard import render
    from workers.run_cache import RunCache  # lazy: torch, once the input is checked
    from workers.train import load_sae  # lazy: SAELens, once the input is checked

    run = RunCache(settings).get(args.run_id)  # the run's model, as its jobs load it
    sae = load_sae(source.sae_dir, run.adapter.device)
    bar = _progress("forward passes")
    done = render(source, run.adapter, sae, args.feature, out, args.texts,
                  lambda share: bar(round(share * 100), 100), replace=args.replace)
    return (f"SAEDashboard page of feature {args.feature} ({done.n_texts:,} texts, {done.n_tokens:,} tokens, "
            f"{done.bytes / 1e6:.1f} MB) in {done.seconds:.1f} s: {out}")


def run_export(args) -> None:
    """Dispatch, turning a problem the user can fix into the CLI's own error (args.cli_error)."""
    from backend.core.db import upgrade  # lazy: SQLAlchemy and Alembic (0.5 s), only for an export
    from backend.core.store import NotFound, StoreOutdated  # lazy: DuckDB, only for an export

    settings = get_settings()
    upgrade(settings)
    try:
        print(args.export_func(args, settings))
    except (ExportError, NotFound, StoreOutdated) as exc:
        raise args.cli_error(str(exc)) from exc


def add_export_parser(sub, cli_error: type[Exception]) -> None:
    """`export` and its commands; a problem the user can fix is raised as `cli_error`."""
    export = sub.add_parser("export", help="export a run's features, tables, labels or a feature's SAEDashboard page")
    kinds = export.add_subparsers(dest="export_kind", required=True)

    def command(name: str, help_text: str, func, out_help: str) -> argparse.ArgumentParser:
        p = kinds.add_parser(name, help=help_text, description=help_text)
        p.add_argument("run_id")
        p.add_argument("--out", default=None, help=out_help)
        p.add_argument("--replace", action="store_true", help="overwrite an existing output")
        p.set_defaults(func=run_export, export_func=func, cli_error=cli_error)
        return p

    np_ = command("neuronpedia", "a layer (or chosen features) in Neuronpedia's import layout, with the reward fields",
                  cmd_neuronpedia, "folder to create (default: neuronpedia-<run>-layer<L>)")
    np_.add_argument("--layer", type=int, required=True)
    np_.add_argument("--features", type=_features, default=None, help="feature ids, e.g. 3,7,12 (default: all)")
    np_.add_argument("--model-id", default=None, help="Neuronpedia model id (default: from the run's model)")
    np_.add_argument("--source-set", default=None, help="Neuronpedia source set (default: rewardatlas-<run>)")
    np_.add_argument("--creator-id", default="rewardatlas", help="the Neuronpedia user id the rows name as creator")
    np_.add_argument("--creator-name", default="rewardatlas")
    np_.add_argument("--batch-features", type=int, default=128, help="features per batch file (default 128)")

    table = command("table", "a layer's feature table, filtered and sorted as on the layer page, with its statistics",
                    cmd_table, "file to write (default: features-<run>-layer<L>.<format>)")
    table.add_argument("--layer", type=int, required=True)
    table.add_argument("--format", choices=("csv", "parquet"), default="csv")
    table.add_argument("--sort", default=None, help="a layer-page sort key (default: the layer's default ranking)")
    table.add_argument("--sign", choices=("pos", "neg"), default=None, help="raises (pos) or lowers (neg) the reward")
    table.add_argument("--min-freq", type=float, default=None, help="per cent of tokens, as the pages show it")
    table.add_argument("--max-freq", type=float, default=None, help="per cent of tokens")
    table.add_argument("--token", default=None, help="features firing on a token starting with this")
    table.add_argument("--label", default=None, help="reward, not_reward, unsure or unlabelled")
    table.add_argument("--min-pair-cosine", type=float, default=None)

    lab = command("labels", "every label with its feature's statistics and its history", cmd_labels,
                  "file to write (default: labels-with-stats-<run>.<format>)")
    lab.add_argument("--format", choices=("csv", "json"), default="json")

    dash = command("saedashboard", "SAEDashboard's own page of one feature, from the run's SAE and reward model",
                   cmd_saedashboard, "HTML file to write (default: saedashboard-<run>-layer<L>-feature<F>.html)")
    dash.add_argument("--layer", type=int, required=True)
    dash.add_argument("--feature", type=int, required=True)
    dash.add_argument("--texts", type=int, default=1024, help="corpus texts to read the feature on (default 1024)")

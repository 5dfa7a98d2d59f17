"""One layer of a run (or chosen features of it) in the layout Neuronpedia's importer reads, plus
what no Neuronpedia export carries: what each feature does to the reward.

The layout (one source = one SAE on one layer, `<modelId>/<layer>-<sourceSet>/`):

    release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl      one row each, plain JSONL
    features/batch-<n>.jsonl.gz       a `Neuron` row per feature
    activations/batch-<n>.jsonl.gz    an `Activation` row per context (top contexts, then quantile samples)
    explanations/batch-<n>.jsonl.gz   an `Explanation` row per label with a note (only where there are any)
    rewardatlas.json                  what was exported: run, layer metrics, files (the importer ignores it)

Neuronpedia's importer (apps/webapp/app/api/admin/import/route.ts) reads the four metadata files
as JSONL and every `*.jsonl.gz` under features/, activations/ and explanations/; its
importJsonlString (apps/webapp/lib/db/import.ts) inserts the columns named by a file's first line
that the table has, so every line of a file carries the same keys and the reward fields (`reward`,
an object no table has a column for) ride along without disturbing the import. The rows follow
its Prisma models (apps/webapp/prisma/schema.prisma); neuronpedia_schema.json is written from them.
"""
from __future__ import annotations

import gzip
import json
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from backend.core import explanations, labels, store
from backend.core.exports import ExportError
from backend.core.exports.atomic import atomic_dir
from backend.core.exports.source import LayerSource, chosen_features, open_layer, reading, require_sae, safe_name
from backend.core.exports.streams import ChunkSink
from backend.core.exports.tables import default_ranks
from backend.core.run_config import DEMO_MODEL, DEMO_MODEL_DIRNAME
from backend.core.settings import Settings

SCHEMA_PATH = Path(__file__).with_name("neuronpedia_schema.json")
BATCH_FEATURES = 128  # features per batch file (SAEDashboard's NeuronpediaRunner writes 128 a batch too)
MANIFEST = "rewardatlas.json"
GZIP_LEVEL = 3  # level 5 made the files 4% smaller and the export 1.5x slower
# what each feature's `reward` object carries, from the store's features table
REWARD_COLUMNS = ("weight", "weight_se", "std_weight", "reward_correlation", "reward_effect", "attribution",
                  "attribution_abs", "attribution_share", "measured_delta", "measured_delta_low", "measured_delta_high",
                  "measured_n", "predicted_delta_regression", "predicted_delta_attribution")
FEATURE_COLUMNS = ("feature", "frequency", "max_activation", "top_token", "hist_edges", "hist_counts", "neighbours",
                   "neighbour_cosines", *REWARD_COLUMNS)


@dataclass(frozen=True)
class Options:
    """How the export names itself on Neuronpedia; None: derived from the run."""
    model_id: str | None = None      # Neuronpedia's Model.id (lower case letters, digits, - and _)
    source_set: str | None = None    # the source set's name; the source's id is "<layer>-<source_set>"
    creator_id: str = "rewardatlas"  # a Neuronpedia User.id the rows name as their creator
    creator_name: str = "rewardatlas"
    batch_features: int = BATCH_FEATURES


@dataclass
class Export:
    source: LayerSource
    features: list[int]  # ascending
    options: Options
    model_id: str
    source_set: str
    sae_config: dict[str, Any]
    run_info: dict[str, str]
    model_layers: int
    labelled: dict[int, dict[str, Any]]
    settings: Settings | None = None
    explained: dict[int, dict[str, Any]] = field(default_factory=dict)  # current explanations (issue 24's)
    token_scheme: str = "plain"  # how the tokenizer spells word boundaries (token_scheme)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def source_id(self) -> str:
        return f"{self.source.layer}-{self.source_set}"

    @property
    def root(self) -> str:
        """The source's folder, as the importer finds it under the dataset root."""
        return f"{self.model_id}/{self.source_id}"

    @property
    def n_batches(self) -> int:
        return -(-len(self.features) // self.options.batch_features)

    def batches(self) -> Iterator[tuple[int, list[int]]]:
        size = self.options.batch_features
        for i in range(self.n_batches):
            yield i, self.features[i * size:(i + 1) * size]


def _checked_name(value: str | None, fallback: str, what: str) -> str:
    if value is None:
        return fallback
    if not value or safe_name(value, "") != value:
        raise ExportError(f"{what} {value!r}: use lower case letters, digits, '-' and '_' only")
    return value


def _model_layers(settings: Settings, info: dict[str, str], source: LayerSource) -> int:
    """The model's block count from its config.json where the model is a local directory; else the
    deepest layer the run has (Neuronpedia's Model.layers)."""
    model = info.get("model") or ""
    path = settings.models_dir / DEMO_MODEL_DIRNAME if model == DEMO_MODEL else Path(model)
    try:
        config = json.loads((path / "config.json").read_text())
        return int(config.get("num_hidden_layers") or config.get("n_layer"))
    except (OSError, ValueError, TypeError):
        return max(int(row["layer"]) for row in store.layers(source.store_path)) + 1


def prepare(settings: Settings, run_id: str, layer: int, features: list[int] | None = None,
            options: Options = Options()) -> Export:
    """Everything checked before a byte is written: the run, the layer, the features (None: all of
    the layer's), the SAE on disk, the names. NotFound / ExportError otherwise."""
    source = open_layer(settings, run_id, layer)
    chosen = chosen_features(source, features)
    sae_config = json.loads((require_sae(source) / "cfg.json").read_text())
    if not 1 <= options.batch_features <= 100_000:
        raise ExportError(f"batch size {options.batch_features}: choose 1 to 100,000 features a batch file")
    info = store.run_info(source.store_path)
    model_id = _checked_name(options.model_id, safe_name(Path(info.get("model") or "model").name, "model"), "model id")
    source_set = _checked_name(options.source_set, f"rewardatlas-{safe_name(run_id, 'run')}", "source set")
    return Export(source, sorted(chosen) if chosen is not None else list(range(int(source.info["d_sae"]))),
                  options, model_id, source_set, sae_config, info, _model_layers(settings, info, source),
                  labels.labels_for_layer(settings, run_id, layer), settings,
                  explained=explanations.for_layer(settings, run_id, layer))


# --- rows ----------------------------------------------------------------------------------------

def token_scheme(tokens) -> str:
    """How a tokenizer spells word boundaries: 'bpe' (byte-level "Ġ" / SentencePiece "▁"),
    'wordpiece' ("##" continuations) or 'plain' (tokens carry their own spaces)."""
    tokens = [t for t in tokens if t]
    if any(t[0] in "\u0120\u2581\u010a" for t in tokens):
        return "bpe"
    return "wordpiece" if any(t.startswith("##") for t in tokens) else "plain"


def surface_tokens(tokens: list[str], scheme: str | None = None) -> list[str]:
    """Tokens as they read when Neuronpedia joins them: WordPiece's "##" continuations attached and its
    other tokens after a space, byte-level BPE's "Ġ"/"Ċ" and SentencePiece's "▁" as the space or
    newline they stand for (SURFACE_SQL does the same in the store)."""
    scheme = scheme or token_scheme(tokens)
    if scheme == "bpe":
        return [t.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n") for t in tokens]
    if scheme == "wordpiece":
        return [t[2:] if t.startswith("##") else (t if i == 0 else " " + t) for i, t in enumerate(tokens)]
    return list(tokens)


SURFACE_SQL = {
    "bpe": "list_transform(c.tokens, lambda t: replace(replace(replace(t, '\u0120', ' '), '\u2581', ' '), '\u010a', chr(10)))",
    "wordpiece": "list_transform(c.tokens, lambda t, i: CASE WHEN starts_with(t, '##') THEN t[3:] WHEN i = 1 THEN t "
                 "ELSE ' ' || t END)",
    "plain": "c.tokens",
}


def _number(value: Any) -> float | None:
    return None if value is None or value != value else float(value)


def _reward(export: Export, row: dict[str, Any], ranking: str, ranks: dict[int, int]) -> dict[str, Any]:
    feature = int(row["feature"])
    label = export.labelled.get(feature) or {}
    out = {name: _number(row[name]) if name != "measured_n" else int(row[name] or 0) for name in REWARD_COLUMNS}
    return {"run_id": export.source.run_id, "output": export.run_info.get("output"), **out,
            "default_ranking": ranking, "default_rank": ranks.get(feature), "label": label.get("label"),
            "label_note": label.get("note"), "label_author": label.get("author"), "label_version": label.get("version")}


def _neuron(export: Export, row: dict[str, Any], ranking: str, ranks: dict[int, int]) -> dict[str, Any]:
    edges, counts = row["hist_edges"] or [], row["hist_counts"] or []
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    return {
        "modelId": export.model_id, "layer": export.source_id, "index": str(row["feature"]),
        "sourceSetName": export.source_set, "creatorId": export.options.creator_id, "createdAt": export.created_at,
        "maxActApprox": _number(row["max_activation"]) or 0.0, "hasVector": False,
        "hookName": export.source.info["hook_name"], "frac_nonzero": _number(row["frequency"]) or 0.0,
        "freq_hist_data_bar_heights": [float(c) for c in counts], "freq_hist_data_bar_values": centres,
        "topkCosSimIndices": [int(i) for i in row["neighbours"] or []],
        "topkCosSimValues": [float(c) for c in row["neighbour_cosines"] or []],
        "reward": _reward(export, row, ranking, ranks),
    }


def _finite(expr: str) -> str:
    return f"CASE WHEN isfinite({expr}) THEN {expr} END"  # DuckDB's to_json writes NaN, which JSON has not


# One `Activation` row per stored context, as JSON, made by DuckDB (Python took ~20 ms a feature). Parameters:
# id prefix, model id, source id, creator id, created at, layer, first and last feature, the features.
ACTIVATIONS_SQL = """
SELECT to_json(struct_pack(
    id := concat(?::VARCHAR, c.feature, '-', left(c.kind, 1), c.rank),
    tokens := {surface},
    modelId := ?::VARCHAR, layer := ?::VARCHAR, "index" := c.feature::VARCHAR,
    maxValue := coalesce(list_max(c.acts), 0)::DOUBLE,
    maxValueTokenIndex := coalesce(list_position(c.acts, list_max(c.acts)) - 1, 0),
    minValue := coalesce(list_min(c.acts), 0)::DOUBLE,
    "values" := c.acts::DOUBLE[],
    creatorId := ?::VARCHAR, createdAt := ?::VARCHAR, dataIndex := c.text_id::VARCHAR,
    binMin := c.bin_low, binMax := c.bin_high, qualifyingTokenIndex := c.position - c.window_start,
    reward := struct_pack(kind := c.kind, rank := c.rank, text_id := c.text_id, score := {score},
                          dataset_reward := {reward})
))::VARCHAR
FROM contexts c LEFT JOIN texts t USING (text_id)
WHERE c.layer = ? AND c.feature BETWEEN ? AND ? AND c.feature IN (SELECT unnest(?::INTEGER[]))
ORDER BY c.feature, c.kind DESC, c.rank
"""


def _explanation(export: Export, feature: int, label: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"ra-{safe_name(export.source.run_id)}-l{export.source.layer}-f{feature}-label-v{label['version']}",
        "modelId": export.model_id, "layer": export.source_id, "index": str(feature), "description": label["note"],
        "authorId": export.options.creator_id, "typeName": None, "explanationModelName": None,
        "notes": f"rewardatlas label '{label['label']}' by {label['author']} (version {label['version']})",
        "createdAt": label["updated_at"].isoformat() if isinstance(label["updated_at"], datetime) else export.created_at,
    }


def _written_explanation(export: Export, feature: int, e: dict[str, Any]) -> dict[str, Any]:
    """A feature's current explanation (an explain job's or a person's) as an Explanation row, its
    scores and reward-related classification in the notes."""
    stored = e.get("scores") or {}
    headline = {name: (stored.get(name) or {}).get("score") for name in ("detection", "fuzzing", "embedding", "causal")}
    scores = ", ".join(f"{name} {value:.3g}" for name, value in headline.items() if isinstance(value, (int, float)))
    related = f"; reward-related: {e['reward_related']}" if e.get("reward_related") else ""
    return {
        "id": f"ra-{safe_name(export.source.run_id)}-l{export.source.layer}-f{feature}-explanation-v{e['version']}",
        "modelId": export.model_id, "layer": export.source_id, "index": str(feature), "description": e["text"],
        "authorId": export.options.creator_id, "typeName": f"rewardatlas-{e['explainer']}",
        "explanationModelName": e.get("model") or None,
        "notes": f"rewardatlas {e.get('explainer_name') or e['explainer']} explanation, version {e['version']}"
                 f"{related}{'; scores: ' + scores if scores else ''}",
        "createdAt": e["updated_at"].isoformat() if isinstance(e.get("updated_at"), datetime) else export.created_at,
    }


def _metadata(export: Export) -> dict[str, dict[str, Any]]:
    """The release, model, source set and source rows."""
    o, info, layer = export.options, export.run_info, export.source.info
    title = f"rewardatlas run {export.source.run_id}: {info.get('name') or export.source.run_id}"
    notes = (f"SAE features of a reward model, exported by rewardatlas with what each does to the reward: "
             f"held-out R² {layer.get('r2_heldout')}, default ranking {layer.get('default_ranking')}, "
             f"verdict {layer.get('faithfulness_verdict')}")
    return {
        "release.jsonl": {"name": export.source_set, "description": title, "descriptionShort": title, "urls": [],
                          "creatorName": o.creator_name, "creatorNameShort": o.creator_name, "creatorId": o.creator_id,
                          "defaultSourceSetName": export.source_set, "createdAt": export.created_at},
        "model.jsonl": {"id": export.model_id, "displayName": info.get("model") or export.model_id,
                        "displayNameShort": export.model_id, "creatorId": o.creator_id, "layers": export.model_layers,
                        "neuronsPerLayer": int(layer["d_sae"]), "owner": o.creator_name, "instruct": False,
                        "defaultSourceSetName": export.source_set, "createdAt": export.created_at,
                        "updatedAt": export.created_at},
        "sourceset.jsonl": {"modelId": export.model_id, "name": export.source_set,
                            "description": f"Residual stream - {layer['d_sae']} ({layer['architecture']})",
                            "creatorName": o.creator_name, "creatorId": o.creator_id, "urls": [],
                            "releaseName": export.source_set, "visibility": "PRIVATE", "createdAt": export.created_at},
        "source.jsonl": {"id": export.source_id, "modelId": export.model_id, "setName": export.source_set,
                         "creatorId": o.creator_id, "hasDashboards": True, "inferenceEnabled": False,
                         "saelensConfig": export.sae_config, "visibility": "PRIVATE",
                         "dataset": info.get("dataset"), "num_prompts": int(info.get("n_texts") or 0) or None,
                         "notes": notes, "createdAt": export.created_at},
    }


# --- files -------------------------------------------------------------------------------------

def _jsonl(rows: list[dict[str, Any]] | list[str], compress: bool) -> bytes:
    """JSON lines from rows (dicts, or lines already written as JSON), gzip'd where the importer reads gzip."""
    data = b"".join((row.encode() if isinstance(row, str) else orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY))
                    + b"\n" for row in rows)
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0) if compress else data


def _batch_rows(con, export: Export, ids: list[int], ranking: str, ranks: dict[int, int]):
    """(Neuron rows, Activation JSON lines, Explanation rows) of a batch of features."""
    layer = export.source.layer
    # BETWEEN first: the row groups' zone maps skip the rest of the layer (a semi-join alone read it all)
    span = [min(ids), max(ids)]
    cur = con.execute(f"SELECT {', '.join(FEATURE_COLUMNS)} FROM features WHERE layer = ? AND feature BETWEEN ? AND ? "
                      "AND feature IN (SELECT unnest(?::INTEGER[])) ORDER BY feature", [layer, *span, ids])
    neurons = [_neuron(export, dict(zip(FEATURE_COLUMNS, r)), ranking, ranks) for r in cur.fetchall()]
    sql = ACTIVATIONS_SQL.format(surface=SURFACE_SQL[export.token_scheme], score=_finite("t.score"),
                                 reward=_finite("t.reward"))
    prefix = f"ra-{safe_name(export.source.run_id)}-v{export.source.run.version}-l{layer}-f"
    activations = [line for (line,) in con.execute(sql, [prefix, export.model_id, export.source_id,
                                                          export.options.creator_id, export.created_at, layer, *span,
                                                          ids]).fetchall()]
    explanations = [_explanation(export, f, export.labelled[f]) for f in ids
                    if f in export.labelled and (export.labelled[f].get("note") or "").strip()]
    explanations += [_written_explanation(export, f, export.explained[f]) for f in ids if f in export.explained]
    return neurons, activations, explanations


def _scheme_of(settings: Settings, info: dict[str, str], con, layer: int) -> str:
    """The run's tokenizer's scheme: from its tokenizer.json where the model is a local directory (a
    WordPiece corpus of common words may show no "##" at all), else from the stored contexts' tokens."""
    model = info.get("model") or ""
    path = settings.models_dir / DEMO_MODEL_DIRNAME if model == DEMO_MODEL else Path(model)
    try:
        kind = json.loads((path / "tokenizer.json").read_text())["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        kind = None
    if kind == "WordPiece":
        return "wordpiece"
    sample = con.execute("SELECT list(t) FROM (SELECT unnest(tokens) AS t FROM contexts WHERE layer = ? LIMIT 20000)",
                         [layer]).fetchone()[0] or []
    return token_scheme(sample)


def files(export: Export, progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[str, bytes]]:
    """(path under the source's folder, content) for every file, batch by batch; the manifest last.
    `progress(batches done, batches)` after each batch."""
    written: dict[str, int] = {}

    def emit(name: str, data: bytes):
        written[name] = len(data)
        return name, data

    for name, row in _metadata(export).items():
        yield emit(name, _jsonl([row], compress=False))
    counts = {"features": 0, "activations": 0, "explanations": 0}
    with reading(export.source.store_path) as con:
        ranking, ranks = default_ranks(con, export.source)
        export.token_scheme = _scheme_of(export.settings, export.run_info, con, export.source.layer)
        for i, ids in export.batches():
            neurons, activations, explanations = _batch_rows(con, export, ids, ranking, ranks)
            for folder, rows in (("features", neurons), ("activations", activations), ("explanations", explanations)):
                counts[folder] += len(rows)
                if rows:
                    yield emit(f"{folder}/batch-{i}.jsonl.gz", _jsonl(rows, compress=True))
            if progress is not None:
                progress(i + 1, export.n_batches)
    yield MANIFEST, json.dumps(_manifest(export, ranking, counts, written), indent=1, default=str).encode()


def _manifest(export: Export, ranking: str, counts: dict[str, int], written: dict[str, int]) -> dict[str, Any]:
    layer = {k: v for k, v in export.source.info.items() if not isinstance(v, (list, dict))}
    return {"format": "neuronpedia", "exported_at": export.created_at, "run_id": export.source.run_id,
            "run_version": export.source.run.version, "layer": export.source.layer, "model_id": export.model_id,
            "source_set": export.source_set, "source_id": export.source_id, "default_ranking": ranking,
            "whole_layer": len(export.features) == int(export.source.info["d_sae"]), "n_features": len(export.features),
            "rows": counts, "files": written, "layer_metrics": layer}


def write_dir(export: Export, out: Path, replace: bool = False,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The export under `out` (created whole, or not at all): out/<modelId>/<sourceId>/..."""
    with atomic_dir(Path(out), replace=replace) as work:
        base = work / export.root
        for name, data in files(export, progress):
            path = base / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        manifest = json.loads((base / MANIFEST).read_text())
    return {"path": str(Path(out) / export.root), "bytes": sum(manifest["files"].values()), **manifest["rows"]}


def zip_stream(export: Export) -> Iterator[bytes]:
    """The same files as a ZIP (<modelId>/<sourceId>/...), sent as each file is made: gzip'd batches
    stored, the small JSON files deflated."""
    sink = ChunkSink()
    with zipfile.ZipFile(sink, "w") as archive:
        for name, data in files(export):
            packed = zipfile.ZIP_STORED if name.endswith(".gz") else zipfile.ZIP_DEFLATED
            info = zipfile.ZipInfo(f"{export.root}/{name}", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = packed
            archive.writestr(info, data)
            yield sink.drain()
    yield sink.drain()


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())

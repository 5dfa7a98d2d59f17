"""Read-only queries on one run's DuckDB feature store (schema: backend/core/store_schema.py).

Every function takes the store's path. Connections are cached per file and re-opened when
the file is replaced (the pipeline renames a new store into place), detected by inode,
mtime and size. Each thread queries through its own cursor, kept between calls, so threads
never share one.
"""
from __future__ import annotations

import json
import os
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa

from backend.core.store_schema import CARD_KEY, FEATURES, LAYERS, NORMALISED_TOKEN, STORE_VERSION, TABLES, order_sql, sorts

# Sort keys of the feature table (from the spec): key -> SQL expression. "key" puts the largest
# first, "-key" the smallest; NULLs (a dead feature's correlation, say) always last, ties by feature id.
SORT_COLUMNS = {sort.key: sort.expression for sort in sorts(FEATURES)}
SORTS = tuple(key for column in SORT_COLUMNS for key in (column, f"-{column}"))


order_by = order_sql  # the layer table's ORDER BY for a sort key (one definition, in the spec)


SIGN_COLUMNS = ("weight", "reward_effect", "attribution", "measured_delta")  # the rankings' columns


@dataclass(frozen=True)
class FeatureFilter:
    """Which of a layer's features a table view shows; every field optional."""
    sign: str | None = None          # 'pos' (raises the score) or 'neg' (lowers it), by `sign_column`
    sign_column: str = "weight"      # whose sign says so: the default ranking's column
    sign_flip: bool = False          # True for measured_delta: a feature whose zeroing lowers the score raises it
    min_frequency: float | None = None
    max_frequency: float | None = None
    token: str | None = None         # a top token or top-context token starts with this
    features: tuple[int, ...] | None = None  # only these ids (e.g. the ones with a label, from SQL)
    min_pair_cosine: float | None = None  # present in both dictionaries: max cosine in the paired SAE >= this

    def where(self) -> tuple[str, list[Any]]:
        """SQL conditions (after 'WHERE layer = ?') and their parameters."""
        sql, params = [], []
        if self.sign in ("pos", "neg"):
            if self.sign_column not in SIGN_COLUMNS:
                raise ValueError(f"cannot filter by the sign of {self.sign_column!r}")
            raises = (self.sign == "pos") != self.sign_flip
            sql.append(f"{self.sign_column} {'>' if raises else '<'} 0")
        elif self.sign is not None:
            raise ValueError(f"unknown sign {self.sign!r}; expected 'pos' or 'neg'")
        if self.min_frequency is not None:
            sql.append("frequency >= ?")
            params.append(self.min_frequency)
        if self.max_frequency is not None:
            sql.append("frequency <= ?")
            params.append(self.max_frequency)
        if self.min_pair_cosine is not None:
            sql.append("pair_max_cosine >= ?")
            params.append(self.min_pair_cosine)
        if self.token:
            sql.append("feature IN (SELECT t.feature FROM feature_tokens t WHERE t.layer = f.layer "
                       f"AND starts_with(t.token, {NORMALISED_TOKEN.format('?')}))")
            params.append(self.token.strip())
        if self.features is not None:  # a semi-join on the list: fast even for every id of a layer
            sql.append("feature IN (SELECT unnest(?::INTEGER[]))")
            params.append(list(self.features))
        return "".join(f" AND {c}" for c in sql), params


LAYER_COLUMNS = ", ".join(LAYERS.names)
FEATURE_COLUMNS = ", ".join(c.name for c in FEATURES.columns if c.table)  # a layer table row
FAITHFULNESS_COLUMNS = ", ".join(TABLES["faithfulness"].names)
# a measured feature's single-feature Δ beside both predictions of it: a calibration point
MEASURED_COLUMNS = ("feature", "measured_delta", "measured_delta_low", "measured_delta_high", "measured_n",
                    "predicted_delta_regression", "predicted_delta_attribution")


class NotFound(LookupError):
    """An unknown run, layer, feature or page; the web layer answers 404 with this message."""


class StoreOutdated(Exception):
    """A store written with another schema version; the web layer answers 409 with this message."""


@dataclass
class FeaturePage:
    rows: list[dict[str, Any]]
    total: int  # features in the layer, over all pages


@dataclass
class _OpenStore:
    signature: tuple[int, int, int, int]  # device, inode, mtime, size: a replaced file reopens
    con: duckdb.DuckDBPyConnection
    memo: dict[str, Any] = field(default_factory=dict)  # small results; the file never changes
    cursors: dict[int, duckdb.DuckDBPyConnection] = field(default_factory=dict)  # one per thread, kept
    views: OrderedDict = field(default_factory=OrderedDict)  # (layer, sort, filter) -> ids, least recent first
    layer_rows: OrderedDict = field(default_factory=OrderedDict)  # layer -> (table columns, row of each id)


_lock = threading.Lock()
_connections: dict[str, _OpenStore] = {}


def _open(path: Path) -> _OpenStore:
    # keyed by the path as given: every query calls this, and resolve() cost a syscall per
    # part of the path each time; os.stat follows links, so a replaced file still reopens
    key = str(path)
    try:
        st = os.stat(key)
    except FileNotFoundError:
        raise NotFound(f"feature store {path} does not exist") from None
    signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    with _lock:
        cached = _connections.get(key)
        if cached is None or cached.signature != signature:
            # duckdb.connect(path) shares one database instance per path within a process,
            # so after a rename it would keep serving the old file. A private in-memory
            # instance with the file ATTACHed read-only always opens the current file; the
            # old connection is dropped, not closed, so in-flight cursors finish normally.
            # One thread per query: page queries touch a few thousand rows, where DuckDB's
            # parallel workers cost more CPU than they save (measured: a feature's card 1.4 ->
            # 0.8 ms, a table page 10 -> 8 ms), and concurrent requests already use the cores.
            con = duckdb.connect(":memory:", config={"threads": 1})
            attach = os.path.abspath(key).replace("'", "''")
            con.execute(f"ATTACH '{attach}' AS store (READ_ONLY)")
            found = con.execute("SELECT value FROM store.run_info WHERE key = 'store_version'").fetchone()
            if found is None or found[0] != str(STORE_VERSION):
                con.close()
                raise StoreOutdated(
                    f"feature store {path} has schema version {found[0] if found else 'unknown'}, this server "
                    f"reads version {STORE_VERSION}: re-run its pipeline (rewardatlas run CONFIG --replace)")
            _connections[key] = _OpenStore(signature, con)
        return _connections[key]


def _cursor(path: Path) -> duckdb.DuckDBPyConnection:
    """This thread's cursor on the store (a cursor serves one thread at a time); opening one
    per query cost a quarter of a millisecond."""
    opened = _open(path)
    cur = opened.cursors.get(threading.get_ident())
    if cur is None:
        cur = opened.con.cursor()
        cur.execute("USE store")
        opened.cursors[threading.get_ident()] = cur
    return cur


def _memo(path: Path, name: str, compute):
    """compute(), once per store file: for small results every page needs (layers, scales)."""
    opened = _open(path)
    if name not in opened.memo:
        opened.memo[name] = compute()
    return opened.memo[name]


def _rows(path: Path, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cur = _cursor(path)
    cur.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def run_info(path: Path) -> dict[str, str]:
    """The run_info key/value table (run_id, name, model, store_version, ...)."""
    return {r["key"]: r["value"] for r in _rows(path, "SELECT key, value FROM run_info")}


OUTPUT_KEYS = ("output", "output_index", "output_name", "n_outputs", "output_score")


def explained_output(path: Path) -> dict[str, Any] | None:
    """Which output of a multi-output head the run explains (backend/core/head_outputs.py: `output`
    says it in words), None for a one-output head."""
    def compute():
        info = run_info(path)
        if "output" not in info:
            return None
        record: dict[str, Any] = {key: info.get(key) for key in OUTPUT_KEYS}
        record["output_index"], record["n_outputs"] = int(record["output_index"]), int(record["n_outputs"])
        return record
    return _memo(path, "explained_output", compute)


def best_layer(path: Path) -> int | None:
    """The layer the pipeline chose to open first (backend/core/layer_choice.py), as the runs list has it."""
    value = run_info(path).get("best_layer")
    return None if value is None else int(value)


def texts_count(path: Path) -> int:
    return _rows(path, "SELECT count(*) AS n FROM texts")[0]["n"]


def layers(path: Path) -> list[dict[str, Any]]:
    """Every layer's SAE and regression metrics, by layer."""
    rows = _memo(path, "layers", lambda: _rows(path, f"SELECT {LAYER_COLUMNS} FROM layers ORDER BY layer"))
    return [dict(row) for row in rows]


def layer_info(path: Path, layer: int) -> dict[str, Any]:
    by_layer = _memo(path, "layers_by_id", lambda: {row["layer"]: row for row in layers(path)})
    if layer not in by_layer:
        known = ", ".join(map(str, sorted(by_layer)))
        raise NotFound(f"layer {layer} not found: this run has SAEs at layer{'s' if len(by_layer) != 1 else ''} {known}")
    return dict(by_layer[layer])


def present_in_both(path: Path, thresholds: tuple[float, ...]) -> dict[int, dict[float, int]]:
    """Per layer with a paired dictionary (sae.widths): how many features have a max cosine of
    at least each threshold in it."""
    def compute():
        counts = ", ".join(f"count(*) FILTER (WHERE pair_max_cosine >= {float(t)!r}) AS n{i}"
                           for i, t in enumerate(thresholds))
        rows = _rows(path, f"SELECT layer, {counts} FROM features WHERE pair_max_cosine IS NOT NULL GROUP BY layer")
        return {row["layer"]: {t: row[f"n{i}"] for i, t in enumerate(thresholds)} for row in rows}
    return _memo(path, f"present_in_both {thresholds}", compute)


def _by_layer(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["layer"], []).append(row)
    return out


def faithfulness(path: Path, layer: int) -> list[dict[str, Any]]:
    """The layer's deletion-curve points (table faithfulness), by ranking, direction, then n; [] where none
    was measured."""
    layer_info(path, layer)  # NotFound for an unknown layer
    by_layer = _memo(path, "faithfulness", lambda: _by_layer(
        _rows(path, f"SELECT {FAITHFULNESS_COLUMNS} FROM faithfulness ORDER BY layer, ranking, direction, n")))
    return [dict(row) for row in by_layer.get(layer, [])]


def measured_features(path: Path, layer: int) -> list[dict[str, Any]]:
    """The layer's features whose Δ was measured zeroed alone (MEASURED_COLUMNS), by feature id."""
    layer_info(path, layer)
    by_layer = _memo(path, "measured_features", lambda: _by_layer(_rows(
        path, f"SELECT layer, {', '.join(MEASURED_COLUMNS)} FROM features WHERE measured_n > 0 ORDER BY layer, feature")))
    return [{name: row[name] for name in MEASURED_COLUMNS} for row in by_layer.get(layer, [])]


def max_abs_weight(path: Path, layer: int) -> float:
    """The layer's largest |weight|: the scale for weight colours, the same on every page."""
    scales = _memo(path, "max_abs_weight", lambda: {
        r["layer"]: r["m"] for r in _rows(path, "SELECT layer, max(abs(weight)) AS m FROM features GROUP BY layer")})
    return scales.get(layer) or 0.0


def _kept(cache: OrderedDict, key, read, too_big) -> Any:
    """cache[key], read() on a miss; then the least recently used entries go while
    too_big(cache) holds (the newest always stays)."""
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = read()
    with _lock:
        cache[key] = value
        while len(cache) > 1 and too_big(cache):
            cache.popitem(last=False)
    return value


VIEW_CACHE_SIZE = 128  # table views (layer, sort, filter) whose feature order each process keeps
LAYER_ROWS_CACHED = 1_500_000  # feature-table rows (all layers together) each process keeps


# A token search's features that fire *on* the typed token: it (or a token it starts) is one of
# their top tokens; their mean activation on it, the exact token preferred. Parameters:
# the typed token (parameters in that order: token, layer, token). The others the search keeps only share a top context with the token.
ON_TOKEN_SQL = f"""
WITH on_token AS (
    SELECT feature, max(t.mean_activation) AS activation,
           bool_or({NORMALISED_TOKEN.format('t.token')} = {NORMALISED_TOKEN.format('?')}) AS exact
    FROM (SELECT feature, unnest(top_tokens) AS t FROM features WHERE layer = ?)
    WHERE starts_with({NORMALISED_TOKEN.format('t.token')}, {NORMALISED_TOKEN.format('?')})
    GROUP BY feature)"""


def on_token(path: Path, layer: int, token: str) -> dict[int, float]:
    """The layer's features that fire on `token` (ON_TOKEN_SQL), with their mean activation on it."""
    cur = _cursor(path)
    typed = token.strip()
    cur.execute(f"{ON_TOKEN_SQL} SELECT feature, activation FROM on_token", [typed, layer, typed])
    return {int(f): float(a) for f, a in cur.fetchall()}


def view_order(path: Path, layer: int, sort: str, where: FeatureFilter = FeatureFilter()) -> np.ndarray:
    """The ids of the features `where` keeps, in `sort` order: one query per view, then every
    page of it and every j/k step through it is a slice or a lookup. The file never changes,
    so an order stays valid for as long as the file is the same; 8 bytes per feature shown."""
    order = order_by(sort)

    def read() -> np.ndarray:
        layer_info(path, layer)  # NotFound for an unknown layer
        conditions, params = where.where()
        cur = _cursor(path)
        if where.token:  # those that fire on the token first (by their activation on it), then the rest
            cur.execute(f"{ON_TOKEN_SQL} SELECT feature FROM features f LEFT JOIN on_token o USING (feature) "
                        f"WHERE layer = ?{conditions} ORDER BY o.activation IS NULL, o.exact DESC, o.activation DESC, "
                        f"{order}", [where.token.strip(), layer, where.token.strip(), layer, *params])
        else:
            cur.execute(f"SELECT feature FROM features f WHERE layer = ?{conditions} ORDER BY {order}", [layer, *params])
        return cur.fetchnumpy()["feature"].astype(np.int64)

    return _kept(_open(path).views, (layer, sort, where), read, lambda views: len(views) > VIEW_CACHE_SIZE)


def _layer_rows(path: Path, layer: int) -> tuple[pa.Table, np.ndarray]:
    """The table columns of all a layer's features (by feature id) and each id's row in them,
    read once: a page then takes its 50 rows from memory (a query for them scans the layer's
    row group, ~4 ms). Layers kept up to LAYER_ROWS_CACHED rows in all, ~80 bytes a row."""
    def read() -> tuple[pa.Table, np.ndarray]:
        table = _cursor(path).sql(f"SELECT {FEATURE_COLUMNS} FROM features WHERE layer = ? ORDER BY feature",
                                  params=[layer]).to_arrow_table()
        ids = table.column("feature").to_numpy()
        position = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
        position[ids] = np.arange(len(ids))
        return table, position

    return _kept(_open(path).layer_rows, layer, read,
                 lambda layers: sum(len(table) for table, _ in layers.values()) > LAYER_ROWS_CACHED)


def top_tokens(path: Path, layer: int, ids: list[int]) -> dict[int, str | None]:
    """Each feature's top token (what a page shows beside its id), from the layer's rows in
    memory; ids the layer lacks are left out."""
    table, position = _layer_rows(path, layer)
    known = [i for i in ids if 0 <= i < len(position) and position[i] >= 0]
    tokens = table.column("top_token").take(position[known]).to_pylist() if known else []
    return dict(zip(known, tokens))


def features(path: Path, layer: int, sort: str, where: FeatureFilter = FeatureFilter(),
             limit: int = 50, offset: int = 0) -> FeaturePage:
    """One page of a layer's feature table: the features `where` keeps, ordered by `sort`."""
    ids = view_order(path, layer, sort, where)
    page = ids[offset:offset + limit]
    if len(page) == 0:
        return FeaturePage(rows=[], total=len(ids))
    table, position = _layer_rows(path, layer)
    return FeaturePage(rows=table.take(position[page]).to_pylist(), total=len(ids))


def neighbours_in_order(path: Path, layer: int, feature: int, sort: str,
                        where: FeatureFilter = FeatureFilter()) -> dict[str, Any]:
    """Where `feature` stands in a table view: {'index' (0-based, None if the view does not
    show it), 'total', 'previous', 'next'} -- what j/k on the feature page walk through."""
    ids = view_order(path, layer, sort, where)
    found = np.flatnonzero(ids == feature)
    if len(found) == 0:
        return {"index": None, "total": len(ids), "previous": None, "next": None}
    i = int(found[0])
    return {"index": i, "total": len(ids), "previous": int(ids[i - 1]) if i > 0 else None,
            "next": int(ids[i + 1]) if i + 1 < len(ids) else None}


def _parse_json(text: bytes) -> Any:
    """orjson reads a 15 KB card in 0.07 ms, the json module in 0.31; but orjson refuses the
    NaN that DuckDB's to_json writes for a non-finite double, which json still reads."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def feature(path: Path, layer: int, feature: int) -> dict[str, Any]:
    """One feature: stats, weight and its rank, histogram, correlation with the reward, reward
    effect, top tokens, nearest features, top contexts and per-activation-bin samples (with
    their texts' reward and score), and its place in the default table view: its card."""
    # the card key holds each id in 32 bits: a larger one would name another layer's feature
    in_range = 0 <= layer < 2**31 and 0 <= feature < 2**31
    rows = in_range and _rows(path, f"SELECT card FROM feature_cards WHERE card_key = "
                                    f"{CARD_KEY.format(layer='?', feature='?')}", [layer, feature])
    if not rows:
        layer_info(path, layer)  # an unknown layer says so, rather than "feature not found"
        raise NotFound(f"feature {feature} not found in layer {layer}")
    card = _parse_json(zlib.decompress(rows[0]["card"]))
    for name in ("hist_edges", "hist_counts", "top_tokens", "neighbours", "contexts", "quantile_contexts"):
        card[name] = card[name] or []
    return card


def layer_vectors(path: Path, layer: int) -> dict[str, list]:
    """Per-feature columns of a layer in feature order (weight, frequency): what an ablation needs."""
    layer_info(path, layer)
    rows = _rows(path, "SELECT list(weight ORDER BY feature) AS weight, list(frequency ORDER BY feature) AS frequency "
                       "FROM features WHERE layer = ?", [layer])
    return {"weight": [w or 0.0 for w in rows[0]["weight"]], "frequency": rows[0]["frequency"]}


def text(path: Path, text_id: int) -> dict[str, Any]:
    """One corpus text: split, reward, RM score and the share of the corpus scoring below it
    (`score_percentile`, 0-100), its token count and where the score is read."""
    rows = _rows(path, "SELECT text_id, split, text, reward, score, n_tokens, reward_position, "
                       "(SELECT count(*) FROM texts o WHERE o.score < t.score) AS below, "
                       "(SELECT count(*) FROM texts) AS corpus FROM texts t WHERE text_id = ?", [text_id])
    if not rows:
        raise NotFound(f"text {text_id} not found")
    row = rows[0]
    row["score_percentile"] = 100.0 * row.pop("below") / row["corpus"]
    return row


def texts(path: Path, split: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The run's texts by id (optionally one split), with the dataset reward and RM score."""
    where, params = ("WHERE split = ?", [split]) if split else ("", [])
    sql = f"SELECT text_id, text, reward, score FROM texts {where} ORDER BY text_id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return _rows(path, sql, params)


# The corpus browser's sorts: key -> ORDER BY over texts t (and, for "feature", the feature's
# ranked texts r); ties by text id, so every page of a sort is stable.
CORPUS_SORTS = {
    "score": "t.score DESC NULLS LAST, t.text_id",
    "-score": "t.score ASC NULLS LAST, t.text_id",
    "text_id": "t.text_id",
    "reward": "t.reward DESC NULLS LAST, t.text_id",
    "-reward": "t.reward ASC NULLS LAST, t.text_id",
    "feature": "r.activation DESC, r.rank, t.text_id",
}
SPLITS = ("train", "heldout")
CORPUS_COLUMNS = "t.text_id, t.split, t.text, t.score, t.reward, t.n_tokens"


@dataclass
class CorpusPage:
    rows: list[dict[str, Any]]
    total: int  # texts matching the filters, over all pages


def _corpus_where(contains: str | None, split: str | None, score_min: float | None,
                  score_max: float | None) -> tuple[str, list[Any]]:
    """WHERE conditions on texts t and their parameters; the substring is matched literally
    (contains(), not LIKE: a '%' or '_' the user types is that character) and case-blind."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    sql, params = [], []
    if contains:
        sql.append("contains(lower(t.text), lower(?))")
        params.append(contains)
    if split is not None:
        sql.append("t.split = ?")
        params.append(split)
    if score_min is not None:
        sql.append("t.score >= ?")
        params.append(score_min)
    if score_max is not None:
        sql.append("t.score <= ?")
        params.append(score_max)
    return (" WHERE " + " AND ".join(sql) if sql else ""), params


def corpus(path: Path, *, contains: str | None = None, split: str | None = None, score_min: float | None = None,
           score_max: float | None = None, sort: str = "score", layer: int | None = None,
           feature: int | None = None, offset: int = 0, limit: int = 50) -> CorpusPage:
    """One page of the run's texts: those holding `contains` (case-blind), of `split`, with a
    score in [score_min, score_max], in `sort` order (CORPUS_SORTS). With a layer and feature,
    each row has the feature's `activation` (its max over the text's own tokens) where the text
    is among the feature's ranked texts (feature_texts), else None; sort "feature" lists only
    those, strongest first. NotFound for an unknown layer; ValueError for an unknown sort or
    split, a feature out of the layer's range, or a feature sort without its layer and feature."""
    if sort not in CORPUS_SORTS:
        raise ValueError(f"unknown sort {sort!r}; expected one of {', '.join(CORPUS_SORTS)}")
    if (layer is None) != (feature is None):
        raise ValueError("layer and feature go together: name both, or neither")
    if sort == "feature" and layer is None:
        raise ValueError("sort 'feature' needs a layer and a feature")
    where, params = _corpus_where(contains, split, score_min, score_max)
    joined, columns, join_params = "", CORPUS_COLUMNS, []
    if layer is not None:
        check_feature(path, layer, feature)
        kind = "JOIN" if sort == "feature" else "LEFT JOIN"  # a feature sort lists its ranked texts only
        joined = (f" {kind} (SELECT text_id, rank, activation FROM feature_texts WHERE layer = ? AND feature = ?) r"
                  " USING (text_id)")
        columns += ", r.activation::DOUBLE AS activation, r.rank AS activation_rank"
        join_params = [layer, feature]
    total = _rows(path, f"SELECT count(*) AS n FROM texts t{joined}{where}", [*join_params, *params])[0]["n"]
    rows = _rows(path, f"SELECT {columns} FROM texts t{joined}{where} ORDER BY {CORPUS_SORTS[sort]} LIMIT ? OFFSET ?",
                 [*join_params, *params, limit, offset])
    return CorpusPage(rows=rows, total=total)


def check_feature(path: Path, layer: int, feature: int) -> dict[str, Any]:
    """The layer's info when `feature` is one of its features: NotFound for an unknown layer,
    ValueError for a feature id beyond its SAE's width."""
    info = layer_info(path, layer)
    if not 0 <= feature < info["d_sae"]:
        raise ValueError(f"feature {feature} is out of range: layer {layer}'s SAE has {info['d_sae']} features "
                         f"(0..{info['d_sae'] - 1})")
    return info


def ranked_text_count(path: Path, layer: int, feature: int) -> int:
    """How many texts the store ranks for the feature (at most the run's analysis.ranked_texts)."""
    return _rows(path, "SELECT count(*) AS n FROM feature_texts WHERE layer = ? AND feature = ?",
                 [layer, feature])[0]["n"]


def _has_table(path: Path, table: str) -> bool:
    """Whether the store has `table` (a store written before the table was declared lacks it)."""
    return _memo(path, f"has_table {table}", lambda: bool(_rows(
        path, "SELECT count(*) AS n FROM duckdb_tables() WHERE database_name = 'store' AND table_name = ?",
        [table])[0]["n"]))


def lexicon_summary(path: Path) -> list[dict[str, Any]]:
    """The implicit-reward lexicon's Kendall taus against the reference: the measured lexicon's
    row first, then each layer's predicted one; [] where the run has no lexicon."""
    if not _has_table(path, "lexicon_summary"):
        return []
    return _memo(path, "lexicon_summary", lambda: _rows(
        path, f"SELECT {', '.join(TABLES['lexicon_summary'].names)} FROM lexicon_summary "
              "ORDER BY layer NULLS FIRST"))


def lexicon_words(path: Path) -> list[dict[str, Any]]:
    """Every word of the lexicon (reference, measured, rank difference) with each layer's
    predicted value under `predicted` (layer -> value); [] where the run has no lexicon."""
    if not _has_table(path, "lexicon_words"):
        return []

    def compute():
        rows = _rows(path, f"SELECT {', '.join(TABLES['lexicon_words'].names)} FROM lexicon_words ORDER BY word")
        by_word = {row["word"]: {**row, "predicted": {}} for row in rows}
        for p in _rows(path, "SELECT layer, word, predicted FROM lexicon_predictions ORDER BY layer, word"):
            if p["word"] in by_word:
                by_word[p["word"]]["predicted"][p["layer"]] = p["predicted"]
        return list(by_word.values())
    return [dict(row) for row in _memo(path, "lexicon_words", compute)]


def table_rows(path: Path, table: str, order_by: str | None = None) -> list[dict[str, Any]]:
    """Every row of a small per-run table of the spec (transfer_layers, divergence, ...), ordered
    by `order_by` (default: its primary key); [] where the store lacks the table or it is empty."""
    if not _has_table(path, table):
        return []
    spec = TABLES[table]
    order = order_by or ", ".join(spec.primary_key) or spec.names[0]
    rows = _memo(path, f"table_rows {table} {order}",
                 lambda: _rows(path, f"SELECT {', '.join(spec.names)} FROM {table} ORDER BY {order}"))
    return [dict(row) for row in rows]


def filled_columns(path: Path, layer: int) -> frozenset[str]:
    """The layer table's columns that hold a value for at least one of the layer's features: what
    the run computed there (ReasonScores, a paired dictionary, preference pairs, ...)."""
    def compute() -> frozenset[str]:
        table, _ = _layer_rows(path, layer)
        return frozenset(name for name in table.column_names if table.column(name).null_count < len(table))
    return _memo(path, f"filled_columns {layer}", compute)

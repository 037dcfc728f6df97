"""Schema and value validation of a dataset root (run on open and by ``dig data validate``).

Every problem raises :class:`DataError` with a one-line message naming the file and the
column (and the row, 0-based within the file, where it is known):

* missing column, wrong dtype, wrong u2i list length (fixed-size type or per row);
* null in a required column (everything but ``user_state``); ``user_state`` null on a click;
* negative id, id beyond the table size in meta.json (unless ``data.hash_ids``);
* NaN or inf in ``u2i``;
* a timestamp outside ``[0, 10^13]`` (Unix seconds or milliseconds; e.g. the int64 minimum a
  converter produces from a missing field);
* ``user_state`` prefix statistics that are negative, NaN/inf, or decrease along a user's
  rows in time (they are sums over strictly earlier events, so they can only grow);
* empty dataset (no train rows), truncated or corrupt parquet file.

The cheap checks (footers, schemas, row-group statistics) always run; the value scan
(``deep``) reads the id, label, history and u2i columns. A successful deep scan is recorded
in ``ROOT/.dig_validated.json`` (file sizes and mtimes), so ranks and reruns skip it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dig_torchrec.config import DataConfig
from dig_torchrec.data.schema import (HISTORY, ITEM_ID, LABEL, SPLITS, TIMESTAMP, U2I, USER_ID, USER_STATE,
                                      DatasetMeta, FeatureSchema)
from dig_torchrec.errors import DataError

logger = logging.getLogger(__name__)

CACHE_FILE = ".dig_validated.json"
CHECKS_VERSION = 2  # bump when deep_check gains a check, so older caches do not skip it
MIN_TIMESTAMP = 0
MAX_TIMESTAMP = 10**13  # Unix milliseconds until the year 2286 (seconds are far below)


def split_files(root: Path, split: str) -> List[Path]:
    d = root / split
    return sorted(d.glob("*.parquet")) if d.exists() else []


def all_row_files(root: Path) -> List[Path]:
    files = [f for s in SPLITS for f in split_files(root, s)]
    files += [p for p in (root / "retrieval" / "valid.parquet", root / "retrieval" / "test.parquet") if p.exists()]
    return files


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: corrupt or truncated parquet file ({e})") from e


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def check_schema(path: Path, arrow_schema: pa.Schema, meta: DatasetMeta, schema: FeatureSchema) -> None:
    """Columns and dtypes of an exposure-row file."""
    names = arrow_schema.names
    id_cols = [USER_ID, ITEM_ID, TIMESTAMP, LABEL, *meta.user_features, *meta.context_features]
    for col in [*id_cols, HISTORY, U2I, USER_STATE]:
        if col not in names:
            raise DataError(f"{path}: missing column '{col}'")
    for col in id_cols:
        t = arrow_schema.field(col).type
        if not (_is_int(t) or (col == LABEL and pa.types.is_boolean(t))):
            raise DataError(f"{path}: column '{col}' has dtype {t}; expected int64")
    t = arrow_schema.field(HISTORY).type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not _is_int(t.value_type):
        raise DataError(f"{path}: column 'history' has dtype {t}; expected list<int64>")
    t = arrow_schema.field(U2I).type
    if pa.types.is_fixed_size_list(t):
        if t.list_size != meta.u2i_dim:
            raise DataError(f"{path}: column 'u2i' has list length {t.list_size}; expected d_c={meta.u2i_dim} (meta.json u2i_dim)")
    elif not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise DataError(f"{path}: column 'u2i' has dtype {t}; expected fixed_size_list<float32>[{meta.u2i_dim}]")
    if not pa.types.is_floating(t.value_type):
        raise DataError(f"{path}: column 'u2i' has dtype {t}; expected fixed_size_list<float32>[{meta.u2i_dim}]")
    t = arrow_schema.field(USER_STATE).type
    ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)
    if ok:
        sub = {t.value_type.field(i).name: t.value_type.field(i).type for i in range(t.value_type.num_fields)}
        ok = "key" in sub and _is_int(sub["key"]) and all(s in sub and pa.types.is_floating(sub[s]) for s in meta.u2i_stats)
    if not ok:
        want = ", ".join(["key: int64", *[f"{s}: float32" for s in meta.u2i_stats]])
        raise DataError(f"{path}: column 'user_state' has dtype {t}; expected list<struct<{want}>>")


def _stats_check(path: Path, pf: pq.ParquetFile, cards: Dict[str, int], hash_ids: bool) -> None:
    """Nulls and id ranges from row-group statistics (no data read)."""
    md = pf.metadata
    col_index = {md.schema.column(i).path: i for i in range(md.num_columns)}
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for col, card in cards.items():
            i = col_index.get(col)
            if i is None:
                continue
            st = g.column(i).statistics
            if st is None:
                continue
            if st.null_count:
                raise DataError(f"{path}: column '{col}' has {st.null_count} null(s) in row group {rg}")
            if st.has_min_max and (st.min < 0 or (st.max >= card and not hash_ids)):
                raise DataError(f"{path}: column '{col}' row group {rg} has ids in [{st.min}, {st.max}] outside [0, {card})")


def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def deep_check(path: Path, pf: pq.ParquetFile, meta: DatasetMeta, cards: Dict[str, int], hash_ids: bool) -> int:
    """Scan the values of one exposure-row file; return its row count."""

    def read(col: str) -> pa.ChunkedArray:
        try:
            return pf.read(columns=[col]).column(0)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: column '{col}': corrupt data ({e})") from e

    n = pf.metadata.num_rows
    for col, card in cards.items():
        arr = read(col)
        if arr.null_count:
            raise DataError(f"{path}: column '{col}' row {_first_bad_row(arr.is_null().to_numpy(zero_copy_only=False))}: null")
        v = arr.to_numpy()
        if v.size and v.min() < 0:
            r = _first_bad_row(v < 0)
            raise DataError(f"{path}: column '{col}' row {r}: negative id {int(v[r])}")
        if v.size and v.max() >= card and not hash_ids:
            r = _first_bad_row(v >= card)
            raise DataError(f"{path}: column '{col}' row {r}: id {int(v[r])} beyond table size {card} "
                            f"(meta.json; set data.hash_ids=true to hash)")
    for col in (TIMESTAMP, LABEL):
        arr = read(col)
        if arr.null_count:
            raise DataError(f"{path}: column '{col}' row {_first_bad_row(arr.is_null().to_numpy(zero_copy_only=False))}: null")
    ts = read(TIMESTAMP).to_numpy()
    if ts.size and (ts.min() < MIN_TIMESTAMP or ts.max() > MAX_TIMESTAMP):
        r = _first_bad_row((ts < MIN_TIMESTAMP) | (ts > MAX_TIMESTAMP))
        raise DataError(f"{path}: column 'timestamp' row {r}: value {int(ts[r])} outside [{MIN_TIMESTAMP}, "
                        f"{MAX_TIMESTAMP}] (not a Unix time in seconds or milliseconds)")
    label = read(LABEL).to_numpy().astype(np.int64)
    if label.size and (label.min() < 0 or label.max() > 1):
        r = _first_bad_row((label < 0) | (label > 1))
        raise DataError(f"{path}: column 'label' row {r}: value {int(label[r])} not in {{0, 1}}")
    hist = read(HISTORY).combine_chunks()
    if hist.null_count:
        raise DataError(f"{path}: column 'history' row {_first_bad_row(hist.is_null().to_numpy(zero_copy_only=False))}: null")
    lens = hist.value_lengths().to_numpy(zero_copy_only=False)
    if lens.size and lens.max() > meta.history_length:
        r = _first_bad_row(lens > meta.history_length)
        raise DataError(f"{path}: column 'history' row {r}: length {int(lens[r])} > meta.json history_length {meta.history_length}")
    hv = hist.flatten().to_numpy(zero_copy_only=False)
    if hv.size and (hv.min() < 0 or (hv.max() >= meta.num_items and not hash_ids)):
        rows = np.repeat(np.arange(len(lens)), lens)
        r = int(rows[_first_bad_row((hv < 0) | (hv >= meta.num_items))])
        raise DataError(f"{path}: column 'history' row {r}: item id outside [0, {meta.num_items})")
    u2i = read(U2I).combine_chunks()
    if u2i.null_count:
        raise DataError(f"{path}: column 'u2i' row {_first_bad_row(u2i.is_null().to_numpy(zero_copy_only=False))}: null")
    if not pa.types.is_fixed_size_list(u2i.type):
        ul = u2i.value_lengths().to_numpy(zero_copy_only=False)
        if ul.size and (ul != meta.u2i_dim).any():
            r = _first_bad_row(ul != meta.u2i_dim)
            raise DataError(f"{path}: column 'u2i' row {r}: list length {int(ul[r])}; expected d_c={meta.u2i_dim}")
    vals = u2i.flatten().to_numpy(zero_copy_only=False)
    if vals.size and not np.isfinite(vals).all():
        r = _first_bad_row(~np.isfinite(vals.reshape(n, meta.u2i_dim)).all(1))
        raise DataError(f"{path}: column 'u2i' row {r}: NaN or inf")
    state = read(USER_STATE).combine_chunks()
    present = ~state.is_null().to_numpy(zero_copy_only=False)
    missing = ~present & (label > 0)
    if missing.any():
        raise DataError(f"{path}: column 'user_state' row {_first_bad_row(missing)}: null on a click row (label=1)")
    user = read(USER_ID).to_numpy()
    check_prefix_stats(path, state, present, user, ts, meta.u2i_stats)
    return n


def check_prefix_stats(path: Path, state: pa.Array, present: np.ndarray, user: np.ndarray, ts: np.ndarray,
                       stats: List[str]) -> None:
    """``user_state`` statistics are finite, >= 0 and, summed over keys, never decrease along a
    user's rows in time (rows with equal timestamps may come in any order).

    Args:
        path: the file (named in errors).
        state: the ``user_state`` column (list<struct<key, stats...>>).
        present: rows whose state is not null.
        user: user ids per row.
        ts: timestamps per row.
        stats: the statistic fields (meta.json ``u2i_stats``).
    """
    if not stats or not present.any():
        return
    offsets = state.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    flat = state.values if hasattr(state, "values") else state.flatten()
    rows = np.flatnonzero(present)
    for stat in stats:
        vals = flat.field(stat).to_numpy(zero_copy_only=False).astype(np.float64)
        if vals.size and not (np.isfinite(vals).all() and vals.min() >= 0):
            bad = ~np.isfinite(vals) | (vals < 0)
            r = int(np.searchsorted(offsets, _first_bad_row(bad), side="right") - 1)
            raise DataError(f"{path}: column 'user_state' row {r}: statistic '{stat}' is negative, NaN or inf")
        cs = np.concatenate([[0.0], np.cumsum(vals)])
        total = (cs[offsets[1:]] - cs[offsets[:-1]])[rows]
        order = np.lexsort((total, ts[rows], user[rows]))
        u, t = user[rows][order], total[order]
        same = u[1:] == u[:-1]
        drop = same & (t[1:] < t[:-1] - 1e-4 * np.maximum(1.0, np.abs(t[:-1])))
        if drop.any():
            j = _first_bad_row(drop) + 1
            r = int(rows[order][j])
            raise DataError(f"{path}: column 'user_state' row {r}: statistic '{stat}' summed over keys is "
                            f"{t[j]:g}, below {t[j - 1]:g} at an earlier row of user {int(u[j])} (prefix statistics "
                            f"must not decrease in time)")


def _fingerprint(files: List[Path]) -> Dict[str, List[int]]:
    out = {}
    for f in files:
        st = f.stat()
        out[str(f)] = [st.st_size, st.st_mtime_ns]
    return out


def validate_dataset(root: str | Path, data_cfg: Optional[DataConfig] = None, *, meta: Optional[DatasetMeta] = None,
                     schema: Optional[FeatureSchema] = None, deep: bool = True, use_cache: bool = True) -> Dict[str, Any]:
    """Validate a dataset root; raise :class:`DataError` on the first problem.

    Args:
        root: dataset root.
        data_cfg: data config (``hash_ids``, ``history_length``); defaults if omitted.
        meta: loaded metadata (read if omitted).
        schema: feature layout (built if omitted).
        deep: scan values, not only footers and statistics.
        use_cache: skip the deep scan when ``ROOT/.dig_validated.json`` matches the files.

    Returns:
        ``{"files": {path: rows}, "rows": {split: rows}}``.
    """
    from dig_torchrec.data.items import ItemTable

    root = Path(root)
    data_cfg = data_cfg or DataConfig(path=str(root))
    if not root.exists():
        raise DataError(f"{root}: dataset root not found")
    meta = meta or DatasetMeta.load(root)
    schema = schema or FeatureSchema.from_meta(meta, min(data_cfg.history_length, meta.history_length))
    ItemTable.load(root, schema, meta)  # items.parquet: columns, nulls, id ranges, u2i fields
    cards = {USER_ID: meta.num_users, ITEM_ID: meta.num_items, **meta.user_features, **meta.context_features}
    files = all_row_files(root)
    report: Dict[str, Any] = {"files": {}, "rows": {}}
    cache_path = root / CACHE_FILE
    fp = _fingerprint(files + [root / "items.parquet", root / "meta.json"])
    cached = False
    if deep and use_cache and cache_path.exists():
        try:
            c = json.loads(cache_path.read_text())
            cached = (c.get("files") == fp and c.get("hash_ids") == data_cfg.hash_ids
                      and c.get("checks") == CHECKS_VERSION)
        except (OSError, json.JSONDecodeError):
            cached = False
    for split in SPLITS:
        report["rows"][split] = 0
    for f in files:
        pf = open_parquet(f)
        check_schema(f, pf.schema_arrow, meta, schema)
        if deep and not cached:  # the value scan names the row
            rows = deep_check(f, pf, meta, cards, data_cfg.hash_ids)
        else:
            _stats_check(f, pf, cards, data_cfg.hash_ids)
            rows = pf.metadata.num_rows
        report["files"][str(f)] = rows
        split = f.parent.name if f.parent.name in SPLITS else f"retrieval/{f.stem}"
        report["rows"][split] = report["rows"].get(split, 0) + rows
    if report["rows"]["train"] == 0:
        where = root / "train"
        raise DataError(f"{where}: empty dataset (no train rows{'' if split_files(root, 'train') else '; no parquet files'})")
    for split in ("valid", "test"):
        if report["rows"][split] == 0:
            logger.warning("%s: split '%s' has no rows", root, split)
    if deep and not cached and use_cache:
        try:  # atomic: several ranks may validate the same root at once
            tmp = cache_path.with_name(f"{CACHE_FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"files": fp, "hash_ids": data_cfg.hash_ids, "checks": CHECKS_VERSION}))
            os.replace(tmp, cache_path)
        except OSError:
            pass
    return report

"""Small helpers shared by the public-dataset converters: CSV reading and dense id maps."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dig_torchrec.errors import DataError


def require(src: Path, name: str, dataset: str) -> Path:
    p = Path(src) / name
    if not p.exists():
        raise DataError(f"{p}: {dataset} file not found")
    return p


def read_csv(path: Path, columns: Sequence[str], types: Optional[Dict[str, pa.DataType]] = None,
             max_rows: int = 0) -> pa.Table:
    """Read a CSV with a header, keeping ``columns`` (missing ones raise naming file + column).

    Args:
        path: the file.
        columns: the columns to keep (header names; surrounding spaces in the header are ignored).
        types: explicit column types.
        max_rows: stop after this many rows (0: all).
    """
    try:
        with open(path, "rb") as fh:
            header = fh.readline().decode("utf-8", "replace").strip().split(",")
        names = [h.strip() for h in header]
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: missing column '{missing[0]}' (header: {', '.join(names)})")
        read = pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24)
        conv = pacsv.ConvertOptions(include_columns=list(columns), column_types=types or {},
                                    null_values=["", "NULL", "NaN", "nan"], strings_can_be_null=True)
        if not max_rows:
            return pacsv.read_csv(path, read_options=read, convert_options=conv)
        batches, n = [], 0
        with pacsv.open_csv(path, read_options=read, convert_options=conv) as reader:
            for batch in reader:
                batches.append(batch)
                n += batch.num_rows
                if n >= max_rows:
                    break
        return pa.Table.from_batches(batches).slice(0, max_rows) if batches else pa.table({c: [] for c in columns})
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot parse CSV ({e})") from e


def stream_csv(path: Path, columns: Sequence[str], types: Optional[Dict[str, pa.DataType]] = None
               ) -> Iterable[pa.RecordBatch]:
    """Record batches of a (large) CSV with a header."""
    with open(path, "rb") as fh:
        names = [h.strip() for h in fh.readline().decode("utf-8", "replace").strip().split(",")]
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (header: {', '.join(names)})")
    read = pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24)
    conv = pacsv.ConvertOptions(include_columns=list(columns), column_types=types or {},
                                null_values=["", "NULL", "NaN", "nan"], strings_can_be_null=True)
    try:
        with pacsv.open_csv(path, read_options=read, convert_options=conv) as reader:
            yield from reader
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot parse CSV ({e})") from e


class Vocab:
    """Dense ids for raw values: ``0`` = missing/unknown, known values ``1..n`` in sorted order."""

    def __init__(self, values: Iterable[np.ndarray | pa.Array]) -> None:
        arrays = [pa.array(v) if not isinstance(v, (pa.Array, pa.ChunkedArray)) else v for v in values]
        arrays = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays]
        if arrays:
            t = arrays[0].type
            merged = pa.concat_arrays([a.cast(t) for a in arrays]).drop_null()
            self.values = pc.unique(merged).sort() if len(merged) else merged
        else:
            self.values = pa.array([], pa.int64())

    def __len__(self) -> int:
        return len(self.values) + 1

    def ids(self, column: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Dense ids (int64) of ``column``; unknown or null -> 0."""
        arr = column if isinstance(column, (pa.Array, pa.ChunkedArray)) else pa.array(column)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        idx = pc.index_in(arr.cast(self.values.type), value_set=self.values)
        return (idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1)


def entity_ids(*columns: np.ndarray | pa.Array | pa.ChunkedArray) -> Tuple[Vocab, List[np.ndarray]]:
    """Dense 0-based ids for an entity (user/item) seen in several columns (no unknown slot)."""
    vocab = Vocab(columns)
    return vocab, [vocab.ids(c) - 1 for c in columns]


def log_bucket(x: np.ndarray, base: float = 2.0, max_bucket: int = 30) -> np.ndarray:
    """``0`` for missing/<=0, else ``1 + floor(log_base(x + 1))`` clipped to ``max_bucket``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(len(x), dtype=np.int64)
    ok = np.isfinite(x) & (x > 0)
    out[ok] = np.minimum(1 + np.floor(np.log(x[ok] + 1.0) / np.log(base)).astype(np.int64), max_bucket)
    return out

"""Small helpers shared by the public-dataset converters: CSV reading and dense id maps."""

from __future__ import annotations

import csv
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


def _parses(value: str, t: pa.DataType) -> bool:
    try:
        if pa.types.is_integer(t):
            int(value)
        elif pa.types.is_floating(t):
            float(value)
        return True
    except ValueError:
        return False


def find_bad_line(path: Path, names: Sequence[str], types: Dict[str, pa.DataType], required: Sequence[str] = (),
                  *, delimiter: str = ",", header: bool = True, max_lines: int = 0) -> Optional[str]:
    """The first line of a delimited text file that a converter cannot use, as ``line N: why``.

    Called only after a fast (pyarrow) read failed or produced nulls, to name the line:
    a wrong number of fields, an empty required field, or a value of the wrong type.

    Args:
        path: the file.
        names: the column names of every field, in file order.
        types: column -> arrow type to check (integer or floating); others are not checked.
        required: columns that must not be empty.
        delimiter: field separator.
        header: the first line is a header (line numbers still count it).
        max_lines: stop after this many data lines (0: all).
    """
    index = {n: i for i, n in enumerate(names)}
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        rows = csv.reader(fh, delimiter=delimiter)
        for lineno, row in enumerate(rows, start=1):
            if header and lineno == 1:
                continue
            if max_lines and lineno - int(header) > max_lines:
                break
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank lines are skipped by the reader too
            if len(row) != len(names):
                return f"line {rows.line_num}: expected {len(names)} fields, got {len(row)} ({delimiter.join(row)[:60]!r})"
            for col in required:
                if not row[index[col]].strip():
                    return f"line {rows.line_num}: column '{col}' is empty"
            for col, t in types.items():
                v = row[index[col]].strip() if col in index else ""
                if v and v not in ("NULL", "NaN", "nan") and not _parses(v, t):
                    kind = "an integer" if pa.types.is_integer(t) else "a number"
                    return f"line {rows.line_num}: column '{col}' value {v[:40]!r} is not {kind}"
    return None


def check_required(path: Path, table: pa.Table, names: Sequence[str], types: Dict[str, pa.DataType],
                   required: Sequence[str], *, delimiter: str = ",", header: bool = True, max_lines: int = 0) -> None:
    """Raise :class:`DataError` naming the line when a ``required`` column holds a null."""
    for col in required:
        if table.column(col).null_count:
            bad = find_bad_line(path, names, types, required, delimiter=delimiter, header=header, max_lines=max_lines)
            raise DataError(f"{path}: {bad or f'column {col!r} has empty values'}")


def _csv_options(path: Path, columns: Sequence[str], types: Optional[Dict[str, pa.DataType]]
                 ) -> Tuple[List[str], pacsv.ReadOptions, pacsv.ConvertOptions]:
    """The header's column names and the Arrow read/convert options keeping ``columns``.

    Raises :class:`DataError` naming the file and the first missing column.
    """
    with open(path, "rb") as fh:
        names = [h.strip() for h in fh.readline().decode("utf-8", "replace").strip().split(",")]
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (header: {', '.join(names)})")
    read = pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24)
    conv = pacsv.ConvertOptions(include_columns=list(columns), column_types=types or {},
                                null_values=["", "NULL", "NaN", "nan"], strings_can_be_null=True)
    return names, read, conv


def read_csv(path: Path, columns: Sequence[str], types: Optional[Dict[str, pa.DataType]] = None,
             max_rows: int = 0, required: Sequence[str] = ()) -> pa.Table:
    """Read a CSV with a header, keeping ``columns`` (missing ones raise naming file + column).

    A row with the wrong number of fields, a value of the wrong type or an empty
    ``required`` field raises :class:`DataError` naming the file and the line.

    Args:
        path: the file.
        columns: the columns to keep (header names; surrounding spaces in the header are ignored).
        types: explicit column types.
        max_rows: stop after this many rows (0: all).
        required: columns that must not be empty on any row.
    """
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (expected a header line with {', '.join(columns)})")
    names: List[str] = []
    try:
        names, read, conv = _csv_options(path, columns, types)
        if not max_rows:
            table = pacsv.read_csv(path, read_options=read, convert_options=conv)
        else:
            batches, n = [], 0
            with pacsv.open_csv(path, read_options=read, convert_options=conv) as reader:
                for batch in reader:
                    batches.append(batch)
                    n += batch.num_rows
                    if n >= max_rows:
                        break
            table = pa.Table.from_batches(batches).slice(0, max_rows) if batches else pa.table({c: [] for c in columns})
    except (pa.ArrowInvalid, OSError) as e:
        bad = find_bad_line(path, names, types or {}, required, max_lines=max_rows) if names else None
        raise DataError(f"{path}: {bad or f'cannot parse CSV ({e})'}") from e
    check_required(path, table, names, types or {}, required, max_lines=max_rows)
    return table


def stream_csv(path: Path, columns: Sequence[str], types: Optional[Dict[str, pa.DataType]] = None
               ) -> Iterable[pa.RecordBatch]:
    """Record batches of a (large) CSV with a header."""
    names, read, conv = _csv_options(path, columns, types)
    try:
        with pacsv.open_csv(path, read_options=read, convert_options=conv) as reader:
            yield from reader
    except (pa.ArrowInvalid, OSError) as e:
        bad = find_bad_line(path, names, types or {})
        raise DataError(f"{path}: {bad or f'cannot parse CSV ({e})'}") from e


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

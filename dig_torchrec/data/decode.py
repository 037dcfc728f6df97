"""Window decode: parquet row groups -> numpy arrays in the KJT value layout.

:class:`RowDecoder` turns one arrow table of exposure rows into numpy arrays, checking ids
and u2i values with errors that name file, column and row. :class:`WindowReader` reads a
shuffle window's row groups (``ParquetFile.read_row_group``) and decodes them key-major
(``[keys, rows]``, the KJT value layout) straight into emission order: the window's
permutation is applied by the decoding gathers themselves, and the history ids are laid out
one run per row in emission order by :meth:`History.select`. No per-row Python, no
arrow -> Python objects.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dig_torchrec.data import kernels
from dig_torchrec.data.schema import HISTORY, ITEM_ID, LABEL, U2I, USER_STATE, DatasetMeta, FeatureSchema
from dig_torchrec.data.shards import RowGroup
from dig_torchrec.data.u2i import ArrowUserStates, UserStates
from dig_torchrec.errors import DataError


class History:
    """The history keys of a window's rows (emission order), kept as the decoded list values
    plus, per row, the position of its most recent click and its length: hist_j of row r is
    ``vals[last[r] - j]`` if ``j < num[r]`` else -1.

    Batches read it directly (:func:`kernels.batch_kjt` gathers each row's ids per key), so
    nothing is packed per window; dense ``[H, rows]`` blocks (:meth:`block`, :meth:`rows`)
    serve the retrieval targets and the tests.

    Args:
        vals: int64 list values (checked ids) of the history column.
        last: ``[n]`` index in ``vals`` of each row's most recent click.
        lens: ``[n]`` history length of each row.
        H: history keys.
    """

    def __init__(self, vals: np.ndarray, last: np.ndarray, lens: np.ndarray, H: int) -> None:
        self.vals, self.H = np.ascontiguousarray(vals, dtype=np.int64), H
        self.last = np.ascontiguousarray(last, dtype=np.int64)
        self.num = np.minimum(lens, H).astype(np.int64, copy=False)  # hist keys present per row
        self.key_index = np.arange(H, dtype=np.int64)[:, None]  # [H, 1]

    @classmethod
    def concat(cls, parts: Sequence["History"]) -> "History":
        """Rows of ``parts`` one after the other."""
        shift = np.cumsum([0] + [p.vals.size for p in parts[:-1]])
        vals = np.concatenate([p.vals for p in parts])
        last = np.concatenate([p.last + o for p, o in zip(parts, shift)])
        num = np.concatenate([p.num for p in parts])
        return cls(vals, last, num, parts[0].H)

    @classmethod
    def of_ranges(cls, parts: Sequence[Tuple["History", int, int]]) -> "History":
        """Rows ``a .. b-1`` of each ``(history, a, b)``, one part after the other, holding
        only those rows' ids (a batch that straddles windows)."""
        return cls.concat([h.select(np.arange(a, b, dtype=np.int64)) for h, a, b in parts])

    def select(self, rows: np.ndarray) -> "History":
        """Row i = row ``rows[i]``, holding only those rows' kept ids, one run per row in the
        new order (a shuffled window: a batch of consecutive rows then reads one run)."""
        vals, last, num = kernels.history_rows(self.vals, self.last, self.num, rows.astype(np.int64, copy=False))
        return History(vals, last, num, self.H)

    @property
    def num_rows(self) -> int:
        return int(self.num.size)

    def _dense(self, last: np.ndarray, num: np.ndarray) -> np.ndarray:
        if not self.vals.size:
            return np.full((self.H, num.size), -1, dtype=np.int64)
        idx = last[None, :] - self.key_index  # [H, m]: vals index of hist_j (valid where j < num)
        np.maximum(idx, 0, out=idx)
        out = np.take(self.vals, idx)
        out[self.key_index >= num[None, :]] = -1
        return out

    def block(self, a: int, b: int) -> np.ndarray:
        """Dense ``[H, b - a]`` hist ids of rows ``a .. b-1``, -1 padded."""
        return self._dense(self.last[a:b], self.num[a:b])

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Dense ``[H, len(rows)]`` hist ids of the given rows, -1 padded."""
        return self._dense(self.last[rows], self.num[rows])


@dataclass
class DecodedWindow:
    """Decoded rows of one shuffle window, permuted once into emission order, so that every
    batch is a contiguous range (slice copies instead of random gathers).

    Attributes:
        sparse_t: ``[n_user_ctx, n]`` user + context ids, key-major (user_id first).
        item: ``[n]`` item ids.
        label: ``[n]`` float32 labels.
        hist: the rows' histories (:class:`History`; dense ``[H, rows]`` blocks on demand).
        u2i: ``[n, d_c]`` float32.
        states: the window's user states in FILE order (None without retrieval rows).
        state_row: ``[n]`` emission row -> index into ``states`` (None: identity).
    """

    sparse_t: np.ndarray
    item: np.ndarray
    label: np.ndarray
    hist: History
    u2i: np.ndarray
    states: Optional[UserStates]
    state_row: Optional[np.ndarray]

    @property
    def num_rows(self) -> int:
        return int(self.item.size)

    def state_index(self, rows: np.ndarray) -> np.ndarray:
        """Indices into ``states`` of emission rows ``rows``."""
        return rows if self.state_row is None else self.state_row[rows]


class RowDecoder:
    """Arrow exposure rows -> numpy arrays, with id/u2i checks naming file, column and row.

    Args:
        schema: feature layout (key order, cardinalities, history length H).
        meta: dataset metadata (d_c).
        hash_ids: map ids >= the table size modulo the size instead of raising.
        with_state: also read ``user_state``.
    """

    def __init__(self, schema: FeatureSchema, meta: DatasetMeta, hash_ids: bool, with_state: bool) -> None:
        self.schema, self.meta, self.hash_ids, self.with_state = schema, meta, hash_ids, with_state
        self.user_ctx_keys = [*schema.user_features, *schema.context_features]

    def columns(self) -> List[str]:
        cols = [*self.user_ctx_keys, ITEM_ID, LABEL, HISTORY, U2I]
        if self.with_state:
            cols.append(USER_STATE)
        return cols

    def check_ids(self, values: np.ndarray, column: str, card: int, g: RowGroup,
                  list_offsets: Optional[np.ndarray] = None) -> np.ndarray:
        """Raise on negative ids (and ids >= card unless hashing); return hashed ids.

        Args:
            list_offsets: for a list column, row offsets of ``values`` (to name the row).
        """
        if values.size == 0:
            return values
        lo, hi = values.min(), values.max()
        if lo >= 0 and hi < card:
            return values
        bad = np.flatnonzero((values < 0) | ((values >= card) & (not self.hash_ids)))
        if bad.size:
            row = int(bad[0]) if list_offsets is None else int(np.searchsorted(list_offsets, bad[0], side="right") - 1)
            kind = "negative id" if values[bad[0]] < 0 else f"id beyond table size {card}"
            raise DataError(f"{g.path}: column '{column}' row {row} (row group {g.index}): {kind} "
                            f"({int(values[bad[0]])}); set data.hash_ids=true to hash ids >= the table size")
        return values % card

    def decode(self, t: pa.Table, g: RowGroup) -> Tuple[np.ndarray, ...]:
        """``(user+context ids [n, U], item [n], label [n], history [n, H] most recent first,
        -1 padded, u2i [n, d_c])`` of one row group; raises DataError on bad values."""
        sparse_t, item, label, hist_t, u2i = self.decode_key_major(t, g)
        return np.ascontiguousarray(sparse_t.T), item, label, np.ascontiguousarray(hist_t.T), u2i

    def decode_key_major(self, t: pa.Table, g: RowGroup, perm: Optional[np.ndarray] = None
                         ) -> Tuple[np.ndarray, ...]:
        """:meth:`decode_window` with the history as a dense ``[H, n]`` block."""
        sparse, item, label, hist, u2i = self.decode_window(t, g, perm)
        return sparse, item, label, hist.block(0, hist.num_rows), u2i

    def decode_window(self, t: pa.Table, g: RowGroup, perm: Optional[np.ndarray] = None
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, "History", np.ndarray]:
        """Like :meth:`decode` but with ``sparse [U, n]`` key-major (the KJT value layout) and
        the history as a :class:`History` (packed KJT values; dense blocks on demand).

        Args:
            perm: output row i = table row ``perm[i]`` (a permutation of ``range(n)``): the
                gathers write straight into that order, so a shuffled window costs no extra
                permutation pass. Checks run on the table order (errors name file rows).
        """
        card = self.schema.cardinality
        n = t.num_rows
        sparse = np.empty((len(self.user_ctx_keys), n), dtype=np.int64)
        for j, name in enumerate(self.user_ctx_keys):
            col = t.column(name)
            if col.null_count:
                raise DataError(f"{g.path}: column '{name}' has nulls (row group {g.index})")
            ids = self.check_ids(col.to_numpy().astype(np.int64, copy=False), name, card[name], g)
            if perm is None:
                sparse[j] = ids
            else:
                np.take(ids, perm, out=sparse[j], mode="clip")  # a permutation: valid (unbuffered out)
        item = self.check_ids(t.column(ITEM_ID).to_numpy().astype(np.int64, copy=False), ITEM_ID, card[ITEM_ID], g)
        label = t.column(LABEL).to_numpy()
        if perm is not None:
            item, label = item[perm], label[perm]
        label = label.astype(np.float32, copy=False)
        hcol = t.column(HISTORY).combine_chunks()
        H = self.schema.history_length
        if hcol.null_count == 0 and hcol.offset == 0:  # the list offsets as they are (zero-copy)
            offs = np.asarray(hcol.offsets, dtype=np.int64)
            vals = np.asarray(hcol.values.slice(int(offs[0]), int(offs[-1] - offs[0])), dtype=np.int64)
            offs = offs - offs[0]
            lens = np.diff(offs)
        else:
            lens = hcol.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            vals = hcol.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            offs = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lens, out=offs[1:])
        vals = self.check_ids(vals, HISTORY, card[ITEM_ID], g, offs)
        hist = History(vals, offs[1:] - 1, lens, H)  # last = each row's most recent click
        if perm is not None:  # the kept ids in emission order
            hist = hist.select(perm)
        ucol = t.column(U2I).combine_chunks()
        d_c = self.meta.u2i_dim
        flat = ucol.flatten().to_numpy(zero_copy_only=False)
        if flat.size != n * d_c:
            raise DataError(f"{g.path}: column 'u2i' has {flat.size} values for {n} rows; expected d_c={d_c} per row")
        u2i = flat.astype(np.float32, copy=False).reshape(n, d_c)
        if not np.isfinite(u2i).all():
            row = int(np.flatnonzero(~np.isfinite(u2i).all(1))[0])
            raise DataError(f"{g.path}: column 'u2i' row {row} (row group {g.index}): NaN or inf")
        if perm is not None:
            u2i = np.take(u2i, perm, axis=0)
        return sparse, item, label, hist, u2i


class WindowReader:
    """Reads and decodes the row groups of one shuffle window into a :class:`DecodedWindow`.

    Args:
        decoder: the row decoder (columns, checks).
        meta: dataset metadata (u2i statistics of the user states).
    """

    def __init__(self, decoder: RowDecoder, meta: DatasetMeta) -> None:
        self.decoder, self.meta = decoder, meta

    def load(self, groups: Sequence[RowGroup], perm: Optional[np.ndarray] = None) -> DecodedWindow:
        """Decode a window's row groups key-major, in emission order (row i = window row ``perm[i]``).

        Args:
            groups: the window's row groups, in window order.
            perm: the window's permutation (:meth:`~dig_torchrec.data.plan.SlotPlan.window_permutation`),
                None for file order.
        """
        tables = [self.read_group(g) for g in groups]
        if len(tables) == 1:  # the common case (shuffle_buffer <= row group): decode in emission order
            sparse_t, item, label, hist, u2i = self.decoder.decode_window(tables[0], groups[0], perm)
        else:
            decoded = [self.decoder.decode_window(t, g) for t, g in zip(tables, groups)]

            def cat(i: int, axis: int = 0) -> np.ndarray:
                return np.concatenate([d[i] for d in decoded], axis=axis)

            sparse_t, item, label, u2i = cat(0, 1), cat(1), cat(2), cat(4)
            hist = History.concat([d[3] for d in decoded])
            if perm is not None:
                hist = hist.select(perm)  # ids in emission order (see decode_window)
                sparse_t = np.take(sparse_t, perm, axis=1)
                item, label, u2i = item[perm], label[perm], np.take(u2i, perm, axis=0)
        states = None
        if self.decoder.with_state:
            col = tables[0].column(USER_STATE) if len(tables) == 1 else pa.chunked_array(
                [c for t in tables for c in t.column(USER_STATE).chunks])
            states = ArrowUserStates.from_arrow_view(col, self.meta.u2i_stats)  # no copy
        return DecodedWindow(sparse_t, item, label, hist, u2i, states, perm)

    def read_group(self, g: RowGroup) -> pa.Table:
        """One row group's columns; ``ParquetFile.read_row_group`` without arrow's thread pool
        (the prefetch threads already read windows in parallel)."""
        try:
            return self._parquet_file(g.path).read_row_group(g.index, columns=self.decoder.columns(),
                                                             use_threads=False)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{g.path}: cannot read row group {g.index} ({e})") from e
        except KeyError as e:
            raise DataError(f"{g.path}: missing column {e}") from e

    def _parquet_file(self, path: str) -> pq.ParquetFile:
        """An open ParquetFile per (thread, path): readers are not shared across threads."""
        local = self.__dict__.get("_pf_local")
        if local is None:
            local = self.__dict__.setdefault("_pf_local", threading.local())
        cache = local.__dict__.setdefault("files", {})
        if path not in cache:
            cache[path] = pq.ParquetFile(path)
        return cache[path]

    def __getstate__(self) -> Dict[str, Any]:
        # DataLoader workers get a copy of the reader: drop per-thread open files
        state = dict(self.__dict__)
        state.pop("_pf_local", None)
        return state

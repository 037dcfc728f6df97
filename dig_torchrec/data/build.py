"""Shared dataset builder: prefix statistics, history, u2i, leave-last-out split, parquet.

Every dataset (synthetic, MovieLens, KuaiRec, Taobao) goes through this module, so they
all have the same on-disk layout (``dig_torchrec.data.schema``) and the same u2i definition
(``dig_torchrec.data.u2i``).

Leakage rule: a row's ``history``, ``user_state`` and ``u2i`` use only the user's events with
a timestamp STRICTLY earlier than the row's (events at the same second are never used).

Split rule (paper §4.1, leave-last-out by time): sort each user's rows stably by
timestamp (ties keep their input order). For a user with >= 3 clicks, rows before the
second-to-last click are train, rows from the second-to-last click up to (not including)
the last click are valid, the last click and any later rows are test; the second-to-last
and last clicks are the valid/test retrieval targets. Users with < 3 clicks are train only.

The prefix statistics are computed without a python loop over rows: every (event, u2i key)
contribution gets the sort key ``key * E + position`` (events sorted by user then time), so
"user u's events on key k before position p" is one contiguous range found by
``searchsorted``, and its sum is a difference of prefix sums.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dig_torchrec.data.schema import HISTORY, ITEM_ID, LABEL, TIMESTAMP, U2I, USER_ID, USER_STATE, DatasetMeta
from dig_torchrec.data.u2i import U2ISpec, states_to_arrow, u2i_from_field_stats, user_state_type

logger = logging.getLogger(__name__)

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


@dataclass
class ExtraEvents:
    """Events that update user states but are not exposure rows (e.g. Taobao purchases).

    Args:
        user, ts: int64 ``[M]``.
        key_offsets: int64 ``[M+1]`` CSR into ``keys`` (global u2i keys of each event).
        keys: int64 ``[nnz]``.
        increments: float64 ``[M, S]`` added to the statistics of each of the event's keys.
    """

    user: np.ndarray
    ts: np.ndarray
    key_offsets: np.ndarray
    keys: np.ndarray
    increments: np.ndarray


@dataclass
class PrefixFeatures:
    """Per-row outputs of :func:`compute_prefix_features` (rows in the given order)."""

    history_offsets: np.ndarray  # [N+1]
    history_values: np.ndarray  # item ids, oldest first, most recent LAST
    u2i: np.ndarray  # float32 [N, d_c]
    state_offsets: np.ndarray  # [N+1] (empty for non-click rows)
    state_keys: np.ndarray
    state_stats: np.ndarray  # float32 [T, S]
    has_state: np.ndarray  # bool [N]: label == 1


def expand_ranges(lo: np.ndarray, hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(segment index, flat index) of the concatenated ranges ``[lo[i], hi[i])``."""
    lens = np.maximum(hi - lo, 0).astype(np.int64)
    total = int(lens.sum())
    seg = np.repeat(np.arange(len(lo), dtype=np.int64), lens)
    if total == 0:
        return seg, np.zeros(0, dtype=np.int64)
    starts = np.zeros(len(lo), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    flat = lo[seg] + (np.arange(total, dtype=np.int64) - starts[seg])
    return seg, flat


def stable_time_order(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Permutation sorting rows by (user, timestamp), ties kept in input order."""
    return np.lexsort((np.arange(len(user)), ts, user))


def item_key_csr(spec: U2ISpec, field_values: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    """Combine per-field item key CSRs ``(offsets, values)`` (values are raw field values)
    into one CSR of global u2i keys per item, fields in ``spec.fields`` order."""
    n = len(field_values[0][0]) - 1
    lens = np.zeros(n, dtype=np.int64)
    for off, _ in field_values:
        lens += np.diff(off)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    keys = np.zeros(int(offsets[-1]), dtype=np.int64)
    cursor = offsets[:-1].copy()
    for (off, vals), koff in zip(field_values, spec.key_offsets):
        seg, flat = expand_ranges(off[:-1], off[1:])
        local = flat - off[:-1][seg]
        keys[cursor[seg] + local] = vals[flat] + koff
        cursor += np.diff(off)
    return offsets, keys


def compute_prefix_features(user: np.ndarray, ts: np.ndarray, item: np.ndarray, label: np.ndarray,
                            increments: np.ndarray, item_keys: Tuple[np.ndarray, np.ndarray], spec: U2ISpec,
                            history_length: int, extra: Optional[ExtraEvents] = None) -> PrefixFeatures:
    """History, u2i and user_state of every row from strictly earlier events.

    Args:
        user, ts, item, label: int64 ``[N]``, already sorted by (user, ts) (:func:`stable_time_order`).
        increments: float64 ``[N, S]`` each row adds to its item's keys (column 0 = 1 exposure).
        item_keys: CSR ``(offsets [num_items+1], keys)`` of global u2i keys per item.
        spec: the u2i layout.
        history_length: keep at most this many most recent earlier clicks.
        extra: state-only events (not rows).
    """
    n = len(user)
    S = len(spec.stats)
    ik_off, ik_keys = item_keys
    # ---- events: rows then extras, sorted by (user, ts) -------------------------------
    if extra is not None and len(extra.user):
        ev_user = np.concatenate([user, extra.user])
        ev_ts = np.concatenate([ts, extra.ts])
        ev_inc = np.concatenate([increments, extra.increments]).astype(np.float64)
        order = np.lexsort((np.arange(len(ev_user)), ev_ts, ev_user))
        row_lo = ik_off[item]
        row_len = ik_off[item + 1] - row_lo
        ex_lo = extra.key_offsets[:-1]
        ex_len = np.diff(extra.key_offsets)
        ev_src_lo = np.concatenate([row_lo, ex_lo + len(ik_keys)])
        ev_len = np.concatenate([row_len, ex_len])
        key_pool = np.concatenate([ik_keys, extra.keys])
    else:
        ev_user, ev_ts, ev_inc = user, ts, increments.astype(np.float64)
        order = np.arange(n)
        ev_src_lo = ik_off[item]
        ev_len = ik_off[item + 1] - ev_src_lo
        key_pool = ik_keys
    E = len(ev_user)
    inv = np.empty(E, dtype=np.int64)
    inv[order] = np.arange(E)
    row_pos = inv[:n]  # event position of each row
    su, st = ev_user[order], ev_ts[order]
    new_user = np.ones(E, dtype=bool)
    new_user[1:] = su[1:] != su[:-1]
    new_tie = new_user.copy()
    new_tie[1:] |= st[1:] != st[:-1]
    ustart = np.maximum.accumulate(np.where(new_user, np.arange(E), 0))
    tstart = np.maximum.accumulate(np.where(new_tie, np.arange(E), 0))
    # ---- contributions (event position, key, increments) sorted by key * E + pos ---------
    s_lo, s_len = ev_src_lo[order], ev_len[order]
    seg, flat = expand_ranges(s_lo, s_lo + s_len)
    c_keys = key_pool[flat]
    comp = c_keys * E + seg
    corder = np.argsort(comp, kind="stable")
    comp = comp[corder]
    cinc = ev_inc[order][seg[corder]]
    csum = np.zeros((len(comp) + 1, S), dtype=np.float64)
    np.cumsum(cinc, axis=0, out=csum[1:])

    def range_stats(keys: np.ndarray, lo_pos: np.ndarray, hi_pos: np.ndarray) -> np.ndarray:
        a = np.searchsorted(comp, keys * E + lo_pos)
        b = np.searchsorted(comp, keys * E + hi_pos)
        return (csum[b] - csum[a]).astype(np.float32)

    # ---- u2i of every row (Eq. 6 input c_{u,v}) -----------------------------------------
    r_us, r_ts = ustart[row_pos], tstart[row_pos]
    rseg, rflat = expand_ranges(ik_off[item], ik_off[item + 1])
    rkeys = ik_keys[rflat]
    stats = range_stats(rkeys, r_us[rseg], r_ts[rseg])
    fld = np.searchsorted(np.asarray(spec.key_offsets[1:]), rkeys, side="right")
    F = len(spec.fields)
    agg = torch.zeros(n * F, S, dtype=torch.float64)
    agg.index_add_(0, torch.from_numpy(rseg * F + fld), torch.from_numpy(stats).to(torch.float64))
    u2i = u2i_from_field_stats(agg.view(n, F, S), spec.transforms).numpy()
    # ---- history: last H clicks strictly before -----------------------------------------
    is_click = label > 0
    click_rows = np.flatnonzero(is_click)
    click_pos_unsorted = row_pos[click_rows]
    corder2 = np.argsort(click_pos_unsorted, kind="stable")
    click_pos = click_pos_unsorted[corder2]
    click_item = item[click_rows[corder2]]
    hi = np.searchsorted(click_pos, r_ts)
    lo = np.maximum(np.searchsorted(click_pos, r_us), hi - history_length)
    hseg, hflat = expand_ranges(lo, hi)
    h_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.maximum(hi - lo, 0), out=h_off[1:])
    h_vals = click_item[hflat]
    # ---- user_state of click rows: every key seen strictly before -----------------------
    c_key = comp // E
    c_pos = comp % E
    first = np.ones(len(comp), dtype=bool)
    first[1:] = (c_key[1:] != c_key[:-1]) | (ustart[c_pos[1:]] != ustart[c_pos[:-1]])
    f_pos, f_key = c_pos[first], c_key[first]
    forder = np.argsort(f_pos, kind="stable")
    f_pos, f_key = f_pos[forder], f_key[forder]
    q_us, q_ts = r_us[click_rows], r_ts[click_rows]
    sseg, sflat = expand_ranges(np.searchsorted(f_pos, q_us), np.searchsorted(f_pos, q_ts))
    skeys = f_key[sflat]
    sorder = np.lexsort((skeys, sseg))
    sseg, skeys = sseg[sorder], skeys[sorder]
    sstats = range_stats(skeys, q_us[sseg], q_ts[sseg])
    lens = np.zeros(n, dtype=np.int64)
    lens[click_rows] = np.bincount(sseg, minlength=len(click_rows))
    s_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=s_off[1:])
    return PrefixFeatures(h_off, h_vals, u2i, s_off, skeys, sstats, is_click)


def leave_last_out(user: np.ndarray, label: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split codes (0 train, 1 valid, 2 test) and the valid/test target row indices.

    Rows must be sorted by (user, time) already. See the module docstring for the rule.
    """
    n = len(user)
    code = np.zeros(n, dtype=np.int8)
    if n == 0:
        return code, np.zeros(0, np.int64), np.zeros(0, np.int64)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    run = np.cumsum(new_user) - 1
    nruns = int(run[-1]) + 1
    clicks = np.flatnonzero(label > 0)
    crun = run[clicks]
    count = np.bincount(crun, minlength=nruns)
    ends = np.cumsum(count) - 1
    ok = count >= 3
    last = np.full(nruns, n, dtype=np.int64)
    second = np.full(nruns, n, dtype=np.int64)
    last[ok] = clicks[ends[ok]]
    second[ok] = clicks[ends[ok] - 1]
    idx = np.arange(n)
    code[idx >= second[run]] = 1
    code[idx >= last[run]] = 2
    return code, second[ok], last[ok]


def rows_table(cols: Dict[str, np.ndarray], feature_cols: Sequence[str], pf: PrefixFeatures,
               stat_names: Sequence[str], d_c: int) -> pa.Table:
    """Assemble the exposure-row table (column order of the schema doc)."""
    arrays: Dict[str, pa.Array] = {}
    for name in (USER_ID, ITEM_ID, TIMESTAMP, LABEL, *feature_cols):
        arrays[name] = pa.array(np.asarray(cols[name], dtype=np.int64), type=pa.int64())
    arrays[HISTORY] = pa.ListArray.from_arrays(pa.array(pf.history_offsets.astype(np.int32)),
                                               pa.array(pf.history_values.astype(np.int64), type=pa.int64()))
    arrays[U2I] = pa.FixedSizeListArray.from_arrays(pa.array(pf.u2i.reshape(-1), type=pa.float32()), d_c)
    arrays[USER_STATE] = states_to_arrow(pf.state_offsets, pf.state_keys, pf.state_stats, stat_names, pf.has_state)
    return pa.table(arrays)


def exposure_schema(feature_cols: Sequence[str], stat_names: Sequence[str], d_c: int) -> pa.Schema:
    fields = [pa.field(c, pa.int64()) for c in (USER_ID, ITEM_ID, TIMESTAMP, LABEL, *feature_cols)]
    fields += [pa.field(HISTORY, pa.list_(pa.int64())), pa.field(U2I, pa.list_(pa.float32(), d_c)),
               pa.field(USER_STATE, user_state_type(stat_names))]
    return pa.schema(fields)


def write_splits(root: Path, table: pa.Table, code: np.ndarray, valid_targets: np.ndarray, test_targets: np.ndarray,
                 part: str, row_group_size: int) -> Dict[str, int]:
    """Write the train/valid/test parts of one chunk; return row counts per split.

    Retrieval targets are NOT written here (the caller appends them to
    ``retrieval/{valid,test}.parquet``)."""
    counts = {}
    for split, c in SPLIT_CODES.items():
        idx = np.flatnonzero(code == c)
        counts[split] = int(len(idx))
        if len(idx) == 0:
            continue
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(pa.array(idx)), d / f"{part}.parquet", row_group_size=row_group_size)
    return counts


@dataclass
class DatasetWriter:
    """Writes a whole dataset root: items, split parts, retrieval targets, meta.json."""

    root: Path
    meta: DatasetMeta
    feature_cols: List[str]
    row_group_size: int = 8192
    counts: Dict[str, int] = field(default_factory=lambda: {"train": 0, "valid": 0, "test": 0})
    _retrieval: Dict[str, Optional[pq.ParquetWriter]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.schema = exposure_schema(self.feature_cols, self.meta.u2i_stats, self.meta.u2i_dim)
        self.train_clicks = np.zeros(self.meta.num_items, dtype=np.int64)

    def add_chunk(self, table: pa.Table, code: np.ndarray, valid_t: np.ndarray, test_t: np.ndarray, part: str) -> None:
        table = table.cast(self.schema)
        for split, c in write_splits(self.root, table, code, valid_t, test_t, part, self.row_group_size).items():
            self.counts[split] += c
        self.add_train_clicks(table, code)
        self.add_targets(table, valid_t, test_t)

    def add_train_clicks(self, table: pa.Table, code: np.ndarray) -> None:
        items = table.column(ITEM_ID).to_numpy()
        lab = table.column(LABEL).to_numpy()
        sel = (code == 0) & (lab > 0)
        self.train_clicks += np.bincount(items[sel], minlength=self.meta.num_items)

    def add_targets(self, table: pa.Table, valid_t: np.ndarray, test_t: np.ndarray) -> None:
        rdir = self.root / "retrieval"
        rdir.mkdir(parents=True, exist_ok=True)
        for split, idx in (("valid", valid_t), ("test", test_t)):
            if split not in self._retrieval:
                self._retrieval[split] = pq.ParquetWriter(rdir / f"{split}.parquet", self.schema)
            if len(idx):
                self._retrieval[split].write_table(table.take(pa.array(idx)).cast(self.schema),
                                                   row_group_size=self.row_group_size)

    def write_items(self, items: Dict[str, np.ndarray | pa.Array]) -> None:
        arrays = {}
        for k, v in items.items():
            arrays[k] = v if isinstance(v, pa.Array) else pa.array(np.asarray(v, dtype=np.int64), type=pa.int64())
        arrays["train_clicks"] = pa.array(self.train_clicks, type=pa.int64())
        pq.write_table(pa.table(arrays), self.root / "items.parquet", row_group_size=1 << 16)

    def close(self, items: Dict[str, np.ndarray | pa.Array]) -> None:
        for split in ("valid", "test"):
            if split not in self._retrieval:
                self.add_targets(pa.Table.from_batches([], schema=self.schema), np.zeros(0, np.int64), np.zeros(0, np.int64))
        for w in self._retrieval.values():
            if w is not None:
                w.close()
        self.write_items(items)
        self.meta.extra = {**self.meta.extra, "rows": dict(self.counts)}
        self.meta.save(self.root)
        logger.info("wrote %s: %s", self.root, self.counts)


def build_in_memory(root: Path, meta: DatasetMeta, cols: Dict[str, np.ndarray], feature_cols: List[str],
                    increments: np.ndarray, item_keys: Tuple[np.ndarray, np.ndarray],
                    items: Dict[str, np.ndarray | pa.Array], extra: Optional[ExtraEvents] = None,
                    row_group_size: int = 8192) -> Dict[str, int]:
    """Sort, compute prefix features, split and write a dataset that fits in memory.

    Args:
        root: output dataset root.
        meta: dataset metadata (written as meta.json).
        cols: int64 columns user_id, item_id, timestamp, label and ``feature_cols`` (file order).
        feature_cols: user + context feature column names.
        increments: float64 ``[N, S]`` per-row statistic increments.
        item_keys: global u2i key CSR per item (:func:`item_key_csr`).
        items: the item table columns.
        extra: state-only events.
        row_group_size: parquet row group size.
    """
    spec = U2ISpec.from_meta(meta)
    order = stable_time_order(cols[USER_ID], cols[TIMESTAMP])
    cols = {k: np.asarray(v)[order] for k, v in cols.items()}
    increments = increments[order]
    pf = compute_prefix_features(cols[USER_ID], cols[TIMESTAMP], cols[ITEM_ID], cols[LABEL], increments, item_keys,
                                 spec, meta.history_length, extra)
    table = rows_table(cols, feature_cols, pf, spec.stats, spec.dim)
    code, valid_t, test_t = leave_last_out(cols[USER_ID], cols[LABEL])
    writer = DatasetWriter(Path(root), meta, feature_cols, row_group_size)
    writer.add_chunk(table, code, valid_t, test_t, "part-00000")
    writer.close(items)
    return writer.counts

"""Streaming parquet reader that yields :class:`DIGBatch` (exposure + retrieval rows).

Sharding
    Row groups (found with ``pyarrow.dataset``) are the unit of work. They are assigned to
    ``world_size * W`` slots (``W = max(1, data.num_workers)``) by longest-processing-time
    greedy on their row counts, so slots are disjoint and balanced; rank ``r`` owns slots
    ``r*W .. r*W+W-1`` and DataLoader worker ``w`` of rank ``r`` reads slot ``r*W + w``.

Fixed step count
    Every slot yields exactly ``P = max over all slots of ceil(rows_slot / B)`` batches, so
    every rank runs ``num_batches = W * P`` steps per epoch (with ``W = 1`` this is the max
    over ranks of ``ceil(rows / B)``). Short slots pad with weight-0 batches; the last real
    batch of a slot pads with weight-0 copies of a real row. Every row of the split is
    yielded exactly once per epoch with weight 1.

Shuffle (train)
    A seeded block shuffle buffer: the slot's row groups are permuted, grouped into windows
    of at least ``data.shuffle_buffer`` rows, and each window's rows are permuted. The order
    is a function of (seed, epoch, slot, parquet metadata) only, which makes resume exact.

Retrieval rows (paper §4.1: "positive-only (y=1), full-corpus random negatives")
    ``P_r`` click slots per batch: ``data.retrieval_positives`` if > 0, else (0 = auto)
    ``ceil(2 * p_train * B)`` clamped to ``[1, B]``, with ``p_train`` the train split's
    positive rate = (sum of the item table's train click counts) / (train rows from the
    parquet metadata): no data scan, deterministic and identical on every rank (see
    :func:`auto_positive_slots`). Slot s holds a click of the exposure rows then
    ``data.negatives_per_positive`` items drawn from the whole item table (uniform, or
    ``p(v) ~ (train_clicks(v) + 1) ** popularity_alpha``), never equal to the positive.
    Negatives carry their static features and the u2i computed by :class:`U2IFunction` from
    the click's ``user_state``. Overflow: when a batch has more than P_r clicks, a seeded
    uniform subset of P_r of them (kept in batch order) fills the slots; the other clicks are
    NOT retrieval positives anywhere (they are not carried over, which keeps every batch a
    pure function of (seed, epoch, slot, batch index) and resume exact) but remain ordinary
    exposure rows, trained exactly once. :attr:`ExposureReader.retrieval_clicks_dropped`
    counts them. Missing clicks are weight-0 slots.

Hot loop
    Prefetch threads (one per core beyond the consumer's, at most two windows ahead) read
    windows (``ParquetFile.read_row_group``), decode them key-major (``[keys, rows]``, the
    KJT value layout) straight into emission order (the window's permutation is applied by
    the decoding gathers themselves; the history ids are laid out one run per row in
    emission order by :meth:`_History.select`), draw every batch's retrieval slots
    and negatives, computing all their u2i in ONE :class:`U2IFunction` call per window (a
    compiled per-state binary search directly on the arrow column's buffers,
    :class:`ArrowUserStates`: no copy and no index over the window's states), and build
    every batch lying inside the window: :func:`kernels.batch_dense` (exposure u2i / labels
    / weights, the retrieval slots and their u2i) and :func:`kernels.batch_kjt` (the KJT
    values and lengths of the exposure and retrieval rows, one fresh buffer per batch:
    batches in flight in a training pipeline never share memory). The kernels are numba
    code that runs without the GIL, so the threads scale with the cores. The iterating
    thread only builds the few batches that straddle two windows. No per-row Python, no
    arrow -> Python objects.

State (``state_dict``): epoch, batches yielded in the epoch and real rows yielded; the
next ``__iter__`` resumes at the exact row.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dig_torchrec.config import DataConfig
from dig_torchrec.data.batch import DIGBatch, make_kjt
from dig_torchrec.data import kernels
from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.schema import (HISTORY, ITEM_ID, LABEL, U2I, USER_STATE, DatasetMeta,
                                      FeatureSchema)
from dig_torchrec.data.u2i import ArrowUserStates, U2IFunction, UserStates
from dig_torchrec.errors import DataError

logger = logging.getLogger(__name__)
_PREFETCH_DEPTH = 2  # windows decoded ahead when batches are built in this process (see _prefetch_threads)


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int  # row group index in the file
    num_rows: int
    order: int  # position in the split's canonical (file, row group) order


def list_row_groups(split_dir: Path) -> List[RowGroup]:
    """Every row group of the split's parquet files, in (file name, row group) order."""
    if not split_dir.exists():
        raise DataError(f"{split_dir}: split directory not found")
    try:
        dataset = pads.dataset(str(split_dir), format="parquet")
        fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{split_dir}: cannot open parquet dataset ({e})") from e
    out: List[RowGroup] = []
    for frag in fragments:
        try:
            frag.ensure_complete_metadata()
            groups = frag.row_groups
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{frag.path}: corrupt or truncated parquet file ({e})") from e
        for rg in groups:
            if rg.num_rows > 0:
                out.append(RowGroup(frag.path, rg.id, rg.num_rows, len(out)))
    return out


def assign_slots(groups: Sequence[RowGroup], num_slots: int) -> List[List[RowGroup]]:
    """Longest-processing-time greedy: each row group to the currently lightest slot."""
    slots: List[List[RowGroup]] = [[] for _ in range(num_slots)]
    load = np.zeros(num_slots, dtype=np.int64)
    for g in sorted(groups, key=lambda g: (-g.num_rows, g.order)):
        s = int(np.argmin(load))
        slots[s].append(g)
        load[s] += g.num_rows
    return [sorted(s, key=lambda g: g.order) for s in slots]


def positive_slots_for(clicks: int, rows: int, batch_size: int) -> int:
    """The auto rule on integers: ``ceil(2 * clicks / rows * batch_size)`` in [1, batch_size]
    (``batch_size // 2`` when ``rows`` is 0). Exact integer arithmetic, the same on every rank."""
    slots = -(-2 * clicks * batch_size // rows) if rows else batch_size // 2
    return min(max(slots, 1), batch_size)


def auto_positive_slots(root: Path, items: ItemTable, batch_size: int,
                        train_groups: Optional[Sequence[RowGroup]] = None) -> int:
    """``data.retrieval_positives = 0`` (auto): ``ceil(2 * p_train * batch_size)`` in [1, batch_size].

    ``p_train`` = train clicks / train rows, with the clicks summed from the item table's
    train click counts (``items.parquet`` column ``train_clicks``, or the scan
    :class:`ItemTable` already made) and the rows from the parquet footers: exact integer
    arithmetic, so every rank gets the same value. Twice the mean leaves room for the
    binomial spread of clicks per batch (overflow clicks are subsampled, see the module
    docstring). Falls back to ``batch_size // 2`` when the train split is missing.

    Args:
        root: dataset root.
        items: the item table (``popularity`` = train click counts).
        batch_size: exposure rows per batch.
        train_groups: the train split's row groups if already listed.
    """
    if train_groups is None:
        if not (root / "train").exists():
            logger.warning("%s: no train split to estimate the click rate; data.retrieval_positives=0 "
                           "falls back to batch_size // 2", root)
            return max(1, batch_size // 2)
        train_groups = list_row_groups(root / "train")
    rows = sum(g.num_rows for g in train_groups)
    clicks = int(round(float(items.popularity.double().sum())))
    slots = positive_slots_for(clicks, rows, batch_size)
    logger.info("retrieval positives per batch (auto): %d (train click rate %d/%d, batch %d)",
                slots, clicks, rows, batch_size)
    return slots


@dataclass
class _RetrievalPlan:
    """A batch's retrieval slots: click rows (batch-local), negatives ``[c, K]`` and their
    u2i ``[c * K, d_c]``."""

    clicks: np.ndarray
    neg: np.ndarray
    neg_u2i: Optional[np.ndarray]


class _Window:
    """Decoded rows of one shuffle window, permuted once into emission order, so that every
    batch is a contiguous range (slice copies instead of random gathers).

    Args:
        sparse_t: ``[n_user_ctx, n]`` user + context ids, key-major (user_id first).
        item: ``[n]`` item ids.
        label: ``[n]`` float32 labels.
        hist: the rows' histories (:class:`_History`; dense ``[H, rows]`` blocks on demand).
        u2i: ``[n, d_c]`` float32.
        states: the window's user states in FILE order (None without retrieval rows).
        state_row: ``[n]`` emission row -> index into ``states`` (None: identity).
    """

    def __init__(self, sparse_t: np.ndarray, item: np.ndarray, label: np.ndarray, hist: "_History",
                 u2i: np.ndarray, states: Optional[UserStates], state_row: Optional[np.ndarray]) -> None:
        self.sparse_t = sparse_t
        self.item = item
        self.label = label
        self.hist = hist
        self.u2i = u2i
        self.states = states
        self.state_row = state_row

    @property
    def num_rows(self) -> int:
        return int(self.item.size)

    def state_index(self, rows: np.ndarray) -> np.ndarray:
        """Indices into ``states`` of emission rows ``rows``."""
        return rows if self.state_row is None else self.state_row[rows]


class _History:
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
    def concat(cls, parts: Sequence["_History"]) -> "_History":
        """Rows of ``parts`` one after the other."""
        shift = np.cumsum([0] + [p.vals.size for p in parts[:-1]])
        vals = np.concatenate([p.vals for p in parts])
        last = np.concatenate([p.last + o for p, o in zip(parts, shift)])
        num = np.concatenate([p.num for p in parts])
        return cls(vals, last, num, parts[0].H)

    @classmethod
    def of_ranges(cls, parts: Sequence[Tuple["_History", int, int]]) -> "_History":
        """Rows ``a .. b-1`` of each ``(history, a, b)``, one part after the other, holding
        only those rows' ids (a batch that straddles windows)."""
        return cls.concat([h.select(np.arange(a, b, dtype=np.int64)) for h, a, b in parts])

    def select(self, rows: np.ndarray) -> "_History":
        """Row i = row ``rows[i]``, holding only those rows' kept ids, one run per row in the
        new order (a shuffled window: a batch of consecutive rows then reads one run)."""
        vals, last, num = kernels.history_rows(self.vals, self.last, self.num, rows.astype(np.int64, copy=False))
        return _History(vals, last, num, self.H)

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
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, "_History", np.ndarray]:
        """Like :meth:`decode` but with ``sparse [U, n]`` key-major (the KJT value layout) and
        the history as a :class:`_History` (packed KJT values; dense blocks on demand).

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
        hist = _History(vals, offs[1:] - 1, lens, H)  # last = each row's most recent click
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


class ExposureReader(IterableDataset):
    """Iterable of :class:`DIGBatch` over one split (see the module docstring).

    Args:
        root: dataset root.
        split: ``train``, ``valid`` or ``test``.
        data_cfg: data config (batch sizes, shuffle buffer, negatives, workers, seed, hashing).
        schema: the feature layout (``FeatureSchema.from_meta``).
        rank: this process's rank.
        world_size: number of ranks.
        with_retrieval: also build the retrieval rows (R > 0).
        shuffle: default: ``split == "train"``.
        epoch: the epoch to start at (selects the shuffle order).
    """

    def __init__(self, root: str | Path, split: str, data_cfg: DataConfig, schema: FeatureSchema, *, rank: int = 0,
                 world_size: int = 1, with_retrieval: bool = True, shuffle: Optional[bool] = None,
                 epoch: int = 0) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.root = Path(root)
        self.split = split
        self.cfg = data_cfg
        self.schema = schema
        self.rank, self.world_size = rank, world_size
        self.with_retrieval = with_retrieval
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.meta = DatasetMeta.load(self.root)
        self.items = ItemTable.load(self.root, schema, self.meta)
        self.u2i_fn = U2IFunction(self.meta, self.items)
        self.batch_size = data_cfg.batch_size if split == "train" else data_cfg.eval_batch_size
        self.num_workers = max(0, data_cfg.num_workers)
        self._W = max(1, self.num_workers)
        self.row_groups = list_row_groups(self.root / split)
        if not self.row_groups:
            raise DataError(f"{self.root / split}: empty dataset (no rows)")
        self.num_positive_slots = 0
        if with_retrieval:
            train_groups = self.row_groups if split == "train" else None
            self.num_positive_slots = data_cfg.retrieval_positives or auto_positive_slots(
                self.root, self.items, self.batch_size, train_groups)
        self.negatives = data_cfg.negatives_per_positive
        self.slots = assign_slots(self.row_groups, world_size * self._W)
        self.slot_rows = [sum(g.num_rows for g in s) for s in self.slots]
        self.batches_per_slot = max(1, max(math.ceil(r / self.batch_size) for r in self.slot_rows))
        self.decoder = RowDecoder(schema, self.meta, data_cfg.hash_ids, with_state=with_retrieval)
        self._item_features = np.ascontiguousarray(self.items.features.numpy(), dtype=np.int64)  # [num_items, F]
        self._sample_cdf: Optional[torch.Tensor] = None
        if data_cfg.negative_sampling == "popularity":
            w = (self.items.popularity.double() + 1.0) ** data_cfg.popularity_alpha
            self._sample_cdf = torch.cumsum(w / w.sum(), 0)
        self._template: Optional[_Window] = None
        # set by the trainer on CUDA (train.pin_memory): DataLoader workers' batches are then pinned
        # by the DataLoader's pin thread (DIGBatch.pin_memory), off the training thread
        self.pin_memory = False
        self.epoch = epoch
        self._batches_done = 0
        self._rows_done = 0
        self._clicks_dropped = 0

    # ------------------------------------------------------------------ public state
    def negative_sampling_prob(self) -> Optional[torch.Tensor]:
        """``[num_items]`` p(v) of the negative sampler (``data.negative_sampling=popularity``); None if uniform."""
        if self._sample_cdf is None:
            return None
        cdf = self._sample_cdf
        return torch.diff(cdf, prepend=cdf.new_zeros(1)).float()

    @property
    def num_batches(self) -> int:
        """Steps per epoch; equal on every rank."""
        return self._W * self.batches_per_slot

    def __len__(self) -> int:
        return self.num_batches

    @property
    def rows(self) -> int:
        """Real rows of this rank's share."""
        return sum(self.slot_rows[self.rank * self._W:(self.rank + 1) * self._W])

    @property
    def rows_consumed(self) -> int:
        """Real (weight-1) exposure rows yielded so far in the current epoch."""
        return self._rows_done

    @property
    def retrieval_clicks_dropped(self) -> int:
        """Clicks of real exposure rows that found no retrieval slot (overflow beyond P_r)
        so far in the current epoch; they were still yielded as exposure rows."""
        return self._clicks_dropped

    @property
    def retrieval_size(self) -> int:
        return self.num_positive_slots * (1 + self.negatives)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._batches_done, self._rows_done, self._clicks_dropped = epoch, 0, 0, 0

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "batches_in_epoch": self._batches_done, "rows_consumed": self._rows_done,
                "retrieval_clicks_dropped": self._clicks_dropped,
                "num_batches": self.num_batches, "world_size": self.world_size, "num_workers": self.num_workers,
                "seed": self.cfg.seed, "split": self.split}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("world_size", "num_workers", "num_batches", "seed"):
            if key in state and int(state[key]) != int(getattr(self, key) if key != "seed" else self.cfg.seed):
                raise DataError(
                    f"reader state for split '{self.split}': {key}={state[key]} does not match the current "
                    f"{key}={getattr(self, key) if key != 'seed' else self.cfg.seed}; resume with the same data config"
                )
        self.epoch = int(state["epoch"])
        self._batches_done = int(state["batches_in_epoch"])
        self._rows_done = int(state.get("rows_consumed", 0))
        self._clicks_dropped = int(state.get("retrieval_clicks_dropped", 0))

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[DIGBatch]:
        if get_worker_info() is not None:  # the reader itself was handed to a DataLoader
            raise RuntimeError("ExposureReader manages its own DataLoader workers (data.num_workers); iterate it directly")
        if self._batches_done >= self.num_batches:
            self.set_epoch(self.epoch + 1)
        start = self._batches_done
        if self.num_workers == 0:
            stream: Iterator[DIGBatch] = self.slot_batches(0, start, self.epoch)
        else:
            loader = DataLoader(_WorkerStreams(self, start, self.epoch), batch_size=None,
                                num_workers=self.num_workers, worker_init_fn=_worker_init,
                                persistent_workers=False, pin_memory=self.pin_memory)
            stream = iter(loader)
        P = self.num_positive_slots
        for batch in stream:
            self._batches_done += 1
            self._rows_done += int(batch.weights.sum().item())
            if P:
                clicks = int(torch.count_nonzero((batch.labels > 0) & (batch.weights > 0)))
                if clicks > P:
                    self._clicks_dropped += clicks - P
            yield batch
        if self._batches_done >= self.num_batches:
            logger.debug("reader %s rank %d finished epoch %d", self.split, self.rank, self.epoch)

    def slot_batches(self, slot_in_rank: int, consumed: int, epoch: int) -> Iterator[DIGBatch]:
        """The batches of one slot, skipping those already consumed by the rank.

        Args:
            slot_in_rank: worker index w (0 without workers).
            consumed: batches the rank already yielded this epoch (round-robin over workers).
            epoch: shuffle epoch.
        """
        W = self._W
        skip = max(0, -(-(consumed - slot_in_rank) // W))
        slot = self.rank * W + slot_in_rank
        yield from self._stream(slot, skip, epoch)

    def _slot_order(self, slot: int, epoch: int) -> Tuple[List[List[RowGroup]], List[np.random.Generator]]:
        groups = list(self.slots[slot])
        rng = np.random.default_rng([self.cfg.seed, epoch, slot, 7])
        if self.shuffle:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        windows: List[List[RowGroup]] = []
        cur: List[RowGroup] = []
        rows = 0
        target = self.cfg.shuffle_buffer if self.shuffle else 0
        for g in groups:
            cur.append(g)
            rows += g.num_rows
            if rows >= target:
                windows.append(cur)
                cur, rows = [], 0
        if cur:
            windows.append(cur)
        return windows, [np.random.default_rng([self.cfg.seed, epoch, slot, 11, i]) for i in range(len(windows))]

    def _stream(self, slot: int, skip: int, epoch: int) -> Iterator[DIGBatch]:
        windows, rngs = self._slot_order(slot, epoch)
        sizes = np.array([sum(g.num_rows for g in w) for w in windows], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        total = int(starts[-1])
        pending: Dict[int, Future] = {}
        # In the main process `depth` windows are decoded, planned AND batched ahead (every
        # batch lying wholly inside the window; parquet decoding, numpy gathers and the u2i
        # lookups release the GIL) by prefetch threads that leave a core to the consumer (the
        # training step): this thread only hands the batches over, so it does not fight the
        # prefetch threads for the GIL (that cost ~15% more CPU than one thread doing it all).
        # Inside a DataLoader worker one window ahead on one thread (the workers fill the cores).
        in_worker = get_worker_info() is not None
        threads = 1 if in_worker else (self.cfg.reader_threads or _prefetch_threads())
        depth = 1 if in_worker else max(_PREFETCH_DEPTH, threads)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dig-reader-prefetch",
                                  initializer=_prefetch_thread_init)
        B, real_batches = self.batch_size, -(-total // self.batch_size)

        def load(w: int) -> Tuple[_Window, Dict[int, _RetrievalPlan], Dict[int, DIGBatch]]:
            win = self._load_window(windows[w], rngs[w])
            w_start, w_end = int(starts[w]), int(starts[w + 1])
            plans: Dict[int, _RetrievalPlan] = {}
            if self.num_positive_slots:
                plans = self._plan_window(win, w_start, w_end, skip, total, epoch, slot)
            built: Dict[int, DIGBatch] = {}  # the same batches _plan_window planned
            for b in range(max(skip, -(-w_start // B)), real_batches):
                lo, hi = b * B, min((b + 1) * B, total)
                if hi > w_end:
                    break
                built[b] = self._make_batch([(win, lo - w_start, hi - w_start)], None, plans.pop(b, None))
            return win, plans, built

        def window(w: int) -> Tuple[_Window, Dict[int, _RetrievalPlan], Dict[int, DIGBatch]]:
            # window w (from the prefetch threads if already submitted); start w+1 .. w+depth
            # first, so that the threads already work while this thread waits or loads w itself
            fut = pending.pop(w, None)
            for nxt in range(w + 1, min(w + 1 + depth, len(windows))):
                if nxt not in pending:
                    pending[nxt] = pool.submit(load, nxt)
            if fut is not None:
                return fut.result()
            with _single_thread():
                return load(w)

        try:
            yield from self._batches(skip, epoch, slot, windows, starts, total, window)
        finally:
            for fut in pending.values():
                fut.cancel()
            pool.shutdown(wait=True)

    def _batches(self, skip: int, epoch: int, slot: int, windows: List[List[RowGroup]], starts: np.ndarray,
                 total: int, window) -> Iterator[DIGBatch]:
        B = self.batch_size
        real_batches = -(-total // B)
        wi = -1
        cur: Optional[_Window] = None
        plans: Dict[int, _RetrievalPlan] = {}
        built: Dict[int, DIGBatch] = {}
        for b in range(skip, self.batches_per_slot):
            if b >= real_batches:
                with _single_thread():
                    pad = self._pad_batch(self._batch_generator(epoch, slot, b))
                yield pad
                continue
            lo, hi = b * B, min((b + 1) * B, total)
            parts: List[Tuple[_Window, int, int]] = []  # (window, first row, end row) in emission order
            pos = lo
            while pos < hi:
                w = int(np.searchsorted(starts, pos, side="right") - 1)
                if w != wi:
                    (cur, plans, built), wi = window(w), w
                end = min(hi, int(starts[w + 1]))
                parts.append((cur, pos - int(starts[w]), end - int(starts[w])))
                pos = end
            ready = built.pop(b, None)  # built by the window's loader (the batch lies inside it)
            if ready is not None:
                yield ready
                continue
            plan = plans.pop(b, None)
            # the generator is only needed when the batch was not planned (straddles windows)
            gen = self._batch_generator(epoch, slot, b) if plan is None and self.num_positive_slots else None
            with _single_thread():
                batch = self._make_batch(parts, gen, plan)
            yield batch

    def _batch_generator(self, epoch: int, slot: int, b: int) -> torch.Generator:
        """The torch generator of batch b of a slot: a function of (seed, epoch, slot, b) only."""
        seed = int(np.random.default_rng([self.cfg.seed, epoch, slot, 13, b]).integers(0, 2**62))
        return torch.Generator().manual_seed(seed)

    def _plan_window(self, w: _Window, w_start: int, w_end: int, first: int, total: int, epoch: int, slot: int
                     ) -> Dict[int, "_RetrievalPlan"]:
        """Retrieval slots of every batch (index >= first) lying wholly inside window w, with
        ONE u2i call for all their negatives (the per-call overhead dominated per-batch calls).

        Each batch still draws from its own generator in the same order as
        :meth:`_make_batch` would, so the result is identical to planning batch by batch.

        Args:
            w: the window; w_start/w_end: its emission-row range in the slot.
            first: first batch index still to be yielded.
            total: rows of the slot.
        """
        B = self.batch_size
        plans: Dict[int, _RetrievalPlan] = {}
        rows_all, negs_all = [], []
        for b in range(max(first, -(-w_start // B)), self.batches_per_slot):
            lo, hi = b * B, min((b + 1) * B, total)
            if hi > w_end or lo >= hi:
                break
            a = lo - w_start
            clicks, neg = self._select_retrieval(w.label[a:a + hi - lo], w.item[a:a + hi - lo],
                                                 self._batch_generator(epoch, slot, b))
            plans[b] = _RetrievalPlan(clicks, neg, None)
            if clicks.size:
                rows_all.append(w.state_index(clicks + a))
                negs_all.append(neg.reshape(-1))
        if not rows_all:
            return plans
        K = self.negatives
        u2i = self.u2i_fn(w.states, torch.from_numpy(np.repeat(np.concatenate(rows_all), K)),
                          torch.from_numpy(np.concatenate(negs_all))).numpy()
        off = 0
        for plan in plans.values():
            m = plan.clicks.size * K
            if m:
                plan.neg_u2i = u2i[off:off + m]
                off += m
        return plans

    # ------------------------------------------------------------------ decoding
    def _load_window(self, groups: Sequence[RowGroup], rng: Optional[np.random.Generator]) -> _Window:
        """Decode a window's row groups key-major and permute them into emission order."""
        tables = [self._read_group(g) for g in groups]
        perm = None
        if self.shuffle and rng is not None:
            perm = rng.permutation(sum(t.num_rows for t in tables))  # emission row -> file row
        if len(tables) == 1:  # the common case (shuffle_buffer <= row group): decode in emission order
            sparse_t, item, label, hist, u2i = self.decoder.decode_window(tables[0], groups[0], perm)
        else:
            decoded = [self.decoder.decode_window(t, g) for t, g in zip(tables, groups)]

            def cat(i: int, axis: int = 0) -> np.ndarray:
                return np.concatenate([d[i] for d in decoded], axis=axis)

            sparse_t, item, label, u2i = cat(0, 1), cat(1), cat(2), cat(4)
            hist = _History.concat([d[3] for d in decoded])
            if perm is not None:
                hist = hist.select(perm)  # ids in emission order (see decode_window)
                sparse_t = np.take(sparse_t, perm, axis=1)
                item, label, u2i = item[perm], label[perm], np.take(u2i, perm, axis=0)
        states = None
        if self.with_retrieval:
            col = tables[0].column(USER_STATE) if len(tables) == 1 else pa.chunked_array(
                [c for t in tables for c in t.column(USER_STATE).chunks])
            states = ArrowUserStates.from_arrow_view(col, self.meta.u2i_stats)  # no copy
        return _Window(sparse_t, item, label, hist, u2i, states, perm)

    def _read_group(self, g: RowGroup) -> pa.Table:
        # ParquetFile.read_row_group without arrow's thread pool: ~10% less CPU than a
        # dataset fragment scan, and the prefetch threads already read windows in parallel
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

    # ------------------------------------------------------------------ batches
    def _sample_negatives(self, pos: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n_items = self.items.num_items
        shape = (pos.numel(), self.negatives)
        if self._sample_cdf is None:
            neg = torch.randint(0, n_items, shape, generator=gen)
        else:
            u = torch.rand(shape, generator=gen, dtype=torch.float64)
            neg = torch.searchsorted(self._sample_cdf, u).clamp(max=n_items - 1)
        if n_items > 1:
            clash = neg == pos[:, None]
            if bool(clash.any()):
                shift = torch.randint(1, n_items, shape, generator=gen)
                neg = torch.where(clash, (neg + shift) % n_items, neg)
        return neg

    def _select_retrieval(self, label: np.ndarray, item: np.ndarray, gen: torch.Generator
                          ) -> Tuple[np.ndarray, np.ndarray]:
        """Click rows filling the retrieval slots (a seeded uniform subset, in batch order, on
        overflow) and their negatives ``[clicks, K]``."""
        P = self.num_positive_slots
        clicks = np.flatnonzero(label > 0)
        if clicks.size > P:
            keep = torch.randperm(clicks.size, generator=gen)[:P].numpy()
            keep.sort()
            clicks = clicks[keep]
        if not clicks.size:
            return clicks, np.zeros((0, self.negatives), dtype=np.int64)
        return clicks, self._sample_negatives(torch.from_numpy(item[clicks]), gen).numpy()

    def _make_batch(self, parts: List[Tuple[_Window, int, int]], gen: Optional[torch.Generator],
                    plan: Optional["_RetrievalPlan"] = None) -> DIGBatch:
        """One batch from consecutive emission-order row ranges ``(window, lo, hi)``.

        Exposure rows are copies of the window's rows (padding rows copy row 0); each
        retrieval slot's user-side columns are its click row's, broadcast over its 1 + K rows.

        Args:
            plan: the retrieval slots precomputed by :meth:`_plan_window` (else drawn here
                from ``gen``).
        """
        # the batch's exposure rows are rows lo .. lo + n - 1 of these arrays
        if len(parts) == 1:  # the common case: the batch reads the window's arrays in place
            w0, lo, hi = parts[0]
            sparse_src, item_src, label_src, u2i_src, hist_src = w0.sparse_t, w0.item, w0.label, w0.u2i, w0.hist
            n = hi - lo
        else:  # the batch straddles windows: copy the (few) rows of each into one range
            lo = 0
            sparse_src = np.concatenate([w.sparse_t[:, a:b] for w, a, b in parts], axis=1)
            hist_src = _History.of_ranges([(w.hist, a, b) for w, a, b in parts])
            item_src, label_src, u2i_src = (np.concatenate([getattr(w, c)[a:b] for w, a, b in parts])
                                            for c in ("item", "label", "u2i"))
            n = item_src.shape[0]
        P, K, d_c = self.num_positive_slots, self.negatives, self.meta.u2i_dim
        clicks, neg, neg_u2i = np.zeros(0, dtype=np.int64), np.zeros((0, K), dtype=np.int64), None
        if P:
            if plan is None:
                assert gen is not None
                clicks, neg = self._select_retrieval(label_src[lo:lo + n], item_src[lo:lo + n], gen)
                neg_u2i = self._negative_u2i(parts, clicks, neg) if clicks.size else None
            else:
                clicks, neg, neg_u2i = plan.clicks, plan.neg, plan.neg_u2i
        if neg_u2i is None:
            neg_u2i = np.zeros((0, d_c), dtype=np.float32)
        ex_u2i, ex_label, weights, slot_rows, slot_items, r_u2i, r_labels, slot_w = kernels.batch_dense(
            label_src, u2i_src, item_src, lo, n, self.batch_size, P, clicks, neg, neg_u2i)
        kjt = self._kjt(sparse_src, item_src, hist_src, lo, n, slot_rows, slot_items)
        return DIGBatch(sparse_features=kjt, u2i=torch.from_numpy(ex_u2i), labels=torch.from_numpy(ex_label),
                        weights=torch.from_numpy(weights),
                        retrieval_u2i=torch.from_numpy(r_u2i.reshape(P * (1 + K), d_c)),
                        retrieval_labels=torch.from_numpy(r_labels.reshape(-1)),
                        retrieval_weights=torch.from_numpy(slot_w.reshape(-1)))

    def _negative_u2i(self, parts: List[Tuple[_Window, int, int]], clicks: np.ndarray, neg: np.ndarray
                      ) -> np.ndarray:
        """u2i ``[real * K, d_c]`` of the negatives ``neg[c]`` for the user state of batch row ``clicks[c]``.

        The lookup runs directly on each window's UserStates (a binary search inside each
        click's state), so no per-batch copy of the states is made.
        """
        K = neg.shape[1]
        out = []
        first = 0  # batch row of the part's first row
        for w, a, b in parts:
            sel = (clicks >= first) & (clicks < first + b - a)
            if sel.any():
                rows = w.state_index(clicks[sel] - first + a)
                out.append(self.u2i_fn(w.states, torch.from_numpy(np.repeat(rows, K)),
                                       torch.from_numpy(neg[sel].reshape(-1))).numpy())
            first += b - a
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _kjt(self, sparse_t: np.ndarray, item: np.ndarray, hist: _History, lo: int, n: int, slot_rows: np.ndarray,
             slot_items: np.ndarray) -> KeyedJaggedTensor:
        """KJT in ``schema.keys`` order of the B exposure rows then the P*(1+K) retrieval rows.

        Same layout as :func:`make_kjt` (``length_per_key``/``offset_per_key`` precomputed on
        the host), built in one pass by :func:`kernels.batch_kjt` (no GIL held) into one
        fresh values buffer per batch (batches in flight in a pipeline never share memory).

        Args:
            sparse_t: ``[U, rows]`` user + context ids of the rows ``item`` and ``hist`` hold.
            item: ``[rows]`` item ids.
            hist: the rows' histories.
            lo, n: the batch's exposure rows are rows ``lo .. lo + n - 1``.
            slot_rows: ``[P]`` batch row (``0 .. n-1``) of each retrieval slot's click.
            slot_items: ``[P, 1 + K]`` the positive then the negatives of each slot.
        """
        values, lengths, counts = kernels.batch_kjt(
            sparse_t, item, self._item_features, hist.vals, hist.last, hist.num, self.schema.history_length,
            lo, n, self.batch_size, slot_rows, slot_items)
        N = self.batch_size + slot_items.size
        S = sparse_t.shape[0] + self._item_features.shape[1]  # single-valued keys
        length_per_key = [N] * S + counts.tolist()
        offset_per_key = [0] + np.cumsum(length_per_key).tolist()
        return KeyedJaggedTensor(keys=self.schema.keys, values=torch.from_numpy(values),
                                 lengths=torch.from_numpy(lengths), stride=N, length_per_key=length_per_key,
                                 offset_per_key=offset_per_key)

    def _pad_batch(self, gen: torch.Generator) -> DIGBatch:
        """A weight-0 batch (copies of the split's first row) to even out step counts."""
        if self._template is None:
            g = self.row_groups[0]
            self._template = self._load_window([g], None)
        b = self._make_batch([(self._template, 0, 1)], gen)
        b.weights.zero_()
        b.retrieval_weights.zero_()
        return b


class _WorkerStreams(IterableDataset):
    """The per-worker view handed to the DataLoader: worker w streams slot ``rank*W + w``."""

    def __init__(self, reader: ExposureReader, consumed: int, epoch: int) -> None:
        super().__init__()
        self.reader, self.consumed, self.epoch = reader, consumed, epoch

    def __iter__(self) -> Iterator[DIGBatch]:
        info = get_worker_info()
        w = 0 if info is None else info.id
        # the DataLoader starts its round robin at worker 0, which must serve global batch
        # index `consumed`; rotating keeps the order identical to an uninterrupted epoch.
        W = self.reader._W
        return self.reader.slot_batches((w + self.consumed) % W, self.consumed, self.epoch)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Batch assembly runs many small torch ops; intra-op threads only add sync overhead
    (10x slower on a busy 2-core host), so run them on one thread and restore after."""
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _prefetch_threads() -> int:
    """Prefetch threads of a reader in the main process: this rank's share of the usable cores
    (cores / ``LOCAL_WORLD_SIZE``, the ranks on this node) minus the one the batching thread
    needs, at least 1. Without the division, 8 GPU ranks on a 64-core node would start 63
    threads each."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        local_ranks = 1
    return max(1, cores // local_ranks - 1)


def _prefetch_thread_init() -> None:
    """Prefetch threads run the window's u2i torch ops: one intra-op thread each. A new
    thread starts with the process default (all cores), and OpenMP teams in two prefetch
    threads next to the main thread oversubscribe the cores: +30% CPU on an idle 2-core host,
    4x wall time on a busy one. (The setting is per thread; the main thread keeps its own.)"""
    torch.set_num_threads(1)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------------- retrieval targets
@dataclass
class RetrievalTargets:
    """Held-out (user, positive item) pairs with the user's features as of that moment."""

    user_kjt: KeyedJaggedTensor  # keys = schema.user_side_keys, U rows
    target_item: torch.Tensor  # [U]
    history: torch.Tensor  # [U, H] -1 padded, most recent first (aligned with hist_j)
    states: UserStates
    user_id: torch.Tensor  # [U]
    u2i: torch.Tensor  # [U, d_c] stored u2i of (user, target)
    context: torch.Tensor  # [U, n_user_ctx] user + context feature ids (schema order)

    def __len__(self) -> int:
        return int(self.target_item.numel())


def load_targets(root: str | Path, split: str, schema: FeatureSchema, hash_ids: bool = False) -> RetrievalTargets:
    """Read ``ROOT/retrieval/{split}.parquet``.

    Args:
        root: dataset root.
        split: ``valid`` or ``test``.
        schema: the feature layout (history length H).
        hash_ids: hash ids beyond the table size instead of raising.
    """
    root = Path(root)
    path = root / "retrieval" / f"{split}.parquet"
    if not path.exists():
        raise DataError(f"{path}: retrieval targets not found")
    meta = DatasetMeta.load(root)
    decoder = RowDecoder(schema, meta, hash_ids, with_state=True)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read parquet ({e})") from e
    g = RowGroup(str(path), 0, table.num_rows, 0)
    for col in decoder.columns():
        if col not in table.column_names:
            raise DataError(f"{path}: missing column '{col}'")
    sparse, item, _label, hist, u2i = decoder.decode(table, g)
    states = UserStates.from_arrow(table.column(USER_STATE), meta.u2i_stats)
    U = len(item)
    ones = torch.ones(U, dtype=torch.int32)
    values, lengths = [], []
    for j in range(sparse.shape[1]):
        values.append(torch.from_numpy(sparse[:, j].copy()))
        lengths.append(ones)
    hist_t = torch.from_numpy(hist)
    for j in range(hist_t.shape[1]):
        mask = hist_t[:, j] >= 0
        values.append(hist_t[mask, j])
        lengths.append(mask.to(torch.int32))
    kjt = make_kjt(schema.user_side_keys, values, lengths)
    return RetrievalTargets(user_kjt=kjt, target_item=torch.from_numpy(item.copy()), history=hist_t, states=states,
                            user_id=torch.from_numpy(sparse[:, 0].copy()), u2i=torch.from_numpy(u2i.copy()),
                            context=torch.from_numpy(sparse))


def open_dataset(root: str | Path, data_cfg: DataConfig, deep: Optional[bool] = None) -> Tuple[DatasetMeta, FeatureSchema]:
    """Load meta.json, build the schema and validate every file (raises DataError).

    Args:
        root: dataset root.
        data_cfg: data config (history length, hash_ids).
        deep: also scan values (NaN/inf u2i, id ranges, list lengths); default: yes, cached in
            ``ROOT/.dig_validated.json`` per file size/mtime.
    """
    from dig_torchrec.data.validate import validate_dataset

    meta = DatasetMeta.load(root)
    schema = FeatureSchema.from_meta(meta, data_cfg.history_length)
    validate_dataset(root, data_cfg, meta=meta, schema=schema, deep=True if deep is None else deep, use_cache=deep is None)
    return meta, schema

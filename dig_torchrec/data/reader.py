"""Streaming parquet reader that yields :class:`DIGBatch` (exposure + retrieval rows).

This module is the iterator; each of its parts has a module of its own:

* :mod:`~dig_torchrec.data.shards`: which row groups each rank / DataLoader worker (slot) reads,
  and the fixed step count (every slot yields as many batches as the longest one);
* :mod:`~dig_torchrec.data.plan`: every batch of a slot's epoch (its rows, the shuffle, every
  random draw), a function of (seed, epoch, slot, batch index) only;
* :mod:`~dig_torchrec.data.decode`: a shuffle window's row groups -> numpy, in emission order;
* :mod:`~dig_torchrec.data.sampling`: retrieval positives per batch, negatives and their u2i;
* :mod:`~dig_torchrec.data.assembly`: rows + draw -> :class:`DIGBatch` (KJT built in one pass);
* :mod:`~dig_torchrec.data.targets`, :mod:`~dig_torchrec.data.dataset`: evaluation targets and
  opening a dataset (re-exported here for callers).

Every row of the split is yielded exactly once per epoch with weight 1; short slots pad with
weight-0 batches and the last real batch of a slot with weight-0 copies of a real row.
Retrieval rows (paper §4.1): ``P_r`` positives per batch, each a click of the batch followed
by ``data.negatives_per_positive`` full-corpus negatives with their u2i. Clicks beyond
``P_r`` are not retrieval positives anywhere (they are not carried over, which keeps every
batch a pure function of its plan) but stay ordinary exposure rows;
:attr:`ExposureReader.retrieval_clicks_dropped` counts them.

Hot loop: prefetch threads (one per core beyond the consumer's, at least two windows ahead)
decode windows, draw every batch's retrieval rows, compute all their negatives' u2i in ONE
:class:`U2IFunction` call per window, and assemble every batch lying inside the window. The
kernels and the parquet decode run without the GIL, so the threads scale with the cores; the
iterating thread only builds the few batches that straddle two windows and the padding.

State (``state_dict``): epoch, batches yielded in the epoch, real rows yielded and clicks
dropped; the next ``__iter__`` resumes at the exact row.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dig_torchrec.config import DataConfig
from dig_torchrec.data.assembly import BatchAssembler, BatchRows
from dig_torchrec.data.batch import DIGBatch
from dig_torchrec.data.dataset import open_dataset
from dig_torchrec.data.decode import DecodedWindow, RowDecoder, WindowReader
from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.plan import SlotPlan
from dig_torchrec.data.sampling import NegativeSampler, RetrievalDraw, auto_retrieval_positives, negative_u2i, \
    window_negative_u2i
from dig_torchrec.data.schema import DatasetMeta, FeatureSchema
from dig_torchrec.data.shards import RowGroup, ShardLayout, assign_slots, list_row_groups
from dig_torchrec.data.targets import RetrievalTargets, load_targets
from dig_torchrec.data.u2i import U2IFunction
from dig_torchrec.errors import DataError

# callers import these from here (the reader's public surface before it was split in parts)
__all__ = ["ExposureReader", "RetrievalTargets", "RowDecoder", "RowGroup", "assign_slots", "list_row_groups",
           "load_targets", "open_dataset"]

logger = logging.getLogger(__name__)
_PREFETCH_DEPTH = 2  # windows decoded ahead when batches are built in this process (see _prefetch_threads)

# a window decoded by a prefetch thread, and the batches lying inside it, by batch index
_LoadedWindow = Tuple[DecodedWindow, Dict[int, DIGBatch]]


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
        self.u2i_fn = U2IFunction(self.meta, self.items.u2i_keys)
        self.batch_size = data_cfg.batch_size if split == "train" else data_cfg.eval_batch_size
        self.num_workers = max(0, data_cfg.num_workers)
        self.row_groups = list_row_groups(self.root / split)
        if not self.row_groups:
            raise DataError(f"{self.root / split}: empty dataset (no rows)")
        self.num_retrieval_positives = 0  # P_r
        if with_retrieval:
            train_groups = self.row_groups if split == "train" else None
            self.num_retrieval_positives = data_cfg.retrieval_positives or auto_retrieval_positives(
                self.root, self.items, self.batch_size, train_groups)
        self.negatives = data_cfg.negatives_per_positive
        self.layout = ShardLayout(self.row_groups, world_size, max(1, self.num_workers), self.batch_size)
        self.decoder = RowDecoder(schema, self.meta, data_cfg.hash_ids, with_state=with_retrieval)
        self.windows = WindowReader(self.decoder, self.meta)
        self.sampler = NegativeSampler(self.items, self.negatives, data_cfg.negative_sampling,
                                       data_cfg.popularity_alpha)
        self.assembler = BatchAssembler(schema, self.items.features.numpy(), self.batch_size,
                                        self.num_retrieval_positives, self.negatives, self.meta.u2i_dim)
        self._padding_window: Optional[DecodedWindow] = None  # the split's first row group, decoded on demand
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
        return self.sampler.prob()

    @property
    def num_batches(self) -> int:
        """Steps per epoch; equal on every rank."""
        return self.layout.slots_per_rank * self.layout.batches_per_slot

    def __len__(self) -> int:
        return self.num_batches

    @property
    def rows(self) -> int:
        """Real rows of this rank's share."""
        return self.layout.rank_rows(self.rank)

    @property
    def rows_consumed(self) -> int:
        """Real (weight-1) exposure rows yielded so far in the current epoch."""
        return self._rows_done

    @property
    def retrieval_clicks_dropped(self) -> int:
        """Clicks of real exposure rows that found no place among the retrieval positives
        (overflow beyond P_r) so far in the current epoch; they were still yielded as exposure rows."""
        return self._clicks_dropped

    @property
    def retrieval_size(self) -> int:
        return self.num_retrieval_positives * (1 + self.negatives)

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
        P = self.num_retrieval_positives
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

    def plan(self, slot: int, epoch: int) -> SlotPlan:
        """Every batch of ``slot`` in ``epoch``."""
        return SlotPlan(self.layout.slots[slot], seed=self.cfg.seed, epoch=epoch, slot=slot, shuffle=self.shuffle,
                        shuffle_buffer=self.cfg.shuffle_buffer, batch_size=self.batch_size,
                        num_batches=self.layout.batches_per_slot)

    def slot_batches(self, slot_in_rank: int, consumed: int, epoch: int) -> Iterator[DIGBatch]:
        """The batches of one slot, skipping those already consumed by the rank.

        Args:
            slot_in_rank: worker index w (0 without workers).
            consumed: batches the rank already yielded this epoch (round-robin over workers).
            epoch: shuffle epoch.
        """
        W = self.layout.slots_per_rank
        skip = max(0, -(-(consumed - slot_in_rank) // W))
        yield from self._stream(self.plan(self.layout.slot(self.rank, slot_in_rank), epoch), skip)

    def _stream(self, plan: SlotPlan, skip: int) -> Iterator[DIGBatch]:
        """Batches ``skip ..`` of a slot. Windows are decoded and their batches built ahead by
        prefetch threads (in the main process ``depth`` windows, leaving a core to the
        consumer, the training step; inside a DataLoader worker one window on one thread, as
        the workers fill the cores); this thread hands the batches over and builds only those
        that straddle two windows or pad."""
        pending: Dict[int, Future] = {}
        in_worker = get_worker_info() is not None
        threads = 1 if in_worker else (self.cfg.reader_threads or _prefetch_threads())
        depth = 1 if in_worker else max(_PREFETCH_DEPTH, threads)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dig-reader-prefetch",
                                  initializer=_prefetch_thread_init)

        def load(w: int) -> _LoadedWindow:
            win = self.windows.load(plan.windows[w], plan.window_permutation(w))
            return win, self._window_batches(plan, w, win, skip)

        def window(w: int) -> _LoadedWindow:
            # window w (from the prefetch threads if already submitted); start w+1 .. w+depth
            # first, so that the threads already work while this thread waits or loads w itself
            fut = pending.pop(w, None)
            for nxt in range(w + 1, min(w + 1 + depth, len(plan.windows))):
                if nxt not in pending:
                    pending[nxt] = pool.submit(load, nxt)
            if fut is not None:
                return fut.result()
            with _single_thread():
                return load(w)

        try:
            current, win, built = -1, None, {}
            for b in range(skip, plan.num_batches):
                batch_plan = plan.batch(b)
                parts: List[Tuple[DecodedWindow, int, int]] = []
                for w, lo, hi in batch_plan.spans:
                    if w != current:
                        (win, built), current = window(w), w
                    parts.append((win, lo, hi))
                ready = built.pop(b, None)  # built with its window (the batch lies inside it)
                if ready is not None:
                    yield ready
                    continue
                with _single_thread():
                    batch = self._padding_batch(plan, b) if batch_plan.padding else self._batch(plan, b, parts)
                yield batch
        finally:
            for fut in pending.values():
                fut.cancel()
            pool.shutdown(wait=True)

    def _window_batches(self, plan: SlotPlan, w: int, win: DecodedWindow, first: int) -> Dict[int, DIGBatch]:
        """Every batch (index >= ``first``) lying inside window ``w``, with ONE u2i call for
        all their negatives."""
        w_start = int(plan.starts[w])
        rows: Dict[int, BatchRows] = {}
        draws: Dict[int, RetrievalDraw] = {}
        for b in plan.batches_in_window(w, first):
            lo, hi = plan.batch_rows(b)
            rows[b] = BatchRows.of_parts([(win, lo - w_start, hi - w_start)])
            if self.num_retrieval_positives:
                draws[b] = plan.draw_retrieval(b, rows[b].batch_label, rows[b].batch_item,
                                               self.num_retrieval_positives, self.sampler)
        if draws:
            window_negative_u2i(self.u2i_fn, win, [(rows[b].lo, d) for b, d in draws.items()])
        return {b: self.assembler.assemble(r, draws.get(b)) for b, r in rows.items()}

    def _batch(self, plan: SlotPlan, b: int, parts: List[Tuple[DecodedWindow, int, int]]) -> DIGBatch:
        """Batch ``b`` from its row ranges ``(window, first row, end row)`` (a batch that
        straddles windows, or the template row of a padding batch)."""
        rows = BatchRows.of_parts(parts)
        draw = None
        if self.num_retrieval_positives:
            draw = plan.draw_retrieval(b, rows.batch_label, rows.batch_item, self.num_retrieval_positives, self.sampler)
            negative_u2i(self.u2i_fn, parts, draw)
        return self.assembler.assemble(rows, draw)

    def _padding_batch(self, plan: SlotPlan, b: int) -> DIGBatch:
        """Weight-0 batch ``b``: copies of the split's first row (its retrieval rows drawn from
        batch ``b``'s generator like any batch's), to even out step counts across slots."""
        if self._padding_window is None:
            self._padding_window = self.windows.load([self.row_groups[0]])
        batch = self._batch(plan, b, [(self._padding_window, 0, 1)])
        batch.weights.zero_()
        batch.retrieval_weights.zero_()
        return batch


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
        W = self.reader.layout.slots_per_rank
        return self.reader.slot_batches((w + self.consumed) % W, self.consumed, self.epoch)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Batch assembly runs many small torch ops, where intra-op threads only add sync
    overhead: run them on one thread and restore after (see docs/benchmarks.md)."""
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
    thread starts with the process default (all cores), and OpenMP teams in several prefetch
    threads next to the main thread oversubscribe the cores (see docs/benchmarks.md). The
    setting is per thread; the main thread keeps its own."""
    torch.set_num_threads(1)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)

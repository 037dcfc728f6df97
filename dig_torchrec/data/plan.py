"""The plan of one slot's epoch: which rows make each batch, in which order, and every random draw.

Every batch of a slot is planned by :meth:`SlotPlan.batch`, and every random number the
reader uses comes from here, each from a generator seeded by (seed, epoch, slot, ...) only:

* shuffle (train): the slot's row groups are permuted (:meth:`SlotPlan.__init__`), grouped
  into windows of at least ``data.shuffle_buffer`` rows, and each window's rows are
  permuted (:meth:`SlotPlan.window_permutation`). Emission order = windows in order, each
  window's rows in permuted order; batch ``b`` is emission rows ``b*B .. (b+1)*B - 1``.
  Without shuffle every row group is a window of its own, in file order.
* retrieval rows (:meth:`SlotPlan.draw_retrieval`): batch ``b``'s own generator picks the
  clicks that become retrieval positives (a uniform subset, kept in batch order, when the
  batch has more than ``P_r`` clicks) and draws their negatives.

So a batch is a pure function of (seed, epoch, slot, batch index) and parquet metadata,
whichever thread builds it and in whichever order: resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from dig_torchrec.data.sampling import NegativeSampler, RetrievalDraw
from dig_torchrec.data.shards import RowGroup


@dataclass(frozen=True)
class BatchPlan:
    """Batch ``index`` of a slot: its rows as ``(window, first row, end row)`` spans in the
    windows' emission order (window-local rows); no spans = a weight-0 padding batch."""

    index: int
    spans: Tuple[Tuple[int, int, int], ...]

    @property
    def padding(self) -> bool:
        return not self.spans

    @property
    def window(self) -> Optional[int]:
        """The window holding every row of the batch, None if it straddles windows (or pads)."""
        return self.spans[0][0] if len(self.spans) == 1 else None


class SlotPlan:
    """Every batch of one slot in one epoch (see the module docstring).

    Args:
        groups: the slot's row groups (:class:`~dig_torchrec.data.shards.ShardLayout`).
        seed, epoch, slot: what every draw is seeded by.
        shuffle: block-shuffle the slot (train).
        shuffle_buffer: least rows per shuffle window.
        batch_size: B.
        num_batches: batches the slot yields (the longest slot's; short slots pad).
    """

    def __init__(self, groups: Sequence[RowGroup], *, seed: int, epoch: int, slot: int, shuffle: bool,
                 shuffle_buffer: int, batch_size: int, num_batches: int) -> None:
        self.seed, self.epoch, self.slot, self.shuffle = seed, epoch, slot, shuffle
        self.batch_size, self.num_batches = batch_size, num_batches
        groups = list(groups)
        if shuffle:
            order = np.random.default_rng([seed, epoch, slot, 7]).permutation(len(groups))
            groups = [groups[i] for i in order]
        self.windows: List[List[RowGroup]] = []
        cur: List[RowGroup] = []
        rows = 0
        target = shuffle_buffer if shuffle else 0
        for g in groups:
            cur.append(g)
            rows += g.num_rows
            if rows >= target:
                self.windows.append(cur)
                cur, rows = [], 0
        if cur:
            self.windows.append(cur)
        sizes = np.array([sum(g.num_rows for g in w) for w in self.windows], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # emission row of each window
        self.total = int(self.starts[-1])  # real rows of the slot
        self.real_batches = -(-self.total // batch_size)  # batches holding real rows

    def window_permutation(self, w: int) -> Optional[np.ndarray]:
        """Window ``w``'s emission order: emission row i = window (file order) row ``perm[i]``;
        None without shuffle."""
        if not self.shuffle:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, self.slot, 11, w])
        return rng.permutation(int(self.starts[w + 1] - self.starts[w]))

    def batch_rows(self, b: int) -> Tuple[int, int]:
        """Emission rows ``[lo, hi)`` of real batch ``b``."""
        return b * self.batch_size, min((b + 1) * self.batch_size, self.total)

    def batch(self, b: int) -> BatchPlan:
        """Batch ``b``: its spans over the windows, or padding beyond the slot's rows."""
        if b >= self.real_batches:
            return BatchPlan(b, ())
        lo, hi = self.batch_rows(b)
        spans = []
        pos = lo
        while pos < hi:
            w = int(np.searchsorted(self.starts, pos, side="right") - 1)
            end = min(hi, int(self.starts[w + 1]))
            spans.append((w, pos - int(self.starts[w]), end - int(self.starts[w])))
            pos = end
        return BatchPlan(b, tuple(spans))

    def batches_in_window(self, w: int, first: int = 0) -> range:
        """Indices ``>= first`` of the batches lying wholly inside window ``w`` (their
        :meth:`batch` has the single span of window ``w``)."""
        w_start, w_end = int(self.starts[w]), int(self.starts[w + 1])
        B = self.batch_size
        # batch b lies inside when b*B >= w_start and min((b+1)*B, total) <= w_end
        end = self.real_batches if w_end == self.total else w_end // B
        return range(max(first, -(-w_start // B)), end)

    def generator(self, b: int) -> torch.Generator:
        """The torch generator of batch ``b``'s retrieval draws."""
        seed = int(np.random.default_rng([self.seed, self.epoch, self.slot, 13, b]).integers(0, 2**62))
        return torch.Generator().manual_seed(seed)

    def draw_retrieval(self, b: int, label: np.ndarray, item: np.ndarray, positives: int,
                       sampler: NegativeSampler) -> RetrievalDraw:
        """Batch ``b``'s retrieval positives and negatives, from its own generator.

        Args:
            label, item: the batch's exposure rows (``[n]``; a padding batch passes its template row).
            positives: P_r, the retrieval positives per batch.
            sampler: the negative distribution.
        """
        gen = self.generator(b)
        clicks = np.flatnonzero(label > 0)
        if clicks.size > positives:  # overflow: a uniform subset, kept in batch order
            keep = torch.randperm(clicks.size, generator=gen)[:positives].numpy()
            keep.sort()
            clicks = clicks[keep]
        if not clicks.size:
            return RetrievalDraw(clicks, np.zeros((0, sampler.negatives), dtype=np.int64))
        return RetrievalDraw(clicks, sampler.sample(torch.from_numpy(item[clicks]), gen).numpy())

"""Retrieval rows (paper §4.1: "positive-only (y=1), full-corpus random negatives").

* How many: ``P_r`` retrieval positives per batch, ``data.retrieval_positives`` if > 0, else
  (0 = auto) ``ceil(2 * p_train * B)`` clamped to ``[1, B]`` (:func:`auto_retrieval_positives`).
* Which negatives: :class:`NegativeSampler`, ``data.negatives_per_positive`` items of the
  whole item table per positive, uniform or ``p(v) ~ (train_clicks(v) + 1) ** popularity_alpha``,
  never equal to the positive. (The draws themselves are seeded per batch by
  :class:`~dig_torchrec.data.plan.SlotPlan`.)
* Their u2i: computed by :class:`U2IFunction` from the click's ``user_state``
  (:func:`window_negative_u2i`, :func:`negative_u2i`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from dig_torchrec.data.decode import DecodedWindow
from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.shards import RowGroup, list_row_groups
from dig_torchrec.data.u2i import U2IFunction

logger = logging.getLogger(__name__)


@dataclass
class RetrievalDraw:
    """A batch's retrieval positives and their negatives.

    Attributes:
        clicks: int64 ``[c]`` batch rows of the clicks that are retrieval positives (``c <= P_r``).
        negatives: int64 ``[c, K]`` negative items of each positive.
        negative_u2i: float32 ``[c * K, d_c]`` u2i of each negative for its click's user state
            (filled in after the draw: :func:`window_negative_u2i`, :func:`negative_u2i`).
    """

    clicks: np.ndarray
    negatives: np.ndarray
    negative_u2i: Optional[np.ndarray] = None


def retrieval_positives_for(clicks: int, rows: int, batch_size: int) -> int:
    """The auto rule on integers: ``ceil(2 * clicks / rows * batch_size)`` in [1, batch_size]
    (``batch_size // 2`` when ``rows`` is 0). Exact integer arithmetic, the same on every rank."""
    positives = -(-2 * clicks * batch_size // rows) if rows else batch_size // 2
    return min(max(positives, 1), batch_size)


def auto_retrieval_positives(root: Path, items: ItemTable, batch_size: int,
                             train_groups: Optional[Sequence[RowGroup]] = None) -> int:
    """``data.retrieval_positives = 0`` (auto): ``ceil(2 * p_train * batch_size)`` in [1, batch_size].

    ``p_train`` = train clicks / train rows, with the clicks summed from the item table's
    train click counts (``items.parquet`` column ``train_clicks``, or the scan
    :class:`ItemTable` already made) and the rows from the parquet footers: no data scan,
    exact integer arithmetic, so every rank gets the same value. Twice the mean leaves room
    for the binomial spread of clicks per batch (a batch with more clicks than ``P_r`` fills
    its positives with a seeded uniform subset of them; the other clicks stay ordinary
    exposure rows, see :meth:`~dig_torchrec.data.plan.SlotPlan.draw_retrieval`). Falls back
    to ``batch_size // 2`` when the train split is missing.

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
    positives = retrieval_positives_for(clicks, rows, batch_size)
    logger.info("retrieval positives per batch (auto): %d (train click rate %d/%d, batch %d)",
                positives, clicks, rows, batch_size)
    return positives


class NegativeSampler:
    """Full-corpus negatives for retrieval positives.

    Args:
        items: the item table (``popularity`` = train click counts).
        negatives: K, negatives per positive.
        method: ``uniform`` or ``popularity`` (``p(v) ~ (train_clicks(v) + 1) ** alpha``).
        popularity_alpha: alpha.
    """

    def __init__(self, items: ItemTable, negatives: int, method: str = "uniform", popularity_alpha: float = 0.75) -> None:
        self.num_items = items.num_items
        self.negatives = negatives
        self.cdf: Optional[torch.Tensor] = None
        if method == "popularity":
            w = (items.popularity.double() + 1.0) ** popularity_alpha
            self.cdf = torch.cumsum(w / w.sum(), 0)

    def prob(self) -> Optional[torch.Tensor]:
        """``[num_items]`` p(v) (popularity sampling); None if uniform."""
        if self.cdf is None:
            return None
        return torch.diff(self.cdf, prepend=self.cdf.new_zeros(1)).float()

    def sample(self, positives: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``[len(positives), K]`` negatives, none equal to its row's positive item (a clash
        is moved by a uniform nonzero shift, when the corpus has more than one item)."""
        n_items = self.num_items
        shape = (positives.numel(), self.negatives)
        if self.cdf is None:
            neg = torch.randint(0, n_items, shape, generator=gen)
        else:
            u = torch.rand(shape, generator=gen, dtype=torch.float64)
            neg = torch.searchsorted(self.cdf, u).clamp(max=n_items - 1)
        if n_items > 1:
            clash = neg == positives[:, None]
            if bool(clash.any()):
                shift = torch.randint(1, n_items, shape, generator=gen)
                neg = torch.where(clash, (neg + shift) % n_items, neg)
        return neg


def window_negative_u2i(u2i_fn: U2IFunction, window: DecodedWindow,
                        draws: Sequence[Tuple[int, RetrievalDraw]]) -> None:
    """Fill ``negative_u2i`` of the draws of batches lying inside ``window`` with ONE
    :class:`U2IFunction` call (per-batch calls cost more in call overhead than in lookups).

    Args:
        draws: ``(first window row of the batch, its draw)`` per batch.
    """
    rows_all: List[np.ndarray] = []
    negs_all: List[np.ndarray] = []
    for a, draw in draws:
        if draw.clicks.size:
            rows_all.append(window.state_index(draw.clicks + a))
            negs_all.append(draw.negatives.reshape(-1))
    if not rows_all:
        return
    K = draws[0][1].negatives.shape[1]
    u2i = u2i_fn(window.states, torch.from_numpy(np.repeat(np.concatenate(rows_all), K)),
                 torch.from_numpy(np.concatenate(negs_all))).numpy()
    off = 0
    for _, draw in draws:
        m = draw.clicks.size * K
        if m:
            draw.negative_u2i = u2i[off:off + m]
            off += m


def negative_u2i(u2i_fn: U2IFunction, parts: Sequence[Tuple[DecodedWindow, int, int]], draw: RetrievalDraw) -> None:
    """Fill ``draw.negative_u2i`` of a batch made of window row ranges ``(window, a, b)``
    (one u2i call per window: the lookup runs directly on each window's user states, so no
    per-batch copy of the states is made)."""
    if not draw.clicks.size:
        return
    clicks, neg = draw.clicks, draw.negatives
    K = neg.shape[1]
    out = []
    first = 0  # batch row of the part's first row
    for w, a, b in parts:
        sel = (clicks >= first) & (clicks < first + b - a)
        if sel.any():
            rows = w.state_index(clicks[sel] - first + a)
            out.append(u2i_fn(w.states, torch.from_numpy(np.repeat(rows, K)),
                              torch.from_numpy(neg[sel].reshape(-1))).numpy())
        first += b - a
    draw.negative_u2i = np.concatenate(out) if len(out) > 1 else out[0]

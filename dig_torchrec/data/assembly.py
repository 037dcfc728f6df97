"""Batch assembly: decoded window rows + a retrieval draw -> one :class:`DIGBatch`.

A batch's exposure rows are ``B`` consecutive emission rows (the last real batch of a slot
pads with weight-0 copies of its first row); its retrieval rows are, per retrieval
positive, the click then its K negatives, carrying the click row's user-side features
(``P_r * (1 + K)`` rows; positives the batch lacks are weight-0 copies of the first one).
:func:`kernels.batch_dense` builds the dense tensors and :func:`kernels.batch_kjt` the KJT
values and lengths in one pass each (numba, no GIL), into fresh buffers per batch: batches
in flight in a training pipeline never share memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dig_torchrec.data import kernels
from dig_torchrec.data.batch import DIGBatch
from dig_torchrec.data.decode import DecodedWindow, History
from dig_torchrec.data.sampling import RetrievalDraw
from dig_torchrec.data.schema import FeatureSchema


@dataclass
class BatchRows:
    """The arrays a batch reads: its exposure rows are rows ``lo .. lo + n - 1`` of them.

    A batch inside one window reads the window's arrays in place; a batch that straddles
    windows gets a copy of the (few) rows of each (:meth:`of_parts`).
    """

    sparse_t: np.ndarray  # [U, rows] user + context ids, key-major
    item: np.ndarray  # [rows]
    label: np.ndarray  # [rows]
    u2i: np.ndarray  # [rows, d_c]
    hist: History
    lo: int
    n: int

    @classmethod
    def of_parts(cls, parts: Sequence[Tuple[DecodedWindow, int, int]]) -> "BatchRows":
        """Consecutive emission-order row ranges ``(window, first row, end row)``."""
        if len(parts) == 1:  # the common case: read the window's arrays in place
            w, lo, hi = parts[0]
            return cls(w.sparse_t, w.item, w.label, w.u2i, w.hist, lo, hi - lo)
        sparse_t = np.concatenate([w.sparse_t[:, a:b] for w, a, b in parts], axis=1)
        hist = History.of_ranges([(w.hist, a, b) for w, a, b in parts])
        item, label, u2i = (np.concatenate([getattr(w, c)[a:b] for w, a, b in parts]) for c in ("item", "label", "u2i"))
        return cls(sparse_t, item, label, u2i, hist, 0, int(item.shape[0]))

    @property
    def batch_label(self) -> np.ndarray:
        return self.label[self.lo:self.lo + self.n]

    @property
    def batch_item(self) -> np.ndarray:
        return self.item[self.lo:self.lo + self.n]


class BatchAssembler:
    """Builds :class:`DIGBatch` es of fixed shape.

    Args:
        schema: the feature layout (KJT key order, history length H).
        item_features: int64 ``[num_items, F]`` static item features.
        batch_size: B exposure rows.
        positives: P_r retrieval positives (0: no retrieval rows).
        negatives: K negatives per positive.
        u2i_dim: d_c.
    """

    def __init__(self, schema: FeatureSchema, item_features: np.ndarray, batch_size: int, positives: int,
                 negatives: int, u2i_dim: int) -> None:
        self.schema = schema
        self.item_features = np.ascontiguousarray(item_features, dtype=np.int64)
        self.batch_size, self.positives, self.negatives, self.u2i_dim = batch_size, positives, negatives, u2i_dim

    def assemble(self, rows: BatchRows, draw: Optional[RetrievalDraw]) -> DIGBatch:
        """One batch from its rows and its retrieval draw (None without retrieval rows)."""
        P, K, d_c = self.positives, self.negatives, self.u2i_dim
        clicks, neg, neg_u2i = np.zeros(0, dtype=np.int64), np.zeros((0, K), dtype=np.int64), None
        if P and draw is not None:
            clicks, neg, neg_u2i = draw.clicks, draw.negatives, draw.negative_u2i
        if neg_u2i is None:
            neg_u2i = np.zeros((0, d_c), dtype=np.float32)
        ex_u2i, ex_label, weights, positive_rows, group_items, r_u2i, r_labels, r_weights = kernels.batch_dense(
            rows.label, rows.u2i, rows.item, rows.lo, rows.n, self.batch_size, P, clicks, neg, neg_u2i)
        kjt = self.kjt(rows.sparse_t, rows.item, rows.hist, rows.lo, rows.n, positive_rows, group_items)
        return DIGBatch(sparse_features=kjt, u2i=torch.from_numpy(ex_u2i), labels=torch.from_numpy(ex_label),
                        weights=torch.from_numpy(weights),
                        retrieval_u2i=torch.from_numpy(r_u2i.reshape(P * (1 + K), d_c)),
                        retrieval_labels=torch.from_numpy(r_labels.reshape(-1)),
                        retrieval_weights=torch.from_numpy(r_weights.reshape(-1)))

    def kjt(self, sparse_t: np.ndarray, item: np.ndarray, hist: History, lo: int, n: int, positive_rows: np.ndarray,
            group_items: np.ndarray) -> KeyedJaggedTensor:
        """KJT in ``schema.keys`` order of the B exposure rows then the P*(1+K) retrieval rows.

        Same layout as :func:`~dig_torchrec.data.batch.make_kjt` (``length_per_key``/``offset_per_key``
        precomputed on the host, so the KJT never syncs to learn its layout).

        Args:
            sparse_t: ``[U, rows]`` user + context ids of the rows ``item`` and ``hist`` hold.
            item: ``[rows]`` item ids.
            hist: the rows' histories.
            lo, n: the batch's exposure rows are rows ``lo .. lo + n - 1``.
            positive_rows: ``[P]`` batch row (``0 .. n-1``) of each retrieval positive's click.
            group_items: ``[P, 1 + K]`` each positive's item then its negatives.
        """
        values, lengths, counts = kernels.batch_kjt(
            sparse_t, item, self.item_features, hist.vals, hist.last, hist.num, self.schema.history_length,
            lo, n, self.batch_size, positive_rows, group_items)
        N = self.batch_size + group_items.size
        S = sparse_t.shape[0] + self.item_features.shape[1]  # single-valued keys
        length_per_key = [N] * S + counts.tolist()
        offset_per_key = [0] + np.cumsum(length_per_key).tolist()
        return KeyedJaggedTensor(keys=self.schema.keys, values=torch.from_numpy(values),
                                 lengths=torch.from_numpy(lengths), stride=N, length_per_key=length_per_key,
                                 offset_per_key=offset_per_key)

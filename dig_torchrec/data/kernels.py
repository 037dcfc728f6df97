"""Compiled kernels of the reader's hot loop (numba, ``nogil``).

Why hand-written: no library here builds a KeyedJaggedTensor from a parquet window with
retrieval rows in one pass, and the numpy version of these loops (tens of small array ops
per batch, each holding the GIL between calls) cost the reader more CPU than decoding the
parquet itself and kept its prefetch threads from running in parallel. Each kernel below
is one pass over plain int64/float32 arrays that runs without the GIL, so the reader's
prefetch threads scale with the cores.

Every kernel is a pure function of its arguments (no randomness: all draws stay in the
reader's plan, seeded per batch: ``plan.py``), and ``tests/test_data_kernels.py`` checks each against a
straightforward numpy/python reference.

Indices are trusted: the reader validates ids when it decodes a window (ids in range or
hashed) and draws negatives inside the item table, so the kernels do not bounds-check.

Compiled code is cached on disk (``cache=True``: next to this file, else numba's user-wide
cache), so only the first process after an install pays the compile (a few seconds).
"""

from __future__ import annotations

import logging
from typing import Callable, Tuple

import numpy as np
import numba

logger = logging.getLogger(__name__)


def njit(*args, **kwargs) -> Callable:
    """``numba.njit`` with the on-disk cache when a cache location is writable (next to this
    file or numba's user-wide cache dir, ``NUMBA_CACHE_DIR``); otherwise compile per process."""

    def wrap(fn: Callable) -> Callable:
        try:
            return numba.njit(*args, **kwargs)(fn)
        except RuntimeError as e:  # "cannot cache function ...: no locator available"
            if not kwargs.get("cache"):
                raise
            logger.warning("numba cannot cache %s (%s); compiling it in every process", fn.__name__, e)
            return numba.njit(*args, **{**kwargs, "cache": False})(fn)

    return wrap


@njit(nogil=True, cache=True)
def batch_kjt(sparse_t: np.ndarray, item: np.ndarray, item_features: np.ndarray, hist_vals: np.ndarray,
              hist_last: np.ndarray, hist_num: np.ndarray, num_hist_keys: int, lo: int, n: int, batch_size: int,
              positive_rows: np.ndarray, group_items: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KJT values/lengths of one batch: B exposure rows, then P*(1+K) retrieval rows.

    Row layout (stride ``N = B + P * (1 + K)``): exposure row ``i < n`` is window row
    ``lo + i``; rows ``n .. B-1`` pad with copies of row ``lo``; retrieval row
    ``B + p * (1 + K) + k`` has the user-side features of window row ``lo + positive_rows[p]``
    and item ``group_items[p, k]``. Keys (key-major, like :func:`make_kjt`): the U user and
    context keys (``sparse_t`` rows), the F item features (``item_features`` columns,
    gathered by each row's item), then ``hist_0 .. hist_{H-1}`` where ``hist_j`` of window
    row r is ``hist_vals[hist_last[r] - j]`` when ``j < hist_num[r]`` and absent otherwise.

    Args:
        sparse_t: int64 ``[U, rows]`` user + context ids of the window (key-major).
        item: int64 ``[rows]`` item ids of the window.
        item_features: int64 ``[num_items, F]`` static item features.
        hist_vals, hist_last, hist_num: the window's history (:class:`decode.History`).
        num_hist_keys: H.
        lo, n: first window row and real rows of the batch (``1 <= n <= batch_size``).
        batch_size: B.
        positive_rows: int64 ``[P]`` batch row of each retrieval positive's click.
        group_items: int64 ``[P, 1 + K]`` each retrieval group: the positive then its negatives.

    Returns:
        ``(values int64, lengths int32 [(U + F + H) * N], hist_counts int64 [H])``.
    """
    U = sparse_t.shape[0]
    F = item_features.shape[1]
    H = num_hist_keys
    P = group_items.shape[0]
    R1 = group_items.shape[1]
    B = batch_size
    N = B + P * R1
    S = U + F
    src = np.empty(N, dtype=np.int64)  # window row of every KJT row
    items = np.empty(N, dtype=np.int64)
    for i in range(n):
        src[i] = lo + i
        items[i] = item[lo + i]
    for i in range(n, B):
        src[i] = lo
        items[i] = item[lo]
    for p in range(P):
        r = lo + positive_rows[p]
        for k in range(R1):
            src[B + p * R1 + k] = r
            items[B + p * R1 + k] = group_items[p, k]
    rows_with = np.zeros(H + 1, dtype=np.int64)  # rows_with[m]: rows with m history ids
    for i in range(N):
        rows_with[min(hist_num[src[i]], H)] += 1
    counts = np.empty(H, dtype=np.int64)  # counts[j]: rows having hist_j = rows with > j ids
    acc = 0
    for j in range(H, 0, -1):
        acc += rows_with[j]
        counts[j - 1] = acc
    values = np.empty(S * N + counts.sum(), dtype=np.int64)
    lengths = np.empty((S + H) * N, dtype=np.int32)
    for u in range(U):
        base = u * N
        for i in range(N):
            values[base + i] = sparse_t[u, src[i]]
    for i in range(N):  # item-major table: one cache line per row's item
        v = items[i]
        for f in range(F):
            values[(U + f) * N + i] = item_features[v, f]
    lengths[:S * N] = 1
    lengths[S * N:] = 0
    cursor = np.empty(H, dtype=np.int64)  # write position of the next id of each hist key
    pos = S * N
    for j in range(H):
        cursor[j] = pos
        pos += counts[j]
    for i in range(N):  # row-major: each row's ids are read once, in one run of hist_vals
        r = src[i]
        last = hist_last[r]
        for j in range(min(hist_num[r], H)):
            values[cursor[j]] = hist_vals[last - j]
            cursor[j] += 1
            lengths[(S + j) * N + i] = 1
    return values, lengths, counts


@njit(nogil=True, cache=True)
def history_rows(hist_vals: np.ndarray, hist_last: np.ndarray, hist_num: np.ndarray, rows: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A compact history of the given rows only: ``(vals, last, num)`` in the same form as
    the input (row i of the result = input row ``rows[i]``, its ``num`` most recent ids,
    oldest first, ending at ``vals[last[i]]``), so that consecutive rows' ids are one run."""
    m = rows.size
    num = np.empty(m, dtype=np.int64)
    total = 0
    for i in range(m):
        num[i] = hist_num[rows[i]]
        total += num[i]
    vals = np.empty(total, dtype=np.int64)
    last = np.empty(m, dtype=np.int64)
    pos = 0
    for i in range(m):
        r = rows[i]
        first = hist_last[r] - num[i] + 1
        for k in range(num[i]):
            vals[pos + k] = hist_vals[first + k]
        pos += num[i]
        last[i] = pos - 1
    return vals, last, num


@njit(nogil=True, cache=True)
def _lower_bound(keys: np.ndarray, a: int, b: int, q: int) -> int:
    """First index in ``[a, b)`` whose key is >= q (``b`` if none); ``keys[a:b]`` ascending."""
    while a < b:
        mid = (a + b) >> 1
        if keys[mid] < q:
            a = mid + 1
        else:
            b = mid
    return a


@njit(nogil=True, cache=True)
def segmented_search(offsets: np.ndarray, keys: np.ndarray, state_index: np.ndarray, query: np.ndarray
                     ) -> np.ndarray:
    """Entry index of ``query[m]`` inside state ``state_index[m]``, or -1 if absent.

    State s owns ``keys[offsets[s] : offsets[s + 1]]`` (ascending): one binary search per
    query, no index over all the states.
    """
    M = query.size
    out = np.empty(M, dtype=np.int64)
    for m in range(M):
        s = state_index[m]
        end = offsets[s + 1]
        a = _lower_bound(keys, offsets[s], end, query[m])
        out[m] = a if (a < end and keys[a] == query[m]) else -1
    return out


@njit(nogil=True, cache=True)
def single_key_stats(offsets: np.ndarray, keys: np.ndarray, stat_cols, state_index: np.ndarray,
                     item_ids: np.ndarray, item_keys: np.ndarray) -> np.ndarray:
    """Per-field statistics of candidates whose every u2i field has one key (the u2i input).

    ``out[i, f, j]`` = stat j of key ``item_keys[f, item_ids[i]]`` in state
    ``state_index[i]`` (0 when the state lacks the key), as float64. The fields' keys are
    disjoint ascending ranges and a state's keys are sorted, so field f+1 is searched only
    after field f's position, and a query's fields are looked up while its state is in cache.

    Args:
        offsets, keys: the states (state s owns ``keys[offsets[s]:offsets[s+1]]``, ascending).
        stat_cols: tuple of S float32 arrays aligned with ``keys``.
        state_index: int64 ``[n]``; item_ids: int64 ``[n]``.
        item_keys: int64 ``[F, num_items]`` global u2i key of each (field, item).
    """
    n = item_ids.size
    F = item_keys.shape[0]
    S = len(stat_cols)
    out = np.zeros((n, F, S), dtype=np.float64)
    for i in range(n):
        s = state_index[i]
        a = offsets[s]
        end = offsets[s + 1]
        v = item_ids[i]
        for f in range(F):
            q = item_keys[f, v]
            a = _lower_bound(keys, a, end, q)
            if a < end and keys[a] == q:
                for j in range(S):
                    out[i, f, j] = stat_cols[j][a]
    return out


@njit(nogil=True, cache=True)
def batch_dense(label: np.ndarray, u2i: np.ndarray, item: np.ndarray, lo: int, n: int, batch_size: int,
                num_positives: int, clicks: np.ndarray, neg: np.ndarray, neg_u2i: np.ndarray):
    """The dense tensors and retrieval groups of one batch (rows as in :func:`batch_kjt`).

    Exposure rows ``i < n`` are rows ``lo + i`` (weight 1), rows ``n .. B-1`` copy row
    ``lo`` (weight 0). Retrieval group ``p < len(clicks)`` holds the click at batch row
    ``clicks[p]`` (label 1, its stored u2i) then its K negatives ``neg[p]`` (label 0, u2i
    ``neg_u2i[p * K : (p + 1) * K]``), all with weight 1; the other groups copy group 0 with
    weight 0 (with no click at all, every group row is exposure row 0: the positive's item
    and u2i repeated).

    Args:
        label: float32 ``[rows]``; u2i: float32 ``[rows, d_c]``; item: int64 ``[rows]``.
        lo, n, batch_size: the batch's rows (see :func:`batch_kjt`).
        num_positives: P.
        clicks: int64 ``[c]`` batch rows of the clicks that are retrieval positives (``c <= P``).
        neg: int64 ``[c, K]``; neg_u2i: float32 ``[c * K, d_c]``.

    Returns:
        ``(u2i [B, d_c], labels [B], weights [B], positive_rows [P], group_items [P, 1 + K],
        retrieval_u2i [P, 1 + K, d_c], retrieval_labels [P, 1 + K], retrieval_weights [P, 1 + K])``.
    """
    B = batch_size
    d = u2i.shape[1]
    P = num_positives
    K = neg.shape[1]
    R1 = K + 1
    real = clicks.size
    ex_u2i = np.empty((B, d), dtype=np.float32)
    ex_label = np.empty(B, dtype=np.float32)
    weights = np.zeros(B, dtype=np.float32)
    for i in range(B):
        r = lo + i if i < n else lo
        ex_label[i] = label[r]
        for c in range(d):
            ex_u2i[i, c] = u2i[r, c]
        if i < n:
            weights[i] = 1.0
    positive_rows = np.zeros(P, dtype=np.int64)
    group_items = np.empty((P, R1), dtype=np.int64)
    r_u2i = np.empty((P, R1, d), dtype=np.float32)
    r_labels = np.zeros((P, R1), dtype=np.float32)
    r_weights = np.zeros((P, R1), dtype=np.float32)
    for p in range(P):
        r_labels[p, 0] = 1.0
        if real == 0:  # no click: every group row is exposure row 0, weight 0
            for k in range(R1):
                group_items[p, k] = item[lo]
                for c in range(d):
                    r_u2i[p, k, c] = u2i[lo, c]
            continue
        q = p if p < real else 0  # padding groups copy group 0
        row = lo + clicks[q]
        positive_rows[p] = clicks[q]
        group_items[p, 0] = item[row]
        for c in range(d):
            r_u2i[p, 0, c] = u2i[row, c]
        for k in range(K):
            group_items[p, 1 + k] = neg[q, k]
            for c in range(d):
                r_u2i[p, 1 + k, c] = neg_u2i[q * K + k, c]
        if p < real:
            for k in range(R1):
                r_weights[p, k] = 1.0
    return ex_u2i, ex_label, weights, positive_rows, group_items, r_u2i, r_labels, r_weights

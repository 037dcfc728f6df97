"""The reader's compiled kernels (dig_torchrec.data.kernels) against plain python references."""

from __future__ import annotations

from typing import List

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from dig_torchrec.data import kernels
from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.u2i import ArrowUserStates, U2IFunction, UserStates


def _random_lists(rng: np.random.Generator, rows: int, max_len: int) -> List[List[int]]:
    return [rng.integers(0, 1000, int(rng.integers(0, max_len + 1))).tolist() for _ in range(rows)]


def _csr(lists: List[List[int]]):
    offs = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offs[1:])
    vals = np.array([v for x in lists for v in x], dtype=np.int64)
    return offs, vals


@pytest.mark.parametrize("seed", range(3))
def test_history_rows_keeps_each_rows_most_recent_ids_in_the_given_order(seed):
    rng = np.random.default_rng(seed)
    H = int(rng.integers(1, 8))
    lists = _random_lists(rng, 200, 12)
    offs, vals = _csr(lists)
    perm = rng.permutation(len(lists)).astype(np.int64)
    out_vals, last, num = kernels.history_rows(vals, offs[1:] - 1, np.minimum(np.diff(offs), H), perm)
    pos = 0
    for i, r in enumerate(perm):
        keep = lists[r][max(0, len(lists[r]) - H):]  # the min(len, H) most recent, oldest first
        assert num[i] == len(keep)
        assert out_vals[pos:pos + len(keep)].tolist() == keep  # rows' runs are consecutive
        pos += len(keep)
        assert last[i] == pos - 1
    assert pos == out_vals.size
    # history_rows on a subset gives the same runs for those rows
    rows = rng.integers(0, len(lists), 40).astype(np.int64)
    sub_vals, sub_last, sub_num = kernels.history_rows(out_vals, last, num, rows)
    for i, r in enumerate(rows):
        assert sub_num[i] == num[r]
        assert sub_vals[sub_last[i] - sub_num[i] + 1:sub_last[i] + 1].tolist() == \
            out_vals[last[r] - num[r] + 1:last[r] + 1].tolist()


def _kjt_reference(sparse_t, item, item_features, hist_lists, H, lo, n, B, positive_rows, group_items):
    """Per-key values/lengths of the batch, row by row in python."""
    P, R1 = group_items.shape
    src = [lo + i for i in range(n)] + [lo] * (B - n) + [lo + int(positive_rows[p]) for p in range(P) for _ in range(R1)]
    items = [int(item[r]) for r in src[:B]] + group_items.reshape(-1).tolist()
    values, lengths = [], []
    for u in range(sparse_t.shape[0]):
        values.append([int(sparse_t[u, r]) for r in src])
        lengths.append([1] * len(src))
    for f in range(item_features.shape[1]):
        values.append([int(item_features[v, f]) for v in items])
        lengths.append([1] * len(src))
    for j in range(H):
        h = [hist_lists[r][-1 - j] if len(hist_lists[r]) > j else None for r in src]
        values.append([x for x in h if x is not None])
        lengths.append([int(x is not None) for x in h])
    return values, lengths


@pytest.mark.parametrize("seed,P,n", [(0, 0, 64), (1, 5, 64), (2, 5, 37), (3, 9, 1)])
def test_batch_kjt_equals_a_row_by_row_reference(seed, P, n):
    """Exposure rows, padding rows (copies of row lo) and retrieval rows (the click row's
    user side, the slot's items) for every key, with the right per-key counts."""
    rng = np.random.default_rng(seed)
    rows, B, H, K = 300, 64, 4, 3
    sparse_t = rng.integers(0, 50, (3, rows))
    item = rng.integers(0, 40, rows)
    item_features = rng.integers(0, 9, (40, 2))
    lists = _random_lists(rng, rows, 7)
    offs, vals = _csr(lists)
    hv, hl, hn = kernels.history_rows(vals, offs[1:] - 1, np.minimum(np.diff(offs), H),
                                      np.arange(rows, dtype=np.int64))
    lo = int(rng.integers(0, rows - B))
    positive_rows = np.sort(rng.choice(n, min(P, n), replace=False)).astype(np.int64)
    positive_rows = np.concatenate([positive_rows, np.zeros(P - positive_rows.size, dtype=np.int64)])
    group_items = rng.integers(0, 40, (P, 1 + K))
    values, lengths, counts = kernels.batch_kjt(sparse_t, item, item_features, hv, hl, hn, H, lo, n, B,
                                                positive_rows, group_items)
    ref_v, ref_l = _kjt_reference(sparse_t, item, item_features, lists, H, lo, n, B, positive_rows, group_items)
    N = B + P * (1 + K)
    assert lengths.dtype == np.int32 and lengths.size == len(ref_l) * N
    assert lengths.reshape(-1, N).tolist() == ref_l
    assert counts.tolist() == [len(v) for v in ref_v[-H:]]
    assert values.tolist() == [x for v in ref_v for x in v]


@pytest.mark.parametrize("clicks", [[3, 10, 11], [], [0, 1, 2, 3, 4, 5]])
def test_batch_dense_fills_exposure_and_retrieval_rows(clicks):
    rng = np.random.default_rng(len(clicks))
    rows, B, P, K, d = 100, 16, 6, 2, 3
    lo, n = 20, 13
    label = (rng.random(rows) < 0.5).astype(np.float32)
    u2i = rng.random((rows, d), dtype=np.float32)
    item = rng.integers(0, 50, rows)
    clicks = np.array(clicks, dtype=np.int64)
    neg = rng.integers(0, 50, (clicks.size, K))
    neg_u2i = rng.random((clicks.size * K, d), dtype=np.float32)
    ex_u2i, ex_label, w, positive_rows, group_items, r_u2i, r_lab, r_w = kernels.batch_dense(
        label, u2i, item, lo, n, B, P, clicks, neg, neg_u2i)
    src = [lo + i for i in range(n)] + [lo] * (B - n)
    assert np.array_equal(ex_u2i, u2i[src]) and np.array_equal(ex_label, label[src])
    assert w.tolist() == [1.0] * n + [0.0] * (B - n)
    assert np.array_equal(r_lab, np.tile(np.array([1.0] + [0.0] * K, dtype=np.float32), (P, 1)))
    real = clicks.size
    for p in range(P):
        q = p if p < real else 0
        assert r_w[p].tolist() == [float(p < real)] * (1 + K)
        if real == 0:  # every slot row is exposure row 0
            assert positive_rows[p] == 0 and (group_items[p] == item[lo]).all() and (r_u2i[p] == u2i[lo]).all()
            continue
        assert positive_rows[p] == clicks[q]
        assert group_items[p].tolist() == [item[lo + clicks[q]]] + neg[q].tolist()
        assert np.array_equal(r_u2i[p, 0], u2i[lo + clicks[q]])
        assert np.array_equal(r_u2i[p, 1:], neg_u2i[q * K:(q + 1) * K])


def test_single_key_stats_on_arrow_view_states_equals_the_composite_index(tiny_dataset, tiny_meta_schema):
    """U2IFunction's compiled path over the reader's zero-copy states of a SLICED column
    (offsets not starting at 0) equals the composite-index path on copied states."""
    meta, schema = tiny_meta_schema
    fn = U2IFunction(meta, ItemTable.load(tiny_dataset, schema).u2i_keys)
    col = pads.dataset(str(tiny_dataset / "train")).to_table(columns=["user_state"]).column("user_state")
    arr = col.combine_chunks().slice(101, 2000)
    view = ArrowUserStates.from_arrow_view(arr, meta.u2i_stats)
    assert isinstance(view, ArrowUserStates) and int(view._np_offsets[0]) > 0
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.integers(0, len(view), 500))
    items = torch.from_numpy(rng.integers(0, fn.num_items, 500))
    assert view.prefers_segmented(500 * len(fn.spec.fields))
    got = fn(view, rows, items)
    ref = UserStates.from_arrow(arr, meta.u2i_stats)
    ref.composite(fn.stride)  # force the index path
    assert not ref.prefers_segmented(1)
    want = fn(ref, rows, items)
    assert torch.equal(got, want)
    assert (got != 0).any()  # some candidates hit stored keys


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """Where numba finds no cache location (read-only install, no writable home), the
    kernels still compile, per process, instead of failing at import."""
    import numba

    real = numba.njit
    calls = []

    def no_locator(*args, **kwargs):
        calls.append(kwargs.get("cache"))
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_locator)

    @kernels.njit(nogil=True, cache=True)
    def add_one(x):
        return x + 1

    assert calls == [True, False]
    assert add_one(np.arange(3)).tolist() == [1, 2, 3]

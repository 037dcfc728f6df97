"""u2i: exact recomputation from user_state, no leakage, vectorized full-corpus scoring."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from dig_torchrec.data.build import compute_prefix_features, item_key_csr
from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.data.u2i import U2IFunction, U2ISpec, UserStates, u2i_from_field_stats


def _all_rows(root: Path) -> pa.Table:
    tables = [pads.dataset(str(root / s)).to_table() for s in ("train", "valid", "test")]
    return pa.concat_tables(tables)


@pytest.mark.parametrize("split", ["train", "valid", "test", "retrieval/test"])
def test_recomputing_u2i_from_user_state_reproduces_the_stored_column(tiny_dataset, tiny_meta_schema, split):
    meta, schema = tiny_meta_schema
    fn = U2IFunction(meta, ItemTable.load(tiny_dataset, schema).u2i_keys)
    path = tiny_dataset / (split + ".parquet" if split.startswith("retrieval") else split)
    table = pads.dataset(str(path)).to_table()
    clicks = np.flatnonzero(table.column("label").to_numpy() > 0)
    assert clicks.size > 0
    states = UserStates.from_arrow(table.column("user_state"))
    got = fn(states, torch.from_numpy(clicks), torch.from_numpy(table.column("item_id").to_numpy()[clicks]))
    stored = np.stack(table.column("u2i").to_numpy(zero_copy_only=False))[clicks]
    assert torch.equal(got, torch.from_numpy(stored.astype(np.float32)))  # bitwise


def test_u2i_and_state_use_only_strictly_earlier_events(tiny_dataset, tiny_meta_schema):
    """Independent python recomputation of the prefix statistics for a sample of users."""
    meta, schema = tiny_meta_schema
    spec = U2ISpec.from_meta(meta)
    items = pq.read_table(tiny_dataset / "items.parquet").to_pydict()
    cat, brand = items["category"], items["brand"]
    off = spec.key_offsets
    t = _all_rows(tiny_dataset).to_pydict()
    by_user = collections.defaultdict(list)
    for i in range(len(t["user_id"])):
        by_user[t["user_id"][i]].append(i)
    users = sorted(by_user)[:: max(1, len(by_user) // 25)]
    checked = 0
    for u in users:
        rows = sorted(by_user[u], key=lambda i: t["timestamp"][i])
        for i in rows:
            state = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
            hist = []
            for j in rows:  # strictly earlier timestamps only
                if t["timestamp"][j] >= t["timestamp"][i]:
                    continue
                it = t["item_id"][j]
                lab = t["label"][j]
                for key in (off[0] + cat[it], off[1] + brand[it]):
                    state[key][0] += 1
                    state[key][1] += lab
                if lab:
                    hist.append(it)
            assert t["history"][i] == hist[-meta.history_length:]
            it = t["item_id"][i]
            exp = []
            for key in (off[0] + cat[it], off[1] + brand[it]):
                n, c, _ = state.get(key, (0.0, 0.0, 0.0))
                exp += [math.log1p(n), c / max(n, 1)]
            got = t["u2i"][i]
            np.testing.assert_allclose([got[0], got[1], got[3], got[4]], exp, rtol=1e-6)
            if t["label"][i]:
                st = {d["key"]: (d["exposures"], d["clicks"]) for d in t["user_state"][i]}
                assert st == {k: (v[0], v[1]) for k, v in state.items()}
            checked += 1
    assert checked > 200


def test_changing_a_later_event_never_changes_earlier_rows():
    rng = np.random.default_rng(0)
    n_items = 30
    meta = DatasetMeta(name="t", num_users=3, num_items=n_items, user_features={}, context_features={},
                       item_features={"category": 5}, u2i_dim=3, history_length=4, u2i_fields=["category"],
                       u2i_stats=["exposures", "clicks", "value_sum"])
    spec = U2ISpec.from_meta(meta)
    cat = rng.integers(0, 5, n_items)
    keys = item_key_csr(spec, [(np.arange(n_items + 1), cat)])
    n = 60
    user = np.sort(rng.integers(0, 3, n))
    ts = np.concatenate([np.sort(rng.integers(0, 20, (user == u).sum())) for u in range(3)])  # with ties
    item = rng.integers(0, n_items, n)
    label = rng.integers(0, 2, n)
    inc = np.stack([np.ones(n), label, label * 2.0], 1)
    base = compute_prefix_features(user, ts, item, label, inc, keys, spec, 4)
    for k in range(n):
        lab2 = label.copy()
        lab2[k] ^= 1
        inc2 = np.stack([np.ones(n), lab2, lab2 * 2.0], 1)
        other = compute_prefix_features(user, ts, item, lab2, inc2, keys, spec, 4)
        not_later = (user != user[k]) | (ts <= ts[k])
        assert np.array_equal(base.u2i[not_later], other.u2i[not_later])
        later = (user == user[k]) & (ts > ts[k]) & (cat[item] == cat[item[k]])
        if later.any():
            assert not np.array_equal(base.u2i[later], other.u2i[later])


def test_u2i_formula():
    agg = torch.tensor([[[0.0, 0.0, 0.0]], [[4.0, 1.0, 3.0]]], dtype=torch.float64)
    out = u2i_from_field_stats(agg, ["log1p", "rate", "log1p"])
    assert out.dtype == torch.float32
    expect = torch.tensor([[0.0, 0.0, 0.0], [math.log1p(4), 0.25, math.log1p(3)]], dtype=torch.float32)
    assert torch.allclose(out, expect)


def test_full_corpus_u2i_is_vectorized_and_matches_per_item(tiny_dataset, tiny_meta_schema):
    meta, schema = tiny_meta_schema
    items = ItemTable.load(tiny_dataset, schema)
    fn = U2IFunction(meta, items.u2i_keys)
    table = pads.dataset(str(tiny_dataset / "retrieval" / "test.parquet")).to_table()
    states = UserStates.from_arrow(table.column("user_state")).select(torch.tensor([0]))
    all_items = torch.arange(items.num_items)
    full = fn(states, torch.zeros(1, dtype=torch.long), all_items)
    assert full.shape == (items.num_items, meta.u2i_dim)
    for v in (0, 7, items.num_items - 1):
        assert torch.equal(full[v], fn(states, torch.tensor([0]), torch.tensor([v]))[0])
    assert (full != 0).any()


def test_full_corpus_u2i_is_exact_at_500k_candidates():
    n_items = 500_000
    meta = DatasetMeta(name="big", num_users=1, num_items=n_items, user_features={}, context_features={},
                       item_features={"category": 1000, "brand": 20000}, u2i_dim=6, history_length=1,
                       u2i_fields=["category", "brand"], u2i_stats=["exposures", "clicks", "value_sum"])
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(np.stack([np.arange(n_items), rng.integers(0, 1000, n_items),
                                       rng.integers(0, 20000, n_items)], 1))
    spec = U2ISpec.from_meta(meta)
    ar = torch.arange(n_items + 1)
    items = ItemTable(feats, ["item_id", "category", "brand"], torch.zeros(n_items),
                      [(ar, feats[:, 1] + spec.key_offsets[0]), (ar, feats[:, 2] + spec.key_offsets[1])])
    keys = torch.from_numpy(np.sort(rng.choice(spec.num_keys, 300, replace=False)))
    states = UserStates(torch.tensor([0, 300]), keys, torch.rand(300, 3) * 10)
    out = U2IFunction(meta, items.u2i_keys)(states, torch.zeros(1, dtype=torch.long), torch.arange(n_items))
    assert out.shape == (n_items, 6)
    hit = torch.isin(feats[:, 2] + spec.key_offsets[1], keys)
    assert (out[hit, 3] > 0).all() and (out[~hit, 3] == 0).all()


def test_user_states_roundtrip_and_select():
    offsets = np.array([0, 2, 2, 5])
    keys = np.array([1, 4, 0, 3, 9])
    stats = np.arange(15, dtype=np.float32).reshape(5, 3)
    arr = UserStates(torch.from_numpy(offsets), torch.from_numpy(keys), torch.from_numpy(stats)).to_arrow(
        ["a", "b", "c"], valid=np.array([True, False, True]))
    assert arr.null_count == 1
    st = UserStates.from_arrow(arr)
    assert st.offsets.tolist() == [0, 2, 2, 5] and st.keys.tolist() == keys.tolist()
    sub = st.select(torch.tensor([2, 0, 2]))
    assert sub.offsets.tolist() == [0, 3, 5, 8]
    assert sub.keys.tolist() == [0, 3, 9, 1, 4, 0, 3, 9]
    got = sub.lookup(torch.tensor([0, 1, 1, 2]), torch.tensor([3, 4, 9, 5]), stride=16)
    assert got[:, 0].tolist() == [9.0, 3.0, 0.0, 0.0]


def _random_states(rng: np.random.Generator, num_states: int, num_keys: int, num_stats: int = 3) -> UserStates:
    """Random jagged states with many empty ones (first, last and in between)."""
    lens = rng.integers(0, 8, num_states) * (rng.random(num_states) < 0.6)
    if num_states > 1:
        lens[0] = lens[-1] = 0
    lens = np.minimum(lens, num_keys)
    offsets = np.zeros(num_states + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    keys = [np.sort(rng.choice(num_keys, int(n), replace=False)) for n in lens]
    keys = np.concatenate(keys).astype(np.int64) if offsets[-1] else np.zeros(0, dtype=np.int64)
    stats = rng.random((int(offsets[-1]), num_stats)).astype(np.float32) * 10
    return UserStates(torch.from_numpy(offsets), torch.from_numpy(keys), torch.from_numpy(stats))


@pytest.mark.parametrize("seed", range(6))
def test_segmented_lookup_equals_the_composite_index_lookup(seed):
    """The per-state binary search (reader windows) returns exactly the composite-index
    lookup (and a per-query dict reference), including empty and absent states/keys."""
    rng = np.random.default_rng(seed)
    num_states, num_keys = int(rng.integers(1, 40)), int(rng.integers(1, 50))
    states = _random_states(rng, num_states, num_keys)
    m = int(rng.integers(0, 300))
    si = torch.from_numpy(rng.integers(0, num_states, m))
    keys = torch.from_numpy(rng.integers(0, num_keys, m))
    seg = torch.from_numpy(states.lookup_segmented(si.numpy(), keys.numpy()))
    comp = UserStates(states.offsets, states.keys, states.stats)
    comp.composite(num_keys)  # a built index: lookup() takes the composite path
    assert torch.equal(seg, comp.lookup(si, keys, num_keys))
    off, k, st = states.offsets.tolist(), states.keys.tolist(), states.stats
    for q in range(m):
        row = dict(zip(k[off[si[q]]:off[si[q] + 1]], range(off[si[q]], off[si[q] + 1])))
        want = st[row[int(keys[q])]] if int(keys[q]) in row else torch.zeros(st.shape[1])
        assert torch.equal(seg[q], want)
    # few queries on many entries: lookup() itself takes the segmented path
    fresh = UserStates(states.offsets, states.keys, states.stats)
    small = slice(0, max(0, min(m, int(states.keys.numel()) - 1)))
    assert torch.equal(fresh.lookup(si[small], keys[small], num_keys), seg[small])


def test_u2i_of_a_reader_window_matches_per_state_recomputation(tiny_dataset, tiny_meta_schema):
    """U2IFunction on many states with few queries (the segmented path, all fields in one
    lookup) equals the composite path and, for the click itself, the stored u2i bit for bit."""
    meta, schema = tiny_meta_schema
    fn = U2IFunction(meta, ItemTable.load(tiny_dataset, schema).u2i_keys)
    table = pads.dataset(str(tiny_dataset / "train")).to_table()
    clicks = np.flatnonzero(table.column("label").to_numpy() > 0)
    states = UserStates.from_arrow(table.column("user_state"))
    assert clicks.size < states.keys.numel()
    item = torch.from_numpy(table.column("item_id").to_numpy()[clicks])
    got = fn(states, torch.from_numpy(clicks), item)
    assert states._composite is None  # the segmented path ran
    stored = np.stack(table.column("u2i").to_numpy(zero_copy_only=False))[clicks]
    assert torch.equal(got, torch.from_numpy(stored.astype(np.float32)))
    neg = torch.from_numpy(np.random.default_rng(0).integers(0, fn.num_items, clicks.size * 3))
    rows = torch.from_numpy(np.repeat(clicks, 3))
    seg = fn(states, rows, neg)
    states.composite(fn.stride)
    assert torch.equal(seg, fn(states, rows, neg))


def test_arrow_view_states_equal_the_copied_states(tiny_dataset):
    """``ArrowUserStates.from_arrow_view`` (the reader's zero-copy states) looks up and
    materializes exactly what ``UserStates.from_arrow`` copies: null states, sliced and
    chunked columns, and (fallback) nulls that own entries."""
    from dig_torchrec.data.u2i import ArrowUserStates

    col = pads.dataset(str(tiny_dataset / "train")).to_table(columns=["user_state"]).column("user_state")
    arr = col.combine_chunks()
    assert arr.null_count > 0
    offs = arr.offsets.to_numpy()
    owning = pa.ListArray.from_arrays(pa.array(offs), arr.values,
                                      mask=pa.array((np.arange(len(arr)) % 4 == 0) & (np.diff(offs) > 0)))
    rng = np.random.default_rng(0)
    cases = [(arr, True), (arr.slice(37, 500), True), (pa.chunked_array([arr]), True),
             (pa.chunked_array([arr.slice(0, 100), arr.slice(100)]), False), (owning, False)]
    for array, zero_copy in cases:
        ref = UserStates.from_arrow(array)
        names = [f.name for f in ref_type_fields(array)]
        view = ArrowUserStates.from_arrow_view(array, names)
        assert isinstance(view, ArrowUserStates) == zero_copy
        assert len(view) == len(ref) and view.num_stats == ref.num_stats
        si = rng.integers(0, len(ref), 400)
        present = ref.keys.numpy()
        stored = rng.choice(present, 400) if present.size else 0
        keys = np.where(rng.random(400) < 0.5, stored, rng.integers(0, 3000, 400))
        assert np.array_equal(view.lookup_segmented(si, keys), ref.lookup_segmented(si, keys))
        for a, b in ((view.offsets, ref.offsets), (view.keys, ref.keys), (view.stats, ref.stats)):
            assert torch.equal(a, b)
        assert torch.equal(view.lookup(torch.from_numpy(si), torch.from_numpy(keys), 4096),
                           ref.lookup(torch.from_numpy(si), torch.from_numpy(keys), 4096))


def ref_type_fields(array):
    t = array.type.value_type
    return [t.field(i) for i in range(t.num_fields) if t.field(i).name != "key"]


def test_single_key_u2i_path_equals_the_per_field_loop(tiny_dataset, tiny_meta_schema):
    """U2IFunction's one-gather path for single-valued fields == the per-field CSR loop."""
    meta, schema = tiny_meta_schema
    fn = U2IFunction(meta, ItemTable.load(tiny_dataset, schema).u2i_keys)
    assert fn._single_keys is not None
    table = pads.dataset(str(tiny_dataset / "train")).to_table()
    states = UserStates.from_arrow(table.column("user_state"))
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.integers(0, len(states), 3000))
    items = torch.from_numpy(rng.integers(0, fn.num_items, 3000))
    fast = fn(states, rows, items)
    single, fn._single_keys = fn._single_keys, None
    try:
        assert torch.equal(fast, fn(states, rows, items))
    finally:
        fn._single_keys = single

"""ExposureReader: rank/worker splits, fixed sizes, retrieval rows, resume, targets."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from dig_torchrec.data.decode import History
from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.reader import ExposureReader, load_targets, open_dataset
from dig_torchrec.data.u2i import U2IFunction, UserStates

ROW_KEYS = ["user_id", "item_id", "hour", "device", "city"]


def _row_tuples(batch, keys=ROW_KEYS) -> List[Tuple]:
    B = batch.batch_size
    kjt = batch.sparse_features
    cols = [kjt[k].values()[:B] for k in keys]
    real = batch.weights > 0
    u2i = batch.u2i[real]
    return list(zip(*[c[real].tolist() for c in cols], batch.labels[real].tolist(), map(tuple, u2i.tolist())))


def _parquet_tuples(root: Path, split: str) -> collections.Counter:
    t = pads.dataset(str(root / split)).to_table()
    cols = [t.column(k).to_numpy() for k in ROW_KEYS]
    u2i = np.stack(t.column("u2i").to_numpy(zero_copy_only=False)).astype(np.float32)
    lab = t.column("label").to_numpy().astype(np.float32)
    return collections.Counter(zip(*[c.tolist() for c in cols], lab.tolist(), map(tuple, u2i.tolist())))


def _assert_same_batches(got, want) -> None:
    """Bit-identical batches in the same order (KJT, u2i, labels, weights, retrieval rows)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
        assert torch.equal(a.u2i, b.u2i) and torch.equal(a.retrieval_u2i, b.retrieval_u2i)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.weights, b.weights)
        assert torch.equal(a.retrieval_weights, b.retrieval_weights)


@pytest.mark.parametrize("world_size,num_workers,positives", [(1, 0, 16), (2, 0, 16), (3, 0, 16), (2, 2, 16),
                                                              (2, 0, 0), (1, 0, 2)])
def test_rank_and_worker_splits_cover_every_row_exactly_once(tiny_dataset, tiny_data_config, tiny_meta_schema,
                                                             world_size, num_workers, positives):
    _, schema = tiny_meta_schema
    cfg = dataclasses.replace(tiny_data_config, num_workers=num_workers, retrieval_positives=positives)
    seen: collections.Counter = collections.Counter()
    steps = []
    for rank in range(world_size):
        reader = ExposureReader(tiny_dataset, "train", cfg, schema, rank=rank, world_size=world_size)
        batches = list(reader)
        steps.append(len(batches))
        assert len(batches) == reader.num_batches
        assert reader.rows_consumed == reader.rows
        for b in batches:
            seen.update(_row_tuples(b))
    assert len(set(steps)) == 1, f"ranks ran different step counts: {steps}"
    expected = _parquet_tuples(tiny_dataset, "train")
    assert seen == expected
    if num_workers == 0:  # the spec's step count: max over ranks of ceil(rows / B)
        per_rank = [ExposureReader(tiny_dataset, "train", cfg, schema, rank=r, world_size=world_size).rows
                    for r in range(world_size)]
        assert steps[0] == max(-(-r // cfg.batch_size) for r in per_rank)


def test_batches_have_fixed_sizes_and_valid_retrieval_rows(tiny_dataset, tiny_data_config, tiny_meta_schema):
    meta, schema = tiny_meta_schema
    cfg = tiny_data_config
    reader = ExposureReader(tiny_dataset, "train", cfg, schema)
    items = ItemTable.load(tiny_dataset, schema)
    B, P, K = cfg.batch_size, cfg.retrieval_positives, cfg.negatives_per_positive
    R = P * (1 + K)
    n_checked = 0
    for step, batch in enumerate(reader):
        kjt = batch.sparse_features
        assert kjt.keys() == schema.keys
        assert kjt.stride() == B + R
        assert batch.u2i.shape == (B, meta.u2i_dim) and batch.retrieval_u2i.shape == (R, meta.u2i_dim)
        assert batch.labels.shape == (B,) and batch.retrieval_labels.shape == (R,)
        assert torch.equal(batch.retrieval_labels.view(P, 1 + K), torch.cat([torch.ones(P, 1), torch.zeros(P, K)], 1))
        item_ids = kjt["item_id"].values()
        r_items = item_ids[B:].view(P, 1 + K)
        slot_real = batch.retrieval_weights.view(P, 1 + K)[:, 0] > 0
        # positives are clicks of this batch's real exposure rows
        clicked = set(item_ids[:B][(batch.labels > 0) & (batch.weights > 0)].tolist())
        assert set(r_items[slot_real, 0].tolist()) <= clicked
        assert int(slot_real.sum()) == min(P, int(((batch.labels > 0) & (batch.weights > 0)).sum()))
        # negatives never equal their positive, and carry their own static features
        assert not (r_items[:, 1:] == r_items[:, :1]).any()
        for key_idx, name in enumerate(schema.item_features):
            assert torch.equal(kjt[name].values()[B:], items.features[item_ids[B:], key_idx])
        n_checked += 1
        if step > 5:
            break
    assert n_checked > 0


def test_negative_u2i_is_computed_from_the_positive_user_state(tiny_dataset, tiny_data_config, tiny_meta_schema):
    """Recompute each retrieval row's u2i independently from the click row's stored user_state."""
    meta, schema = tiny_meta_schema
    cfg = dataclasses.replace(tiny_data_config, shuffle_buffer=0)
    reader = ExposureReader(tiny_dataset, "train", cfg, schema, shuffle=False)
    batch = next(iter(reader))
    B, P, K = cfg.batch_size, cfg.retrieval_positives, cfg.negatives_per_positive
    table = pads.dataset(str(tiny_dataset / "train")).to_table()
    # unshuffled: the first batch is the first B rows in file order
    clicks = np.flatnonzero(table.column("label").to_numpy()[:B] > 0)[:P]
    states = UserStates.from_arrow(table.column("user_state").slice(0, B))
    fn = U2IFunction(meta, ItemTable.load(tiny_dataset, schema).u2i_keys)
    items = batch.sparse_features["item_id"].values()[B:].view(P, 1 + K)
    expect = fn(states, torch.from_numpy(clicks).repeat_interleave(1 + K), items[: len(clicks)].reshape(-1))
    got = batch.retrieval_u2i.view(P, 1 + K, -1)[: len(clicks)].reshape(-1, meta.u2i_dim)
    assert torch.equal(got, expect)
    # user-side keys of the retrieval rows are the click row's
    uid = batch.sparse_features["user_id"].values()
    assert torch.equal(uid[B:].view(P, 1 + K)[: len(clicks)], uid[:B][clicks][:, None].expand(-1, 1 + K))


def test_last_batch_padding_and_weight_zero_pad_batches(tiny_dataset, tiny_data_config, tiny_meta_schema):
    _, schema = tiny_meta_schema
    cfg = dataclasses.replace(tiny_data_config, batch_size=1000)
    reader = ExposureReader(tiny_dataset, "train", cfg, schema, world_size=3, rank=0)
    batches = list(reader)
    total_w = sum(float(b.weights.sum()) for b in batches)
    assert total_w == reader.rows
    last = batches[-1]
    assert last.batch_size == 1000
    assert float(last.weights.sum()) < 1000 or total_w == 1000 * len(batches)


def test_history_keys_are_most_recent_first(tiny_dataset, tiny_data_config, tiny_meta_schema):
    _, schema = tiny_meta_schema
    cfg = dataclasses.replace(tiny_data_config, shuffle_buffer=0)
    reader = ExposureReader(tiny_dataset, "train", cfg, schema, shuffle=False, with_retrieval=False)
    batch = next(iter(reader))
    table = pads.dataset(str(tiny_dataset / "train")).to_table()
    hist = table.column("history").to_pylist()[: cfg.batch_size]
    H = schema.history_length
    for j in range(H):
        jt = batch.sparse_features[f"hist_{j}"]
        lengths = jt.lengths().tolist()
        expect = [h[len(h) - 1 - j] for h in hist if len(h) > j]
        assert lengths == [1 if len(h) > j else 0 for h in hist]
        assert jt.values().tolist() == expect
    assert batch.retrieval_size == 0


@pytest.mark.parametrize("num_workers,positives", [(0, 16), (2, 16), (0, 2)])
def test_resume_continues_at_the_exact_row(tiny_dataset, tiny_data_config, tiny_meta_schema, num_workers, positives):
    _, schema = tiny_meta_schema
    cfg = dataclasses.replace(tiny_data_config, num_workers=num_workers, retrieval_positives=positives)
    full = list(ExposureReader(tiny_dataset, "train", cfg, schema, epoch=1))
    first = ExposureReader(tiny_dataset, "train", cfg, schema, epoch=1)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    del it
    assert state["batches_in_epoch"] == 7 and state["epoch"] == 1
    resumed = ExposureReader(tiny_dataset, "train", cfg, schema)
    resumed.load_state_dict(state)
    tail = list(resumed)
    _assert_same_batches(head + tail, full)
    assert resumed.rows_consumed == resumed.rows


def _train_click_rate(root: Path) -> Tuple[int, int]:
    t = pads.dataset(str(root / "train")).to_table(columns=["label"])
    return int((t.column("label").to_numpy() > 0).sum()), t.num_rows


def test_auto_retrieval_positives_follow_the_train_click_rate(tiny_dataset, tiny_data_config, tiny_meta_schema):
    """data.retrieval_positives=0: ceil(2 * train click rate * B) in [1, B], identical on every rank."""
    _, schema = tiny_meta_schema
    clicks, rows = _train_click_rate(tiny_dataset)
    for B in (64, 3, 4096):
        cfg = dataclasses.replace(tiny_data_config, retrieval_positives=0, batch_size=B, eval_batch_size=2 * B)
        expect = min(max(-(-2 * clicks * B // rows), 1), B)
        assert 0 < expect <= B
        got = {ExposureReader(tiny_dataset, "train", cfg, schema, rank=r, world_size=2).num_retrieval_positives
               for r in range(2)}
        assert got == {expect}
        eval_expect = min(max(-(-2 * clicks * 2 * B // rows), 1), 2 * B)
        assert ExposureReader(tiny_dataset, "valid", cfg, schema).num_retrieval_positives == eval_expect
    # the tiny set's click rate is well below 1/2, so auto is much smaller than the old B // 2
    cfg = dataclasses.replace(tiny_data_config, retrieval_positives=0)
    reader = ExposureReader(tiny_dataset, "train", cfg, schema)
    assert reader.num_retrieval_positives < cfg.batch_size // 2
    assert reader.retrieval_size == reader.num_retrieval_positives * (1 + cfg.negatives_per_positive)
    assert next(iter(reader)).retrieval_size == reader.retrieval_size


def test_overflow_clicks_are_a_seeded_subset_and_counted(tiny_dataset, tiny_data_config, tiny_meta_schema):
    """More clicks than slots: a uniform subset (not the first P) fills the slots; the rest are
    counted in retrieval_clicks_dropped and stay exposure rows."""
    _, schema = tiny_meta_schema
    P = 2
    cfg = dataclasses.replace(tiny_data_config, retrieval_positives=P)
    reader = ExposureReader(tiny_dataset, "train", cfg, schema)
    B, K = cfg.batch_size, cfg.negatives_per_positive
    dropped, not_first = 0, 0
    for batch in reader:
        kjt = batch.sparse_features
        uid, item = kjt["user_id"].values(), kjt["item_id"].values()
        real_click = (batch.labels > 0) & (batch.weights > 0)
        click_rows = torch.nonzero(real_click).flatten()
        pairs = list(zip(uid[:B][click_rows].tolist(), item[:B][click_rows].tolist()))
        slot_real = batch.retrieval_weights.view(P, 1 + K)[:, 0] > 0
        assert int(slot_real.sum()) == min(P, len(pairs))
        slots = list(zip(uid[B:].view(P, 1 + K)[slot_real, 0].tolist(), item[B:].view(P, 1 + K)[slot_real, 0].tolist()))
        assert set(slots) <= set(pairs)
        assert len(set(slots)) == len(slots) or len(set(pairs)) < len(pairs)
        dropped += max(0, len(pairs) - P)
        not_first += bool(set(slots) - set(pairs[:P]))
    assert dropped > 0 and reader.retrieval_clicks_dropped == dropped
    assert not_first > 0, "overflow always kept the first P clicks: the subset is not random"
    assert reader.state_dict()["retrieval_clicks_dropped"] == dropped


def test_shuffle_is_seeded_and_changes_with_epoch(tiny_dataset, tiny_data_config, tiny_meta_schema):
    _, schema = tiny_meta_schema
    cfg = tiny_data_config

    def first_users(epoch: int, seed: int) -> List[int]:
        r = ExposureReader(tiny_dataset, "train", dataclasses.replace(cfg, seed=seed), schema, epoch=epoch)
        return next(iter(r)).sparse_features["user_id"].values()[: cfg.batch_size].tolist()

    assert first_users(0, 0) == first_users(0, 0)
    assert first_users(0, 0) != first_users(1, 0)
    assert first_users(0, 0) != first_users(0, 1)
    # a second pass over the same reader starts the next epoch
    r = ExposureReader(tiny_dataset, "train", cfg, schema)
    list(r)
    assert next(iter(r)).sparse_features["user_id"].values()[: cfg.batch_size].tolist() == first_users(1, 0)


def test_popularity_negative_sampling_follows_train_clicks(tiny_dataset, tiny_data_config, tiny_meta_schema):
    _, schema = tiny_meta_schema
    cfg = dataclasses.replace(tiny_data_config, negative_sampling="popularity", popularity_alpha=1.0,
                              negatives_per_positive=16)
    reader = ExposureReader(tiny_dataset, "train", cfg, schema)
    B, P, K = cfg.batch_size, cfg.retrieval_positives, 16
    counts = torch.zeros(reader.items.num_items)
    for step, b in enumerate(reader):
        negs = b.sparse_features["item_id"].values()[B:].view(P, 1 + K)[:, 1:]
        counts += torch.bincount(negs.reshape(-1), minlength=reader.items.num_items)
        if step > 40:
            break
    pop = reader.items.popularity
    corr = torch.corrcoef(torch.stack([counts, pop]))[0, 1]
    assert corr > 0.8, corr


def test_load_targets_matches_retrieval_file(tiny_dataset, tiny_meta_schema):
    meta, schema = tiny_meta_schema
    targets = load_targets(tiny_dataset, "test", schema)
    table = pads.dataset(str(tiny_dataset / "retrieval" / "test.parquet")).to_table()
    assert len(targets) == table.num_rows > 0
    assert (table.column("label").to_numpy() == 1).all()
    assert targets.user_kjt.keys() == schema.user_side_keys
    assert targets.user_kjt.stride() == len(targets)
    assert targets.target_item.tolist() == table.column("item_id").to_pylist()
    hist = table.column("history").to_pylist()
    for i in (0, len(hist) // 2, len(hist) - 1):
        h = hist[i][::-1][: schema.history_length]
        assert targets.history[i].tolist() == h + [-1] * (schema.history_length - len(h))
    assert len(targets.states) == len(targets)
    fn = U2IFunction(meta, ItemTable.load(tiny_dataset, schema).u2i_keys)
    assert torch.equal(fn(targets.states, torch.arange(len(targets)), targets.target_item), targets.u2i)


def test_eval_split_uses_eval_batch_size_without_shuffle(tiny_dataset, tiny_data_config, tiny_meta_schema):
    _, schema = tiny_meta_schema
    reader = ExposureReader(tiny_dataset, "valid", tiny_data_config, schema, with_retrieval=False)
    batches = list(reader)
    assert all(b.batch_size == tiny_data_config.eval_batch_size for b in batches)
    assert sum(float(b.weights.sum()) for b in batches) == reader.rows
    again = list(ExposureReader(tiny_dataset, "valid", tiny_data_config, schema, with_retrieval=False))
    assert torch.equal(batches[0].sparse_features.values(), again[0].sparse_features.values())


def test_open_dataset_returns_meta_and_schema(tiny_dataset, tiny_data_config):
    meta, schema = open_dataset(tiny_dataset, tiny_data_config)
    assert schema.history_length == tiny_data_config.history_length
    assert schema.keys[0] == "user_id" and "item_id" in schema.keys
    assert meta.u2i_dim == 6


def test_item_table_covers_corpus_and_builds_item_kjt(tiny_dataset, tiny_meta_schema):
    meta, schema = tiny_meta_schema
    items = ItemTable.load(tiny_dataset, schema)
    assert items.num_items == meta.num_items
    assert items.features[:, 0].tolist() == list(range(meta.num_items))
    ids = torch.tensor([5, 0, 5, meta.num_items - 1])
    kjt = items.kjt(ids)
    assert kjt.keys() == schema.item_features and kjt.stride() == 4
    for j, name in enumerate(schema.item_features):
        assert kjt[name].values().tolist() == items.features[ids, j].tolist()
    t = pads.dataset(str(tiny_dataset / "train")).to_table()
    clicks = np.bincount(t.column("item_id").to_numpy()[t.column("label").to_numpy() > 0], minlength=meta.num_items)
    assert items.popularity.tolist() == clicks.astype(np.float32).tolist()


def _history_reference(hist_lists, H: int) -> np.ndarray:
    """``[H, n]``: hist_j of row r = the j-th most recent click, -1 padded (per-row python)."""
    out = np.full((H, len(hist_lists)), -1, dtype=np.int64)
    for r, h in enumerate(hist_lists):
        h = h or []
        for j in range(min(H, len(h))):
            out[j, r] = h[len(h) - 1 - j]
    return out


@pytest.mark.parametrize("null_history", [False, True])
def test_decoding_straight_into_emission_order_equals_decode_then_permute(tiny_dataset, tiny_data_config,
                                                                           tiny_meta_schema, null_history):
    """``decode_key_major(t, g, perm)`` (the shuffled-window path) == the table-order decode
    permuted afterwards, for the zero-copy history path and the null-list fallback."""
    import pyarrow as pa

    from dig_torchrec.data.decode import RowDecoder
    from dig_torchrec.data.shards import list_row_groups

    meta, schema = tiny_meta_schema
    dec = RowDecoder(schema, meta, hash_ids=False, with_state=False)
    g = list_row_groups(tiny_dataset / "train")[0]
    t = pads.dataset(str(tiny_dataset / "train")).to_table(columns=dec.columns()).slice(0, 300)
    if null_history:  # null lists (and a sliced column) take the value_lengths/flatten path
        h = t.column("history").combine_chunks()
        mask = pa.array(np.arange(len(h)) % 7 == 3)
        h = pa.ListArray.from_arrays(h.offsets, h.values, mask=mask)
        t = t.set_column(t.schema.get_field_index("history"), "history", h).slice(5)
    perm = np.random.default_rng(0).permutation(t.num_rows)
    base = dec.decode_key_major(t, g)
    fast = dec.decode_key_major(t, g, perm)
    for axis, (a, b) in zip((1, 0, 0, 1, 0), zip(base, fast)):
        assert np.array_equal(np.take(a, perm, axis=axis), b)
    H = schema.history_length
    assert np.array_equal(base[3], _history_reference(t.column("history").to_pylist(), H))


@pytest.mark.parametrize("null_history", [False, True])
def test_window_history_in_emission_order_equals_the_dense_history(tiny_dataset, tiny_meta_schema, null_history):
    """A shuffled window's ``History`` (each row's kept ids as one run, rows in emission
    order) == the dense ``[H, n]`` -1 padded block, also for concatenated + permuted parts
    and for the row ranges of a batch that straddles windows."""
    import pyarrow as pa

    from dig_torchrec.data.decode import RowDecoder
    from dig_torchrec.data.shards import list_row_groups

    meta, schema = tiny_meta_schema
    H = schema.history_length
    dec = RowDecoder(schema, meta, hash_ids=False, with_state=False)
    g = list_row_groups(tiny_dataset / "train")[0]
    t = pads.dataset(str(tiny_dataset / "train")).to_table(columns=dec.columns()).slice(0, 400)
    if null_history:
        h = t.column("history").combine_chunks()
        h = pa.ListArray.from_arrays(h.offsets, h.values, mask=pa.array(np.arange(len(h)) % 5 == 1))
        t = t.set_column(t.schema.get_field_index("history"), "history", h).slice(3)
    rng = np.random.default_rng(1)
    perm = rng.permutation(t.num_rows)
    hist = dec.decode_window(t, g, perm)[3]
    dense = np.take(_history_reference(t.column("history").to_pylist(), H), perm, axis=1)
    n = t.num_rows
    assert np.array_equal(hist.block(0, n), dense)
    assert np.array_equal(hist.block(17, 90), dense[:, 17:90])
    rows = rng.integers(0, n, 50)
    assert np.array_equal(hist.rows(rows), dense[:, rows])
    # only the H kept ids of each row, one run per row, rows in emission order
    mask = dense >= 0
    assert np.array_equal(hist.num, mask.sum(0)) and hist.vals.size == mask.sum()
    assert np.array_equal(hist.last, np.cumsum(hist.num) - 1)
    # a multi-row-group window: parts concatenated then permuted
    h1, h2 = dec.decode_window(t.slice(0, 150), g)[3], dec.decode_window(t.slice(150), g)[3]
    perm2 = rng.permutation(n)
    cat = History.concat([h1, h2]).select(perm2)
    full = dec.decode_window(t, g)[3]
    assert np.array_equal(cat.block(0, n), np.take(full.block(0, n), perm2, axis=1))
    # the rows of a batch straddling two windows
    part = History.of_ranges([(hist, n - 30, n), (cat, 0, 20)])
    assert np.array_equal(part.block(0, 50), np.concatenate([dense[:, n - 30:], cat.block(0, 20)], axis=1))


def _kjt_of_rows(schema, sparse_t, item, hist_t, item_features, B, positive_rows, group_items):
    """Reference KJT (make_kjt) of B exposure rows (rows past ``item.size`` copy row 0) then
    each retrieval positive's click row repeated over its 1 + K items, from dense per-row columns."""
    from dig_torchrec.data.batch import make_kjt

    n = item.size
    src = np.concatenate([np.arange(n), np.zeros(B - n, dtype=np.int64),
                          np.repeat(positive_rows, group_items.shape[1])]).astype(np.int64)
    items = np.concatenate([item[src[:B]], group_items.reshape(-1)])
    cols = [sparse_t[u, src] for u in range(sparse_t.shape[0])]
    cols += [item_features[items, f] for f in range(item_features.shape[1])]
    values = [torch.from_numpy(c.copy()) for c in cols]
    lengths = [torch.ones(src.size, dtype=torch.int32) for _ in cols]
    for j in range(hist_t.shape[0]):
        h = hist_t[j, src]
        values.append(torch.from_numpy(h[h >= 0].copy()))
        lengths.append(torch.from_numpy((h >= 0).astype(np.int32)))
    return make_kjt(schema.keys, values, lengths)


@pytest.mark.parametrize("positives", [0, 7, 64])
def test_batch_kjt_equals_a_reference_built_from_dense_rows(tiny_dataset, tiny_data_config, tiny_meta_schema,
                                                            positives):
    """The KJT of a batch (compiled, straight from the window) == make_kjt over the dense
    rows: full batches at any offset, a short last batch (padding rows) and a batch that
    straddles two windows, with and without retrieval rows."""
    _, schema = tiny_meta_schema
    cfg = dataclasses.replace(tiny_data_config, retrieval_positives=max(positives, 1))
    reader = ExposureReader(tiny_dataset, "train", cfg, schema)
    plan = reader.plan(slot=0, epoch=0)
    win = reader.windows.load(plan.windows[0], plan.window_permutation(0))
    win2 = reader.windows.load(plan.windows[1], plan.window_permutation(1))
    B, K = reader.batch_size, reader.negatives
    assert win.num_rows >= 4 * B
    rng = np.random.default_rng(positives)
    feats = reader.assembler.item_features
    cases = [([(win, a, a + B)]) for a in (0, B, 7, 3 * B)] + [[(win, 5, 5 + B // 3)]]
    cases.append([(win, win.num_rows - B // 2, win.num_rows), (win2, 0, B - B // 2)])  # straddles
    for parts in cases:
        n = sum(b - a for _, a, b in parts)
        positive_rows = np.sort(rng.choice(n, min(positives, n), replace=False)).astype(np.int64) if positives \
            else np.zeros(0, dtype=np.int64)
        group_items = rng.integers(0, reader.items.num_items, (positive_rows.size, 1 + K))
        sparse_t = np.concatenate([w.sparse_t[:, a:b] for w, a, b in parts], axis=1)
        item = np.concatenate([w.item[a:b] for w, a, b in parts])
        hist_t = np.concatenate([w.hist.block(a, b) for w, a, b in parts], axis=1)
        ref = _kjt_of_rows(schema, sparse_t, item, hist_t, feats, B, positive_rows, group_items)
        if len(parts) == 1:
            w, a, _ = parts[0]
            got = reader.assembler.kjt(w.sparse_t, w.item, w.hist, a, n, positive_rows, group_items)
        else:
            got = reader.assembler.kjt(sparse_t, item, History.of_ranges([(w.hist, a, b) for w, a, b in parts]), 0, n,
                              positive_rows, group_items)
        assert torch.equal(got.values(), ref.values()) and torch.equal(got.lengths(), ref.lengths())
        assert got.length_per_key() == ref.length_per_key() and got.offset_per_key() == ref.offset_per_key()
        assert got.keys() == ref.keys() and got.stride() == ref.stride()
    # the batch a reader yields across the window boundary is built the same way
    straddle = reader._batch(plan, 99, cases[-1])
    assert straddle.sparse_features.stride() == B + reader.retrieval_size
    assert torch.equal(straddle.sparse_features["user_id"].values()[:B],
                       torch.from_numpy(np.concatenate([w.sparse_t[0, a:b] for w, a, b in cases[-1]])))


def test_batches_do_not_depend_on_reader_threads(tiny_dataset, tiny_data_config, tiny_meta_schema):
    """data.reader_threads only changes how many windows load at once, never the batches or
    their order (windows finish out of order with several threads; a resume mid-epoch too)."""
    _, schema = tiny_meta_schema
    cfg = dataclasses.replace(tiny_data_config, shuffle_buffer=64, retrieval_positives=8)

    def batches(threads: int, state=None) -> list:
        r = ExposureReader(tiny_dataset, "train", dataclasses.replace(cfg, reader_threads=threads), schema, epoch=1)
        if state is not None:
            r.load_state_dict(state)
        return list(r)

    ref = batches(1)
    assert len(ref) > 4
    for threads in (2, 3):
        _assert_same_batches(batches(threads), ref)
    r = ExposureReader(tiny_dataset, "train", dataclasses.replace(cfg, reader_threads=3), schema, epoch=1)
    it = iter(r)
    for _ in range(3):
        next(it)
    state = r.state_dict()
    del it
    _assert_same_batches(batches(3, state), ref[3:])

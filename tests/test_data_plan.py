"""SlotPlan: the one rule for which rows make a batch, and which batches lie inside a window."""

from __future__ import annotations

import numpy as np
import pytest

from dig_torchrec.data.plan import SlotPlan
from dig_torchrec.data.shards import RowGroup


def _groups(sizes):
    return [RowGroup("f.parquet", i, n, i) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes,shuffle,buffer,B", [
    ([512] * 7 + [100], True, 1024, 64),  # windows of 2 row groups, batches straddle
    ([512] * 7 + [100], True, 64, 64),  # one row group per window
    ([300, 7, 1000, 64, 64], False, 0, 64),  # file order, row groups not multiples of B
    ([5, 3, 9], True, 4, 4),  # tiny groups, many straddles
    ([100], True, 1000, 256),  # one short batch
])
def test_batches_in_window_agrees_with_the_batch_plan(sizes, shuffle, buffer, B):
    total = sum(sizes)
    num_batches = -(-total // B) + 3  # 3 padding batches
    plan = SlotPlan(_groups(sizes), seed=3, epoch=1, slot=0, shuffle=shuffle, shuffle_buffer=buffer,
                    batch_size=B, num_batches=num_batches)
    inside = {b: w for w in range(len(plan.windows)) for b in plan.batches_in_window(w)}
    covered = np.zeros(total, dtype=np.int64)
    for b in range(num_batches):
        bp = plan.batch(b)
        assert bp.padding == (b >= plan.real_batches)
        assert inside.get(b) == bp.window  # the same rule as the batch's own spans
        lo, hi = plan.batch_rows(b) if not bp.padding else (0, 0)
        assert sum(e - a for _, a, e in bp.spans) == hi - lo
        for w, a, e in bp.spans:
            covered[plan.starts[w] + a:plan.starts[w] + e] += 1
    assert (covered == 1).all()  # every row of the slot in exactly one batch
    for w in range(len(plan.windows)):
        first = 2
        assert list(plan.batches_in_window(w, first)) == [b for b in plan.batches_in_window(w) if b >= first]
        perm = plan.window_permutation(w)
        n = int(plan.starts[w + 1] - plan.starts[w])
        assert (perm is None) == (not shuffle)
        if perm is not None:
            assert np.array_equal(np.sort(perm), np.arange(n))
            assert np.array_equal(perm, plan.window_permutation(w))  # a function of (seed, epoch, slot, w)
    if shuffle:
        assert sum(len(w) for w in plan.windows) == len(sizes)
        assert all(sum(g.num_rows for g in w) >= buffer for w in plan.windows[:-1])

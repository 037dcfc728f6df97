"""Eq. 5's SID embedding and its prefix-conditioned variant (tokenizer.sid_embedding=sum+prefix)."""

from __future__ import annotations

import torch

from dig_torchrec.model import DIGModel, hash_prefix, prefix_buckets
from test_model_helpers import tiny_config, tiny_meta


def _model(mode: str) -> DIGModel:
    torch.manual_seed(0)
    return DIGModel(tiny_config(tokenizer={"sid_embedding": mode}), tiny_meta())


def test_sum_embedding_of_a_prefix_ignores_how_earlier_tokens_combine():
    """Eq. 5 as a plain sum: the depth-2 embedding of (a, b) minus the token b term is e(a) at depth 1."""
    m = _model("sum")
    e2 = m._sid_prefix_embedding_at(torch.tensor([[1, 5], [2, 5]]))
    e1 = m._sid_prefix_embedding_at(torch.tensor([[1], [2]]))
    # both rows share token 5 at depth 2: their difference is exactly the depth-1 difference
    torch.testing.assert_close(e2[0] - e2[1], e1[0] - e1[1])


def test_prefix_embedding_changes_with_any_earlier_token():
    m = _model("sum+prefix")
    assert m.num_prefix_buckets == prefix_buckets(tiny_meta().num_items, 3, 0)
    base = torch.tensor([[1, 2, 3]])
    e = m._sid_prefix_embedding_at(base)
    for pos in range(3):
        for tok in range(8):
            if tok == base[0, pos]:
                continue
            other = base.clone()
            other[0, pos] = tok
            e_other = m._sid_prefix_embedding_at(other)
            assert not torch.allclose(e, e_other)
    # and unlike the plain sum, the last token's contribution depends on the prefix before it
    a = m._sid_prefix_embedding_at(torch.tensor([[1, 5], [2, 5]]))
    b = m._sid_prefix_embedding_at(torch.tensor([[1], [2]]))
    assert not torch.allclose(a[0] - a[1], b[0] - b[1])
    # the batched all-depth path agrees with the per-depth one
    sids = torch.tensor([[1, 2, 3], [4, 0, 7]])
    every = m._sid_prefix_embeddings(sids)
    for depth in (1, 2, 3):
        torch.testing.assert_close(every[depth - 1], m._sid_prefix_embedding_at(sids[:, :depth]))


def test_prefix_hash_is_deterministic_in_range_and_depth_specific():
    g = torch.Generator().manual_seed(0)
    prefixes = torch.randint(256, (5000, 4), generator=g)
    ids = hash_prefix(prefixes, 256, 1000)
    assert ids.min() >= 0 and ids.max() < 1000
    torch.testing.assert_close(ids, hash_prefix(prefixes.clone(), 256, 1000))
    assert len(torch.unique(ids)) > 950  # spread over the buckets
    # the same packed value at another depth lands elsewhere: (0, 3) vs (3,)
    assert hash_prefix(torch.tensor([[0, 3]]), 256, 10**6) != hash_prefix(torch.tensor([[3]]), 256, 10**6)

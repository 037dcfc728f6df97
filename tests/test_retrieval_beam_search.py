"""Beam search, exhaustive references and the SID index, against a fake scorer.

The fake recall path scores a prefix as <user vector, sum of token embeddings of the prefix>
(the shape of Eq. 5/16 without the Mixer), so every (user, prefix) row has one fixed score
no matter how rows are batched.
"""

from __future__ import annotations

import itertools

import pyarrow.parquet as pq
import pytest
import torch

from dig_torchrec.errors import CheckpointError
from dig_torchrec.retrieval.beam_search import (
    ancestor_ranks,
    beam_search,
    exhaustive_leaf_search,
    leaves_to_items,
    rank_all_items,
    segment_topk,
    topk_deterministic,
)
from dig_torchrec.retrieval.sid_index import SidIndex, decode_prefix, encode_prefix


class FakeRecallPath:
    """score(u, s_1..s_l) = <w_u, sum_i e_{i, s_i}>, optionally rounded to create ties."""

    def __init__(self, num_users: int, K: int, L: int, dim: int = 8, seed: int = 0, round_to: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.user = torch.randn(num_users, dim, generator=g)
        self.tok = torch.randn(L, K, dim, generator=g)
        self.round_to = round_to
        self.calls = 0
        self.rows = 0

    def __call__(self, user_index: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += user_index.numel()
        l = prefix.shape[1]
        e = self.tok[torch.arange(l), prefix].sum(dim=1)  # [N, dim] (Eq. 5 analogue)
        s = (self.user[user_index] * e).sum(-1)
        if self.round_to:
            s = torch.round(s / self.round_to) * self.round_to
        return s


def _random_sids(num_items: int, K: int, L: int, seed: int = 0, collide: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sids = torch.randint(0, K, (num_items, L), generator=g)
    if collide:  # force some items onto the same leaf
        sids[-collide:] = sids[:collide]
    return sids


def _brute_force_leaf_topn(fake: FakeRecallPath, index: SidIndex, num_users: int, n: int):
    """Python reference: all occupied leaves, sorted by (score desc, code asc)."""
    out = []
    for u in range(num_users):
        rows = []
        for code in index.leaf_codes.tolist():
            tok = decode_prefix(torch.tensor([code]), index.num_layers, index.num_codes)
            rows.append((-float(fake(torch.tensor([u]), tok)[0]), code))
        rows.sort()
        out.append([c for _, c in rows[:n]])
    return out


def test_prefix_codes_roundtrip():
    tok = torch.tensor([[3, 0, 7], [15, 15, 15], [0, 0, 1]])
    codes = encode_prefix(tok, 16)
    assert codes.tolist() == [3 * 256 + 7, 16**3 - 1, 1]
    assert torch.equal(decode_prefix(codes, 3, 16), tok)
    assert encode_prefix(tok[:, :1], 16).tolist() == [3, 15, 0]


def test_sid_index_inverted_index_prefixes_and_collisions(tmp_path):
    sids = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 2], [2, 3], [2, 3]])
    index = SidIndex(sids, num_codes=4)
    assert index.valid_codes(1).tolist() == [0, 2]
    assert index.valid_codes(2).tolist() == [1, 2, 11]
    assert index.items_of(1) == [0, 1]
    assert index.items_of(11) == [2, 4, 5]
    assert index.items_of(2) == [3]
    assert index.is_valid(torch.tensor([1, 2, 3, 11, 12]), 2).tolist() == [True, True, False, True, False]
    st = index.collision_stats()
    assert st.occupied_leaves == 3 and st.max_items_per_leaf == 3
    assert st.mean_items_per_leaf == pytest.approx(2.0)
    assert st.colliding_item_fraction == pytest.approx(5 / 6)
    d = index.save(tmp_path / "sid_index")
    inv = pq.read_table(d / "inverted_index.parquet").to_pydict()
    assert inv["leaf_code"] == [1, 2, 11] and inv["items"] == [[0, 1], [3], [2, 4, 5]]
    assert inv["s_1"] == [0, 0, 2] and inv["s_2"] == [1, 2, 3]
    pre = pq.read_table(d / "prefixes.parquet").to_pydict()
    assert list(zip(pre["depth"], pre["code"], pre["num_items"])) == [(1, 0, 3), (1, 2, 3), (2, 1, 2), (2, 2, 1), (2, 11, 3)]
    back = SidIndex.load(d)
    assert torch.equal(back.item_sids, sids) and torch.equal(back.leaf_items, index.leaf_items)


def test_sid_index_rejects_unassigned_items():
    with pytest.raises(CheckpointError, match="item 1"):
        SidIndex(torch.tensor([[0, 1], [-1, 0]]), num_codes=4)


def test_topk_deterministic_breaks_ties_by_key():
    scores = torch.tensor([[1.0, 2.0, 2.0, float("-inf"), 2.0]])
    keys = torch.tensor([[5, 9, 3, 0, 4]])
    k, s = topk_deterministic(scores, keys, 6)
    assert k.tolist() == [[3, 4, 9, 5, -1, -1]]
    assert s[0, :4].tolist() == [2.0, 2.0, 2.0, 1.0]


def test_segment_topk_matches_python_sort():
    g = torch.Generator().manual_seed(1)
    group = torch.randint(0, 5, (200,), generator=g)
    score = torch.randint(0, 4, (200,), generator=g).float()  # many ties
    key = torch.randperm(200, generator=g)
    out = segment_topk(group, score, key, 6, 7)
    for u in range(6):
        ref = sorted((i for i in range(200) if group[i] == u), key=lambda i: (-score[i].item(), key[i].item()))[:7]
        assert [i for i in out[u].tolist() if i >= 0] == ref


@pytest.mark.parametrize("round_to", [0.0, 0.5])  # 0.5: heavy ties, checks the tie-break
def test_wide_beam_equals_exhaustive_leaf_search(round_to):
    K, L, U = 4, 3, 9
    sids = _random_sids(40, K, L, collide=5)
    index = SidIndex(sids, K)
    fake = FakeRecallPath(U, K, L, round_to=round_to)
    B = K ** (L - 1)  # >= every depth-(L-1) prefix: the beam prunes nothing that matters
    beam = beam_search(fake, U, index, beam_size=B, max_rows=7)  # tiny chunks: batching must not matter
    exh = exhaustive_leaf_search(fake, U, index, topn=B, max_rows=11)
    assert torch.equal(beam.codes, exh.codes)
    assert torch.equal(beam.scores, exh.scores)
    ref = _brute_force_leaf_topn(fake, index, U, B)
    assert [[c for c in row if c >= 0] for row in exh.codes.tolist()] == ref


def test_narrow_beam_returns_only_valid_sids_and_prunes():
    K, L, U = 8, 3, 6
    index = SidIndex(_random_sids(60, K, L, seed=3), K)
    fake = FakeRecallPath(U, K, L, seed=3)
    res = beam_search(fake, U, index, beam_size=5)
    assert res.codes.shape == (U, 5)
    assert bool((res.codes >= 0).all())
    assert bool(index.is_valid(res.codes, L).all())  # every returned SID is an occupied leaf
    # each kept beam is unique per user and sorted by score
    for row, sc in zip(res.codes.tolist(), res.scores.tolist()):
        assert len(set(row)) == len(row)
        assert sc == sorted(sc, reverse=True)
    # it scored far fewer rows than there are (user, node) pairs in the full trie
    trie_nodes = sum(index.valid_codes(d).numel() for d in range(1, L + 1))
    assert res.num_scored <= U * (K + (L - 1) * 5 * K)
    assert res.num_scored < U * trie_nodes
    # layer-1 scores every token: the best first token of each user is the argmax over all K
    first = decode_prefix(res.codes[:, 0], L, K)[:, 0]
    assert bool(index.is_valid(first, 1).all())


def test_beam_never_scores_invalid_prefixes():
    K, L, U = 6, 3, 4
    index = SidIndex(_random_sids(10, K, L, seed=5), K)
    seen = []

    def spy(user_index, prefix):
        seen.append(prefix.clone())
        return prefix.float().sum(1) + user_index.float()

    beam_search(spy, U, index, beam_size=3)
    for p in seen:
        assert bool(index.is_valid(encode_prefix(p, K), p.shape[1]).all())


def test_beam_handles_fewer_leaves_than_beam():
    K, L = 4, 2
    index = SidIndex(torch.tensor([[0, 1], [3, 2]]), K)
    res = beam_search(FakeRecallPath(2, K, L), 2, index, beam_size=5)
    assert sorted(c for c in res.codes[0].tolist() if c >= 0) == [1, 14]
    assert res.codes[:, 2:].eq(-1).all() and torch.isneginf(res.scores[:, 2:]).all()


def test_leaves_to_items_retrieval_order_and_exclusion():
    # leaves: code 1 -> items [0, 1]; code 11 -> items [2, 4, 5]; code 2 -> item [3]
    index = SidIndex(torch.tensor([[0, 1], [0, 1], [2, 3], [0, 2], [2, 3], [2, 3]]), 4)
    from dig_torchrec.retrieval.beam_search import BeamResult

    res = BeamResult(codes=torch.tensor([[11, 1, -1], [2, 11, 1]]),
                     scores=torch.tensor([[0.9, 0.5, float("-inf")], [0.8, 0.7, 0.1]]), num_scored=0)
    items, scores = leaves_to_items(res, index, 4)
    assert items.tolist() == [[2, 4, 5, 0], [3, 2, 4, 5]]
    assert scores[0].tolist() == pytest.approx([0.9, 0.9, 0.9, 0.5])
    items, _ = leaves_to_items(res, index, 4, exclude=torch.tensor([[4, -1], [3, 5]]))
    assert items.tolist() == [[2, 5, 0, 1], [2, 4, 0, 1]]
    # unified: rank-path scores decide among the items of the leaves covering n=2 slots
    rank = torch.tensor([0.0, 5.0, 1.0, 9.0, 3.0, 2.0])
    items, scores = leaves_to_items(res, index, 2, item_score_fn=lambda u, v: rank[v] + 0 * u)
    # user 0: leaf 11 alone covers 2 slots -> items {2,4,5} reranked -> 4 (3.0), 5 (2.0)
    # user 1: leaf 2 (1 item) + leaf 11 -> {3, 2, 4, 5} -> 3 (9.0), 4 (3.0)
    assert items.tolist() == [[4, 5], [3, 4]]
    assert scores.tolist() == [[3.0, 2.0], [9.0, 3.0]]


def test_rank_all_items_is_exact_argmax_with_exclusion():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(3, 20, generator=g)
    items, scores = rank_all_items(lambda u, v: table[u, v], 3, 20, 5, exclude=torch.tensor([[-1], [7], [-1]]), max_rows=9)
    for u in range(3):
        s = table[u].clone()
        if u == 1:
            s[7] = float("-inf")
        assert items[u].tolist() == torch.argsort(s, descending=True)[:5].tolist()
    assert 7 not in items[1].tolist()


def test_beam_recovers_planted_argmax():
    """A scorer whose preference is consistent across depths: beam search at B=1 finds the best leaf."""
    K, L, U = 5, 3, 7
    sids = torch.tensor(list(itertools.product(range(K), repeat=L)))  # complete trie
    index = SidIndex(sids, K)
    g = torch.Generator().manual_seed(2)
    pref = torch.randn(U, L, K, generator=g)  # separable score: sum_l pref[u, l, s_l]

    def score(user_index, prefix):
        l = prefix.shape[1]
        # upper bound of the leaf score reachable below the prefix (admissible heuristic)
        best_rest = pref[user_index, l:].max(dim=-1).values.sum(-1) if l < L else 0.0
        return pref[user_index.unsqueeze(1), torch.arange(l), prefix].sum(-1) + best_rest

    res = beam_search(score, U, index, beam_size=1)
    best = pref.argmax(-1)  # [U, L]
    assert torch.equal(res.codes[:, 0], encode_prefix(best, K))


def test_ancestor_ranks_match_a_brute_force_ranking_and_explain_beam_misses():
    K, L, B = 6, 3, 4
    index = SidIndex(_random_sids(150, K, L, seed=3), K)
    fake = FakeRecallPath(1, K, L, seed=5)
    exh = exhaustive_leaf_search(fake, 1, index, 20)
    leaves = exh.codes[0]
    ranks = ancestor_ranks(fake, index, leaves, max_rows=7)
    assert len(ranks) == L - 1
    for depth, got in enumerate(ranks, start=1):
        valid = index.valid_codes(depth)
        scores = fake(torch.zeros(valid.numel(), dtype=torch.long), decode_prefix(valid, depth, K)).tolist()
        ranked = sorted(zip(scores, valid.tolist()), key=lambda t: (-t[0], t[1]))  # beam's tie-break
        rank_of = {code: r for r, (_, code) in enumerate(ranked)}
        assert got == [rank_of[int(c) // K ** (L - depth)] for c in leaves]
    # a leaf whose depth-1 ancestor ranks >= B among all first tokens cannot survive beam search
    found = set(beam_search(fake, 1, index, B).codes[0].tolist())
    lost = [int(c) for c, r in zip(leaves, ranks[0]) if r >= B]
    assert lost and not found.intersection(lost)


class MaxHeapScorer:
    """A planted max-heap scorer: a prefix scores the max of its descendant leaves' scores (TDM's property)."""

    def __init__(self, index: SidIndex, num_users: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.index = index
        self.leaf_scores = torch.randn(num_users, index.leaf_codes.numel(), generator=g)  # [U, occupied leaves]
        self.K, self.L = index.num_codes, index.num_layers

    def prefix_table(self, depth: int) -> tuple:
        """(sorted depth-l codes, [U, codes] max leaf score under each)."""
        codes = self.index.valid_codes(depth)
        parent = self.index.leaf_codes // (self.K ** (self.L - depth))  # each leaf's depth-l ancestor
        pos = torch.searchsorted(codes, parent)
        table = torch.full((self.leaf_scores.shape[0], codes.numel()), float("-inf"))
        table = table.scatter_reduce(1, pos.expand_as(self.leaf_scores), self.leaf_scores, reduce="amax")
        return codes, table

    def __call__(self, user_index: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        codes, table = self.prefix_table(prefix.shape[1])
        col = torch.searchsorted(codes, encode_prefix(prefix, self.K))
        return table[user_index, col]


@pytest.mark.parametrize("beam_size", [10, 16])
def test_beam_search_finds_the_exhaustive_top10_under_a_max_heap_scorer(beam_size):
    """With prefix score = max over descendants, a beam of B >= 10 keeps every ancestor of the top-10 leaves."""
    index = SidIndex(_random_sids(3000, K=8, L=4, seed=3), num_codes=8)
    scorer = MaxHeapScorer(index, num_users=12, seed=4)
    beam = beam_search(scorer, 12, index, beam_size)
    exh = exhaustive_leaf_search(scorer, 12, index, 10)
    for u in range(12):
        assert set(beam.codes[u, :10].tolist()) == set(exh.codes[u, :10].tolist())
    # without the property (Eq. 5's additive scorer) a narrow beam does lose top leaves
    fake = FakeRecallPath(12, 8, 4, seed=5)
    lossy = beam_search(fake, 12, index, 10)
    full = exhaustive_leaf_search(fake, 12, index, 10)
    assert any(set(lossy.codes[u].tolist()) != set(full.codes[u].tolist()) for u in range(12))

"""Balanced k-means tree init, capacity-constrained assignment and collision resolution."""

from __future__ import annotations

import pytest
import torch

from dig_torchrec.errors import ConfigError
from dig_torchrec.modules.balanced_kmeans import (
    balanced_tree_init,
    capacity_constrained_assign,
    collision_rate,
    resolve_last_layer_collisions,
    squared_distances,
)


def _child_sizes(sids: torch.Tensor, layer: int, k: int) -> torch.Tensor:
    """[num_parents, K] child sizes of every node at depth ``layer`` (prefix s_1..s_layer)."""
    if layer == 0:
        parent = torch.zeros(sids.shape[0], dtype=torch.long)
    else:
        key = torch.zeros(sids.shape[0], dtype=torch.long)
        for j in range(layer):
            key = key * k + sids[:, j]
        parent = torch.unique(key, return_inverse=True)[1]
    sizes = torch.zeros(int(parent.max()) + 1, k, dtype=torch.long)
    sizes.index_put_((parent, sids[:, layer]), torch.ones_like(parent), accumulate=True)
    return sizes


def test_balanced_tree_10k_items_k8_l5_zero_collisions_and_balanced_nodes():
    torch.manual_seed(0)
    x = torch.randn(10_000, 16)
    codebooks, sids = balanced_tree_init(x, num_codes=8, num_layers=5, kmeans_iters=5)
    assert codebooks.shape == (5, 8, 16)
    assert sids.shape == (10_000, 5) and int(sids.min()) >= 0 and int(sids.max()) < 8
    assert collision_rate(sids, 8) == 0.0
    assert torch.unique(sids, dim=0).shape[0] == 10_000
    for layer in range(5):
        sizes = _child_sizes(sids, layer, 8)
        spread = sizes.max(1).values - sizes.min(1).values
        assert int(spread.max()) <= 1, f"layer {layer + 1}: a node's children differ by {int(spread.max())}"


def test_assigned_mean_codebook_is_mean_residual_of_items_given_each_token():
    torch.manual_seed(1)
    x = torch.randn(60, 6)
    codebooks, sids = balanced_tree_init(x, num_codes=4, num_layers=3, kmeans_iters=3, codebook_update="assigned_mean")
    residual = x.clone()
    for layer in range(3):
        for k in range(4):
            sel = sids[:, layer] == k
            if sel.any():
                torch.testing.assert_close(codebooks[layer, k], residual[sel].mean(0), atol=1e-5, rtol=1e-5)
        residual = residual - codebooks[layer][sids[:, layer]]


def test_default_codebook_is_a_kmeans_fixed_point_at_layer_one():
    torch.manual_seed(4)
    centers = torch.randn(4, 8) * 4
    x = centers[torch.arange(200) % 4] + 0.1 * torch.randn(200, 8)  # <= 64*K: k-means sees all items
    codebooks, sids = balanced_tree_init(x, num_codes=4, num_layers=5, kmeans_iters=20)
    nearest = squared_distances(x, codebooks[0]).argmin(1)
    for k in range(4):
        torch.testing.assert_close(codebooks[0, k], x[nearest == k].mean(0), atol=1e-4, rtol=1e-4)
    # well-separated clusters: the balanced tree and Eq. 2 agree at layer 1
    assert torch.equal(nearest, sids[:, 0])


def test_catalog_larger_than_leaf_space_names_config_keys():
    with pytest.raises(ConfigError, match="tokenizer.num_codes"):
        balanced_tree_init(torch.randn(9, 2), num_codes=2, num_layers=3)


def test_capacity_assign_respects_capacity_and_is_nearest_when_unconstrained():
    torch.manual_seed(2)
    pts, cents = torch.randn(300, 5), torch.randn(6, 5)
    group = torch.randint(3, (300,))
    loose = torch.full((3, 6), 1000)
    codes = capacity_constrained_assign(pts, group, cents, capacity=loose, num_candidates=2)
    assert torch.equal(codes, squared_distances(pts, cents).argmin(1))
    sizes = torch.bincount(group, minlength=3)
    codes = capacity_constrained_assign(pts, group, cents, group_sizes=sizes, num_candidates=2)
    counts = torch.zeros(3, 6, dtype=torch.long).index_put_((group, codes), torch.ones_like(codes), accumulate=True)
    assert torch.equal(counts.sum(1), sizes)
    assert int((counts.max(1).values - counts.min(1).values).max()) <= 1


def test_last_layer_resolution_removes_collisions_and_keeps_nearest():
    torch.manual_seed(3)
    k = 8
    # 3 prefix groups; many items share a leaf
    sids = torch.tensor([[0, 1, 2]] * 5 + [[0, 1, 3]] * 2 + [[4, 4, 4]] * 3 + [[5, 5, 5]])
    residual = torch.randn(sids.shape[0], 4)
    codebook = torch.randn(k, 4)
    out = resolve_last_layer_collisions(sids, residual, codebook)
    assert collision_rate(sids, k) > 0.9
    assert collision_rate(out, k) == 0.0
    assert torch.equal(out[:, :2], sids[:, :2])
    assert torch.equal(out[10], sids[10])  # the singleton keeps its code
    d = ((residual - codebook[sids[:, 2]]) ** 2).sum(1)
    for leaf_rows in ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9]):
        keeper = leaf_rows[int(d[leaf_rows].argmin())]
        assert int(out[keeper, 2]) == int(sids[keeper, 2])


def test_last_layer_resolution_leaves_overfull_groups_partially_colliding():
    sids = torch.zeros(5, 2, dtype=torch.long)  # 5 items, one prefix, K=2 -> collisions unavoidable
    out = resolve_last_layer_collisions(sids, torch.randn(5, 3), torch.randn(2, 3))
    assert torch.unique(out[:, 1]).numel() == 2

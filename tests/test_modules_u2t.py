"""Eq. 13 batch teacher, Eq. 14 per-layer MLP_u2t, and the stat-mean table."""

from __future__ import annotations

import pytest
import torch

from dig_torchrec.modules.u2t import U2TMLP, U2TStatTable, u2t_teacher


def _brute_force(u2i, sids, weights, users=None):
    n, num_layers = sids.shape
    out = torch.zeros(num_layers, n, u2i.shape[1])
    for layer in range(num_layers):
        for i in range(n):
            acc, cnt = torch.zeros(u2i.shape[1]), 0
            for j in range(n):
                same = bool((sids[i, : layer + 1] == sids[j, : layer + 1]).all())
                if users is not None:
                    same = same and int(users[i]) == int(users[j])
                if same and weights[j] > 0:
                    acc += u2i[j]
                    cnt += 1
            out[layer, i] = acc / max(cnt, 1)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grouping", ["bucket", "user_bucket"])
def test_teacher_equals_brute_force(seed, grouping):
    g = torch.Generator().manual_seed(seed)
    n, num_layers, k = 40, 3, 3
    sids = torch.randint(k, (n, num_layers), generator=g)
    u2i = torch.randn(n, 4, generator=g)
    weights = (torch.rand(n, generator=g) > 0.2).float()
    users = torch.randint(5, (n,), generator=g) * 1000 if grouping == "user_bucket" else None
    got = u2t_teacher(u2i, sids, weights, k, users)
    torch.testing.assert_close(got, _brute_force(u2i, sids, weights, users))


def test_teacher_is_stop_gradient():
    u2i = torch.randn(6, 2, requires_grad=True)
    out = u2t_teacher(u2i, torch.zeros(6, 2, dtype=torch.long), torch.ones(6), 4)
    assert not out.requires_grad and out.grad_fn is None


def test_u2t_mlp_batched_equals_one_mlp_per_layer():
    torch.manual_seed(0)
    mlp = U2TMLP(num_layers=3, in_features=5 + 6, hidden=7, out_features=2)
    user, sid = torch.randn(4, 5), torch.randn(3, 4, 6)
    all_layers = mlp(user, sid)
    assert all_layers.shape == (3, 4, 2)
    for layer in range(3):
        x = torch.cat([user, sid[layer]], -1)
        ref = torch.relu(x @ mlp.w1[layer] + mlp.b1[layer]) @ mlp.w2[layer] + mlp.b2[layer]
        torch.testing.assert_close(all_layers[layer], ref)
        torch.testing.assert_close(mlp.forward_layer(layer, user, sid[layer]), ref)
    # the layers are separate MLPs: perturbing layer 0's weights leaves layer 1 unchanged
    with torch.no_grad():
        mlp.w1[0].add_(1.0)
    changed = mlp(user, sid)
    assert not torch.allclose(changed[0], all_layers[0])
    torch.testing.assert_close(changed[1], all_layers[1])


def test_stat_table_is_running_mean_per_layer_token():
    table = U2TStatTable(num_layers=2, num_codes=3, dim=1)
    table.update(torch.tensor([[0, 1], [0, 2], [1, 1]]), torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([1.0, 1.0, 0.0]))
    table.update(torch.tensor([[0, 1]]), torch.tensor([[8.0]]), torch.ones(1))
    assert table.lookup(0, torch.tensor([0, 1, 2])).flatten().tolist() == [4.0, 0.0, 0.0]
    assert table.lookup(1, torch.tensor([1, 2])).flatten().tolist() == [4.5, 3.0]

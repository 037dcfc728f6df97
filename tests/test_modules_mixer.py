"""DIN target attention, MoE, the shared Mixer and its meta-device materialisation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from dig_torchrec.config import ModelConfig
from dig_torchrec.modules.din import TargetAttention
from dig_torchrec.modules.encoder import ItemEncoder
from dig_torchrec.modules.mixer import Mixer
from dig_torchrec.modules.moe import MixtureOfExperts


def test_din_ignores_masked_history_and_empty_history_is_zero():
    torch.manual_seed(0)
    din = TargetAttention(target_dim=6, key_dim=4, hidden=[8])
    target, keys = torch.randn(3, 6), torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = din(target, keys, mask)
    keys2 = keys.clone()
    keys2[~mask] = 100.0  # garbage in masked slots changes nothing
    torch.testing.assert_close(din(target, keys2, mask), out)
    assert torch.equal(out[1], torch.zeros(4))
    # the output is a convex combination of the unmasked keys (softmax weights)
    w = torch.linalg.lstsq(keys[0, [0, 1, 4]].t(), out[0][:, None]).solution.flatten()
    assert torch.all(w > 0) and abs(float(w.sum()) - 1) < 1e-4


def _textbook_din(din: TargetAttention, target, keys, mask):
    """DIN as usually written: the attention MLP on the concatenation [q, k, q-k, q*k] per slot."""
    q = din.query(target)[:, None, :].expand_as(keys)
    scores = din.attention_out(din.attention_mlp(torch.cat([q, keys, q - keys, q * keys], -1))).squeeze(-1)
    scores = scores.masked_fill(~mask, -1e9)
    weights = torch.softmax(scores, dim=1) * mask.to(scores.dtype)
    return (weights[..., None] * keys).sum(1)


@pytest.mark.parametrize("hidden", [[8, 4], []])
def test_din_factorised_first_layer_equals_the_concatenated_form(hidden):
    """DIN's split first layer is the textbook MLP([q, k, q-k, q*k]) (values and gradients)."""
    torch.manual_seed(1)
    din = TargetAttention(target_dim=6, key_dim=4, hidden=hidden)
    target, keys = torch.randn(7, 6), torch.randn(7, 5, 4)
    mask = torch.rand(7, 5) > 0.3
    out = din(target, keys, mask)
    want = _textbook_din(din, target, keys, mask)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(out.square().sum(), list(din.parameters()))
    g_ref = torch.autograd.grad(want.square().sum(), list(din.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mixer_with_leading_passes_equals_stacked_forward():
    """The recall path's L passes in one call == the per-row Mixer on the stacked passes."""
    torch.manual_seed(2)
    mixer = Mixer(user_dim=8, target_dim=6, cross_feature_dim=3, key_dim=4, cfg=ModelConfig(
        din_hidden=[8], cross_layers=2, num_experts=2, expert_hidden=[8]))
    L, n = 3, 5
    user, targets, cross = torch.randn(n, 8), torch.randn(L, n, 6), torch.randn(L, n, 3)
    keys, mask = torch.randn(n, 4, 4), torch.rand(n, 4) > 0.4
    got = mixer(user, targets, cross, keys, mask)
    want = mixer(user.repeat(L, 1), targets.reshape(L * n, 6), cross.reshape(L * n, 3),
                 keys.repeat(L, 1, 1), mask.repeat(L, 1)).view(L, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_moe_is_gate_weighted_sum_of_experts():
    torch.manual_seed(0)
    moe = MixtureOfExperts(5, [6, 3], num_experts=3)
    x = torch.randn(4, 5)
    gates = torch.softmax(moe.gate(x), -1)
    ref = sum(gates[:, e : e + 1] * moe.experts[e](x) for e in range(3))
    torch.testing.assert_close(moe(x), ref)


@pytest.mark.parametrize("low_rank", [0, 2])
def test_mixer_builds_on_meta_and_dmp_style_materialisation_initialises_everything(low_rank, monkeypatch):
    cfg = ModelConfig(embedding_dim=4, din_hidden=[8], cross_layers=2, cross_low_rank=low_rank,
                      num_experts=2, expert_hidden=[8, 4])
    mixer = Mixer(user_dim=8, target_dim=8, cross_feature_dim=3, key_dim=4, cfg=cfg, device="meta")
    enc = ItemEncoder(num_fields=2, dim=4, num_layers=1, heads=2, device="meta")
    model = nn.ModuleDict({"mixer": mixer, "encoder": enc})
    assert all(p.is_meta for p in model.parameters())
    # Every module owning parameters directly must be re-initialisable by DMP.
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert hasattr(module, "reset_parameters"), f"{name} ({type(module).__name__}) lacks reset_parameters"
    # DMP allocates meta params with empty_like then calls reset_parameters: poison empty_like
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    DistributedModelParallel._init_parameters(SimpleNamespace(device=torch.device("cpu")), model)
    monkeypatch.undo()
    for name, p in model.named_parameters():
        assert not p.is_meta and torch.isfinite(p).all(), f"{name} not initialised"
    out = mixer(torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 3), torch.randn(5, 2, 4), torch.ones(5, 2, dtype=torch.bool))
    assert out.shape == (5,) and torch.isfinite(out).all()


def test_mixer_init_is_deterministic_under_seed():
    cfg = ModelConfig(embedding_dim=4, din_hidden=[8], cross_layers=2, num_experts=2, expert_hidden=[8, 4])
    torch.manual_seed(3)
    a = Mixer(8, 8, 3, 4, cfg)
    torch.manual_seed(3)
    b = Mixer(8, 8, 3, 4, cfg)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n

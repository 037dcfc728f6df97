"""Residual quantizer: Eq. 2-4 assignment, EMA codebook updates, dead-code restarts, Eq. 11/12."""

from __future__ import annotations

import torch

from dig_torchrec.modules.quantizer import ResidualQuantizer


def _quantizer(**kw) -> ResidualQuantizer:
    q = ResidualQuantizer(num_layers=2, num_codes=3, dim=2, decay=0.9, epsilon=1e-5, **kw)
    q.codebooks.copy_(torch.tensor([[[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]))
    return q


def test_assignment_is_greedy_residual_argmin():
    q = _quantizer()
    x = torch.tensor([[4.2, 0.9], [0.1, 3.0], [0.2, -0.1]])
    sids = q.assign(x)
    assert sids.tolist() == [[1, 2], [2, 0], [0, 0]]
    out = q(x)
    # r_0 = x, r_1 = x - c_1, r_2 = r_1 - c_2 (Eq. 3)
    torch.testing.assert_close(out.residuals[0], x)
    torch.testing.assert_close(out.residuals[2][0], torch.tensor([0.2, -0.1]))


def test_codebooks_are_buffers_without_grad_and_losses_reach_input_only():
    q = _quantizer()
    assert "codebooks" in dict(q.named_buffers()) and not list(q.parameters())
    x = torch.randn(5, 2, requires_grad=True)
    out = q(x)
    mask = torch.ones(5, dtype=torch.bool)
    (out.commitment_loss(mask) + out.semantic_loss(mask)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not q.codebooks.requires_grad and q.codebooks.grad is None


def test_commitment_and_semantic_loss_values():
    q = _quantizer()
    x = torch.tensor([[4.2, 0.9], [0.1, 3.0]])
    out = q(x)
    mask = torch.tensor([True, False])
    r1, r2 = x[0] - torch.tensor([4.0, 0.0]), x[0] - torch.tensor([4.0, 1.0])
    # Eq. 11: sum_l ||sg[c_l] - r_{l-1}||^2 = sum_l ||r_l||^2 (per-dimension mean, masked rows)
    torch.testing.assert_close(out.commitment_loss(mask), (r1**2).mean() + (r2**2).mean())
    # Eq. 12: ||e_v - hat e^(1:L)||^2 = ||r_L||^2
    torch.testing.assert_close(out.semantic_loss(mask), (r2**2).mean())


def test_ema_update_matches_hand_computation():
    q = _quantizer(restart_dead_codes=False)
    q.ema_primed.fill_(1)
    q.ema_count.copy_(torch.tensor([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0]]))
    q.ema_sum.copy_(q.codebooks * q.ema_count[..., None])
    count0, sum0 = q.ema_count.clone(), q.ema_sum.clone()
    x = torch.tensor([[4.2, 0.9], [3.8, 1.1], [0.1, 3.0], [9.0, 9.0]])
    mask = torch.tensor([True, True, True, False])
    out = q(x)
    q.ema_update(out, mask)
    a, eps, k = 0.9, 1e-5, 3
    # layer 1: tokens [1, 1, 2] for the unmasked rows, residual r_0 = x
    n1 = torch.tensor([0.0, 2.0, 1.0])
    s1 = torch.stack([torch.zeros(2), x[0] + x[1], x[2]])
    # layer 2: r_1 = x - c_1 -> [0.2,0.9]->code 2, [-0.2,1.1]->2, [0.1,-1.0]->0
    r1 = x[:3] - torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    n2 = torch.tensor([1.0, 0.0, 2.0])
    s2 = torch.stack([r1[2], torch.zeros(2), r1[0] + r1[1]])
    for layer, (n, s) in enumerate(((n1, s1), (n2, s2))):
        count = a * count0[layer] + (1 - a) * n
        total = a * sum0[layer] + (1 - a) * s
        smoothed = (count + eps) / (count.sum() + k * eps) * count.sum()
        torch.testing.assert_close(q.ema_count[layer], count)
        torch.testing.assert_close(q.codebooks[layer], total / smoothed[:, None])


def test_first_ema_step_rescales_init_fractions_to_batch_counts():
    q = _quantizer(restart_dead_codes=False)
    cb = q.codebooks.clone()
    q.load_initial_codebooks(cb, torch.tensor([[0, 0], [1, 1], [1, 2], [2, 2]]))
    torch.testing.assert_close(q.ema_count[0], torch.tensor([0.25, 0.5, 0.25]))
    x = torch.zeros(8, 2)
    out = q(x)
    before = q.ema_count.clone()
    q.ema_update(out, torch.ones(8, dtype=torch.bool))
    n_batch = 8.0
    expected = 0.9 * before[0] * n_batch + 0.1 * torch.tensor([8.0, 0.0, 0.0])
    torch.testing.assert_close(q.ema_count[0], expected)


def test_dead_codes_restart_onto_batch_residuals_and_are_counted():
    q = _quantizer(dead_code_threshold=0.5)
    q.ema_primed.fill_(1)
    q.ema_count.copy_(torch.tensor([[5.0, 5.0, 0.01], [5.0, 5.0, 5.0]]))
    q.ema_sum.copy_(q.codebooks * q.ema_count[..., None])
    x = torch.tensor([[4.1, 0.2], [3.9, -0.1], [0.2, 0.1]])
    out = q(x)
    q.ema_update(out, torch.ones(3, dtype=torch.bool))
    assert q.dead_restarts.tolist() == [1, 0]
    restarted = q.codebooks[0, 2]
    assert any(torch.allclose(restarted, r) for r in x)  # a residual r_0 of the batch
    assert float(q.ema_count[0, 2]) == 1.0
    stats = q.last_stats
    assert stats["utilization"].shape == (2,) and 0 < float(stats["perplexity"][0]) <= 3


def test_catalog_dead_code_rule_scales_the_threshold_with_the_catalog():
    """tokenizer.dead_code_rule=catalog: dead = below threshold x (EMA rows per step / catalog size)."""
    counts = torch.tensor([[9.0, 9.0, 2.0], [10.0, 5.0, 5.0]])  # 20 rows per step per layer

    def restarts(**kw):
        q = _quantizer(dead_code_threshold=0.5, **kw)
        q.ema_primed.fill_(1)
        q.ema_count.copy_(counts)
        q.ema_sum.copy_(q.codebooks * q.ema_count[..., None])
        x = torch.tensor([[4.1, 0.2], [3.9, -0.1], [0.2, 0.1]])
        # an EMA step with the batch's own counts: a * N + (1 - a) * n keeps code 2 of layer 1 near 1.9
        q._restart_dead_codes(q(x), torch.ones(3, dtype=torch.bool))
        return q.dead_restarts.tolist()

    assert restarts() == [0, 0]  # per step: 2.0 items/step >= 0.5
    # catalog of 4 items: an average item is 5 rows/step, the threshold 2.5 rows/step
    assert restarts(catalog_size=4) == [1, 0]
    # catalog of 40 items: threshold 0.25 rows/step, nothing is dead
    assert restarts(catalog_size=40) == [0, 0]


def test_gumbel_assignment_explores_then_decays_to_argmin():
    q = _quantizer()
    torch.manual_seed(0)
    x = torch.tensor([[4.2, 0.9], [0.1, 3.0], [0.2, -0.1], [2.1, 1.9]]).repeat(50, 1)
    argmin = q.assign(x)
    noisy = q.assign(x, noise_scale=2.0)
    assert (noisy != argmin).any(1).float().mean() > 0.2  # exploration moves a share of the rows
    assert torch.equal(q.assign(x, noise_scale=0.0), argmin)


def test_tokenizer_gumbel_noise_decays_linearly_to_zero_then_assigns_argmin():
    from dig_torchrec.config import TokenizerConfig
    from dig_torchrec.modules.tokenizer import DIGTokenizer

    cfg = TokenizerConfig(num_layers=2, num_codes=4, encoder_layers=1, encoder_heads=1, assignment="gumbel",
                          gumbel_scale=1.5, gumbel_decay_steps=10)
    tok = DIGTokenizer(cfg, num_fields=1, dim=2, num_items=8)
    assert tok.gumbel_noise_scale() == 0.0  # before init: no noise
    tok.initialized.fill_(1)
    assert tok.gumbel_noise_scale() == 1.5
    tok.steps_since_init = 4
    assert abs(tok.gumbel_noise_scale() - 1.5 * 0.6) < 1e-9
    tok.steps_since_init = 10
    assert tok.gumbel_noise_scale() == 0.0
    tok.quantizer.codebooks.normal_()
    tok.train()
    e_v = torch.randn(64, 1, 2)
    torch.manual_seed(1)
    assert torch.equal(tok.quantize(e_v, torch.zeros(64, dtype=torch.long)).sids, tok.assign(e_v))


def test_tokenizer_freeze_after_steps_stops_codebooks_and_sids():
    from dig_torchrec.config import TokenizerConfig
    from dig_torchrec.modules.tokenizer import DIGTokenizer

    cfg = TokenizerConfig(num_layers=2, num_codes=4, encoder_layers=1, encoder_heads=1, freeze_after_steps=2,
                          init_kmeans_iters=2)
    torch.manual_seed(0)
    tok = DIGTokenizer(cfg, num_fields=1, dim=2, num_items=16)
    tok.initialize(torch.randn(16, 2))
    tok.train()
    ids = torch.arange(16)
    mask = torch.ones(16, dtype=torch.bool)
    for step in range(2):  # EMA steps move the codebooks
        before = tok.quantizer.codebooks.clone()
        out = tok.quantize(torch.randn(16, 1, 2) * 3, ids)
        tok.training_update(out, ids, mask)
        assert not torch.equal(before, tok.quantizer.codebooks)
    assert tok.ema_frozen and tok.steps_since_init == 2
    frozen_books, frozen_table = tok.quantizer.codebooks.clone(), tok.item_sid_table.clone()
    e_v = torch.randn(16, 1, 2) * 3
    out = tok.quantize(e_v, ids)
    assert torch.equal(out.sids, frozen_table)  # the table's SIDs, whatever e_v says now
    tok.training_update(out, ids, mask)
    assert torch.equal(tok.quantizer.codebooks, frozen_books) and torch.equal(tok.item_sid_table, frozen_table)
    # inference serves the SIDs the recall path trained on, not an argmin of the moved e_v
    assert torch.equal(tok.corpus_sids(e_v.reshape(16, -1)), frozen_table)
    # a model loaded for inference (or resumed) derives the freeze from its step
    tok.steps_since_init = 0
    assert not tok.ema_frozen
    tok.restore_schedule(cfg.init_after_steps + 2)
    assert tok.ema_frozen and torch.equal(tok.corpus_sids(e_v.reshape(16, -1)), frozen_table)
    tok.restore_schedule(cfg.init_after_steps + 1)
    assert not tok.ema_frozen

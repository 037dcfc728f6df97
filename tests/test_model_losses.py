"""Eq. 8 loss composition, warm-up gating, and the ablation switches (paper §4.3/§4.5)."""

from __future__ import annotations

import copy

import pytest
import torch

from dig_torchrec.model import LOSS_KEYS, DIGModel, StepParts
from test_model_helpers import all_item_e_v, initialized_model, make_batch, tiny_config, tiny_meta



def _get(parts: StepParts, key: str) -> torch.Tensor:
    """A loss term, or an intermediate of the model's computation, by name."""
    if key == "teacher":
        return parts.computed.loss_inputs.u2t_teacher
    return getattr(parts.terms, key) if hasattr(parts.terms, key) else getattr(parts.computed, key)

def _model(cfg) -> DIGModel:
    return initialized_model(cfg)


def _pair(section: str, key: str, value):
    """(default model, model with one switch flipped), identically initialised."""
    base_cfg = tiny_config()
    alt_cfg = copy.deepcopy(base_cfg)
    setattr(getattr(alt_cfg, section), key, value)
    return _model(base_cfg), _model(alt_cfg)


def test_total_is_weighted_sum_of_terms():
    cfg = tiny_config(loss={"recall_loss_weight": 0.7, "commit_weight": 0.3, "sem_weight": 0.2, "u2t_weight": 0.05})
    model = _model(cfg)
    loss, out = model(make_batch(tiny_meta(), seed=5, pad_rows=3))
    assert set(out.losses) == set(LOSS_KEYS)
    l = out.losses
    expected = l["rank"] + 0.7 * l["recall"] + 0.3 * l["commit"] + 0.2 * l["sem"] + 0.05 * l["u2t"]
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(l["total"], expected)
    assert all(float(v) > 0 for v in l.values())


def test_warmup_before_tokenizer_init_trains_rank_path_only():
    torch.manual_seed(0)
    model = DIGModel(tiny_config(), tiny_meta())
    loss, out = model(make_batch(tiny_meta()))
    torch.testing.assert_close(loss.detach(), out.losses["rank"])
    assert float(out.losses["recall"]) > 0  # computed (every parameter stays in the graph)
    assert int(model.tokenizer.quantizer.ema_primed) == 0 and model.tokenizer.quantizer.codebooks.abs().sum() == 0


def test_padding_rows_do_not_count():
    model = _model(tiny_config())
    batch = make_batch(tiny_meta(), seed=6, pad_rows=4)
    parts = model.forward_parts(batch)
    out = parts.output
    w = batch.weights
    ref = torch.nn.functional.binary_cross_entropy_with_logits(out.rank_logits[w > 0], batch.labels[w > 0])
    torch.testing.assert_close(out.losses["rank"], ref)


def test_recall_loss_weight_zero_is_rank_only_base():
    base, alt = _pair("loss", "recall_loss_weight", 0.0)
    batch = make_batch(tiny_meta(), seed=7)
    a, b = base.forward_parts(batch), alt.forward_parts(batch)
    for key in ("rank", "recall", "commit", "sem", "u2t"):
        torch.testing.assert_close(_get(a, key), _get(b, key))
    torch.testing.assert_close(b.terms.total, a.terms.total - a.terms.recall)
    torch.testing.assert_close(a.output.recall_logits, b.output.recall_logits)
    # the recall path no longer drives the Mixer: only L_rank + L_u2t + tokenizer terms remain
    mixer_params = list(alt.mixer.parameters())
    g_total = torch.autograd.grad(b.terms.total, mixer_params, retain_graph=True, allow_unused=True)
    g_rank = torch.autograd.grad(b.terms.rank, mixer_params, retain_graph=True, allow_unused=True)
    for x, y in zip(g_total, g_rank):
        if x is not None:
            torch.testing.assert_close(x, y)


def test_frozen_tokenizer_keeps_tree_sids_and_codebooks_but_rank_path_unchanged():
    base, alt = _pair("tokenizer", "frozen", True)
    tree_sids = alt.tokenizer.item_sid_table.clone()
    codebooks = alt.tokenizer.quantizer.codebooks.clone()
    meta = tiny_meta()
    batch = make_batch(meta, seed=8)
    a, b = base.forward_parts(batch), alt.forward_parts(batch)
    torch.testing.assert_close(a.output.rank_logits, b.output.rank_logits)
    torch.testing.assert_close(a.terms.rank, b.terms.rank)
    item_ids = batch.sparse_features["item_id"].values()
    assert torch.equal(b.computed.sids, tree_sids[item_ids])
    opt = torch.optim.Adam(alt.parameters(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        loss, out = alt(make_batch(meta, seed=20 + step))
        loss.backward()
        opt.step()
        alt.on_step_accepted(out)
    assert torch.equal(alt.tokenizer.item_sid_table, tree_sids)
    assert torch.equal(alt.tokenizer.quantizer.codebooks, codebooks)
    enc_before = [p.clone() for p in base.tokenizer.encoder.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(alt.tokenizer.encoder.parameters(), enc_before)), \
        "the encoder must still train in frozen mode"
    _, out = base(make_batch(meta, seed=20))
    base.on_step_accepted(out)
    assert not torch.equal(base.tokenizer.quantizer.codebooks, codebooks)  # the default does move them
    ev = all_item_e_v(alt, meta)
    assert torch.equal(alt.tokenizer.corpus_sids(ev), tree_sids)


def test_train_side_false_zeroes_only_recall_u2t_input():
    base, alt = _pair("u2t", "train_side", False)
    batch = make_batch(tiny_meta(), seed=9)
    a, b = base.forward_parts(batch), alt.forward_parts(batch)
    assert torch.equal(b.computed.u2t_in, torch.zeros_like(b.computed.u2t_in))
    torch.testing.assert_close(a.computed.u2t_in, a.computed.loss_inputs.u2t_teacher)
    for key in ("rank", "commit", "sem", "u2t", "teacher", "u2t_hat"):
        torch.testing.assert_close(_get(a, key), _get(b, key))
    assert not torch.allclose(a.output.recall_logits, b.output.recall_logits)


@pytest.mark.parametrize("mode", ["stat_mean", "none", "catalog_mean"])
def test_u2t_inference_mode_changes_only_eval_recall_u2t(mode):
    base, alt = _pair("u2t", "inference", mode)
    meta = tiny_meta()
    for step in range(2):  # training is identical under every inference mode
        a, b = base.forward_parts(make_batch(meta, seed=30 + step)), alt.forward_parts(make_batch(meta, seed=30 + step))
        for key in ("total", "rank", "recall", "u2t"):
            torch.testing.assert_close(_get(a, key), _get(b, key))
        base.on_step_accepted(a.output), alt.on_step_accepted(b.output)  # u2t statistics, BN statistics
    base.eval(), alt.eval()
    batch = make_batch(meta, seed=11)
    a, b = base.forward_parts(batch), alt.forward_parts(batch)
    torch.testing.assert_close(a.output.rank_logits, b.output.rank_logits)
    torch.testing.assert_close(a.computed.u2t_in, a.computed.u2t_hat)
    if mode == "none":
        assert torch.equal(b.computed.u2t_in, torch.zeros_like(b.computed.u2t_in))
    elif mode == "catalog_mean":  # exposure rows carry u2i, not the user's state: Eq. 13's bucket mean of the batch
        torch.testing.assert_close(b.computed.u2t_in, b.computed.loss_inputs.u2t_teacher)
        assert not torch.allclose(b.computed.u2t_in, b.computed.u2t_hat)
    else:
        sids = b.computed.sids[: batch.batch_size]
        expected = torch.stack([alt.u2t_stats.lookup(l, sids[:, l]) for l in range(3)])
        torch.testing.assert_close(b.computed.u2t_in, expected)
        assert float(alt.u2t_stats.u2i_count.sum()) > 0
    assert not torch.allclose(a.output.recall_logits, b.output.recall_logits)


def test_last_layer_supervision_changes_only_recall_loss():
    base, alt = _pair("loss", "recall_supervision", "last_layer")
    batch = make_batch(tiny_meta(), seed=12)
    a, b = base.forward_parts(batch), alt.forward_parts(batch)
    torch.testing.assert_close(a.terms.recall_per_layer, b.terms.recall_per_layer)
    torch.testing.assert_close(a.terms.recall, a.terms.recall_per_layer.mean())  # Eq. 10
    torch.testing.assert_close(b.terms.recall, b.terms.recall_per_layer[-1])
    torch.testing.assert_close(a.output.recall_logits, b.output.recall_logits)
    for key in ("rank", "commit", "sem", "u2t"):
        torch.testing.assert_close(_get(a, key), _get(b, key))


def test_recall_samples_switch_picks_the_rows():
    base, alt = _pair("loss", "recall_samples", "exposure")
    batch = make_batch(tiny_meta(), seed=13, pad_rows=2)
    a, b = base(batch)[1], alt(batch)[1]
    # the recall path keeps the real rows only (the last 2 of each part are padding)
    R, B = batch.retrieval_size, batch.batch_size
    assert a.recall_logits.shape == (3, R - 2)
    assert torch.equal(a.recall_labels, batch.retrieval_labels[: R - 2])
    assert torch.equal(a.recall_weights, batch.retrieval_weights[: R - 2])
    assert b.recall_logits.shape == (3, B - 2)
    assert torch.equal(b.recall_labels, batch.labels[: B - 2]) and torch.equal(b.recall_weights, batch.weights[: B - 2])
    torch.testing.assert_close(a.rank_logits, b.rank_logits)

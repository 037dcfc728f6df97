"""The recall-objective options of dig_torchrec/losses.py and the model wiring behind them."""

from __future__ import annotations

import math

import pytest
import torch

from dig_torchrec.config import load_config
from dig_torchrec.errors import ConfigError
from dig_torchrec.losses import DIGLoss, descendant_distillation, sampled_softmax, u2t_distillation
from dig_torchrec.model import DIGModel
from dig_torchrec.modules.prefix_sampler import CatalogPrefixIndex
from dig_torchrec.modules.u2t import u2t_teacher
from test_model_helpers import initialize, initialized_model, make_batch, tiny_config, tiny_meta


def _hand_softmax_ce(logits, log_q=None, valid=None):
    """-log softmax(z)[0] for one group, computed the long way."""
    z = [x - (log_q[i] if log_q is not None else 0.0) for i, x in enumerate(logits)]
    keep = [i for i in range(len(z)) if valid is None or valid[i]]
    denom = sum(math.exp(z[i]) for i in keep)
    return -(z[0] - math.log(denom))


def test_sampled_softmax_equals_hand_computation():
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], [[-0.5, 1.5, 0.0], [1.0, 1.0, 1.0]]])  # [L=2, S=2, G=3]
    weights = torch.tensor([1.0, 3.0])
    log_q = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.2]])
    valid = torch.tensor([[[True, True, False], [True, True, True]], [[True, True, True], [True, False, True]]])
    got = sampled_softmax(logits, weights, log_q, valid)
    for layer in range(2):
        per = [_hand_softmax_ce(logits[layer, s].tolist(), log_q[s].tolist(), valid[layer, s].tolist()) for s in range(2)]
        want = (per[0] * 1.0 + per[1] * 3.0) / 4.0
        assert got[layer].item() == pytest.approx(want, rel=1e-6)


def test_softmax_recall_objective_in_the_model_is_per_click_cross_entropy():
    """The model's L_recall with loss.recall_objective=softmax equals CE over each click group, by hand."""
    cfg = tiny_config(loss={"recall_objective": "softmax"})
    meta = tiny_meta()
    model = initialized_model(cfg, meta)
    G = 1 + cfg.data.negatives_per_positive
    batch = make_batch(meta, B=16, R=4 * G, seed=3)
    batch.retrieval_labels.zero_()
    batch.retrieval_labels[::G] = 1.0
    parts = model.forward_parts(batch)
    logits = parts.output.recall_logits  # [L, R]
    sids = parts.computed.sids[16:]
    want = []
    for layer in range(cfg.tokenizer.num_layers):
        ces = []
        for s in range(4):
            grp = logits[layer, s * G:(s + 1) * G].tolist()
            pos_prefix = sids[s * G, : layer + 1].tolist()
            valid = [True] + [sids[s * G + j, : layer + 1].tolist() != pos_prefix for j in range(1, G)]
            ces.append(_hand_softmax_ce(grp, valid=valid))
        want.append(sum(ces) / 4)
    torch.testing.assert_close(parts.terms.recall_per_layer.detach(), torch.tensor(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.terms.recall.detach(), torch.tensor(want).mean(), rtol=1e-5, atol=1e-5)


def test_accidental_hits_are_left_out_of_the_softmax():
    loss = DIGLoss(tiny_config(loss={"recall_objective": "softmax"}).loss, num_items=10, group_size=3)
    logits = torch.tensor([[1.0, 5.0, 0.0]])  # [L=1, N=3]: one group
    sids_hit = torch.tensor([[4], [4], [2]])  # negative 1 has the positive's token
    sids_miss = torch.tensor([[4], [3], [2]])
    w, lab = torch.ones(3), torch.tensor([1.0, 0.0, 0.0])
    hit = loss.recall_per_layer(logits, lab, w, sids_hit, grouped=True)
    miss = loss.recall_per_layer(logits, lab, w, sids_miss, grouped=True)
    assert hit.item() == pytest.approx(_hand_softmax_ce([1.0, 5.0, 0.0], valid=[True, False, True]))
    assert miss.item() == pytest.approx(_hand_softmax_ce([1.0, 5.0, 0.0]))


def test_logq_correction_uses_the_prefix_sampling_mass():
    cfg = tiny_config(loss={"recall_objective": "softmax"}).loss
    loss = DIGLoss(cfg, num_items=4, group_size=2)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    loss.set_sampling_distribution(p, torch.device("cpu"))
    table = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])  # items 0, 1 under prefix (0); 2, 3 under (1)
    index = CatalogPrefixIndex(table, num_codes=2, item_prob=p)
    logits = torch.tensor([[0.3, 0.7], [1.0, -1.0]])  # [L=2, N=2]: positive item 0, negative item 3
    sids = table[[0, 3]]
    got = loss.recall_per_layer(logits, torch.tensor([1.0, 0.0]), torch.ones(2), sids, True, index)
    l1 = _hand_softmax_ce([0.3, 0.7], log_q=[math.log(0.3), math.log(0.7)])  # prefix masses at depth 1
    l2 = _hand_softmax_ce([1.0, -1.0], log_q=[math.log(0.1), math.log(0.4)])  # item masses at depth 2
    torch.testing.assert_close(got, torch.tensor([l1, l2]))
    cfg.logq_correction = False
    plain = DIGLoss(cfg, num_items=4, group_size=2)
    plain.set_sampling_distribution(p, torch.device("cpu"))
    assert plain.recall_per_layer(logits, torch.tensor([1.0, 0.0]), torch.ones(2), sids, True, index)[0].item() == \
        pytest.approx(_hand_softmax_ce([0.3, 0.7]))


def test_prefix_negatives_share_exactly_the_positive_prefix_before_layer_l():
    g = torch.Generator().manual_seed(0)
    K, L, n = 4, 3, 300
    table = torch.randint(K, (n, L), generator=g)
    index = CatalogPrefixIndex(table, num_codes=K)
    pos = table[torch.randint(n, (64,), generator=g)]
    for depth in range(1, L + 1):
        items, valid = index.sample_siblings(pos, depth, 16, generator=g)
        sib = table[items]  # [64, 16, L]
        for r in range(pos.shape[0]):
            if not valid[r]:
                # no sibling: no catalog item shares c_<l and differs at c_l
                share = (table[:, : depth - 1] == pos[r, : depth - 1]).all(1)
                assert not (share & (table[:, depth - 1] != pos[r, depth - 1])).any()
                continue
            assert (sib[r, :, : depth - 1] == pos[r, : depth - 1]).all()
            assert (sib[r, :, depth - 1] != pos[r, depth - 1]).all()
    # every sibling item is reachable (uniform over the complement range)
    items, valid = index.sample_siblings(pos[:1].expand(4000, -1), 1, 1, generator=g)
    reachable = set(torch.nonzero(table[:, 0] != pos[0, 0]).flatten().tolist())
    assert set(items.flatten().tolist()) == reachable


def test_prefix_negative_term_trains_and_is_zero_before_init():
    cfg = tiny_config(loss={"recall_objective": "softmax", "prefix_negatives": 3})
    meta = tiny_meta()
    torch.manual_seed(0)
    model = DIGModel(cfg, meta)
    G = 1 + cfg.data.negatives_per_positive
    batch = make_batch(meta, B=16, R=4 * G, seed=4)
    before = model.forward_parts(batch)  # not initialised: no index, the term adds 0
    assert torch.isfinite(before.terms.recall)
    initialize(model, meta)
    with_term = model.forward_parts(batch)
    cfg_off = tiny_config(loss={"recall_objective": "softmax"})
    model.cfg = cfg_off
    torch.manual_seed(1)
    without = model.forward_parts(batch)
    assert (with_term.terms.recall_per_layer > without.terms.recall_per_layer).all()  # an extra CE >= 0 per layer
    grads = torch.autograd.grad(with_term.terms.recall, [model.sid_embedding_bags.embedding_bags["sid"].weight])
    assert grads[0].abs().sum() > 0


def test_leave_one_out_teacher_excludes_its_own_row():
    u2i = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    sids = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 2]])
    w = torch.ones(4)
    full = u2t_teacher(u2i, sids, w, num_codes=4)
    loo = u2t_teacher(u2i, sids, w, num_codes=4, leave_one_out=True)
    # layer 1: rows 0-2 share token 0
    torch.testing.assert_close(full[0, :3, 0], torch.tensor([3.0, 3.0, 3.0]))
    torch.testing.assert_close(loo[0, :3, 0], torch.tensor([4.0, 3.0, 2.0]))  # mean of the other two
    # layer 2: rows 0, 1 share (0, 0); rows 2 and 3 are alone -> 0, never their own u2i
    torch.testing.assert_close(loo[1, :, 0], torch.tensor([3.0, 1.0, 0.0, 0.0]))
    # a padding row (weight 0) is nobody's neighbour
    w2 = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loo2 = u2t_teacher(u2i, sids, w2, num_codes=4, leave_one_out=True)
    assert loo2[1, 0, 0].item() == 0.0 and loo2[0, 0, 0].item() == 5.0


def test_u2t_distillation_is_row_weighted_mse():
    hat = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # [L=1, N=2, d_c=2]
    teacher = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    assert u2t_distillation(hat, teacher, torch.tensor([1.0, 0.0])).item() == pytest.approx(2.5)


def test_train_mlp_prob_one_feeds_the_mlp_estimate():
    cfg = tiny_config(u2t={"train_mlp_prob": 1.0})
    meta = tiny_meta()
    model = initialized_model(cfg, meta)
    parts = model.forward_parts(make_batch(meta, seed=2))
    torch.testing.assert_close(parts.computed.u2t_in, parts.computed.u2t_hat.detach())
    assert not torch.allclose(parts.computed.u2t_in, parts.computed.loss_inputs.u2t_teacher)


def _hand_soft_ce(student, teacher, keep):
    """Cross-entropy of softmax(student) against softmax(teacher) over the kept columns, by hand."""
    zs = sum(math.exp(student[i]) for i in keep)
    zt = sum(math.exp(teacher[i]) for i in keep)
    return -sum(math.exp(teacher[i]) / zt * (student[i] - math.log(zs)) for i in keep)


def test_descendant_distillation_equals_hand_computation():
    """Depth-l softmax over the group's prefixes vs the softmax of the best leaf logit under each prefix."""
    cfg = tiny_config(loss={"recall_objective": "softmax"}).loss
    plain = DIGLoss(cfg, num_items=16, group_size=3)
    cfg2 = tiny_config(loss={"recall_objective": "softmax", "descendant_distill_weight": 0.5}).loss
    distil = DIGLoss(cfg2, num_items=16, group_size=3)
    # L=3, one click group: positive (1,2,3); negative 1 shares (1,2) with it; negative 2 shares nothing
    sids = torch.tensor([[1, 2, 3], [1, 2, 0], [0, 1, 1]])
    logits = torch.tensor([[0.2, 9.0, -0.4], [1.0, 9.0, 0.3], [-1.0, 2.5, 0.7]])  # [L, N]
    lab, w = torch.tensor([1.0, 0.0, 0.0]), torch.ones(3)
    got = distil.recall_per_layer(logits, lab, w, sids, grouped=True) - plain.recall_per_layer(logits, lab, w, sids,
                                                                                              grouped=True)
    # leaf logits (depth 3): -1.0, 2.5, 0.7. Depth 1 and 2: negative 1 is the positive's prefix, so that prefix's target is max(-1.0, 2.5) = 2.5
    d1 = _hand_soft_ce([0.2, 9.0, -0.4], [2.5, 2.5, 0.7], keep=[0, 2])
    d2 = _hand_soft_ce([1.0, 9.0, 0.3], [2.5, 2.5, 0.7], keep=[0, 2])
    torch.testing.assert_close(got, 0.5 * torch.tensor([d1, d2, 0.0]))
    # the teacher is stop-gradient: no gradient reaches the leaf logits through the term
    x = logits.clone().requires_grad_(True)
    (distil.recall_per_layer(x, lab, w, sids, True) - plain.recall_per_layer(x, lab, w, sids, True)).sum().backward()
    assert x.grad[2].abs().max().item() == 0.0 and x.grad[:2].abs().max().item() > 0.0


def test_descendant_distillation_reaches_the_models_recall_loss():
    """In the model, L_recall per layer = the click-group softmax + w x the distillation of the same logits."""
    cfg = tiny_config(loss={"recall_objective": "softmax", "descendant_distill_weight": 0.7})
    meta = tiny_meta()
    model = initialized_model(cfg, meta)
    G = 1 + cfg.data.negatives_per_positive
    batch = make_batch(meta, B=16, R=4 * G, seed=5)
    parts = model.forward_parts(batch)
    logits = parts.output.recall_logits.detach()  # [L, 4G]
    L = logits.shape[0]
    sids = parts.computed.sids[16:].view(4, G, L)
    same = (sids[:, 1:, :] == sids[:, :1, :]).long().cumprod(-1).permute(2, 0, 1).bool()
    valid = torch.cat([torch.ones(L, 4, 1, dtype=torch.bool), ~same], -1)
    groups = logits.view(L, 4, G)
    w = batch.retrieval_weights.view(4, G)[:, 0]
    want = sampled_softmax(groups, w, None, valid) + 0.7 * descendant_distillation(groups, valid, same, w)
    torch.testing.assert_close(parts.terms.recall_per_layer.detach(), want, rtol=1e-5, atol=1e-5)
    assert descendant_distillation(groups, valid, same, w)[:-1].min().item() > 0.0


def test_descendant_distillation_is_zero_when_prefix_scores_already_rank_like_their_leaves():
    """Minimum at student = teacher: with the depth-l logits equal to the leaf targets the gradient vanishes."""
    leaf = torch.tensor([[0.5, -0.3, 1.2, 0.0]])
    logits = torch.stack([leaf.clone(), leaf.clone(), leaf.clone()]).requires_grad_(True)  # [L=3, S=1, G=4]
    valid = torch.ones(3, 1, 4, dtype=torch.bool)
    same = torch.zeros(3, 1, 3, dtype=torch.bool)
    descendant_distillation(logits, valid, same, torch.ones(1)).sum().backward()
    assert logits.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("overrides, key", [
    (["loss.recall_objective=listwise"], "loss.recall_objective"),
    (["loss.recall_samples=exposure", "loss.recall_objective=softmax"], "loss.recall_samples"),
    (["u2t.train_mlp_prob=1.5"], "u2t.train_mlp_prob"),
    (["u2t.teacher=mean"], "u2t.teacher"),
    (["tokenizer.assignment=soft"], "tokenizer.assignment"),
    (["tokenizer.dead_code_rule=x"], "tokenizer.dead_code_rule"),
    (["loss.prefix_negatives=-1"], "loss.prefix_negatives"),
    (["loss.descendant_distill_weight=0.5", "loss.recall_objective=bce"], "loss.descendant_distill_weight"),
    (["loss.descendant_distill_weight=-1"], "loss.descendant_distill_weight"),
])
def test_bad_recall_options_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_retrieval_plus_exposure_adds_the_exposure_rows_bce():
    """loss.recall_samples=retrieval+exposure: click-group softmax plus Eq. 10's BCE on the exposure rows."""
    cfg = tiny_config(loss={"recall_objective": "softmax", "recall_samples": "retrieval+exposure",
                            "exposure_recall_weight": 0.5})
    meta = tiny_meta()
    model = initialized_model(cfg, meta)
    G = 1 + cfg.data.negatives_per_positive
    B = 16
    batch = make_batch(meta, B=B, R=4 * G, seed=3)
    parts = model.forward_parts(batch)
    logits = parts.output.recall_logits  # [L, 4G + B]: groups first, then the exposure rows
    assert logits.shape[1] == 4 * G + B
    sids = torch.cat([parts.computed.sids[B:], parts.computed.sids[:B]])
    groups = model.criterion.recall_per_layer(logits[:, :4 * G], batch.retrieval_labels, batch.retrieval_weights,
                                              sids[:4 * G], grouped=True)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 4 * G:], batch.labels[None].expand(logits.shape[0], -1), reduction="none").mean(1)
    torch.testing.assert_close(parts.terms.recall_per_layer.detach(), groups + 0.5 * bce, rtol=1e-5, atol=1e-6)

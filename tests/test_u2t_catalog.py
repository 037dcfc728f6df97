"""``u2t.inference=catalog_mean``: the recall path's u2t as the user's exact mean u2i over the
catalog items under each SID prefix (dig_torchrec/retrieval/u2t_catalog.py), checked against a
brute-force mean over the items, and wired through beam search, evaluation and validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dig_torchrec.config import apply_overrides
from dig_torchrec.data.reader import load_targets
from dig_torchrec.data.u2i import U2IFunction
from dig_torchrec.errors import ConfigError
from dig_torchrec.retrieval.beam_search import beam_search, exhaustive_leaf_search, leaves_to_items
from dig_torchrec.retrieval.evaluate import (
    UserBatchScorers,
    kjt_select_rows,
    recall_scorer,
    retrieve_topn,
)
from dig_torchrec.retrieval.sid_index import SidIndex
from dig_torchrec.retrieval.u2t_catalog import CatalogPrefixU2T, item_key_groups

from conftest import untrained_bundle


@pytest.fixture(scope="module")
def bundle(tiny_dataset, tmp_path_factory):
    # K=6, L=3: 216 leaves for 150 items, so depth-1/2 prefixes hold many items
    return untrained_bundle(tiny_dataset, tmp_path_factory.mktemp("ckpt"), "data.history_length=5",
                            "eval.user_batch_size=16", "eval.beam_size=8", "eval.topk=[10]", "tokenizer.num_codes=6",
                            "tokenizer.num_layers=3", "u2t.inference=catalog_mean")


@pytest.fixture(scope="module")
def targets(bundle):
    return load_targets(bundle.data_root, "test", bundle.schema)


def _brute_force(fn: U2IFunction, states, user: int, sids: torch.Tensor, prefix: torch.Tensor, reduce: str
                 ) -> torch.Tensor:
    under = (sids[:, : prefix.numel()] == prefix).all(1).nonzero().squeeze(1)
    u2i = fn(states, torch.full((under.numel(),), user), under).double()
    return u2i.mean(0) if reduce == "mean" else u2i.max(0).values


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_catalog_u2t_equals_the_mean_or_max_u2i_over_the_items_under_each_prefix(bundle, targets, reduce):
    fn = bundle.u2i_fn()
    cat = CatalogPrefixU2T(bundle.index, fn)
    users = torch.arange(6)
    states = targets.states.select(users)
    assert any(len(states.select(torch.tensor([u])).keys) for u in range(6))  # some users have statistics
    table = cat.for_users(states, users.numel(), reduce)
    sids = bundle.index.item_sids
    checked = 0
    for depth in range(1, bundle.index.num_layers + 1):
        prefixes = torch.unique(sids[:, :depth], dim=0)[:12]
        for u in range(users.numel()):
            got = table(torch.full((prefixes.shape[0],), u), prefixes)
            for p in range(prefixes.shape[0]):
                want = _brute_force(fn, states, u, sids, prefixes[p], reduce)
                torch.testing.assert_close(got[p].double(), want, rtol=1e-5, atol=1e-6)
                checked += 1
    assert checked > 50
    # a prefix that holds no item gets 0
    empty = torch.tensor([[bundle.index.num_codes - 1] * bundle.index.num_layers])
    if not bool(bundle.index.is_valid(torch.tensor([bundle.index.num_codes ** bundle.index.num_layers - 1]),
                                      bundle.index.num_layers)):
        assert torch.equal(table(torch.tensor([0]), empty), torch.zeros(1, fn.dim))


def test_at_a_one_item_leaf_the_catalog_mean_is_the_items_exact_u2i(bundle, targets):
    fn = bundle.u2i_fn()
    V = bundle.items.num_items
    # a collision-free index: item v's SID is v in base K
    K = 8
    L = 1
    while K ** L < V:
        L += 1
    sids = torch.stack([(torch.arange(V) // K ** (L - 1 - i)) % K for i in range(L)], 1)
    index = SidIndex(sids, K)
    assert index.collision_stats().max_items_per_leaf == 1
    states = targets.states.select(torch.arange(4))
    table = CatalogPrefixU2T(index, fn).for_users(states, 4)
    user = torch.arange(4).repeat_interleave(V)
    item = torch.arange(V).repeat(4)
    torch.testing.assert_close(table(user, sids[item]), fn(states, user, item))
    for_max = CatalogPrefixU2T(index, fn).for_users(states, 4, "max")
    torch.testing.assert_close(for_max(user, sids[item]), fn(states, user, item))


def test_key_groups_join_items_with_the_same_keys_and_ignore_key_order():
    # field 0 single-valued, field 1 a key set stored in different orders
    f0 = (torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 0, 1, 0]))
    f1 = (torch.tensor([0, 2, 4, 5, 7]), torch.tensor([5, 7, 7, 5, 5, 7, 6]))
    fake = SimpleNamespace(num_items=4, _item_keys=[f0, f1])
    rep, group = item_key_groups(fake)  # type: ignore[arg-type]
    # items 0 and 1: field 0 key 0, field 1 {5, 7} (stored 5,7 and 7,5) -> one group
    assert group[0] == group[1]
    assert len({int(group[0]), int(group[2]), int(group[3])}) == 3
    assert rep.numel() == 3 and torch.equal(group[rep], torch.arange(3))
    assert int(rep[group[1]]) == 0  # the smallest item id represents its group


def test_key_groups_give_every_item_its_own_u2i_for_every_user(bundle, targets):
    fn = bundle.u2i_fn()
    rep, group = item_key_groups(fn)
    V = bundle.items.num_items
    assert rep.numel() < V  # the catalog really is reduced (category x brand groups)
    states = targets.states.select(torch.arange(5))
    user = torch.arange(5).repeat_interleave(V)
    item = torch.arange(V).repeat(5)
    assert torch.equal(fn(states, user, item), fn(states, user, rep[group][item]))


def test_recall_scorer_feeds_the_catalog_mean_to_the_recall_path(bundle, targets):
    model = bundle.model
    idx = torch.arange(5)
    ctx = model.user_context(kjt_select_rows(targets.user_kjt, idx))
    users = bundle.catalog_u2t().for_users(targets.states.select(idx), 5)
    score = recall_scorer(model, ctx, "catalog_mean", users)
    prefix = bundle.index.item_sids[:5, :2]
    u2t = users(idx, prefix)
    want = model.recall_logits(ctx, idx, prefix, u2t_mode="mlp", u2t=u2t)
    assert torch.equal(score(idx, prefix), want)
    # the input matters: a different u2t gives different logits
    assert not torch.allclose(want, model.recall_logits(ctx, idx, prefix, u2t_mode="none"))
    with pytest.raises(ConfigError, match="catalog_mean"):
        model.recall_logits(ctx, idx, prefix, u2t_mode="catalog_mean")
    with pytest.raises(ValueError, match="catalog_mean"):
        recall_scorer(model, ctx, "catalog_mean", None)


def test_wide_beam_with_catalog_mean_equals_exhaustive_leaf_search(bundle, targets):
    idx = torch.arange(12)
    sc = UserBatchScorers(bundle, kjt_select_rows(targets.user_kjt, idx), targets.states.select(idx), 0,
                          "catalog_mean")
    index = bundle.index
    wide = beam_search(sc.recall, idx.numel(), index, index.num_codes ** index.num_layers)
    exh = exhaustive_leaf_search(sc.recall, idx.numel(), index, 10)
    assert torch.equal(leaves_to_items(wide, index, 10)[0], leaves_to_items(exh, index, 10)[0])
    # retrieve_topn serves the same lists through the config's u2t.inference=catalog_mean
    run = retrieve_topn(bundle, targets, idx, ["exhaustive"], 10, progress=False)
    assert torch.equal(run.items["exhaustive"], leaves_to_items(exh, index, 10)[0])
    mlp = retrieve_topn(bundle, targets, idx, ["exhaustive"], 10, u2t_mode="mlp", progress=False)
    assert not torch.equal(mlp.scores["exhaustive"], run.scores["exhaustive"])


def test_config_accepts_catalog_mean_and_names_the_key_on_a_typo(bundle):
    assert apply_overrides(bundle.cfg, ["u2t.inference=catalog_mean"]).u2t.inference == "catalog_mean"
    assert apply_overrides(bundle.cfg, ["u2t.inference=catalog_max"]).u2t.inference == "catalog_max"
    with pytest.raises(ConfigError, match="u2t.inference"):
        apply_overrides(bundle.cfg, ["u2t.inference=catalog"])


def test_training_validation_scores_beam_search_with_the_catalog_mean(bundle):
    from dig_torchrec.retrieval import metrics as M
    from dig_torchrec.retrieval.validation import RetrievalValidator

    cfg = apply_overrides(bundle.cfg, ["train.val_retrieval_users=60"])
    validator = RetrievalValidator(cfg, bundle.meta, bundle.schema, torch.device("cpu"))
    got = validator(bundle.model)
    valid = load_targets(bundle.data_root, "valid", bundle.schema)
    B = max(cfg.eval.beam_size, 10)
    want = {}
    for mode in ("catalog_mean", "mlp"):
        run = retrieve_topn(bundle, valid, validator.rows, ["beam"], 10, beam_size=B, u2t_mode=mode, progress=False)
        ranks = M.target_ranks(run.items["beam"], valid.target_item[validator.rows])
        want[mode] = (M.recall_at_k(ranks, 10), M.ndcg_at_k(ranks, 10))
    assert (got["recall@10"], got["ndcg@10"]) == pytest.approx(want["catalog_mean"])
    assert want["catalog_mean"] != want["mlp"]  # the two inputs rank differently, so the match above is informative


def test_catalog_max_reaches_the_recall_path_through_the_scorers(bundle, targets):
    idx = torch.arange(8)
    user_kjt, states = kjt_select_rows(targets.user_kjt, idx), targets.states.select(idx)
    mean = UserBatchScorers(bundle, user_kjt, states, 0, "catalog_mean")
    top = UserBatchScorers(bundle, user_kjt, states, 0, "catalog_max")
    users = torch.arange(8).repeat_interleave(4)
    prefix = bundle.index.valid_codes(1)[:4].repeat(8)[:, None]  # depth-1 prefixes hold many items
    want = bundle.model.recall_logits(mean.ctx, users, prefix, u2t_mode="mlp",
                                      u2t=bundle.catalog_u2t().for_users(states, 8, "max")(users, prefix))
    assert torch.equal(top.recall(users, prefix), want)
    assert not torch.allclose(top.recall(users, prefix), mean.recall(users, prefix))

"""``model.history_sid``: DIN keys carry each history item's SID-token embeddings."""

from __future__ import annotations

import torch

from dig_torchrec.model import HISTORY_SID_TABLE, DIGModel
from test_model_helpers import initialized_model, make_batch, tiny_config, tiny_meta


def _hist_sid_weight(model: DIGModel) -> torch.Tensor:
    return model.history_sid_bags.embedding_bags[HISTORY_SID_TABLE].weight


def test_history_keys_add_the_sum_of_the_history_items_sid_token_embeddings():
    meta = tiny_meta()
    model = initialized_model(tiny_config(model={"history_sid": True}), meta)
    plain = initialized_model(tiny_config(), meta)
    batch = make_batch(meta, seed=3)
    kjt = model._complete_kjt(batch.sparse_features)
    pooled = model.embedding_bags(kjt).to_dict()
    keys = model._history(kjt, pooled)
    assert keys.shape == (kjt.stride(), meta.history_length, model.embedding_dim)
    table, W = model.tokenizer.item_sid_table, _hist_sid_weight(model)
    K = model.num_codes
    for j, key in enumerate(model.history_keys):
        jt = kjt[key]
        present = (jt.lengths() > 0).nonzero().squeeze(-1)
        for row, item in zip(present.tolist(), jt.values().tolist()):
            sid = table[item]
            expected = pooled[key][row] + sum(W[l * K + int(sid[l])] for l in range(model.num_layers))
            torch.testing.assert_close(keys[row, j], expected)
        empty = (jt.lengths() == 0).nonzero().squeeze(-1)
        assert empty.numel() > 0
        assert torch.count_nonzero(keys[empty, j]) == 0
    # the flag off: DIN keys are the item_id embeddings alone, and no hist_sid table exists
    assert not hasattr(plain, "history_sid_bags")
    torch.testing.assert_close(plain._history(kjt, pooled), torch.stack([pooled[k] for k in plain.history_keys], 1))


def test_items_sharing_a_sid_share_the_sid_part_and_a_changed_sid_changes_recall_logits():
    meta = tiny_meta()
    model = initialized_model(tiny_config(model={"history_sid": True}), meta).eval()
    batch = make_batch(meta, seed=4)
    kjt = model._complete_kjt(batch.sparse_features)
    table = model.tokenizer.item_sid_table
    ctx = model.user_context(kjt)
    rows = torch.arange(kjt.stride())
    prefix = table[kjt["item_id"].values()][:, :2]
    before = model.recall_logits(ctx, rows, prefix)
    # give every history item the same SID: their SID parts become identical
    old = table.clone()
    table[:] = table[0]
    sid_part = model._history_sid_embeddings(kjt)
    mask = model._history_mask(kjt)
    shared = sid_part[mask]
    torch.testing.assert_close(shared, shared[:1].expand_as(shared))
    after = model.recall_logits(model.user_context(kjt), rows, prefix)
    assert not torch.allclose(before, after), "the recall path must see the history items' SIDs"
    table.copy_(old)


def test_before_tokenizer_init_history_sids_are_empty_and_the_table_learns_from_the_recall_loss():
    meta = tiny_meta()
    torch.manual_seed(0)
    cold = DIGModel(tiny_config(model={"history_sid": True}), meta)
    kjt = cold._complete_kjt(make_batch(meta, seed=5).sparse_features)
    assert torch.count_nonzero(cold._history_sid_embeddings(kjt)) == 0  # no SIDs before init

    model = initialized_model(tiny_config(model={"history_sid": True}), meta)
    parts = model.forward_parts(make_batch(meta, seed=5))
    W = _hist_sid_weight(model)
    (g_recall,) = torch.autograd.grad(parts.terms.recall, W, retain_graph=True)
    batch = make_batch(meta, seed=5)
    B = batch.batch_size
    offsets = torch.arange(model.num_layers) * model.num_codes
    used_rows = []
    for k in model.history_keys:  # the recall path reads the history of the retrieval rows (B..B+R)
        jt = kjt[k]
        row_of_value = torch.repeat_interleave(torch.arange(kjt.stride()), jt.lengths())
        items = jt.values()[row_of_value >= B]
        used_rows.append((model.tokenizer.item_sid_table[items] + offsets).reshape(-1))
    used = torch.unique(torch.cat(used_rows))
    assert used.numel() > 0
    assert torch.count_nonzero(g_recall[used].abs().sum(-1)) == used.numel()
    unused = torch.ones(W.shape[0], dtype=torch.bool)
    unused[used] = False
    assert torch.count_nonzero(g_recall[unused]) == 0

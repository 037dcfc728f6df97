"""``model.history_position``: a learned recency vector per history slot in the DIN keys."""

from __future__ import annotations

import torch

from dig_torchrec.data.batch import make_kjt
from dig_torchrec.modules.din import HistoryPositionEmbedding
from test_model_helpers import initialized_model, make_batch, tiny_config, tiny_meta


def _swap_history_slots(model, kjt, a: int, b: int):
    """The same rows with history slots ``a`` and ``b`` exchanged (the same clicks, another order)."""
    d = dict(kjt.to_dict())  # a copy: KJT caches the dict it returns
    ka, kb = model.history_keys[a], model.history_keys[b]
    d[ka], d[kb] = d[kb], d[ka]
    keys = kjt.keys()
    return make_kjt(keys, [d[k].values() for k in keys], [d[k].lengths() for k in keys])


def test_keys_add_the_slot_vector_and_zero_init_is_the_order_free_model():
    meta = tiny_meta()
    model = initialized_model(tiny_config(model={"history_position": True}), meta)
    plain = initialized_model(tiny_config(), meta)
    assert plain.history_position is None
    pos = model.history_position.weight
    assert pos.shape == (meta.history_length, model.embedding_dim)
    assert torch.count_nonzero(pos) == 0  # starts as the order-free model
    kjt = model._complete_kjt(make_batch(meta, seed=3).sparse_features)
    pooled = model.embedding_bags(kjt).to_dict()
    with torch.no_grad():
        pos.copy_(torch.randn_like(pos))
    keys = model._history(kjt, pooled)
    base = torch.stack([pooled[k] for k in model.history_keys], 1)
    for j in range(meta.history_length):
        torch.testing.assert_close(keys[:, j], base[:, j] + pos[j])


def test_history_order_reaches_the_recall_logits_only_with_the_flag():
    meta = tiny_meta()
    for flag in (False, True):
        model = initialized_model(tiny_config(model={"history_position": flag}), meta).eval()
        if flag:
            with torch.no_grad():
                model.history_position.weight.copy_(torch.randn_like(model.history_position.weight))
        batch = make_batch(meta, seed=4)
        kjt = model._complete_kjt(batch.sparse_features)
        swapped = _swap_history_slots(model, kjt, 0, 1)
        rows = torch.arange(kjt.stride())
        prefix = model.tokenizer.item_sid_table[kjt["item_id"].values()][:, :2]
        with torch.no_grad():
            before = model.recall_logits(model.user_context(kjt), rows, prefix)
            after = model.recall_logits(model.user_context(swapped), rows, prefix)
        both = (kjt[model.history_keys[0]].lengths() > 0) & (kjt[model.history_keys[1]].lengths() > 0)
        assert both.any()
        if flag:  # the same clicks in another order score differently where both slots hold a click
            assert not torch.allclose(before[..., both], after[..., both])
        else:  # DIN alone is order-free
            torch.testing.assert_close(before, after)


def test_the_slot_vectors_learn_from_the_recall_loss_and_reset_to_zero():
    meta = tiny_meta()
    model = initialized_model(tiny_config(model={"history_position": True}), meta)
    parts = model.forward_parts(make_batch(meta, seed=5))
    (g,) = torch.autograd.grad(parts.terms.recall, model.history_position.weight)
    assert torch.count_nonzero(g.abs().sum(-1)) == meta.history_length  # every slot gets a gradient at zero init
    # DMP materialises meta parameters as uninitialised memory and calls reset_parameters
    meta_module = HistoryPositionEmbedding(4, 8, device="meta").to_empty(device="cpu")
    meta_module.weight.data.fill_(7.0)
    meta_module.reset_parameters()
    assert torch.count_nonzero(meta_module.weight) == 0

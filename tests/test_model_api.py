"""Model construction (meta, determinism) and the inference API used by training and retrieval."""

from __future__ import annotations

import copy

import pytest
import torch

from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.schema import FeatureSchema
from dig_torchrec.model import DIGModel, DIGOutput
from dig_torchrec.modules.balanced_kmeans import collision_rate
from test_model_helpers import all_item_e_v, initialized_model, item_features, make_batch, tiny_config, tiny_meta


def _trained_model(**sections) -> DIGModel:
    meta = tiny_meta()
    model = initialized_model(tiny_config(**sections), meta)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        loss, out = model(make_batch(meta, seed=100 + step))
        loss.backward()
        opt.step()
        model.on_step_accepted(out)
    model.eval()
    return model


def test_builds_on_meta_and_cpu_init_is_deterministic():
    meta = tiny_meta()
    m = DIGModel(tiny_config(), meta, device="meta")
    assert all(p.is_meta for p in m.parameters()) and all(b.is_meta for b in m.buffers())
    tables = {c.name: c for c in m.embedding_bags.embedding_bag_configs()}
    assert set(tables) == {"user_id", "age", "hour", "item_id", "genre", "year"}
    assert tables["item_id"].feature_names == ["item_id", "hist_0", "hist_1", "hist_2", "hist_3"]
    (sid,) = m.sid_embedding_bags.embedding_bag_configs()
    assert (sid.name, sid.num_embeddings, sid.embedding_dim) == ("sid", 3 * 8, 3 * 8)  # L*K rows, F_enc*d wide
    assert sid.feature_names == ["sid_prefix_1", "sid_prefix_2", "sid_prefix_3"]
    torch.manual_seed(5)
    a = DIGModel(tiny_config(), meta)
    torch.manual_seed(5)
    b = DIGModel(tiny_config(), meta)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_output_fields_and_metrics():
    model = _trained_model()
    model.train()
    loss, out = model(make_batch(tiny_meta(), seed=1))
    assert isinstance(out, DIGOutput) and loss.requires_grad
    assert out.rank_logits.shape == (16,) and out.recall_logits.shape == (3, 20)
    assert not out.rank_logits.requires_grad and not out.losses["total"].requires_grad
    assert out.update is not None and not out.tokenizer_metrics  # a training step's metrics come with its update
    model.on_step_accepted(out)
    assert out.update is None
    for key in ("utilization_l1", "perplexity_l3", "dead_restarts_l2", "collision_rate", "init_collision_rate"):
        assert key in out.tokenizer_metrics
    assert 0.0 <= float(out.tokenizer_metrics["collision_rate"]) <= 1.0


def test_eval_forward_matches_inference_api():
    model = _trained_model()
    meta = tiny_meta()
    batch = make_batch(meta, seed=2)
    B = batch.batch_size
    parts = model.forward_parts(batch)
    out = parts.output
    assert out.recall_logits.shape == (3, B) and torch.equal(out.recall_labels, batch.labels)
    schema = FeatureSchema.from_meta(meta, meta.history_length)
    kjt = batch.sparse_features
    full = kjt.to_dict()
    from dig_torchrec.data.batch import make_kjt

    def subset(keys):  # the first B rows (exposure rows) of the given keys
        return make_kjt(keys, [full[k].values()[: int(full[k].lengths()[:B].sum())] for k in keys],
                        [full[k].lengths()[:B] for k in keys])

    ctx = model.user_context(subset(schema.user_side_keys))
    e_v = model.item_representation(subset(schema.item_features))
    idx = torch.arange(B)
    torch.testing.assert_close(model.rank_logits(ctx, idx, e_v, batch.u2i), out.rank_logits, rtol=1e-5, atol=1e-5)
    sids = model.assign_sids(e_v)
    assert torch.equal(sids, parts.computed.sids[:B])
    for l in range(1, 4):
        got = model.recall_logits(ctx, idx, sids[:, :l])
        torch.testing.assert_close(got, out.recall_logits[l - 1], rtol=1e-5, atol=1e-5)
    # a user context can serve many candidates through user_index
    rep = torch.tensor([0, 0, 1])
    torch.testing.assert_close(model.recall_logits(ctx, rep, sids[[0, 0, 1], :2]), out.recall_logits[1][[0, 0, 1]],
                               rtol=1e-5, atol=1e-5)
    for mode in ("stat_mean", "none"):
        assert model.recall_logits(ctx, idx, sids[:, :2], u2t_mode=mode).shape == (B,)


def test_full_corpus_sids_with_last_layer_resolution():
    model = _trained_model()
    meta = tiny_meta()
    items = ItemTable(item_features(meta), ["item_id", "genre", "year"], torch.zeros(meta.num_items), [])
    resolved = model.full_corpus_sids(items, batch_size=64)
    raw = model.assign_sids(all_item_e_v(model, meta))
    assert resolved.shape == (meta.num_items, 3)
    assert torch.equal(resolved[:, :2], raw[:, :2])
    assert collision_rate(resolved, 8) < collision_rate(raw, 8) or collision_rate(raw, 8) == 0
    model.cfg.tokenizer.collision_resolution = "none"
    assert torch.equal(model.full_corpus_sids(items, batch_size=64), raw)


def test_initialize_tokenizer_gives_collision_free_table_and_records_eq2_rate():
    torch.manual_seed(0)
    meta = tiny_meta()
    model = DIGModel(tiny_config(), meta)
    model.eval()
    model.initialize_tokenizer(all_item_e_v(model, meta))
    assert model.tokenizer.is_initialized
    assert collision_rate(model.tokenizer.item_sid_table, 8) == 0.0
    assert float(model.tokenizer.init_collision_rate) >= 0.0
    with pytest.raises(ValueError, match="catalog has 200 items"):
        model.initialize_tokenizer(torch.zeros(10, 24))


def test_forward_on_a_reader_batch(tiny_dataset, tiny_data_config, tiny_meta_schema):
    from dig_torchrec.data.reader import ExposureReader

    meta, schema = tiny_meta_schema
    cfg = tiny_config()
    cfg.data = tiny_data_config
    torch.manual_seed(0)
    model = DIGModel(cfg, meta)
    batch = next(iter(ExposureReader(tiny_dataset, "train", tiny_data_config, schema)))
    loss, out = model(batch)
    loss.backward()
    real = int((batch.retrieval_weights > 0).sum())
    assert 0 < real < batch.retrieval_size  # the tiny reader batch has padding slots
    assert torch.isfinite(loss) and out.recall_logits.shape == (model.num_layers, real)
    assert torch.equal(out.recall_labels, batch.retrieval_labels[batch.retrieval_weights > 0])


def test_recall_path_ignores_padding_retrieval_rows(tiny_dataset, tiny_data_config, tiny_meta_schema):
    """Weight-0 retrieval slots change neither the losses nor the BN statistics."""
    from dig_torchrec.data.reader import ExposureReader

    meta, schema = tiny_meta_schema
    cfg = tiny_config()
    cfg.data = tiny_data_config
    batch = next(iter(ExposureReader(tiny_dataset, "train", tiny_data_config, schema)))
    pad = batch.retrieval_weights == 0
    assert pad.any()
    poisoned = copy.copy(batch)
    poisoned.retrieval_u2i = batch.retrieval_u2i.clone()
    poisoned.retrieval_u2i[pad] = 1e3  # garbage in padding slots
    results = []
    real = int((~pad).sum())
    for b in (batch, poisoned):
        torch.manual_seed(0)
        model = DIGModel(cfg, meta)
        model.train()
        bn_rows = {}
        for name in ("bn_sid", "bn_u2t"):
            getattr(model, name).register_forward_hook(
                lambda mod, inp, out, name=name: bn_rows.setdefault(name, inp[0].shape[0]) and None)
        parts = model.forward_parts(b)
        model.on_step_accepted(parts.output)  # BN statistics move when the step is accepted
        # the recall BNs see L x (real retrieval rows), never a padding slot
        assert bn_rows == {"bn_sid": model.num_layers * real, "bn_u2t": model.num_layers * real}
        results.append((parts.terms.recall.detach(), parts.terms.u2t.detach(), model.bn_u2t.running_mean.clone(),
                        model.bn_u.running_mean.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

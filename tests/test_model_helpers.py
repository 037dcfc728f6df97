"""Hand-built tiny datasets and batches for the model tests (no data layer needed)."""

from __future__ import annotations

import torch

from dig_torchrec.config import DIGConfig
from dig_torchrec.data.batch import DIGBatch, make_kjt
from dig_torchrec.data.schema import DatasetMeta, FeatureSchema


def tiny_meta(num_items: int = 200, num_users: int = 50, u2i_dim: int = 3, history_length: int = 4) -> DatasetMeta:
    return DatasetMeta(
        name="unit", num_users=num_users, num_items=num_items,
        user_features={"age": 5}, context_features={"hour": 24},
        item_features={"genre": 7, "year": 9}, u2i_dim=u2i_dim, history_length=history_length,
    )


def tiny_config(**sections) -> DIGConfig:
    """Small model: d=8, K=8, L=3; ``sections`` maps 'tokenizer' -> {key: value} etc."""
    cfg = DIGConfig()
    cfg.data.history_length = 4
    cfg.model.embedding_dim = 8
    cfg.model.din_hidden = [8]
    cfg.model.cross_layers = 1
    cfg.model.num_experts = 2
    cfg.model.expert_hidden = [16, 8]
    cfg.tokenizer.num_layers = 3
    cfg.tokenizer.num_codes = 8
    cfg.tokenizer.encoder_layers = 1
    cfg.tokenizer.encoder_heads = 2
    cfg.tokenizer.init_kmeans_iters = 3
    cfg.u2t.hidden_dim = 8
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


def item_features(meta: DatasetMeta, seed: int = 0) -> torch.Tensor:
    """Deterministic static features per item: ``[num_items, 1 + #item features]`` (col 0 = item_id)."""
    g = torch.Generator().manual_seed(seed + 1000)
    cols = [torch.arange(meta.num_items)]
    for card in meta.item_features.values():
        cols.append(torch.randint(card, (meta.num_items,), generator=g))
    return torch.stack(cols, 1)


def make_batch(meta: DatasetMeta, B: int = 16, R: int = 20, seed: int = 0, pad_rows: int = 0) -> DIGBatch:
    """A random DIGBatch: B exposure rows then R retrieval rows; the last ``pad_rows`` of each have weight 0."""
    schema = FeatureSchema.from_meta(meta, meta.history_length)
    g = torch.Generator().manual_seed(seed)
    n = B + R
    feats = item_features(meta)
    item = torch.randint(meta.num_items, (n,), generator=g)
    values, lengths = [], []
    for key in schema.keys:
        if key.startswith("hist_"):
            has = torch.rand(n, generator=g) < 0.7
            values.append(torch.randint(meta.num_items, (int(has.sum()),), generator=g))
            lengths.append(has.long())
            continue
        if key == "item_id":
            v = item
        elif key in meta.item_features:
            v = feats[item, 1 + list(meta.item_features).index(key)]
        else:
            v = torch.randint(schema.cardinality[key], (n,), generator=g)
        values.append(v)
        lengths.append(torch.ones(n, dtype=torch.long))
    kjt = make_kjt(schema.keys, values, lengths)
    w = torch.ones(B)
    rw = torch.ones(R)
    if pad_rows:
        w[B - pad_rows:] = 0
        rw[R - pad_rows:] = 0
    return DIGBatch(
        sparse_features=kjt,
        u2i=torch.rand(B, meta.u2i_dim, generator=g),
        labels=(torch.rand(B, generator=g) < 0.4).float(),
        weights=w,
        retrieval_u2i=torch.rand(R, meta.u2i_dim, generator=g),
        retrieval_labels=(torch.arange(R) % 5 == 0).float(),
        retrieval_weights=rw,
    )


def item_kjt(meta: DatasetMeta, ids: torch.Tensor):
    """KJT with only the item keys for ``ids`` (what ItemTable.kjt gives)."""
    schema = FeatureSchema.from_meta(meta, meta.history_length)
    feats = item_features(meta)[ids]
    return make_kjt(schema.item_features, [feats[:, j] for j in range(feats.shape[1])],
                    [torch.ones(len(ids), dtype=torch.long)] * feats.shape[1])


def all_item_e_v(model, meta: DatasetMeta) -> torch.Tensor:
    return model.item_representation(item_kjt(meta, torch.arange(meta.num_items))).flatten(1)


def initialize(model, meta: DatasetMeta):
    """Run the balanced-tree tokenizer init on every item (eval mode), then back to training mode."""
    model.eval()
    model.initialize_tokenizer(all_item_e_v(model, meta))
    model.train()
    return model


def initialized_model(cfg: DIGConfig, meta: DatasetMeta | None = None):
    """A seeded ``DIGModel`` on ``meta`` (default :func:`tiny_meta`) with its tokenizer initialised, in training mode."""
    from dig_torchrec.model import DIGModel

    torch.manual_seed(0)
    meta = meta or tiny_meta()
    return initialize(DIGModel(cfg, meta), meta)

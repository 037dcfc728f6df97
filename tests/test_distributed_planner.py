"""Sharding constraints from the config and the planner (no process group needed)."""

from __future__ import annotations

import pytest
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
import torch

from dig_torchrec.config import ShardingConfig, TrainConfig
from dig_torchrec.distributed.planner import (
    build_constraints,
    embedding_tables,
    plan_sharding,
    plan_sharding_types,
    resolve_sharding_types,
)
from dig_torchrec.errors import ConfigError
from dig_torchrec.training.optim import attach_sparse_optimizer, sparse_optimizer_spec


class TwoCollections(nn.Module):
    """Like DIGModel: a feature EBC and a SID EBC, on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding_bags = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name="user_id", embedding_dim=8, num_embeddings=100, feature_names=["user_id"]),
                EmbeddingBagConfig(name="item_id", embedding_dim=8, num_embeddings=50, feature_names=["item_id", "hist_0"]),
            ],
            device=torch.device("meta"),
        )
        self.sid_embedding_bags = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="sid", embedding_dim=16, num_embeddings=32, feature_names=["sid_prefix_1"])],
            device=torch.device("meta"),
        )


def test_cpu_defaults_pin_every_table_to_table_wise_fused() -> None:
    model = TwoCollections()
    cons = build_constraints(ShardingConfig(), model, "cpu")
    assert set(cons) == {"user_id", "item_id", "sid"}
    for c in cons.values():
        assert c.sharding_types == ["table_wise"]
        assert c.compute_kernels == ["fused"]


def test_row_wise_on_cpu_names_the_constraint_key() -> None:
    cfg = ShardingConfig(constraints={"user_id": ["row_wise"]})
    with pytest.raises(ConfigError, match=r"sharding\.constraints\.user_id.*row_wise.*CUDA"):
        build_constraints(cfg, TwoCollections(), "cpu")
    # the same constraint is valid on CUDA
    cons = build_constraints(cfg, TwoCollections(), "cuda")
    assert cons["user_id"].sharding_types == ["row_wise"]
    assert cons["item_id"].sharding_types == ["row_wise", "table_wise"]  # cuda defaults


def test_row_wise_in_cpu_defaults_names_the_defaults_key() -> None:
    with pytest.raises(ConfigError, match=r"sharding\.cpu_sharding_types"):
        resolve_sharding_types(ShardingConfig(cpu_sharding_types=["row_wise"]), ["a"], "cpu")


def test_unknown_table_and_unknown_type_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"sharding\.constraints\.nope.*tables are: user_id, item_id, sid"):
        build_constraints(ShardingConfig(constraints={"nope": ["table_wise"]}), TwoCollections(), "cpu")
    with pytest.raises(ConfigError, match=r"unknown sharding type 'diagonal'"):
        build_constraints(ShardingConfig(constraints={"sid": ["diagonal"]}), TwoCollections(), "cpu")


def test_data_parallel_cannot_be_mixed_with_sharded_types() -> None:
    with pytest.raises(ConfigError, match=r"sharding\.constraints\.sid.*data_parallel cannot be mixed"):
        build_constraints(ShardingConfig(constraints={"sid": ["data_parallel", "table_wise"]}), TwoCollections(), "cpu")
    cons = build_constraints(ShardingConfig(constraints={"sid": ["data_parallel"]}), TwoCollections(), "cpu")
    assert cons["sid"].compute_kernels == ["dense"]


def test_dense_kernel_only_for_data_parallel_tables() -> None:
    with pytest.raises(ConfigError, match=r"sharding\.compute_kernel.*'user_id'"):
        build_constraints(ShardingConfig(compute_kernel="dense"), TwoCollections(), "cpu")


def test_sparse_adam_has_no_cpu_kernel() -> None:
    with pytest.raises(ConfigError, match=r"train\.sparse_optimizer.*'adam'.*CPU"):
        sparse_optimizer_spec(TrainConfig(sparse_optimizer="adam"), "cpu")
    cls, kwargs = sparse_optimizer_spec(TrainConfig(sparse_optimizer="adam", sparse_lr=0.01), "cuda")
    assert cls.__name__ == "Adam" and kwargs == {"lr": 0.01}


def test_plan_world_of_one_follows_constraints() -> None:
    model = TwoCollections()
    attach_sparse_optimizer(model, TrainConfig(), "cpu")
    cfg = ShardingConfig(constraints={"sid": ["data_parallel"]})
    plan = plan_sharding(model, cfg, torch.device("cpu"), world_size=1, local_world_size=1, batch_size=32)
    assert plan_sharding_types(plan) == {"user_id": "table_wise", "item_id": "table_wise", "sid": "data_parallel"}
    assert embedding_tables(model)["item_id"] == ("embedding_bags", 50, 8)


def test_config_only_check_runs_before_the_model_exists() -> None:
    from dig_torchrec.distributed.planner import check_sharding_config

    check_sharding_config(ShardingConfig(constraints={"user_id": ["column_wise"]}), "cpu")
    with pytest.raises(ConfigError, match=r"sharding\.constraints\.user_id"):
        check_sharding_config(ShardingConfig(constraints={"user_id": ["row_wise"]}), "cpu")

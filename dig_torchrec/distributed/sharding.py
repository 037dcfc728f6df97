"""Model sharding for training and serving: one :func:`shard_model` for every caller.

After torchrec's DLRM example: the model is built on ``meta``, its embedding tables get
a fused optimizer (``apply_optimizer_in_backward``; FBGEMM updates only the rows a batch
touched, and row-wise Adagrad keeps one scalar of state per row), the planner plans the
tables for the world with the config's constraints, and ``DistributedModelParallel``
shards them and wraps the dense part in DDP. The trainer, the export's resharding ranks
and the training-throughput benchmark all shard through here; the dense optimizer is the
trainer's (``training/optim.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

import torch
import torchrec.optim as trec_optim
from torch import nn
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from dig_torchrec.config import DIGConfig, TrainConfig
from dig_torchrec.distributed.env import DistEnv
from dig_torchrec.distributed.planner import default_sharders, plan_sharding
from dig_torchrec.errors import ConfigError

logger = logging.getLogger(__name__)

# train.sparse_optimizer -> (torchrec optimizer class, devices whose fused kernel supports it)
_SPARSE_OPTIMIZERS: Dict[str, Tuple[Type[torch.optim.Optimizer], Tuple[str, ...]]] = {
    "rowwise_adagrad": (trec_optim.RowWiseAdagrad, ("cpu", "cuda")),
    "sgd": (trec_optim.SGD, ("cpu", "cuda")),
    "adam": (trec_optim.Adam, ("cuda",)),  # FBGEMM's CPU TBE has no Adam
}


def sparse_optimizer_spec(cfg: TrainConfig, device_type: str) -> Tuple[Type[torch.optim.Optimizer], Dict[str, Any]]:
    """The fused optimizer class and kwargs for the embedding tables.

    Args:
        cfg: the ``train`` config section (``sparse_optimizer``, ``sparse_lr``).
        device_type: ``cpu`` or ``cuda``.
    """
    if cfg.sparse_optimizer not in _SPARSE_OPTIMIZERS:
        raise ConfigError(
            f"config key 'train.sparse_optimizer' = {cfg.sparse_optimizer!r}; must be one of {', '.join(_SPARSE_OPTIMIZERS)}"
        )
    cls, devices = _SPARSE_OPTIMIZERS[cfg.sparse_optimizer]
    if device_type not in devices:
        raise ConfigError(
            f"config key 'train.sparse_optimizer' = {cfg.sparse_optimizer!r} has no fused {device_type.upper()} kernel "
            f"in FBGEMM; on {device_type} use rowwise_adagrad or sgd"
        )
    kwargs: Dict[str, Any] = {"lr": cfg.sparse_lr}
    if cfg.sparse_optimizer == "rowwise_adagrad":
        kwargs["eps"] = 1e-8
    return cls, kwargs


def embedding_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of every EmbeddingBagCollection in ``model`` (the sparse side)."""
    params: List[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            params.extend(module.parameters())
    return params


def attach_sparse_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> None:
    """Fuse the sparse optimizer into the embedding tables' backward (before sharding).

    Args:
        model: the unsharded model (may be on ``meta``).
        cfg: the ``train`` config section.
        device_type: ``cpu`` or ``cuda``.
    """
    cls, kwargs = sparse_optimizer_spec(cfg, device_type)
    apply_optimizer_in_backward(cls, embedding_parameters(model), kwargs)


def shard_model(
    model: nn.Module,
    cfg: DIGConfig,
    env: DistEnv,
    rows_per_step: int,
    *,
    train: Optional[TrainConfig] = None,
    pooling: Optional[Mapping[str, List[float]]] = None,
) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """Fuse the sparse optimizer into ``model``'s tables, plan them for ``env``'s world and
    wrap the model in ``DistributedModelParallel``.

    Args:
        model: the unsharded model, built on ``meta``.
        cfg: its config (``sharding`` constraints; ``train`` for the sparse optimizer).
        env: this rank's distributed environment.
        rows_per_step: rows per rank and step the planner's cost model assumes.
        train: the ``train`` section whose ``sparse_optimizer`` is fused (default ``cfg.train``;
            serving passes ``sgd``, the stateless fused kernel every device has).
        pooling: ids per row of each feature for the planner (``planner.feature_pooling_factors``).

    Returns:
        The DMP-wrapped model and its sharding plan.
    """
    attach_sparse_optimizer(model, train or cfg.train, env.device.type)
    plan = plan_sharding(model, cfg.sharding, env.device, env.world_size, env.local_world_size, rows_per_step,
                         pg=env.process_group, pooling=pooling)
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(env.process_group),
        device=env.device,
        plan=plan,
        sharders=default_sharders(),
        # every dense parameter is in the graph on every step (DIGModel weights the recall-side
        # terms 0 before tokenizer init instead of dropping them), so DDP needs no unused-
        # parameter search; static_graph stays off because eval/init calls interleave with steps
        data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False, find_unused_parameters=False),
    )
    return dmp, plan

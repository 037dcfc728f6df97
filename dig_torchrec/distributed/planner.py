"""Sharding plan for DIG's embedding tables: constraints from the config, then TorchRec's planner.

Every table gets :class:`ParameterConstraints` (allowed sharding types and compute kernel):

* ``sharding.constraints[<table>]`` when the config names the table;
* on CUDA, ``[row_wise]`` for a table with at least ``sharding.cuda_row_wise_min_rows``
  rows (default 1M: the 20M-row ``user_id`` table of industrial_large spreads its rows and
  lookups over every GPU instead of loading one);
* otherwise the device default, ``sharding.cpu_sharding_types`` or
  ``sharding.cuda_sharding_types`` (the planner picks among them).

The planner's cost model gets the rows of a real step (exposure + retrieval rows) as its
batch size and one pooling factor per feature of every table (:func:`feature_pooling_factors`;
without them TorchRec counts a 21-feature table such as ``item_id`` + 20 history slots as one
lookup per sample). On CUDA the HBM per device comes from the GPU (or ``hbm_cap``).

On CPU TorchRec shards an EmbeddingBagCollection only as table_wise, column_wise,
table_column_wise or data_parallel; a row-wise type there is a :class:`ConfigError`
naming the config key. A table's types must be either all "sharded" or exactly
``data_parallel``: a table that is data-parallel in one plan and sharded in another
would store its weights and optimizer state in different layouts, and a checkpoint
could not be resharded between the two (e.g. saved on 2 ranks, loaded on 1).
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from dig_torchrec.config import ShardingConfig
from dig_torchrec.errors import ConfigError

logger = logging.getLogger(__name__)

ALL_SHARDING_TYPES: Tuple[str, ...] = tuple(
    t.value
    for t in (
        ShardingType.DATA_PARALLEL,
        ShardingType.TABLE_WISE,
        ShardingType.COLUMN_WISE,
        ShardingType.TABLE_COLUMN_WISE,
        ShardingType.ROW_WISE,
        ShardingType.TABLE_ROW_WISE,
        ShardingType.GRID_SHARD,
    )
)
# What TorchRec can shard an EmbeddingBagCollection as on CPU (row-wise kinds are CUDA only).
CPU_SHARDING_TYPES: Tuple[str, ...] = (
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.DATA_PARALLEL.value,
)
DATA_PARALLEL = ShardingType.DATA_PARALLEL.value


def embedding_tables(model: nn.Module) -> Dict[str, Tuple[str, int, int]]:
    """Every embedding table of ``model``: name -> (module path, rows, dim).

    Args:
        model: an unsharded model (may live on ``meta``).
    """
    tables: Dict[str, Tuple[str, int, int]] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            for tc in module.embedding_bag_configs():
                if tc.name in tables:
                    raise ConfigError(f"embedding table name '{tc.name}' is used by two modules ({tables[tc.name][0]}, {path})")
                tables[tc.name] = (path, tc.num_embeddings, tc.embedding_dim)
    return tables


def _check_types(key: str, types: List[str], device_type: str) -> None:
    if not types:
        raise ConfigError(f"config key '{key}' is empty; give at least one sharding type")
    for t in types:
        if t not in ALL_SHARDING_TYPES:
            raise ConfigError(f"config key '{key}': unknown sharding type {t!r}; valid: {', '.join(ALL_SHARDING_TYPES)}")
        if device_type != "cuda" and t not in CPU_SHARDING_TYPES:
            raise ConfigError(
                f"config key '{key}': sharding type {t!r} needs CUDA; on CPU use one of {', '.join(CPU_SHARDING_TYPES)}"
            )
    if DATA_PARALLEL in types and len(types) > 1:
        raise ConfigError(
            f"config key '{key}' = {types}: data_parallel cannot be mixed with sharded types, or a checkpoint "
            "could not be resharded between plans; choose data_parallel alone or only sharded types"
        )


def check_sharding_config(cfg: ShardingConfig, device_type: str) -> None:
    """Validate the sharding types of the config alone (before any data or model is loaded).

    Args:
        cfg: the ``sharding`` config section.
        device_type: ``cpu`` or ``cuda``.
    """
    defaults_key = "sharding.cuda_sharding_types" if device_type == "cuda" else "sharding.cpu_sharding_types"
    _check_types(defaults_key, list(cfg.cuda_sharding_types if device_type == "cuda" else cfg.cpu_sharding_types), device_type)
    for table, types in cfg.constraints.items():
        _check_types(f"sharding.constraints.{table}", list(types), device_type)


def resolve_sharding_types(
    cfg: ShardingConfig, table_names: Iterable[str] | Mapping[str, Tuple[str, int, int]], device_type: str
) -> Dict[str, List[str]]:
    """Allowed sharding types for every table (the pinned per-table choice).

    Args:
        cfg: the ``sharding`` config section.
        table_names: every embedding table of the model, or :func:`embedding_tables`'s
            mapping (its row counts enable the CUDA row_wise rule for big tables).
        device_type: ``cpu`` or ``cuda``.
    """
    rows = {n: v[1] for n, v in table_names.items()} if isinstance(table_names, Mapping) else {}
    names = list(table_names)
    unknown = sorted(set(cfg.constraints) - set(names))
    if unknown:
        raise ConfigError(
            f"config key 'sharding.constraints.{unknown[0]}': no embedding table of that name; tables are: {', '.join(names)}"
        )
    default_key = "sharding.cuda_sharding_types" if device_type == "cuda" else "sharding.cpu_sharding_types"
    defaults = list(cfg.cuda_sharding_types if device_type == "cuda" else cfg.cpu_sharding_types)
    out: Dict[str, List[str]] = {}
    for name in names:
        if name in cfg.constraints:
            types = list(cfg.constraints[name])
            _check_types(f"sharding.constraints.{name}", types, device_type)
        elif device_type == "cuda" and 0 < cfg.cuda_row_wise_min_rows <= rows.get(name, 0):
            types = [ShardingType.ROW_WISE.value]
        else:
            types = defaults
            _check_types(default_key, types, device_type)
        out[name] = types
    return out


def feature_pooling_factors(model: nn.Module) -> Dict[str, List[float]]:
    """Average ids per sample of every feature of every table: 1.0 each.

    Every DIG feature is a bag of at most one id (user/item/context fields, one history slot
    per ``hist_j`` feature), so 1.0 is exact for the fields and an upper bound for history
    slots; what matters to the planner is one entry per feature (TorchRec's default is one
    entry per *table*).

    Args:
        model: an unsharded model (may live on ``meta``).
    """
    out: Dict[str, List[float]] = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for tc in module.embedding_bag_configs():
                out[tc.name] = [1.0] * len(tc.feature_names)
    return out


def build_constraints(
    cfg: ShardingConfig, model: nn.Module, device_type: str,
    pooling: Optional[Mapping[str, float | Sequence[float]]] = None,
) -> Dict[str, ParameterConstraints]:
    """Planner constraints for every table of ``model``.

    Args:
        cfg: the ``sharding`` config section.
        model: the unsharded model.
        device_type: ``cpu`` or ``cuda``.
        pooling: optional average ids per sample per table: one value (the table's single
            feature) or a list with one value per feature (a planner cost hint).
    """
    tables = embedding_tables(model)
    types = resolve_sharding_types(cfg, tables, device_type)  # the mapping: row counts for the CUDA rule
    constraints: Dict[str, ParameterConstraints] = {}
    for name, allowed in types.items():
        # TorchRec runs sharded tables only with the fused (FBGEMM TBE) kernel; data-parallel
        # tables are replicated plain tensors with the dense kernel.
        if allowed == [DATA_PARALLEL]:
            kernels = [EmbeddingComputeKernel.DENSE.value]
        elif cfg.compute_kernel == "dense":
            raise ConfigError(
                f"config key 'sharding.compute_kernel' = 'dense' works only for data_parallel tables, but table "
                f"'{name}' is {'/'.join(allowed)}; use 'fused' or set sharding.constraints.{name}=[data_parallel]"
            )
        else:
            kernels = [EmbeddingComputeKernel.FUSED.value]
        c = ParameterConstraints(sharding_types=list(allowed), compute_kernels=kernels)
        if pooling and name in pooling:
            value = pooling[name]
            c.pooling_factors = [float(v) for v in value] if isinstance(value, Sequence) else [float(value)]
        constraints[name] = c
    return constraints


def default_sharders() -> List[ModuleSharder[nn.Module]]:
    """Sharders for DIG's modules: EmbeddingBagCollections only.

    The fused optimizer each table uses comes from ``apply_optimizer_in_backward`` on the
    unsharded model, which the sharder reads.
    """
    return [EmbeddingBagCollectionSharder()]  # type: ignore[list-item]


def plan_sharding(
    model: nn.Module,
    cfg: ShardingConfig,
    device: torch.device,
    world_size: int,
    local_world_size: int,
    batch_size: int,
    pg: Optional[dist.ProcessGroup] = None,
    sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
    pooling: Optional[Mapping[str, float | Sequence[float]]] = None,
    hbm_cap: Optional[int] = None,
) -> ShardingPlan:
    """Plan on rank 0 and broadcast (``collective_plan``), so every rank gets the same plan.

    Args:
        model: the unsharded model (usually on ``meta``).
        cfg: the ``sharding`` config section.
        device: this process's compute device.
        world_size: processes in the job.
        local_world_size: processes per node.
        batch_size: rows per step and rank (a planner cost hint: exposure + retrieval rows).
        pg: process group; default the world group. Without an initialised process group
            the plan is made locally (a dry run, e.g. for 16 CUDA ranks on a CPU host).
        sharders: module sharders; default :func:`default_sharders`.
        pooling: ids per sample per table / feature (:func:`feature_pooling_factors`).
        hbm_cap: bytes of HBM per GPU; default this GPU's memory (CUDA), else TorchRec's 32 GB.
    """
    constraints = build_constraints(cfg, model, device.type, pooling)
    if hbm_cap is None and device.type == "cuda" and torch.cuda.is_available():
        hbm_cap = int(torch.cuda.get_device_properties(device).total_memory)
    topology = Topology(world_size=world_size, compute_device=device.type, local_world_size=local_world_size,
                        hbm_cap=hbm_cap)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints, debug=False)
    if dist.is_initialized():
        return planner.collective_plan(model, sharders or default_sharders(), pg)
    return planner.plan(model, sharders or default_sharders())


def plan_sharding_types(plan: ShardingPlan) -> Dict[str, str]:
    """table name -> the sharding type the plan chose (recorded in checkpoints)."""
    out: Dict[str, str] = {}
    for _, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            out[table] = ps.sharding_type
    return out


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: module, table, sharding type, kernel, ranks."""
    lines = []
    for path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            lines.append(f"  {path}.{table}: {ps.sharding_type} kernel={ps.compute_kernel} ranks={ps.ranks}")
    return "sharding plan:\n" + "\n".join(lines)

"""Resharding a checkpoint for W > 1 serving ranks: W spawned gloo processes.

Each rank builds the model on ``meta``, shards it for W ranks with the training's
:func:`~dig_torchrec.distributed.sharding.shard_model`, loads its slices of the
checkpoint and writes them with ``dcp.save``; rank 0 also records the plan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Dict

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from dig_torchrec.config import DIGConfig, config_from_dict
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.distributed.env import init_distributed, shutdown
from dig_torchrec.distributed.sharding import shard_model
from dig_torchrec.errors import CheckpointError
from dig_torchrec.export.bundle import PLAN_FILE
from dig_torchrec.model import DIGModel

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reshard_worker(rank: int, world_size: int, port: int, checkpoint: str, cfg_dict: Dict[str, Any],
                    meta_dict: Dict[str, Any], out_dir: str) -> None:
    """One of W spawned ranks: plan for W, load this rank's slices, ``dcp.save`` them."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    cfg = config_from_dict(cfg_dict)
    meta = DatasetMeta(**meta_dict)
    env = init_distributed("cpu")
    try:
        model = DIGModel(cfg, meta, device="meta")
        # Serving needs no optimizer state: SGD is the stateless fused kernel every device has.
        dmp, plan = shard_model(model, cfg, env, cfg.data.batch_size, train=type(cfg.train)(sparse_optimizer="sgd"))
        state = {"model": dmp.state_dict()}
        dcp.load(state, checkpoint_id=checkpoint)
        dcp.save(state, checkpoint_id=out_dir)
        if rank == 0:
            tables = {}
            for path, module_plan in plan.plan.items():
                for table, ps in module_plan.items():  # type: ignore[union-attr]
                    tables[table] = {"module": path, "sharding_type": ps.sharding_type,
                                     "compute_kernel": ps.compute_kernel, "ranks": list(ps.ranks or [])}
            (Path(out_dir) / PLAN_FILE).write_text(json.dumps(tables, indent=2))
        dist.barrier()
    finally:
        shutdown(env)


def export_sharded(checkpoint: Path, tmp: Path, cfg: DIGConfig, meta: DatasetMeta, world_size: int) -> Dict:
    """W > 1: spawn W gloo ranks that reshard the model into ``tmp``; returns the plan record."""
    port = _free_port()
    logger.info("resharding %s for %d ranks (spawning %d gloo processes)", checkpoint, world_size, world_size)
    try:
        mp.start_processes(
            _reshard_worker,
            args=(world_size, port, str(checkpoint), cfg.to_dict(), dataclasses.asdict(meta), str(tmp)),
            nprocs=world_size, join=True, start_method="spawn",
        )
    except mp.ProcessRaisedException as e:
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        raise CheckpointError(f"resharding {checkpoint} for {world_size} ranks failed: {last}") from e
    except mp.ProcessExitedException as e:
        raise CheckpointError(f"resharding {checkpoint} for {world_size} ranks failed: a rank exited ({e})") from e
    plan_path = tmp / PLAN_FILE
    plan = json.loads(plan_path.read_text())
    plan_path.unlink()  # rewritten by the writer together with the W = 1 case
    return plan

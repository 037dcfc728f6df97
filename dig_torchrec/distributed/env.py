"""Process-group and device setup for one training process.

The same code runs as a single process, under ``torchrun`` and under TorchX
(``dist.ddp`` or ``launch/components.py:train``): the launcher exports ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them we
run as rank 0 of a world of one, still with a process group, because the planner's
``collective_plan`` and ``DistributedModelParallel`` expect one.

The backend follows the device: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dig_torchrec.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """Where this process sits in the job.

    Args:
        rank: global rank.
        world_size: number of processes in the job.
        local_rank: rank on this node (selects the CUDA device).
        local_world_size: processes on this node.
        device: the device this process computes on.
        backend: ``gloo`` or ``nccl``.
        owns_process_group: True when :func:`init_distributed` created the process group
            (so :func:`shutdown` should destroy it).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    owns_process_group: bool = False

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def process_group(self) -> dist.ProcessGroup:
        pg = dist.GroupMember.WORLD
        assert pg is not None, "process group is not initialized"
        return pg


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from e


def select_device(preference: str, local_rank: int) -> torch.device:
    """Pick the compute device for this process.

    Args:
        preference: ``train.device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        local_rank: rank on this node; selects ``cuda:<local_rank>``.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config key 'train.device' = {preference!r}; must be one of auto, cpu, cuda")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' = 'cuda' but no CUDA device is available (use train.device=cpu)")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this node has only {n} CUDA device(s); "
            f"launch at most {n} processes per node (nproc_per_node)"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def backend_for(device: torch.device) -> str:
    """gloo on CPU, nccl on CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device_preference: str = "auto", timeout_s: Optional[int] = None) -> DistEnv:
    """Join (or create) the default process group and choose the device.

    Args:
        device_preference: ``train.device`` (``auto`` | ``cpu`` | ``cuda``).
        timeout_s: collective timeout in seconds (``train.collective_timeout_s``; default 1800);
            the environment variable ``DIG_DIST_TIMEOUT_S`` overrides it.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"environment RANK={rank} is outside WORLD_SIZE={world_size}")
    device = select_device(device_preference, local_rank)
    backend = backend_for(device)
    owns = False
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            world_size = dist.get_world_size()
            rank = dist.get_rank()
        active = dist.get_backend()
        if active != backend:
            logger.warning("process group already initialized with %s (device %s prefers %s)", active, device, backend)
            backend = active
    else:
        timeout = datetime.timedelta(seconds=_env_int("DIG_DIST_TIMEOUT_S", timeout_s or 1800))
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # A world of one needs no rendezvous: an in-memory store will do.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        owns = True
    env = DistEnv(rank, world_size, local_rank, local_world_size, device, backend, owns)
    logger.info("rank %d/%d on %s (backend %s)", rank, world_size, device, backend)
    return env


def collective_device() -> torch.device:
    """Where a tensor must be for a collective of the current process group: this rank's
    GPU under nccl, else the CPU (gloo, or no process group)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown(env: DistEnv) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()

"""Is ``run_dir`` one folder for every rank? A start-up probe, and rank-0 decisions broadcast.

Checkpoints are written by every rank into ``run_dir/checkpoints/.tmp-step-N/`` and renamed
by rank 0, so a ``run_dir`` on a node-local disk silently splits a checkpoint over several
machines. :func:`check_shared_run_dir` catches that at start-up: every rank writes a probe
file named after a nonce chosen by rank 0 (stale probes of an earlier job never match), and
rank 0 checks that it sees all of them. Every rank then raises the same one-line
:class:`~dig_torchrec.errors.ConfigError`.

:func:`broadcast_from_rank0` shares a small Python value decided on rank 0 (e.g. the
checkpoint ``--resume auto`` picks), so every rank acts on one decision.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, List

import torch.distributed as dist

from dig_torchrec.errors import ConfigError

logger = logging.getLogger(__name__)

PROBE_DIR = ".rank_probe"


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_rank0(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (identity in a world of one)."""
    if _world() == 1:
        return value
    box: List[Any] = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_shared_run_dir(run_dir: str | Path) -> None:
    """Fail on every rank when ``run_dir`` is not the same folder for all ranks (a collective call).

    Args:
        run_dir: the run directory (``run_dir``).

    Raises:
        ConfigError: naming ``run_dir``, the ranks (and hosts) whose probe rank 0 cannot see.
    """
    world = _world()
    if world == 1:
        return
    rank = dist.get_rank()
    nonce = broadcast_from_rank0(uuid.uuid4().hex if rank == 0 else None)
    probe_dir = Path(run_dir) / PROBE_DIR
    host = socket.gethostname()
    error = ""
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / f"{nonce}-rank-{rank}").write_text(host)
    except OSError as e:
        error = f"rank {rank} on {host} cannot write {probe_dir}: {e.strerror or e}"
    errors = [None] * world
    dist.all_gather_object(errors, error)
    hosts = [None] * world
    dist.all_gather_object(hosts, host)
    msg = next((e for e in errors if e), "")
    if rank == 0 and not msg:
        missing = [r for r in range(world) if not (probe_dir / f"{nonce}-rank-{r}").is_file()]
        if missing:
            where = ", ".join(f"rank {r} ({hosts[r]})" for r in missing[:4]) + (" ..." if len(missing) > 4 else "")
            msg = (f"config key 'run_dir' = '{run_dir}' is not shared by all ranks: rank 0 ({host}) cannot see the "
                   f"probe files of {where}; put run_dir (and data.path) on a file system every node mounts at the "
                   f"same path (NFS, Lustre, a shared Kubernetes volume)")
    msg = broadcast_from_rank0(msg)
    dist.barrier()
    if rank == 0:  # tidy up (also probes of jobs that died before this point)
        for f in probe_dir.glob("*-rank-*"):
            try:
                f.unlink()
            except OSError:
                pass
        try:
            os.rmdir(probe_dir)
        except OSError:
            pass
    if msg:
        raise ConfigError(msg)
    logger.debug("run_dir %s is shared by all %d ranks", run_dir, world)

"""Keep replicated state that DDP does not sync identical across ranks.

DistributedModelParallel wraps the dense part in DDP with ``broadcast_buffers=False``:
gradients are averaged, but BatchNorm running statistics are updated from each rank's own
batches and drift apart. They only matter in eval mode, so we average them across ranks
right before anything reads them in eval mode or writes them out (validation,
checkpoints). Without this a checkpoint would hold whichever rank's copy DCP happened to
write, and a model loaded on another world size would not reproduce the rank-0 predictions.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import nn


def batchnorm_running_stats(model: nn.Module) -> List[torch.Tensor]:
    """running_mean / running_var of every BatchNorm in ``model``."""
    out: List[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            if m.running_mean is not None:
                out.append(m.running_mean)
            if m.running_var is not None:
                out.append(m.running_var)
    return out


@torch.no_grad()
def average_batchnorm_stats(model: nn.Module) -> None:
    """All-reduce-average BatchNorm running statistics (a collective call; no-op in a world of one).

    Args:
        model: the (DMP-wrapped) model; every rank must call this at the same point.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    stats = batchnorm_running_stats(model)
    if not stats:
        return
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for s in stats:
        n = s.numel()
        s.copy_(flat[offset : offset + n].view_as(s).to(s.dtype))
        offset += n
